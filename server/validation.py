"""The one reply validator: a shared envelope check, then a payload check per aggregation mode.

One bad reply must never end a run: it is classified, recorded with its reason and left out.
(Flower's own FedAvg raises ``InconsistentMessageReplies`` on a mixed set of replies.)

:class:`Envelope` checks what every reply of a round must satisfy whatever the mode: it answers a
message of this round, sent to the node that answers; it is the first answer to that message; it
is signed by the node's registered key for this run, round and message. Errors and refusals stop
there. Each round protocol then checks its own payload with :func:`check_records`,
:func:`check_metrics` and its update check (:func:`check_plain_update` for plaintext models).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common import records as R
from common.codec import PackedStateError, layout_of, record_to_numpy
from common.reply_signing import verify_reply


@dataclass
class Outcome:
    """What became of one sampled node in one round."""

    node_id: int
    status: str  # see server.store.STATUSES
    reason: str | None = None
    weight: float | None = None
    values: dict[str, Any] = field(default_factory=dict)  # record key → accounting/public value reported
    received: list[str] = field(default_factory=list)  # "record.key" of every value that left the node
    state: OrderedDict[str, np.ndarray] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "status": self.status,
            "reason": self.reason,
            "weight": self.weight,
            "values": self.values,
            "received": self.received,
        }


class Rejected(Exception):
    """A payload check failed; the message is the reason recorded for the node."""


def received_keys(content: RecordDict) -> list[str]:
    """``record.key`` of every value a node sent (``record.*`` for model tensors)."""
    out = []
    for name, record in content.items():
        out += [f"{name}.*"] if isinstance(record, ArrayRecord) else [f"{name}.{k}" for k in record.keys()]
    return out


def refusal_reason(content: RecordDict) -> str:
    """A refusal as the operator sees it: the node's code and the log id to ask its owner about."""
    ref = content[R.REFUSAL]
    rule = f" [rule {ref[R.REFUSAL_RULE]}]" if R.REFUSAL_RULE in ref else ""
    return f"{ref.get(R.REFUSAL_CODE, '?')}{rule} (node log id {ref.get(R.REFUSAL_LOG_ID, '?')})"


def check_signature(msg: Message, node_keys: dict[int, bytes], run_id: int, round_: int | None) -> Outcome | None:
    """Reject a reply not signed by the key the SuperLink registered for its node (None: it is)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return None  # Flower's own error replies carry no content to sign
    key = node_keys.get(node)
    if not key:
        return _reject(node, "no registered public key for this node; its replies cannot be verified")
    reason = verify_reply(msg.content, key, run_id, round_, msg.metadata.reply_to_message_id)
    return None if reason is None else _reject(node, reason)


def _reject(node: int, reason: str, content: RecordDict | None = None) -> Outcome:
    """A rejected reply; with ``content`` (an authentic reply), its accounting values are kept."""
    return Outcome(node, "rejected", reason, values=accounting_values(content) if content is not None else {})


#: What a node's update cost it: kept even when the payload is rejected (the node spent budget whatever the
#: server did with its update), so a node's ε counts every authentic reply (server.run_health).
_ACCOUNTING = (R.EPSILON, R.DELTA, R.EPSILON_TOTAL, R.BUDGET_EPSILON, R.BUDGET_DELTA, R.SELECTION_DELTA_RUN)


def accounting_values(content: RecordDict) -> dict[str, float]:
    """The (ε, δ) accounting values an authentic reply reports, each a finite number ≥ 0 (others left out)."""
    if R.METRICS not in content:
        return {}
    record = content[R.METRICS]
    return {
        k: float(v)
        for k in _ACCOUNTING
        if k in record
        and isinstance(v := record[k], int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and v >= 0
    }


def status_of(msg: Message) -> Outcome | None:
    """A Flower error reply or an explicit refusal, as recorded; None for a reply with a payload."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Outcome(node, "failed", f"error {msg.error.code}: {msg.error.reason}")
    if R.REFUSAL in msg.content:
        return Outcome(node, "refused", refusal_reason(msg.content), received=received_keys(msg.content))
    return None


