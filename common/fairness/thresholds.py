"""Group-specific decision thresholds: post-processing a binary model for demographic parity or equalized odds.

The evaluator fits a :class:`ThresholdPolicy` on a calibration part of its held-out set and measures
it (``before``/``after``) on the rest; ``fedguard evaluate --thresholds`` applies it. A row is
predicted positive when its positive-class probability is *above* its group's threshold, so the
default threshold 0.5 reproduces the model's own decision (argmax) exactly.

Method (deterministic thresholds; fairlearn's ``ThresholdOptimizer`` randomizes between two
thresholds per group to hit a rate exactly, which makes one row's prediction depend on a coin flip:
we keep one threshold per group and accept hitting a rate only up to the group's granularity).
For each group large enough to measure, the candidate thresholds are the midpoints between its
distinct calibration scores (at most ``MAX_CANDIDATES``, by quantiles), 0, 1 and the default; each
group starts at the default threshold's point and moves ``strength`` of the way to a common target:

- ``demographic_parity``: the target is one selection rate for every group, the one (on a grid of
  rates) whose per-group thresholds give the highest calibration accuracy at full strength;
- ``equalized_odds``: the target is one (TPR, FPR) point, taken from the pooled ROC curve, the one
  whose per-group thresholds (each group's nearest point in max-norm) leave the smallest
  equalized-odds difference, with ties (within ``EO_TOLERANCE``) broken by accuracy. A single
  threshold per group cannot always reach a common point: what is left is reported in ``after``.

Each group then takes the threshold whose point is nearest its target (ties: higher accuracy, then
nearer the default). Groups with fewer than ``min_group_size`` calibration rows, and groups the
calibration part does not hold, get the default threshold. numpy only (fairlearn is a test
dependency that this is compared against, never a runtime one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import FedGuardError
from common.fairness.config import FairnessConfig
from common.fairness.metrics import audit
from common.json_files import parse_json_file, read_json_file

FORMAT: Literal["fedguard-threshold-policy/1"] = "fedguard-threshold-policy/1"
DEFAULT_THRESHOLD = 0.5
MAX_CANDIDATES = 400  # per group; quantiles beyond that (a threshold finer than 1/400 of a group moves little)
RATE_GRID = 201  # demographic parity: target selection rates 0, 0.005, ..., 1
ROC_POINTS = 200  # equalized odds: pooled-ROC points tried as the common target
EO_TOLERANCE = 0.01  # equalized odds: gaps this close to the smallest count as equal; accuracy decides

Constraint = Literal["demographic_parity", "equalized_odds"]


def prediction_time_note(attribute: str) -> str:
    return (
        f"These thresholds differ by {attribute!r}: applying them needs every row's {attribute!r} at prediction "
        "time, so whoever uses the model must collect and process that sensitive attribute (check that this is "
        "lawful and wanted for the decision at hand)."
    )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupRates(_Model):
    size: int
    selection_rate: float
    tpr: float | None  # None: the group has no positives
    fpr: float | None  # None: the group has no negatives


class Summary(_Model):
    """Decisions of the model on the test part (rows not used for fitting), before or after the thresholds."""

    rows: int
    accuracy: float
    groups: dict[str, GroupRates | None]  # None: suppressed (fewer than min_group_size rows)
    demographic_parity_ratio: float | None  # None: fewer than two groups to compare
    demographic_parity_difference: float | None
    equalized_odds_difference: float | None


class ThresholdPolicy(_Model):
    """Per-group thresholds on the positive-class probability, and what they did on held-out rows."""

    format: Literal["fedguard-threshold-policy/1"] = FORMAT
    attribute: str
    constraint: Constraint
    strength: float = Field(ge=0.0, le=1.0)
    thresholds: dict[str, float]
    default_threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    suppressed: list[str] = Field(default_factory=list, description="groups too small to fit: default threshold")
    calibration_rows: int = Field(ge=0)
    min_group_size: int = Field(ge=1)
    round: int | None = None  # the round of the model the thresholds were fitted for
    rule: str = "positive when the positive-class probability is above the row's group threshold"
    before: Summary | None = None
    after: Summary | None = None
    note: str = ""

    def threshold_for(self, group: str) -> float:
        return self.thresholds.get(group, self.default_threshold)


# -- fitting -------------------------------------------------------------------------------------


@dataclass
class _Curve:
    """One group's decisions at every candidate threshold (ascending)."""

    thresholds: np.ndarray
    selection: np.ndarray
    tpr: np.ndarray  # NaN when the group has no positives
    fpr: np.ndarray  # NaN when the group has no negatives
    correct: np.ndarray
    default: int  # index of the default threshold

    @classmethod
    def of(cls, s: np.ndarray, y: np.ndarray, default: float) -> _Curve:
        u = np.unique(s)
        if u.size > MAX_CANDIDATES:
            u = np.unique(np.quantile(s, np.linspace(0.0, 1.0, MAX_CANDIDATES)))
        t = np.unique(np.concatenate([[0.0, default, 1.0], (u[:-1] + u[1:]) / 2]))
        pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
        tp = pos.size - np.searchsorted(pos, t, side="right")
        fp = neg.size - np.searchsorted(neg, t, side="right")
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = tp / pos.size if pos.size else np.full(t.size, np.nan)
            fpr = fp / neg.size if neg.size else np.full(t.size, np.nan)
        return cls(t, (tp + fp) / s.size, tpr, fpr, tp + neg.size - fp, int(np.searchsorted(t, default)))

    def pick(self, distance: np.ndarray) -> int:
        """The nearest candidate; ties: more correct decisions, then nearer the default threshold."""
        nearness = np.abs(self.thresholds - self.thresholds[self.default])
        return int(np.lexsort((nearness, -self.correct, np.round(distance, 12)))[0])

    def point(self, i: int) -> tuple[float, float]:
        return float(self.tpr[i]), float(self.fpr[i])


