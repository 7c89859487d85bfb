"""Threshold secure aggregation rounds at the server: it routes keys and sealed shares and learns only the sum.

Each round attempt (a fresh random session): the sampled nodes advertise per-round public keys
and their declared weights; the server broadcasts them, and each node answers with its self-mask
seed and mask key Shamir-shared t of n, every share sealed for one peer, which the server routes
unopened inside the train messages. Each train reply is the node's masked, quantized, weighted
update (its ledger was charged before it left, as in plaintext mode); the server adds the vectors
mod 2^32 as they arrive. Then it asks the contributors for the shares that remove the masks —
self-mask shares of the nodes whose vectors arrived, mask-key shares of those that dropped before
sending — reconstructs, unmasks, dequantizes, divides by the summed weight and takes the same
server optimizer step as plaintext mode. With fewer than t shares the round is discarded with its
reason. Every key, share and masked update is a reply checked by the shared envelope (signed by
the node's enrolled key for this run, round and message, first reply only).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import records as R
from common import secagg as S
from common.codec import numpy_to_record
from common.config import RunConfig
from common.he_custody import trainable_keys
from common.optimizers import describe as describe_optimizer
from server.grid_io import collect_replies
from server.rounds.base import Aggregate, Federation
from server.rounds.plaintext import PlaintextRounds
from server.validation import Outcome, Rejected, check_metrics, check_records, received_keys, status_of


@dataclass
class Session:
    """One round attempt's public state at the server: keys, routed shares, the running masked sum."""

    id: str
    threshold: int
    sampled: int
    pk1: dict[int, bytes] = field(default_factory=dict)
    pk2: dict[int, bytes] = field(default_factory=dict)
    weights: dict[int, int] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)  # nodes whose sealed shares were routed (they mask)
    total: np.ndarray | None = None
    contributors: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def weight_max(self) -> int:
        return max(self.weights[n] for n in self.shared)


