"""The node's side of ``[mitigation]``: its noised counts, and its records' reweighing weights.

Every count leaves through ``NodePrivacy.release_counts(..., mitigation=True)``: one Gaussian release,
reserved in the ledger before the noise is drawn, planned with the run's DP-SGD rounds (so the run's
ε covers it). Groups below the larger of the run's and the owner's minimum size never leave.
Weights arrive from the server and are checked here, fail closed: a weight outside (0, 1] would
let one record move a DP-SGD step by more than the clipping norm.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import ConfigRecord, Message

from client.node import NodeSettings, node_logger
from client.privacy import NodePrivacy, Spend
from common import records as R
from common.config import RunConfig
from common.data import Encoded
from common.errors import FedGuardError
from common.evaluation import predict
from common.fairness import Counts, NoisyCounts, group_confusion_counts
from common.fairness.mitigation import WeightTable, fallback_weight


class MitigationRefused(FedGuardError):
    code = "mitigation-invalid"


def _min_size(cfg: RunConfig, settings: NodeSettings) -> int:
    return max(cfg.fairness.min_group_size, settings.policy.min_group_size if settings.policy else 1)


def _groups(data: Encoded, attribute: str) -> dict[str, np.ndarray]:
    if attribute not in data.groups:
        raise MitigationRefused(
            f"the mitigation attribute {attribute!r} is not a sensitive column of this node's data",
            fix="list it under data.schema.sensitive in the node's schema",
        )
    return {attribute: data.groups[attribute]}


def label_counts(data: Encoded, cfg: RunConfig, settings: NodeSettings) -> Counts:
    """Group × label counts of the training split (the confusion table of a perfect predictor)."""
    attribute = cfg.mitigation_attribute
    assert attribute is not None
    y = data.y.numpy()
    return group_confusion_counts(y, y, _groups(data, attribute), _min_size(cfg, settings), intersections=[])


def model_counts(model: torch.nn.Module, data: Encoded, cfg: RunConfig, settings: NodeSettings) -> Counts:
    """Confusion counts of ``model`` per group of the mitigation attribute on ``data`` (all the node's rows)."""
    attribute = cfg.mitigation_attribute
    assert attribute is not None
    probs, _ = predict(model, data)
    groups = _groups(data, attribute)
    return group_confusion_counts(data.y.numpy(), probs.argmax(-1), groups, _min_size(cfg, settings), intersections=[])


def release(
    privacy: NodePrivacy, counts: Counts, msg: Message, cfg: RunConfig, settings: NodeSettings, round_: int, what: str
) -> tuple[ConfigRecord, Spend]:
    """Noise ``counts`` as one charged release; the record the reply carries, and what it cost."""
    noisy, spend = privacy.release_counts(
        counts,
        round_=round_,
        message_id=f"{msg.metadata.message_id or ''}:{what}" if msg.metadata.message_id else None,
        min_group_size=_min_size(cfg, settings),
        mitigation=True,
    )
    node_logger(settings.workdir).info(
        "round %s: released noised %s of %d group(s) (σ=%.1f per cell); ε this run %.3f",
        round_,
        what,
        len(noisy.counts.get(cfg.mitigation_attribute or "", {})),
        noisy.sigma,
        spend.epsilon_run,
    )
    return _record(noisy), spend


def _record(noisy: NoisyCounts) -> ConfigRecord:
    return ConfigRecord(
        {
            R.COUNTS_JSON: json.dumps(noisy.counts),
            R.COUNT_SIGMA: noisy.sigma,
            R.COUNT_THRESHOLD: noisy.threshold,
            R.COUNT_SELECTION_DELTA: noisy.selection_delta,
        }
    )


def received_weights(msg: Message) -> WeightTable | None:
    """The reweighing table the server sent, checked: group → class index → weight in (0, 1]."""
    raw = msg.content[R.CONFIG].get(R.REWEIGHING_JSON)
    if raw is None:
        return None
    try:
        table = json.loads(str(raw))
        ok = isinstance(table, dict) and all(
            isinstance(row, dict)
            and all(isinstance(w, int | float) and math.isfinite(w) and 0.0 < w <= 1.0 for w in row.values())
            for row in table.values()
        )
    except (json.JSONDecodeError, RecursionError):
        ok = False
    if not ok:
        raise MitigationRefused(
            "the reweighing weights the server sent are not a table of weights in (0, 1]; nothing was trained",
            fix="the server must send weights scaled so the largest is 1 (a larger one would break the DP bound)",
        )
    return {str(g): {str(c): float(w) for c, w in row.items()} for g, row in table.items()}


def record_weights(data: Encoded, cfg: RunConfig, table: WeightTable) -> torch.Tensor:
    """Each training record's weight from its group and label; a group not in the table gets its mean."""
    attribute = cfg.mitigation_attribute
    assert attribute is not None
    groups = _groups(data, attribute)[attribute].astype(str)
    fallback = fallback_weight(table)
    labels = data.y.numpy()
    w = [table.get(g, {}).get(str(int(y)), fallback) for g, y in zip(groups, labels, strict=True)]
    return torch.tensor(w, dtype=torch.float32)