def _rate_picks(curves: Mapping[str, _Curve], targets: Mapping[str, float]) -> dict[str, int]:
    return {g: c.pick(np.abs(c.selection - targets[g])) for g, c in curves.items()}


def _roc_distance(c: _Curve, tpr: float, fpr: float) -> np.ndarray:
    """Max-norm distance of every candidate's (TPR, FPR) to a point; an undefined rate does not count."""
    d = np.fmax(np.abs(c.tpr - tpr), np.abs(c.fpr - fpr))  # fmax ignores one NaN
    return np.nan_to_num(d, nan=0.0)


def _roc_picks(curves: Mapping[str, _Curve], targets: Mapping[str, tuple[float, float]]) -> dict[str, int]:
    return {g: c.pick(_roc_distance(c, *targets[g])) for g, c in curves.items()}


def _eo_gap(curves: Mapping[str, _Curve], picks: Mapping[str, int]) -> float:
    tprs = [c.tpr[picks[g]] for g, c in curves.items() if not np.isnan(c.tpr[picks[g]])]
    fprs = [c.fpr[picks[g]] for g, c in curves.items() if not np.isnan(c.fpr[picks[g]])]
    spread = [max(v) - min(v) for v in (tprs, fprs) if v]
    return float(max(spread)) if spread else 0.0


def _correct(curves: Mapping[str, _Curve], picks: Mapping[str, int]) -> int:
    return int(sum(c.correct[picks[g]] for g, c in curves.items()))


def _demographic_parity(curves: Mapping[str, _Curve], strength: float) -> dict[str, int]:
    start = {g: float(c.selection[c.default]) for g, c in curves.items()}
    best_rate, best = 0.0, -1
    for rate in np.linspace(0.0, 1.0, RATE_GRID):
        correct = _correct(curves, _rate_picks(curves, dict.fromkeys(curves, float(rate))))
        if correct > best:
            best_rate, best = float(rate), correct
    return _rate_picks(curves, {g: r + strength * (best_rate - r) for g, r in start.items()})


