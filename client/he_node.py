"""Homomorphic mode on the nodes: clients decrypt only evaluator-signed global models and send
encrypted updates; the evaluator, the model custodian, checks, decrypts, steps and re-encrypts.

A client opens its HE context (sealed to its own key by the evaluator, relayed by the server)
only if its fingerprint is the one the admin-signed run config names. It decrypts a global model
only if the evaluator's pinned key signed exactly those ciphertexts for this run and round, so the
server cannot pass one client's ciphertext off as the aggregate. It encrypts ``w·Δ`` (its declared
weight over the config's cap, ``w ≤ 1``) with the update clipped to ±B.

The evaluator recomputes the server's sum from the individual updates, each signed by a distinct
enrolled client (their reply signatures are checked again here), decrypts it, rejects an aggregate
whose norm is out of bounds (a foreign-key or bit-flipped ciphertext decrypts to garbage), applies
the step, evaluates the new model, re-encrypts and signs it. Decrypted values are rounded
(``he.decrypt_sum``) before anything derived from them leaves.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from client.node import NodeSettings
from common import he
from common import records as R
from common.codec import state_to_numpy
from common.config import RunConfig
from common.errors import FedGuardError
from common.he_custody import (
    EvaluatorKey,
    flatten_state,
    load_evaluator_key,
    open_context,
    sealed_header,
    sign_global,
    trainable_keys,
    unflatten,
    verify_global,
)
from common.kit.keys import load_node_private_key, public_line
from common.models import build_model
from common.reply_signing import key_fingerprint, verify_reply

#: Opened contexts (and the evaluator's key) per (fingerprint, key file or workdir): the executor is
#: long-lived; opening costs ~0.3 s.
_CONTEXTS: dict[tuple[str, str], Any] = {}


class HERoundRefused(FedGuardError):
    """The evaluator will not decrypt this round's sum (the round is discarded, the run goes on)."""

    code = "he-aggregate-refused"


def template(cfg: RunConfig) -> OrderedDict[str, np.ndarray]:
    """The model's structure, from the seed (public: the initial model follows from the config)."""
    torch.manual_seed(cfg.seed)
    return state_to_numpy(build_model(cfg.model.name, cfg.data.schema_, cfg.model.params))


def _node_key(settings: NodeSettings) -> bytes:
    if settings.auth_key is None:
        raise FedGuardError(
            "homomorphic mode needs the node's key (a deployment): it opens the sealed HE context",
            fix="run homomorphic federations on real nodes (`fedguard client start`), not in simulation",
        )
    return settings.auth_key.read_bytes()


def client_context(msg: Message, cfg: RunConfig, settings: NodeSettings) -> Any:
    """This node's secret HE context, opened from the blob the server relayed."""
    sealed = bytes(msg.content[R.CONFIG][R.HE_SEALED_CONTEXT])  # type: ignore[arg-type]
    expected = cfg.homomorphic.context_fingerprint
    cache_key = (expected, str(settings.auth_key))
    if cache_key not in _CONTEXTS:
        federation, node, _, _ = sealed_header(sealed)
        _CONTEXTS[cache_key] = open_context(
            sealed,
            _node_key(settings),
            federation=settings.federation or federation,
            node=settings.node_name or node,
            expected_fingerprint=expected,
        )
    return _CONTEXTS[cache_key]


def decrypt_global(
    ctx: Any, cfg: RunConfig, blobs: list[bytes], config: Any, run_uid: str, round_: int
) -> OrderedDict[str, np.ndarray]:
    """The plaintext global model, if and only if the pinned evaluator signed these ciphertexts."""
    verify_global(
        blobs,
        str(config.get(R.HE_GLOBAL_SIGNATURE, "")) or None,
        run_uid=run_uid,
        round=round_,
        evaluator_public_key_openssh=str(config.get(R.HE_EVALUATOR_KEY, "")).encode(),
        expected_key_fingerprint=cfg.homomorphic.evaluator_key,
    )
    base = template(cfg)
    keys = trainable_keys(base)
    flat, _ = he.decrypt_sum(ctx, blobs, int(sum(base[k].size for k in keys)), max_weight=1.0)
    return unflatten(flat, base, keys)


def encrypt_model(ctx: Any, cfg: RunConfig, state: OrderedDict[str, np.ndarray]) -> list[bytes]:
    """A whole model as ciphertexts with weight 1 (the global model the evaluator hands out)."""
    flat = flatten_state(state, trainable_keys(state))
    return he.encrypt_update(
        ctx, np.clip(flat, -cfg.homomorphic.bound, cfg.homomorphic.bound), 1.0, bound=cfg.homomorphic.bound
    )


