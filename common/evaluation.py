"""Scoring a global model on a held-out set: metrics and the fairness audit, in one pass.

Used by the evaluator node (client/) and, when no evaluator node takes part, by the server on
its own held-out file; both must compute exactly the same numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from common.calibration import (
    UNCALIBRATED,
    PriorCalibration,
    apply_offsets,
    cross_fitted,
    cross_fitted_tempered,
    mean_log_loss,
    tempered,
)
from common.data import Encoded
from common.errors import ConfigError
from common.fairness import Audit, FairnessConfig, audit, dataset_fingerprint, prediction_summary
from common.fairness.thresholds import ThresholdPolicy, apply_thresholds, fit_and_measure
from common.tokenizer import PAD_ID

if TYPE_CHECKING:
    from common.config import RunConfig


#: The metric of the temperature-scaled probabilities' loss (common.calibration), beside the model's own ``loss``.
CALIBRATED_LOSS = "calibrated_loss"


def calibration_note(metrics: dict[str, float]) -> str:
    """What to print after a calibrated accuracy: that it is calibrated, and the model's own ("" otherwise)."""
    own = metrics.get(f"{UNCALIBRATED}accuracy")
    return "" if own is None else f" (prior-calibrated; the model's own decisions {own:.3f})"


def loss_note(metrics: dict[str, float], digits: int = 3) -> str:
    """The loss to print: the model's own, and the temperature-scaled one beside it when there is one."""
    own, scaled = metrics.get("loss", float("nan")), metrics.get(CALIBRATED_LOSS)
    return f"loss {own:.{digits}f}" + ("" if scaled is None else f" (temperature-scaled {scaled:.{digits}f})")


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 512) -> tuple[np.ndarray, float]:
    """Class probabilities for every row, and the mean cross-entropy loss (0 rows: no rows, loss 0).

    Under ``inference_mode``: no autograd graph, so scoring a held-out set costs a forward pass only.
    """
    model.eval()
    order = by_length(data.x)
    x, y = (data.x, data.y) if order is None else (data.x[order], data.y[order])
    probs, loss = [], 0.0
    with torch.inference_mode():
        for i in range(0, max(len(data), 1), batch_size):  # one (empty) pass for 0 rows: the right shape
            logits = model(x[i : i + batch_size])
            loss += nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
            probs.append(torch.softmax(logits, -1))
    out = torch.cat(probs)
    if order is not None:  # back to the rows' own order
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out.numpy(), loss / max(len(data), 1)


def by_length(x: torch.Tensor) -> torch.Tensor | None:
    """Text rows (token ids) shortest first, or None for other data. A pretrained text model pads each
    batch to its longest text, so batches of similar lengths cost a fraction of mixed ones (MiniLM on
    review snippets: most are a third of the longest); the predictions are the same."""
    if x.dim() != 2 or x.dtype != torch.int64 or len(x) < 2:
        return None
    return torch.argsort((x != PAD_ID).sum(1), stable=True)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    f1s = []
    for c in np.unique(np.concatenate([y_true, y_pred])):
        tp = np.sum((y_pred == c) & (y_true == c))
        denom = np.sum(y_pred == c) + np.sum(y_true == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s)) if f1s else math.nan  # no rows: no F1


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, loss: float) -> dict[str, float]:
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else math.nan,  # no rows: no accuracy
        "loss": float(loss),
        "macro_f1": macro_f1(y_true, y_pred),
        "n": float(len(y_true)),
    }