def _equalized_odds(curves: Mapping[str, _Curve], scores: np.ndarray, y: np.ndarray, strength: float) -> dict[str, int]:
    pooled = _Curve.of(scores, y, DEFAULT_THRESHOLD)
    idx = np.unique(np.linspace(0, pooled.thresholds.size - 1, min(ROC_POINTS, pooled.thresholds.size)).astype(int))
    tried = []
    for i in idx:
        common = pooled.point(int(i))
        picks = _roc_picks(curves, dict.fromkeys(curves, common))
        tried.append((_eo_gap(curves, picks), _correct(curves, picks), common))
    smallest = min(gap for gap, _, _ in tried)
    _, _, (tpr, fpr) = max((t for t in tried if t[0] <= smallest + EO_TOLERANCE), key=lambda t: t[1])

    def target(c: _Curve) -> tuple[float, float]:
        t0, f0 = c.point(c.default)  # an undefined start stays undefined and is ignored by the distance
        return t0 + strength * (tpr - t0), f0 + strength * (fpr - f0)

    return _roc_picks(curves, {g: target(c) for g, c in curves.items()})


def _positive(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim != 1:
        raise ValueError(f"scores must be positive-class probabilities, shape (n,) or (n, 2); got {s.shape}")
    if s.size and (np.isnan(s).any() or s.min() < 0.0 or s.max() > 1.0):
        raise ValueError("scores must be probabilities in [0, 1]")
    return s


def _group_column(groups: Mapping[str, np.ndarray | Sequence[object]], attribute: str, n: int) -> np.ndarray:
    if attribute not in groups:
        raise FedGuardError(
            f"the threshold policy is for the sensitive attribute {attribute!r}, which the data does not have "
            f"(it has {sorted(groups) or 'no sensitive columns'})",
            fix=f"use a schema that declares {attribute!r} as a sensitive column: the thresholds need every row's "
            f"{attribute!r} at prediction time",
        )
    keys = np.asarray(groups[attribute]).astype(str)
    if keys.shape != (n,):
        raise ValueError(f"{attribute!r} has {keys.size} values for {n} scores")
    return keys


def fit_thresholds(
    scores: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[int],
    groups: Mapping[str, np.ndarray | Sequence[object]],
    *,
    attribute: str,
    constraint: Constraint = "demographic_parity",
    strength: float = 1.0,
    min_group_size: int = 20,
) -> ThresholdPolicy:
    """Fit per-group thresholds on these (calibration) rows; ``before``/``after`` are left for :func:`measure`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength is the fraction of the gap closed, in [0, 1]; got {strength}")
    s = _positive(scores)
    labels = np.asarray(y).astype(np.int64)
    keys = _group_column(groups, attribute, s.size)
    if labels.shape != s.shape or not np.isin(labels, (0, 1)).all():
        raise ValueError("y must hold one 0/1 label per score")
    present, sizes = np.unique(keys, return_counts=True)
    fit = [str(g) for g, n in zip(present, sizes, strict=True) if n >= min_group_size]
    curves = {g: _Curve.of(s[keys == g], labels[keys == g], DEFAULT_THRESHOLD) for g in fit}
    if len(curves) < 2:  # nothing to equalize: every group keeps the model's own decision
        picks = {g: c.default for g, c in curves.items()}
    elif constraint == "demographic_parity":
        picks = _demographic_parity(curves, strength)
    else:
        rows = np.isin(keys, fit)
        picks = _equalized_odds(curves, s[rows], labels[rows], strength)
    return ThresholdPolicy(
        attribute=attribute,
        constraint=constraint,
        strength=strength,
        thresholds={g: float(c.thresholds[picks[g]]) for g, c in curves.items()},
        suppressed=sorted(str(g) for g in present if str(g) not in curves),
        calibration_rows=int(s.size),
        min_group_size=min_group_size,
        note=prediction_time_note(attribute),
    )


# -- applying and measuring ----------------------------------------------------------------------


def apply_thresholds(
    policy: ThresholdPolicy, scores: np.ndarray | Sequence[float], groups: Mapping[str, np.ndarray | Sequence[object]]
) -> np.ndarray:
    """0/1 predictions: positive when the score is above the row's group threshold (unknown group: the default)."""
    s = _positive(scores)
    keys = _group_column(groups, policy.attribute, s.size)
    cut = np.full(s.size, policy.default_threshold)
    for group, threshold in policy.thresholds.items():
        cut[keys == group] = threshold
    return (s > cut).astype(np.int64)


def summarize(y: np.ndarray | Sequence[int], y_pred: np.ndarray, groups: np.ndarray, min_group_size: int) -> Summary:
    """Accuracy, per-group rates and the gaps, from the audit's own (fairlearn-checked) metrics."""
    cfg = FairnessConfig(min_group_size=min_group_size, bootstrap_n=0, intersections=[])
    att = audit(y, y_pred, None, {"a": groups}, cfg)
    a = att.attributes[0]
    rates = {
        g.group: None
        if g.suppressed or g.size is None or g.selection_rate is None
        else GroupRates(size=g.size, selection_rate=g.selection_rate, tpr=g.tpr, fpr=g.fpr)
        for g in a.groups
    }
    d = a.disparities
    return Summary(
        rows=att.overall.n,
        accuracy=att.overall.accuracy,
        groups=rates,
        demographic_parity_ratio=d.demographic_parity_ratio.value if d else None,
        demographic_parity_difference=d.demographic_parity_difference.value if d else None,
        equalized_odds_difference=d.equalized_odds_difference.value if d else None,
    )


def calibration_split(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of calibration rows: ``fraction`` of every group, drawn with ``seed`` (the rest: test part)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(groups.size, dtype=bool)
    for g in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == g))
        mask[rows[: int(round(fraction * rows.size))]] = True
    return mask


