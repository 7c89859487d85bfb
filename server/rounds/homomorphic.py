"""Homomorphic rounds at the server: it relays, checks structure and sums ciphertexts; it never decrypts.

The server holds only the public context of the federation's CKKS key (no secret key, no Galois
keys: it can add, nothing else) and the contexts the evaluator sealed to each node, which it
relays unopened. Each round: send the evaluator-signed encrypted global model to the sampled
clients, check every encrypted update (records, metrics, ciphertext count, sizes and parameters;
its envelope and signature were checked by the engine) and add it, then send the sum with the
signed contributions to the evaluator, which verifies, decrypts, steps, evaluates, re-encrypts and
signs the next global model. A round the evaluator refuses (a foreign-key or tampered update, a
forged sum) is discarded and recorded; the run goes on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from common import he
from common import records as R
from common.config import RunConfig
from common.errors import ConfigError, FedGuardError
from common.he_custody import load_server_bundle, trainable_keys
from common.reply_signing import key_fingerprint
from server.grid_io import collect_replies
from server.rounds.base import Aggregate, Federation, RoundProtocol
from server.scoring import Score, score_from_reply
from server.validation import (
    Outcome,
    Rejected,
    check_metrics,
    check_records,
    check_values,
    received_keys,
    status_of,
)


class EvaluatorFailed(FedGuardError):
    code = "evaluator-failed"


@dataclass
class EncryptedGlobal:
    """The current global model as the evaluator handed it out: ciphertexts and its signature."""

    record: Any  # ArrayRecord of ciphertexts
    signature: str


class HomomorphicRounds(RoundProtocol):
    """The server's side of one homomorphic run (see the module docstring)."""

    mode: ClassVar[str] = "homomorphic"

    def __init__(self, fed: Federation, state: OrderedDict[str, np.ndarray]) -> None:
        super().__init__(fed, state)
        cfg = self.cfg
        if fed.evaluator is None:
            raise ConfigError(
                "homomorphic mode needs the enrolled evaluator node: it holds the key and steps the model",
                fix="start the evaluator (`fedguard evaluator start`) before the run",
            )
        self.evaluator = fed.evaluator
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
        self.evaluator_key = (fed.node_keys or {})[self.evaluator].decode()
        self.names = {fp: name for name, fp in self.bundle.info.recipients.items()}
        self.glob: EncryptedGlobal | None = None
        self._score: Score | None = None
        self._begin_intake()

    @classmethod
    def check_supported(cls, cfg: RunConfig, *, simulated: bool, resuming: bool) -> None:
        if simulated or resuming:
            raise ConfigError(
                "homomorphic aggregation runs on a deployment (nodes open their sealed HE contexts with their own "
                "keys) and cannot resume a run (the server holds no plaintext model to checkpoint)",
                where="secure_aggregation",
                fix='deploy real nodes (`fedguard demo --he` shows how), or set secure_aggregation = "none"',
            )

    def describe(self) -> str:
        info = self.bundle.info
        return (
            f"homomorphic aggregation: CKKS {info.scheme}, context {info.fingerprint[:16]}…, bound {info.bound:g}, "
            f"max {info.max_clients} clients; the server holds only the public context and sums ciphertexts"
        )

    def start(self, resuming: bool) -> Score:
        """Round 0: the evaluator encrypts and signs the initial model and scores it."""
        msg = Message(
            RecordDict({R.CONFIG: ConfigRecord({**self.fed.base, R.ROUND: 0})}),
            dst_node_id=self.evaluator,
            message_type="query.he_init",
        )
        self.glob, score, _ = self._next_global(self._ask_evaluator(msg, "the initial model"))
        return score

    def configure_train(self, rnd: int, nodes: list[int]) -> tuple[list[Message], list[Outcome]]:
        """A train message per node holding its own sealed context; a node without one is left out."""
        assert self.glob is not None, "start() hands out the first encrypted global model"
        self._begin_intake()
        messages, skipped = [], []
        for node in nodes:
            try:
                sealed = self._sealed(node)
            except FedGuardError as exc:
                skipped.append(Outcome(node, "failed", f"no HE context for this node: {exc.what}"))
                continue
            config = {
                **self.fed.base,
                R.ROUND: rnd,
                R.HE_GLOBAL_SIGNATURE: self.glob.signature,
                R.HE_EVALUATOR_KEY: self.evaluator_key,
                R.HE_SEALED_CONTEXT: sealed,
            }
            content = RecordDict({R.ARRAYS: self.glob.record, R.CONFIG: ConfigRecord(config)})
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

    def accept(self, reply: Message) -> Outcome:
        """The same record, metric and finiteness checks as a plaintext reply, then the ciphertext checks."""
        if (status := status_of(reply)) is not None:
            return status
        t0 = time.perf_counter()
        node, content = int(reply.metadata.src_node_id), reply.content
        try:
            check_records(content, {R.ARRAYS, R.METRICS, R.HE})
            _, values = check_metrics(content, self.cfg.server.max_weight)
            values |= check_values(content[R.HE], R.HE)
            if set(content[R.HE].keys()) != {R.HE_ENCRYPT_SECONDS}:
                raise Rejected(f"he record of a client update carries {sorted(content[R.HE].keys())}")
            blobs = he.record_to_blobs(content[R.ARRAYS], where=f"node {node}")
            self.total.add(blobs, where=f"node {node}")
        except Rejected as exc:
            return Outcome(node, "rejected", str(exc))
        except FedGuardError as exc:
            return Outcome(node, "rejected", f"encrypted update refused: {exc.what}")
        finally:
            self._sum_seconds += time.perf_counter() - t0
        values["bytes"] = sum(len(b) for b in blobs)
        self.accepted.append((node, reply))
        return Outcome(node, "accepted", values=values, received=received_keys(content))

    def aggregate(self, rnd: int, outcomes: list[Outcome], needed: int) -> Aggregate:
        """Send the sum and the signed contributions to the evaluator; the next global model back."""
        assert self.glob is not None
        meta = self._round_meta(outcomes)
        t0 = time.perf_counter()
        config = {**self.fed.base, R.ROUND: rnd, R.HE_EVALUATOR_KEY: self.evaluator_key}
        content = aggregate_content(
            self.glob, self.total.result(), self.accepted, self.fed.node_keys or {}, config, needed
        )
        server_seconds = time.perf_counter() - t0
        msg = Message(content, dst_node_id=self.evaluator, message_type="query.he_aggregate", group_id=str(rnd))
        try:
            self.glob, self._score, timings = self._next_global(self._ask_evaluator(msg, f"round {rnd}'s aggregate"))
        except EvaluatorFailed as exc:  # e.g. a foreign-key update: the round is discarded
            return Aggregate(False, discarded=exc.what, meta=meta)
        meta["homomorphic"] |= {"sum_seconds": self._sum_seconds, "server-seconds": server_seconds, **timings}
        return Aggregate(True, meta=meta)

    def conclude(self, rnd: int, updated: bool) -> Score | None:
        """The evaluator's score of the model it decrypted; the server holds no plaintext to checkpoint."""
        score, self._score = self._score, None
        return score if updated else None

    def _begin_intake(self) -> None:
        # This round's running sum, and the signed contributions the evaluator recomputes it from.
        self.total = he.CiphertextSum(self.public_ctx, self.n_params, max_clients=self.bundle.info.max_clients)
        self.accepted: list[tuple[int, Message]] = []
        self._sum_seconds = 0.0

    def _sealed(self, node: int) -> bytes:
        fp = key_fingerprint((self.fed.node_keys or {})[node])
        return self.bundle.sealed_for(self.names.get(fp, f"unknown key {fp}"), fp)

    def _ask_evaluator(self, msg: Message, what: str) -> RecordDict:
        """The evaluator's reply, through the same envelope check as every training reply."""
        fed, rnd = self.fed, int(msg.content[R.CONFIG][R.ROUND])
        gate = fed.envelope([msg], rnd)
        replies, _, _ = collect_replies(fed.grid, [msg], self.cfg.server.round_timeout, self.cfg.server.poll_interval)
        if not replies:
            raise EvaluatorFailed(f"the evaluator did not answer {what} within {self.cfg.server.round_timeout:g}s")
        if (left_out := gate.check(replies[0])) is not None:
            raise EvaluatorFailed(f"the evaluator's answer to {what} was {left_out.status}: {left_out.reason}")
        return replies[0].content

    def _next_global(self, content: RecordDict) -> tuple[EncryptedGlobal, Score, dict[str, float]]:
        he_rec = content[R.HE]
        timings = {k: float(v) for k, v in he_rec.items() if k != R.HE_SIGNATURE and isinstance(v, int | float)}
        glob = EncryptedGlobal(content[R.ARRAYS], str(he_rec[R.HE_SIGNATURE]))
        return glob, score_from_reply(content, self.evaluator), timings

    def _round_meta(self, outcomes: list[Outcome]) -> dict[str, Any]:
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