def encrypt_delta(
    ctx: Any, cfg: RunConfig, new: OrderedDict[str, np.ndarray], old: OrderedDict[str, np.ndarray], weight: float
) -> tuple[list[bytes], float]:
    """``w·clip(new − old)`` as ciphertexts, and the seconds it took (recorded for the run store)."""
    keys = trainable_keys(old)
    delta = flatten_state(new, keys) - flatten_state(old, keys)
    bound = cfg.homomorphic.bound
    t0 = time.perf_counter()
    blobs = he.encrypt_update(ctx, np.clip(delta, -bound, bound), weight, bound=bound)
    return blobs, time.perf_counter() - t0


# -- the evaluator ---------------------------------------------------------------------------------


def _evaluator_key(cfg: RunConfig, settings: NodeSettings) -> EvaluatorKey:
    """The evaluator's secret context and key description, read once per executor."""
    key = (cfg.homomorphic.context_fingerprint, str(settings.workdir))
    if key not in _CONTEXTS:
        _CONTEXTS[key] = load_evaluator_key(settings.workdir, expected_fingerprint=cfg.homomorphic.context_fingerprint)
    return _CONTEXTS[key]


def evaluator_context(cfg: RunConfig, settings: NodeSettings) -> Any:
    return _evaluator_key(cfg, settings).context


def signed_global(
    ctx: Any, cfg: RunConfig, settings: NodeSettings, state: OrderedDict[str, np.ndarray], run_uid: str, round_: int
) -> tuple[ArrayRecord, str]:
    blobs = encrypt_model(ctx, cfg, state)
    sig = sign_global(blobs, run_uid=run_uid, round=round_, evaluator_private_key_openssh=_node_key(settings))
    return he.blobs_to_record(blobs), sig


def own_public_key(settings: NodeSettings) -> bytes:
    return public_line(load_node_private_key(_node_key(settings))).encode()


def aggregate(
    msg: Message, ctx: Any, cfg: RunConfig, settings: NodeSettings, run_uid: str, round_: int, flower_run: int
) -> tuple[OrderedDict[str, np.ndarray], OrderedDict[str, np.ndarray], dict[str, float]]:
    """(current global, mean update) after every check; raises :class:`HERoundRefused` otherwise."""
    content, config = msg.content, msg.content[R.CONFIG]
    current = decrypt_global(ctx, cfg, he.record_to_blobs(content[R.ARRAYS]), config, run_uid, round_ - 1)
    keys = trainable_keys(current)
    size = int(sum(current[k].size for k in keys))
    t0 = time.perf_counter()
    count = int(config["he-contributions"])  # type: ignore[arg-type]
    enrolled = set(_evaluator_key(cfg, settings).info.recipients.values()) - {key_fingerprint(own_public_key(settings))}
    updates, signers = [], set()
    for i in range(count):
        key = str(config[f"c{i}-key"]).encode()
        fp = key_fingerprint(key)
        if fp not in enrolled:
            raise HERoundRefused(f"contribution {i} is signed by {fp}, which is not an enrolled client's key")
        prefix = f"c{i}-"
        reply = RecordDict({name[len(prefix) :]: rec for name, rec in content.items() if name.startswith(prefix)})
        bad = verify_reply(reply, key, flower_run, round_, str(config[f"c{i}-reply-to"]))
        if bad is not None:
            raise HERoundRefused(f"contribution {i} ({fp}): {bad}")
        signers.add(fp)
        updates.append(he.record_to_blobs(reply[R.ARRAYS]))
    needed = int(config["he-needed"])  # type: ignore[arg-type]
    if len(signers) < max(1, needed):
        raise HERoundRefused(f"{len(signers)} distinct signed contribution(s); the round needs {needed}")
    try:
        total = he.verify_sum(ctx, updates, he.record_to_blobs(content["he-sum"]), n_params=size)
    except he.HEError as exc:
        raise HERoundRefused(f"the server's sum: {exc.what}") from None
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        mean, _ = he.decrypt_sum(ctx, total, size, max_weight=float(count))
        he.check_aggregate_norm(mean, cfg.homomorphic.bound, l2_bound=cfg.homomorphic.max_aggregate_norm)
    except he.HEError as exc:
        raise HERoundRefused(f"the decrypted aggregate was discarded: {exc.what}") from None
    timings = {R.HE_VERIFY_SECONDS: verify_s, R.HE_DECRYPT_SECONDS: time.perf_counter() - t0}
    return current, unflatten(mean, current, keys), timings
