"""Homomorphic rounds at the server: it relays, checks structure and sums ciphertexts; it never decrypts.

The server holds only the public context of the federation's CKKS key (no secret key, no Galois
keys: it can add, nothing else) and the contexts the evaluator sealed to each node, which it
relays unopened. Each round: send the evaluator-signed encrypted global model to the sampled
clients, check every encrypted update structurally (count, sizes, parameters, signature) and add
it, then send the sum with the signed contributions to the evaluator, which verifies, decrypts,
steps, evaluates, re-encrypts and signs the next global model. A round the evaluator refuses
(a foreign-key or tampered update, a forged sum) is discarded and recorded; the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import he
from common import records as R
from common.config import RunConfig
from common.errors import ConfigError, FedGuardError
from common.he_custody import load_server_bundle, trainable_keys
from common.reply_signing import key_fingerprint
from server.grid_io import Progress, collect_replies, registered_keys
from server.scoring import Score, score_from_reply
from server.store import RunStore
from server.validation import Outcome, check_signature, received_keys, refusal_reason


class EvaluatorFailed(FedGuardError):
    code = "evaluator-failed"


@dataclass
class EncryptedGlobal:
    """The current global model as the evaluator handed it out: ciphertexts and its signature."""

    record: Any  # ArrayRecord of ciphertexts
    signature: str


class HomomorphicRounds:
    """The server's side of one homomorphic run (see the module docstring)."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        state: dict[str, np.ndarray],
        evaluator: int,
        node_keys: dict[int, bytes],
        flower_run_id: int,
        progress: Progress,
    ) -> None:
        self.grid, self.cfg, self.evaluator, self.progress = grid, cfg, evaluator, progress
        self.flower_run_id = flower_run_id
        self.bundle = load_server_bundle(cfg.homomorphic.bundle)
        if self.bundle.fingerprint != cfg.homomorphic.context_fingerprint:
            raise ConfigError(
                f"the HE bundle holds context {self.bundle.fingerprint}, the signed run config names "
                f"{cfg.homomorphic.context_fingerprint}",
                where=cfg.homomorphic.bundle,
                fix="point homomorphic.bundle at the evaluator's current keygen output",
            )
        if cfg.homomorphic.bound > self.bundle.info.bound:
            raise ConfigError(
                f"homomorphic.bound {cfg.homomorphic.bound:g} exceeds the bound {self.bundle.info.bound:g} the key "
                f"was made for: sums of {self.bundle.info.max_clients} updates could overflow",
                where="homomorphic.bound",
                fix="lower homomorphic.bound, or re-run `fedguard evaluator keygen --bound` with a larger one",
            )
        self.public_ctx = self.bundle.load_context()
        self.n_params = int(sum(state[k].size for k in trainable_keys(state)))
        self.evaluator_key = node_keys[evaluator].decode()
        self.names = {fp: name for name, fp in self.bundle.info.recipients.items()}

    def describe(self) -> str:
        info = self.bundle.info
        return (
            f"homomorphic aggregation: CKKS {info.scheme}, context {info.fingerprint[:16]}…, bound {info.bound:g}, "
            f"max {info.max_clients} clients; the server holds only the public context and sums ciphertexts"
        )

    def _sealed(self, node: int, node_keys: dict[int, bytes]) -> bytes:
        fp = key_fingerprint(node_keys[node])
        return self.bundle.sealed_for(self.names.get(fp, f"unknown key {fp}"), fp)

    def _ask_evaluator(self, msg: Message, what: str) -> RecordDict:
        replies, _, _ = collect_replies(self.grid, [msg], self.cfg.server.round_timeout, self.cfg.server.poll_interval)
        if not replies:
            raise EvaluatorFailed(f"the evaluator did not answer {what} within {self.cfg.server.round_timeout:g}s")
        reply = replies[0]
        rnd = int(msg.content[R.CONFIG][R.ROUND])
        keys = registered_keys(self.grid)
        bad = check_signature(reply, keys, self.flower_run_id, rnd)
        if bad is not None:
            raise EvaluatorFailed(f"the evaluator's answer to {what} is not validly signed: {bad.reason}")
        if reply.has_error():
            raise EvaluatorFailed(f"the evaluator failed {what}: {reply.error.reason}")
        if R.REFUSAL in reply.content:
            raise EvaluatorFailed(f"the evaluator refused {what}: {refusal_reason(reply.content)}")
        return reply.content

    def _next_global(self, content: RecordDict) -> tuple[EncryptedGlobal, Score, dict[str, float]]:
        he_rec = content[R.HE]
        timings = {k: float(v) for k, v in he_rec.items() if k != R.HE_SIGNATURE and isinstance(v, int | float)}
        glob = EncryptedGlobal(content[R.ARRAYS], str(he_rec[R.HE_SIGNATURE]))
        return glob, score_from_reply(content, self.evaluator), timings

    def initial(self, base: dict[str, Any]) -> tuple[EncryptedGlobal, Score]:
        """Round 0: the evaluator encrypts and signs the initial model and scores it."""
        msg = Message(
            RecordDict({R.CONFIG: ConfigRecord({**base, R.ROUND: 0})}),
            dst_node_id=self.evaluator,
            message_type="query.he_init",
        )
        glob, score, _ = self._next_global(self._ask_evaluator(msg, "the initial model"))
        return glob, score

    def train_messages(
        self, glob: EncryptedGlobal, base: dict[str, Any], rnd: int, nodes: list[int], node_keys: dict[int, bytes]
    ) -> tuple[list[Message], list[Outcome]]:
        """A train message per node holding its own sealed context; a node without one is left out."""
        messages, skipped = [], []
        for node in nodes:
            try:
                sealed = self._sealed(node, node_keys)
            except FedGuardError as exc:
                skipped.append(Outcome(node, "failed", f"no HE context for this node: {exc.what}"))
                continue
            config = {
                **base,
                R.ROUND: rnd,
                R.HE_GLOBAL_SIGNATURE: glob.signature,
                R.HE_EVALUATOR_KEY: self.evaluator_key,
                R.HE_SEALED_CONTEXT: sealed,
            }
            content = RecordDict({R.ARRAYS: glob.record, R.CONFIG: ConfigRecord(config)})
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type="train",
                    group_id=str(rnd),
                    ttl=self.cfg.server.round_timeout,  # a node never trains for a closed round
                )
            )
        return messages, skipped

    def add_replies(
        self, replies: list[Message], node_keys: dict[int, bytes], rnd: int
    ) -> tuple[list[Outcome], he.CiphertextSum, list[tuple[int, Message]]]:
        """Check and add every encrypted update; a bad one is rejected without losing the others."""
        total = he.CiphertextSum(self.public_ctx, self.n_params, max_clients=self.bundle.info.max_clients)
        outcomes, accepted = [], []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            bad = check_signature(reply, node_keys, self.flower_run_id, rnd)
            if bad is not None:
                outcomes.append(bad)
                continue
            if reply.has_error():
                outcomes.append(Outcome(node, "failed", f"error {reply.error.code}: {reply.error.reason}"))
                continue
            content = reply.content
            if R.REFUSAL in content:
                outcomes.append(Outcome(node, "refused", refusal_reason(content), received=received_keys(content)))
                continue
            try:
                blobs = he.record_to_blobs(content[R.ARRAYS], where=f"node {node}")
                total.add(blobs, where=f"node {node}")
            except (FedGuardError, KeyError) as exc:
                reason = exc.what if isinstance(exc, FedGuardError) else f"missing record {exc}"
                outcomes.append(Outcome(node, "rejected", f"encrypted update refused: {reason}"))
                continue
            values = {k: v for k, v in content[R.METRICS].items() if isinstance(v, int | float)}
            if R.HE in content:
                values |= {k: v for k, v in content[R.HE].items() if isinstance(v, int | float)}
            values["bytes"] = sum(len(b) for b in blobs)
            outcomes.append(Outcome(node, "accepted", values=values, received=received_keys(content)))
            accepted.append((node, reply))
        return outcomes, total, accepted

    def aggregate(
        self,
        glob: EncryptedGlobal,
        total: he.CiphertextSum,
        accepted: list[tuple[int, Message]],
        node_keys: dict[int, bytes],
        base: dict[str, Any],
        rnd: int,
        needed: int,
    ) -> tuple[EncryptedGlobal, Score, dict[str, float]]:
        """Send the sum and the signed contributions to the evaluator; the next global model back."""
        t0 = time.perf_counter()
        config = {**base, R.ROUND: rnd, R.HE_EVALUATOR_KEY: self.evaluator_key}
        content = aggregate_content(glob, total.result(), accepted, node_keys, config, needed)
        sum_seconds = time.perf_counter() - t0
        msg = Message(content, dst_node_id=self.evaluator, message_type="query.he_aggregate", group_id=str(rnd))
        glob, score, timings = self._next_global(self._ask_evaluator(msg, f"round {rnd}'s aggregate"))
        return glob, score, {"server-seconds": sum_seconds, **timings}

    def round_meta(self, outcomes: list[Outcome]) -> dict[str, Any]:
        acc = [o.values for o in outcomes if o.status == "accepted"]
        info = self.bundle.info
        return {
            "homomorphic": {
                "scheme": info.scheme,
                "params": he.context_info(self.public_ctx),
                "context_fingerprint": info.fingerprint,
                "bytes_per_client": [int(v.get("bytes", 0)) for v in acc],
                "encrypt_seconds": [float(v.get(R.HE_ENCRYPT_SECONDS, 0.0)) for v in acc],
            }
        }


def aggregate_content(
    glob: EncryptedGlobal,
    total: list[bytes],
    accepted: list[tuple[int, Message]],
    node_keys: dict[int, bytes],
    config: dict[str, Any],
    needed: int,
) -> RecordDict:
    """What the evaluator needs to check a sum: the current global model (signed by itself), the
    sum, and every contribution with all its signed records, the node's key and the message it answered."""
    content = RecordDict({R.ARRAYS: glob.record, "he-sum": he.blobs_to_record(total)})
    config = {**config, R.HE_GLOBAL_SIGNATURE: glob.signature, "he-contributions": len(accepted), "he-needed": needed}
    for i, (node, reply) in enumerate(accepted):
        for name in reply.content.keys():
            content[f"c{i}-{name}"] = reply.content[name]
        config[f"c{i}-key"] = node_keys[node].decode()
        config[f"c{i}-reply-to"] = reply.metadata.reply_to_message_id
    content[R.CONFIG] = ConfigRecord(config)
    return content


def record_score(store: RunStore, run_id: int, rnd: int, score: Score) -> None:
    store.record_evaluation(run_id, rnd, score.metrics, score.audit_json, score.provenance, score.evaluated_by)
