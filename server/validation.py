"""Check every reply before it can touch the global model.

One bad reply must never end a run: it is classified, recorded with its reason and left out.
(Flower's own FedAvg raises ``InconsistentMessageReplies`` on a mixed set of replies.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common import records as R
from common.codec import record_to_numpy
from common.reply_signing import verify_reply

#: Accounting and public values a train reply may carry besides its weight (all numeric, ≥ 0).
_METRIC_KEYS = [k for k in R.REPLY_ALLOWLIST[R.METRICS] if k != R.NUM_EXAMPLES]


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


def _reject(node: int, reason: str) -> Outcome:
    return Outcome(node, "rejected", reason)


def update_norm(state: OrderedDict[str, np.ndarray], reference: OrderedDict[str, np.ndarray]) -> float:
    """L2 norm of (state − reference) over the float tensors."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((state[k].astype(np.float64) - ref) ** 2))
    return math.sqrt(total)


def classify_reply(
    msg: Message,
    reference: OrderedDict[str, np.ndarray],
    max_weight: float,
    max_update_norm: float | None = None,
) -> Outcome:
    """Accept a reply only if it matches the global model exactly in structure, is finite and in bounds."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Outcome(node, "failed", f"error {msg.error.code}: {msg.error.reason}")
    content = msg.content
    if R.REFUSAL in content:
        return Outcome(node, "refused", refusal_reason(content), received=received_keys(content))
    names = set(content.keys()) - {R.SIGNATURE}
    if names != {R.ARRAYS, R.METRICS}:
        return _reject(node, f"unexpected records {sorted(names)}; expected {[R.ARRAYS, R.METRICS]}")
    try:
        state = record_to_numpy(content[R.ARRAYS])
        metrics = dict(content[R.METRICS])
    except (TypeError, ValueError, KeyError) as exc:
        return _reject(node, f"undecodable reply: {type(exc).__name__}")
    missing, extra = set(reference) - set(state), set(state) - set(reference)
    if missing or extra:
        return _reject(node, f"tensor keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for key, ref in reference.items():
        arr = state[key]
        if arr.shape != ref.shape:
            return _reject(node, f"wrong shape for {key}: {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            return _reject(node, f"wrong dtype for {key}: {arr.dtype}, expected {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return _reject(node, f"non-finite values (NaN/Inf) in {key}")
    if max_update_norm is not None:
        norm = update_norm(state, reference)
        if norm > max_update_norm:
            return _reject(node, f"update norm {norm:.3g} exceeds server.max_update_norm={max_update_norm:g}")
    weight = metrics.get(R.NUM_EXAMPLES)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or not 0 < weight <= max_weight:
        return _reject(node, f"weight {R.NUM_EXAMPLES}={weight!r} outside (0, {max_weight:g}]")
    unexpected = sorted(set(metrics) - set(R.REPLY_ALLOWLIST[R.METRICS]))
    if unexpected:
        return _reject(node, f"metrics outside the reply allow-list: {unexpected}")
    values: dict[str, Any] = {}
    for key in _METRIC_KEYS:
        v = metrics.get(key)
        if v is not None:
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                return _reject(node, f"invalid {key}={v!r}")
            values[key] = v
    return Outcome(node, "accepted", None, float(weight), values, received_keys(content), state)