class SecAggRounds(PlaintextRounds):
    """FedAvg over masked updates: plaintext mode's model, optimizer and checkpoints, without seeing an update."""

    mode: ClassVar[str] = "secagg"

    def __init__(self, fed: Federation, state: OrderedDict[str, np.ndarray]) -> None:
        super().__init__(fed, state)
        self.keys = trainable_keys(state)
        self.length = int(sum(state[k].size for k in self.keys)) + 1  # the values, then the weight
        self.session: Session | None = None

    @classmethod
    def check_supported(cls, cfg: RunConfig, *, simulated: bool, resuming: bool) -> None:
        S.check_config(cfg)

    def describe(self) -> str:
        cfg = self.cfg
        t = S.threshold(cfg, cfg.clients_per_round)
        return (
            f"threshold secure aggregation (SecAgg): t = {t} of {cfg.clients_per_round} nodes per round; the server "
            f"routes sealed shares and learns only the sum; server optimizer {describe_optimizer(cfg.server.optimizer)}"
        )

    # -- before training: keys and sealed shares ----------------------------------------------------
    def configure_train(self, rnd: int, nodes: list[int]) -> tuple[list[Message], list[Outcome]]:
        """Keys, then sealed shares, then one train message per node carrying the shares sealed for it."""
        t0 = time.perf_counter()
        s = self.session = Session(secrets.token_hex(16), S.threshold(self.cfg, len(nodes)), len(nodes))
        left_out = self._advertise(rnd, nodes)
        if len(s.pk1) < s.threshold:
            return [], left_out + self._not_started(sorted(s.pk1), f"{len(s.pk1)} node(s) advertised keys", s)
        routed, more = self._distribute(rnd)
        left_out += more
        if len(s.shared) < s.threshold:
            return [], left_out + self._not_started(s.shared, f"{len(s.shared)} node(s) shared keys", s)
        s.total = np.zeros(self.length, dtype=np.uint32)
        arrays = numpy_to_record(self.state)
        messages = [self._train_message(rnd, node, arrays, routed[node]) for node in s.shared]
        s.seconds += time.perf_counter() - t0
        return messages, left_out

    def _advertise(self, rnd: int, nodes: list[int]) -> list[Outcome]:
        """Step 1: every node's two public keys and declared weight."""
        s = self.session
        assert s is not None
        answers, left_out = self._exchange(rnd, nodes, "query.secagg_keys", "key advertisement", lambda n: {})
        for node, rec in answers.items():
            if (bad := self._take_keys(s, node, rec)) is not None:
                left_out.append(Outcome(node, "rejected", f"key advertisement: {bad}"))
        return left_out

    def _distribute(self, rnd: int) -> tuple[dict[int, list[tuple[int, bytes]]], list[Outcome]]:
        """Step 2: broadcast the keys; route each sealed share to its peer (destination → [(source, ciphertext)])."""
        s = self.session
        assert s is not None
        advertised = sorted(s.pk1)
        keys = {
            S.PEERS: advertised,
            S.PEER_PK1: [s.pk1[n] for n in advertised],
            S.PEER_PK2: [s.pk2[n] for n in advertised],
            S.THRESHOLD: s.threshold,
        }
        answers, left_out = self._exchange(rnd, advertised, "query.secagg_shares", "share distribution", lambda n: keys)
        routed: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        for node, rec in answers.items():
            dsts, ciphertexts = [int(d) for d in rec.get(S.DSTS, [])], list(rec.get(S.CIPHERTEXTS, []))
            if sorted(dsts) != [n for n in advertised if n != node] or len(ciphertexts) != len(dsts):
                left_out.append(Outcome(node, "rejected", "share distribution: not one sealed share per peer"))
                continue
            s.shared.append(node)
            for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
                routed[dst].append((node, bytes(ciphertext)))
        s.shared.sort()
        return routed, left_out

    def _train_message(self, rnd: int, node: int, arrays: Any, routed: list[tuple[int, bytes]]) -> Message:
        """Step 3: the global model and the shares the round's other contributors sealed for ``node``."""
        s = self.session
        assert s is not None
        forwarded = [(src, ct) for src, ct in routed if src in s.shared]
        config = {
            **self.fed.base,
            R.ROUND: rnd,
            S.SESSION: s.id,
            S.PEERS: s.shared,
            S.SRCS: [src for src, _ in forwarded],
            S.FORWARDED: [ct for _, ct in forwarded],
            S.WEIGHT_MAX: float(s.weight_max),
        }
        return Message(
            RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(config)}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(rnd),
            ttl=self.cfg.server.round_timeout,  # a node never trains for a closed round
        )

    def _take_keys(self, s: Session, node: int, rec: Any) -> str | None:
        try:
            pk1, pk2, weight = bytes(rec[S.PK1]), bytes(rec[S.PK2]), rec[S.WEIGHT]
            S.check_public_key(pk1, "the mask key")
            S.check_public_key(pk2, "the encryption key")
        except (KeyError, TypeError) as exc:
            return f"malformed keys ({type(exc).__name__})"
        except S.SecAggError as exc:
            return exc.what
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= self.cfg.server.max_weight:
            return f"declared weight {weight!r} is not an integer in (0, {self.cfg.server.max_weight:g}]"
        if {pk1, pk2} & (set(s.pk1.values()) | set(s.pk2.values())) or pk1 == pk2:
            return "a public key another node (or this one) already advertised"
        s.pk1[node], s.pk2[node], s.weights[node] = pk1, pk2, weight
        return None

    @staticmethod
    def _not_started(nodes: list[int], why: str, s: Session) -> list[Outcome]:
        reason = f"round not started: only {why}; t={s.threshold} are needed to unmask"
        return [Outcome(n, "failed", reason) for n in nodes]

    # -- the masked updates ---------------------------------------------------------------------
    def accept(self, reply: Message) -> Outcome:
        """The same record and metric checks as a plaintext reply; the masked vector joins the running sum."""
        if (status := status_of(reply)) is not None:
            return status
        s, node, content = self.session, int(reply.metadata.src_node_id), reply.content
        assert s is not None and s.total is not None
        try:
            check_records(content, {S.SECAGG_MASKED, R.METRICS})
            weight, values = check_metrics(content, self.cfg.server.max_weight)
            if weight != s.weights.get(node):
                raise Rejected(f"weight {weight:g} differs from the {s.weights.get(node)} it announced")
            record = content[S.SECAGG_MASKED]
            if list(record.keys()) != [S.MASKED_VECTOR]:
                raise Rejected(f"masked update carries {sorted(record.keys())}, expected [{S.MASKED_VECTOR!r}]")
            vector = record[S.MASKED_VECTOR].numpy()
            if vector.dtype != np.uint32 or vector.shape != (self.length,):
                raise Rejected(f"masked update is {vector.dtype} {vector.shape}, expected uint32 ({self.length},)")
        except Rejected as exc:
            return Outcome(node, "rejected", str(exc))
        except (TypeError, ValueError) as exc:
            return Outcome(node, "rejected", f"undecodable masked update ({type(exc).__name__})")
        s.total += vector  # mod 2^32: uint32 wraps
        s.contributors.append(node)
        return Outcome(node, "accepted", None, weight, values, received_keys(content))

    # -- unmask, decode, step ---------------------------------------------------------------------
    def aggregate(self, rnd: int, outcomes: list[Outcome], needed: int) -> Aggregate:
        s = self.session
        assert s is not None and s.total is not None
        survivors = sorted(s.contributors)
        dropped = sorted(set(s.shared) - set(survivors))
        info: dict[str, Any] = {
            "threshold": s.threshold,
            "sampled": s.sampled,
            "advertised": len(s.pk1),
            "shared": len(s.shared),
            "contributors": len(survivors),
            "dropped_before_sending": len(dropped),
        }
        meta = {"secagg": info}
        least = max(s.threshold, self.cfg.server.min_replies)
        if len(survivors) < least:
            why = f"{len(survivors)} masked update(s) arrived; unmasking needs {least} (t and server.min_replies)"
            return Aggregate(False, discarded=why, meta=meta)
        t0 = time.perf_counter()
        b_shares, sk_shares, answered, left_out = self._collect_shares(rnd, survivors, dropped)
        info |= {"unmask_answers": len(answered), "recovered_from_shares": len(set(survivors) - set(answered))}
        if len(answered) < s.threshold:
            reasons = "; ".join(f"node {o.node_id} {o.status}: {o.reason}" for o in left_out)
            why = f"only {len(answered)} node(s) revealed shares; t={s.threshold} are needed"
            return Aggregate(False, discarded=why + (f" ({reasons})" if reasons else ""), meta=meta)
        try:
            mean_delta, weight_sum = self._unmask(s, survivors, dropped, b_shares, sk_shares)
        except S.SecAggError as exc:
            return Aggregate(False, discarded=exc.what, meta=meta)
        self._note_recovered(outcomes, set(survivors) - set(answered))
        self.state = self.optimizer.step(self.state, S.mean_state(self.state, mean_delta, self.keys))
        info["error_bound"] = S.error_bound(self.cfg, len(survivors), weight_sum / s.weight_max)
        info["exchange_seconds"] = s.seconds + time.perf_counter() - t0  # wall: the extra exchanges, unmasking
        return Aggregate(True, meta=meta)

    def _collect_shares(
        self, rnd: int, survivors: list[int], dropped: list[int]
    ) -> tuple[dict[int, list[bytes]], dict[int, list[bytes]], list[int], list[Outcome]]:
        """Step 4: each contributor's shares: self-mask seeds of the survivors, mask keys of the dropouts."""
        asks = {S.SURVIVORS: survivors, S.DROPPED: dropped}
        answers, left_out = self._exchange(rnd, survivors, "query.secagg_unmask", "unmask", lambda n: asks)
        b_shares: dict[int, list[bytes]] = defaultdict(list)
        sk_shares: dict[int, list[bytes]] = defaultdict(list)
        kinds_asked = ["b"] * len(survivors) + ["sk"] * len(dropped)
        for node, rec in answers.items():
            nodes, kinds, shares = (
                [int(n) for n in rec.get(S.SHARE_NODES, [])],
                rec.get(S.SHARE_KINDS, []),
                rec.get(S.SHARES, []),
            )
            if nodes != survivors + dropped or list(kinds) != kinds_asked or len(shares) != len(nodes):
                left_out.append(Outcome(node, "rejected", "unmask: shares for other nodes than asked"))
                continue
            for owner, kind, share in zip(nodes, kinds, shares, strict=True):
                (b_shares if kind == "b" else sk_shares)[owner].append(bytes(share))
        answered = sorted(set(answers) - {o.node_id for o in left_out})
        return b_shares, sk_shares, answered, left_out

    def _unmask(
        self,
        s: Session,
        survivors: list[int],
        dropped: list[int],
        b_shares: dict[int, list[bytes]],
        sk_shares: dict[int, list[bytes]],
    ) -> tuple[np.ndarray, int]:
        """The weighted mean update and the summed weight; SecAggError when the masks do not come off."""
        assert s.total is not None
        seeds = {n: S.reconstruct(b_shares[n], s.threshold, f"node {n}'s self-mask seed") for n in survivors}
        gone = {n: S.reconstruct(sk_shares[n], s.threshold, f"node {n}'s mask key") for n in dropped}
        try:
            plain = S.unmask(s.total, s.id, seeds, gone, {n: s.pk1[n] for n in survivors})
        except ValueError as exc:  # a rebuilt mask key that is no key: a node sent a wrong share
            raise S.SecAggError(f"a reconstructed mask key is unusable ({type(exc).__name__})") from None
        sa = self.cfg.secagg
        mean_delta, weight_sum = S.decode(plain, len(survivors), s.weight_max, sa.clipping_range, sa.quantization_range)
        declared = sum(s.weights[n] for n in survivors)
        if weight_sum != declared:
            raise S.SecAggError(f"the unmasked weight sum {weight_sum} is not the declared {declared}: masks remain")
        return mean_delta, weight_sum

    @staticmethod
    def _note_recovered(outcomes: list[Outcome], recovered: set[int]) -> None:
        for o in outcomes:
            if o.node_id in recovered and o.status == "accepted":
                o.reason = "did not answer the unmask request; its update was unmasked from t peers' shares"

    # -- one exchange -----------------------------------------------------------------------------
    def _exchange(
        self, rnd: int, nodes: list[int], kind: str, step: str, extra: Callable[[int], dict[str, Any]]
    ) -> tuple[dict[int, Any], list[Outcome]]:
        """Send one protocol message per node; each reply through the envelope and the record allow-list.

        Returns node → its secagg record, and an outcome for every node left out (with the step's name).
        """
        s, fed = self.session, self.fed
        assert s is not None
        query_timeout, poll = fed.timeouts
        messages = [
            Message(
                RecordDict({R.CONFIG: ConfigRecord({**fed.base, R.ROUND: rnd, S.SESSION: s.id, **extra(n)})}),
                dst_node_id=n,
                message_type=kind,
                group_id=str(rnd),
                ttl=query_timeout,
            )
            for n in nodes
        ]
        gate = fed.envelope(messages, rnd)
        answers: dict[int, Any] = {}
        left_out: list[Outcome] = []

        def take(reply: Message) -> None:
            node = int(reply.metadata.src_node_id)
            if (bad := gate.check(reply)) is not None:
                left_out.append(Outcome(bad.node_id, bad.status, f"{step}: {bad.reason}", received=bad.received))
                return
            try:
                check_records(reply.content, {S.SECAGG})
            except Rejected as exc:
                left_out.append(Outcome(node, "rejected", f"{step}: {exc}"))
                return
            answers[node] = reply.content[S.SECAGG]

        lost: dict[int, str] = {}
        _, silent, unreachable = collect_replies(fed.grid, messages, query_timeout, poll, on_reply=take, lost=lost)
        no_reply = f"no reply within {query_timeout:g}s"
        left_out += [Outcome(n, "dropped", f"{step}: {lost.get(n) or no_reply}") for n in sorted(silent)]
        left_out += [Outcome(n, "failed", f"{step}: the message could not be delivered") for n in sorted(unreachable)]
        return answers, left_out