def fit_and_measure(
    scores: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[int],
    groups: Mapping[str, np.ndarray | Sequence[object]],
    *,
    attribute: str,
    constraint: Constraint = "demographic_parity",
    strength: float = 1.0,
    min_group_size: int = 20,
    calibration_fraction: float = 0.5,
    seed: int = 0,
) -> ThresholdPolicy:
    """Split the rows (per group, seeded), fit on the calibration part, measure before/after on the test part."""
    s = _positive(scores)
    labels = np.asarray(y).astype(np.int64)
    keys = _group_column(groups, attribute, s.size)
    calib = calibration_split(keys, calibration_fraction, seed)
    policy = fit_thresholds(
        s[calib],
        labels[calib],
        {attribute: keys[calib]},
        attribute=attribute,
        constraint=constraint,
        strength=strength,
        min_group_size=min_group_size,
    )
    test = ~calib
    if test.any():
        t_scores, t_keys = s[test], {attribute: keys[test]}
        before = (t_scores > DEFAULT_THRESHOLD).astype(np.int64)
        after = apply_thresholds(policy, t_scores, t_keys)
        policy.before = summarize(labels[test], before, keys[test], min_group_size)
        policy.after = summarize(labels[test], after, keys[test], min_group_size)
    return policy


# -- files ---------------------------------------------------------------------------------------


def policy_from_json(text: str | bytes, where: str) -> ThresholdPolicy:
    """Parse a policy file's text; anything else is a ConfigError naming the file and the field."""
    fix = "pass a threshold policy written by FedGuard (thresholds.json beside the checkpoint, or --fit-thresholds)"
    return parse_json_file(text, where, ThresholdPolicy, FORMAT, "threshold policy", fix)


def load_policy(path: Path) -> ThresholdPolicy:
    data = read_json_file(path, "threshold policy", "pass --thresholds with the path of a thresholds.json file")
    return policy_from_json(data, str(path))