def evaluate(model: nn.Module, data: Encoded, batch_size: int = 512) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and macro-F1 on ``data``."""
    probs, loss = predict(model, data, batch_size)
    return _metrics(data.y.numpy(), probs.argmax(-1), loss)


def evaluate_and_audit(
    model: nn.Module,
    data: Encoded,
    fairness: FairnessConfig,
    policy: ThresholdPolicy | None = None,
    calibration: PriorCalibration | None = None,
) -> tuple[dict[str, float], Audit | None]:
    """Metrics (with what the model predicted overall) plus the fairness audit over the sensitive groups
    (binary tasks with sensitive columns). With ``policy``, of the decisions after its group thresholds;
    with ``calibration``, of the decisions after its per-class offsets and the probabilities after its
    temperature (``calibrated_loss``; the audit's calibration error and log loss), the model's own
    decisions kept as ``uncalibrated_*`` and its own loss as ``loss``."""
    probs, loss = predict(model, data)
    if calibration is None:
        return _audit_predictions(probs, loss, data, fairness, policy)
    decided, scores = apply_offsets(probs, calibration.offsets), tempered(probs, calibration.temperature)
    return _calibrated(probs, loss, data, fairness, decided, scores)


def _calibrated(
    probs: np.ndarray, loss: float, data: Encoded, fairness: FairnessConfig, decided: np.ndarray, scores: np.ndarray
) -> tuple[dict[str, float], Audit | None]:
    """Metrics and audit of calibrated decisions and scores, with the model's own accuracy, macro-F1 and loss."""
    metrics, found = _audit_predictions(scores, loss, data, fairness, decided=decided)
    own = _metrics(data.y.numpy(), probs.argmax(-1), loss)
    metrics |= {f"{UNCALIBRATED}{k}": own[k] for k in ("accuracy", "macro_f1")}
    return metrics | {CALIBRATED_LOSS: mean_log_loss(scores, data.y.numpy())}, found


def _audit_predictions(
    probs: np.ndarray,
    loss: float,
    data: Encoded,
    fairness: FairnessConfig,
    policy: ThresholdPolicy | None = None,
    decided: np.ndarray | None = None,
) -> tuple[dict[str, float], Audit | None]:
    """``decided``: the decisions to score when they are not the model's own argmax (prior calibration)."""
    y_true = data.y.numpy()
    if decided is not None:
        y_pred = decided
    else:
        y_pred = probs.argmax(-1) if policy is None else apply_thresholds(policy, probs, data.groups)
    # What the model predicted overall goes with every evaluation: the model findings (a constant or
    # skewed model) need no sensitive columns (common.fairness.model_findings).
    metrics = _metrics(y_true, y_pred, loss) | prediction_summary(y_true, y_pred, probs.shape[1])
    if probs.shape[1] != 2 or not data.groups or not len(data):  # no rows: no groups to audit
        return metrics, None
    return metrics, audit(y_true, y_pred, probs[:, 1], data.groups, fairness)


def score_held_out(
    model: nn.Module, data: Encoded, cfg: RunConfig, round_: int | None = None
) -> tuple[dict[str, float], Audit | None, ThresholdPolicy | None, PriorCalibration | None]:
    """A round's scoring of the global model on a held-out set (the evaluator's, or the server's own file):
    metrics, the fairness audit, in a thresholds run the fitted policy and with ``[evaluation]
    calibration = "prior"`` the fitted calibration — from one inference pass.

    With calibration every metric, finding and the audit describe the calibrated decisions and
    scores, each row decided with offsets and scaled with a temperature fitted on the other fold
    (``common.calibration.cross_fitted``, ``cross_fitted_tempered``); the model's own decisions are
    kept as ``uncalibrated_accuracy`` and ``uncalibrated_macro_f1``, its own loss as ``loss``."""
    probs, loss = predict(model, data)
    policy = _fit_policy(probs, data, cfg, round_)
    if cfg.evaluation.calibration != "prior" or not len(data):
        return *_audit_predictions(probs, loss, data, cfg.fairness), policy, None
    y = data.y.numpy()
    decided, calibration = cross_fitted(probs, y, cfg.data.schema_.classes, seed=cfg.seed, round_=round_)
    scores = cross_fitted_tempered(probs, y, seed=cfg.seed)
    return *_calibrated(probs, loss, data, cfg.fairness, decided, scores), policy, calibration


def threshold_policy(
    model: nn.Module, data: Encoded, cfg: RunConfig, round_: int | None = None
) -> ThresholdPolicy | None:
    """``[mitigation] method = "thresholds"``: group thresholds fitted on a calibration part of the held-out set.

    The split (``calibration_fraction`` of every group) is drawn with the run's seed, so the evaluator
    and a server scoring its own held-out file fit the same policy; ``before``/``after`` are measured on
    the other rows. None for any other method, or without rows.
    """
    if cfg.mitigation.method != "thresholds" or not len(data):
        return None
    return _fit_policy(predict(model, data)[0], data, cfg, round_)


def _fit_policy(probs: np.ndarray, data: Encoded, cfg: RunConfig, round_: int | None) -> ThresholdPolicy | None:
    m = cfg.mitigation
    attribute = cfg.mitigation_attribute
    if m.method != "thresholds" or attribute is None or not len(data):
        return None
    if attribute not in data.groups:
        raise ConfigError(
            f'mitigation method "thresholds" fits thresholds per {attribute!r}, which this held-out data does not '
            f"declare as sensitive (it has {sorted(data.groups) or 'none'})",
            where="the held-out data (evaluator node or data.evaluation_path)",
            fix=f"add {attribute!r} to the held-out data's sensitive columns (the evaluator's schema), or change "
            "mitigation.attribute",
        )
    policy = fit_and_measure(
        probs,
        data.y.numpy(),
        data.groups,
        attribute=attribute,
        constraint=m.constraint,
        strength=m.strength,
        min_group_size=cfg.fairness.min_group_size,
        calibration_fraction=m.calibration_fraction,
        seed=cfg.seed,
    )
    policy.round = round_
    return policy


def provenance(data: Encoded, source: str) -> dict[str, Any]:
    """Evaluation-set size and fingerprint, so a report names exactly what it was computed on."""
    return {
        "evaluation_size": len(data),
        "sha256": dataset_fingerprint(data.x.numpy(), data.y.numpy(), data.groups),
        "source": source,
    }