class Envelope:
    """The checks every reply of one round passes before any mode looks at its payload.

    ``node_keys`` is None in simulation (no node authentication: every node is in one trust
    domain); in deployment every reply must be signed by its node's registered key. ``round_`` is
    None for exchanges outside a round (the role query).
    """

    def __init__(
        self, messages: Iterable[Message], node_keys: dict[int, bytes] | None, run_id: int, round_: int | None
    ) -> None:
        self._messages = list(messages)  # their ids are assigned when they are pushed
        self._sent: dict[str, int] | None = None
        self._answered: set[str] = set()
        self.node_keys, self.run_id, self.round = node_keys, run_id, round_

    def check(self, msg: Message) -> Outcome | None:
        """Why ``msg`` is left out (rejected, failed or refused), or None: check its payload."""
        if self._sent is None:
            self._sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._messages}
        node, answered = int(msg.metadata.src_node_id), msg.metadata.reply_to_message_id
        if not answered or answered not in self._sent:
            return _reject(
                node, "answers no message of " + ("this exchange" if self.round is None else f"round {self.round}")
            )
        if answered in self._answered:
            return _reject(node, "a second reply to the same message (only the first counts)")
        if node != self._sent[answered]:
            return _reject(node, f"answers a message sent to node {self._sent[answered]}")
        self._answered.add(answered)
        if self.node_keys is not None and (bad := check_signature(msg, self.node_keys, self.run_id, self.round)):
            return bad
        return status_of(msg)


def check_records(content: RecordDict, expected: set[str]) -> None:
    """Exactly the records a mode's reply carries (besides the signature), each key allow-listed."""
    names = set(content.keys()) - {R.SIGNATURE}
    if names != expected:
        raise Rejected(f"unexpected records {sorted(names)}; expected {sorted(expected)}")
    for name in names:
        allowed = R.REPLY_ALLOWLIST[name]
        extra = [] if "*" in allowed else sorted(set(content[name].keys()) - set(allowed))
        if extra:
            raise Rejected(f"{name} keys outside the reply allow-list: {extra}")


def check_values(record: Any, name: str) -> dict[str, float]:
    """Every value of an allow-listed record is a finite number ≥ 0 (accounting, public or timing)."""
    values: dict[str, float] = {}
    for key, v in record.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise Rejected(f"invalid {name}.{key}={v!r}: expected a finite number ≥ 0")
        values[key] = v
    return values


def check_metrics(content: RecordDict, max_weight: float) -> tuple[float, dict[str, float]]:
    """The declared weight in (0, ``max_weight``] and every other metric finite and ≥ 0."""
    values = check_values(content[R.METRICS], R.METRICS)
    weight = values.pop(R.NUM_EXAMPLES, None)
    if weight is None or not 0 < weight <= max_weight:
        raise Rejected(f"weight {R.NUM_EXAMPLES}={weight!r} outside (0, {max_weight:g}]")
    return float(weight), values


def update_norm(state: OrderedDict[str, np.ndarray], reference: OrderedDict[str, np.ndarray]) -> float:
    """L2 norm of (state − reference) over the float tensors."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((state[k].astype(np.float64) - ref) ** 2))
    return math.sqrt(total)


def model_norm(state: OrderedDict[str, np.ndarray]) -> float:
    """L2 norm of the float tensors of a model state."""
    return math.sqrt(
        sum(float(np.sum(v.astype(np.float64) ** 2)) for v in state.values() if np.issubdtype(v.dtype, np.floating))
    )


def check_plain_update(
    content: RecordDict, reference: OrderedDict[str, np.ndarray], max_update_norm: float | None
) -> OrderedDict[str, np.ndarray]:
    """A plaintext model with the global one's exact layout (names, shapes, dtypes), finite, within the norm bound."""
    try:  # the packed layout is checked against the global model's before any value is read
        state = record_to_numpy(content[R.ARRAYS], layout_of(reference))
    except PackedStateError as exc:
        raise Rejected(f"model state refused: {exc.what}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise Rejected(f"undecodable reply: {type(exc).__name__}") from None
    for key, arr in state.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise Rejected(f"non-finite values (NaN/Inf) in {key}")
    if max_update_norm is not None:
        norm = update_norm(state, reference)
        if norm > max_update_norm:
            raise Rejected(f"update norm {norm:.3g} exceeds server.max_update_norm={max_update_norm:g}")
    return state


def classify_reply(
    msg: Message,
    reference: OrderedDict[str, np.ndarray],
    max_weight: float,
    max_update_norm: float | None = None,
    also: frozenset[str] = frozenset(),
) -> Outcome:
    """The plaintext payload check of one reply (after its envelope): accepted with its state, or why not.

    ``also``: records the run's mode adds to every update (``mitigation-counts`` for fairfed and qfedavg).
    """
    if (status := status_of(msg)) is not None:
        return status
    node, content = int(msg.metadata.src_node_id), msg.content
    try:
        check_records(content, {R.ARRAYS, R.METRICS, *also})
        weight, values = check_metrics(content, max_weight)
        state = check_plain_update(content, reference, max_update_norm)
    except Rejected as exc:  # the envelope passed: the reply is the node's, and so is the budget it spent
        return _reject(node, str(exc), content)
    return Outcome(node, "accepted", None, weight, values, received_keys(content), state)
