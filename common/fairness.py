"""Fairness metric math: disaggregated metrics, disparities, audit findings and federated group counts.

One concept, as in fairlearn's ``MetricFrame``: every group metric is a function of the group's
binary confusion table ``[tp, fp, fn, tn]``. The central audit computes those tables from
predictions on the held-out set; the federated audit sums the (noised) tables that nodes
computed on their validation splits; both then go through the same :func:`_rates`. So a central
and a federated number mean the same thing, and bootstrap replicates are just resampled tables.

numpy only (fairlearn is a test dependency that checks these numbers, never a runtime one).

Conventions (the labels are binary, ``1`` is the positive / selected outcome):

- ``accuracy = (tp+tn)/n``, ``selection_rate = (tp+fp)/n``, ``tpr = tp/(tp+fn)``,
  ``fpr = fp/(fp+tn)``, ``precision = tp/(tp+fp)``, ``base_rate = (tp+fn)/n``.
  A rate whose denominator is zero is *undefined* (``None``) and is left out of disparities;
  fairlearn/scikit-learn report 0 there instead, which would make a group with no positives
  look like a group the model never recognises.
- Disparities over the non-suppressed groups of one attribute (fairlearn's ``between_groups``):
  demographic-parity difference ``max - min`` and ratio ``min / max`` of selection rates,
  equal-opportunity difference ``max - min`` of TPR, equalized-odds difference
  ``max(TPR difference, FPR difference)`` (fairlearn's ``agg="worst_case"``).
- Groups with fewer rows than ``min_group_size`` are *suppressed*: listed, with neither metric
  values nor their exact size, and left out of disparities.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Joins the values (and attribute names) of an intersection: ``"female × married"``.
SEP = " × "
#: Table name and group key of the all-rows table in federated counts.
OVERALL = "(all)"
#: Order of the four cells of a confusion table.
CELLS = ("tp", "fp", "fn", "tn")

#: attribute (or intersection) → group → ``[tp, fp, fn, tn]``
Counts = dict[str, dict[str, list[int]]]

Severity = Literal["warning", "critical"]
FindingKind = Literal[
    "demographic_parity_ratio",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "degenerate_selection_rate",
    "degenerate_low_tpr",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Configuration


class FairnessConfig(_Model):
    """What an audit computes and which results become findings."""

    min_group_size: int = Field(20, ge=1, description="groups with fewer rows are suppressed")
    dp_ratio_min: float = Field(0.8, gt=0.0, le=1.0, description="demographic-parity ratio below this → finding")
    dp_diff_max: float | None = Field(None, ge=0.0, le=1.0, description="optional: DP difference above this → finding")
    eo_diff_max: float = Field(0.1, ge=0.0, le=1.0, description="equalized-odds difference above this → finding")
    eopp_diff_max: float = Field(0.1, ge=0.0, le=1.0, description="equal-opportunity difference above this → finding")
    critical_factor: float = Field(
        2.0,
        gt=1.0,
        description="critical when a difference exceeds factor × its maximum, or a ratio falls below "
        "1 − factor × (1 − its minimum); warning otherwise",
    )
    degenerate_rate_ratio: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="degenerate model: selection rate below this fraction of the base rate, or rejection "
        "rate below this fraction of the negative rate",
    )
    degenerate_tpr_max: float = Field(0.1, ge=0.0, lt=1.0, description="degenerate model: TPR below this everywhere")
    bootstrap_n: int = Field(200, ge=0, le=100_000, description="bootstrap replicates for disparity CIs; 0: none")
    bootstrap_seed: int = Field(0, ge=0, description="fixed so a report is reproducible (not a privacy seed)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    ece_bins: int = Field(15, ge=1, le=1000)
    intersections: list[tuple[str, str]] | None = Field(
        None, description="attribute pairs to intersect; None: all pairs of sensitive columns; []: none"
    )
    federated_counts: bool = Field(
        True,
        description="after the last round, each client sends noised per-group confusion counts of the final "
        "model on its validation split (charged to its privacy ledger) for the federated view",
    )
    count_noise_multiplier: float = Field(
        5.0, gt=0.0, description="z of the counts' Gaussian mechanism: σ = z·√(tables) per cell"
    )
    count_selection_delta: float = Field(
        1e-7, gt=0.0, lt=1e-3, description="δ added by releasing only groups whose noisy size clears a threshold"
    )

    @model_validator(mode="after")
    def _distinct_pairs(self) -> FairnessConfig:
        for a, b in self.intersections or []:
            if a == b:
                raise ValueError(f"intersection ({a!r}, {b!r}) needs two different attributes")
        return self


# --------------------------------------------------------------------------------------------
# Result models


class GroupMetrics(_Model):
    group: str
    suppressed: bool = False
    size: int | None  # None when suppressed: a small group's exact size is not shown either
    base_rate: float | None = None
    accuracy: float | None = None
    selection_rate: float | None = None
    tpr: float | None = None
    fpr: float | None = None
    precision: float | None = None


class Disparity(_Model):
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    groups: list[str] = Field(default_factory=list)  # the (highest, lowest) groups that set the value


class Disparities(_Model):
    demographic_parity_difference: Disparity
    demographic_parity_ratio: Disparity
    equalized_odds_difference: Disparity
    equal_opportunity_difference: Disparity


class AttributeAudit(_Model):
    name: str  # "gender", or "gender × maritalcat" for an intersection
    attributes: list[str]
    groups: list[GroupMetrics]
    disparities: Disparities | None  # None: fewer than two groups above the minimum size
    note: str | None = None


class OverallMetrics(_Model):
    n: int
    accuracy: float
    f1: float | None  # F1 of the positive class
    roc_auc: float | None  # None without scores or with one class present
    ece: float | None
    log_loss: float | None
    base_rate: float
    selection_rate: float
    tpr: float | None
    fpr: float | None


class Audit(_Model):
    overall: OverallMetrics
    attributes: list[AttributeAudit]
    min_group_size: int
    bootstrap_n: int
    confidence: float


class FederatedAudit(_Model):
    """Group metrics from summed per-client confusion counts (no per-row data, so no bootstrap CIs)."""

    round: int | None = None
    overall: GroupMetrics | None
    attributes: list[AttributeAudit]
    min_group_size: int
    clients: int | None = None
    noise: str | None = None  # e.g. "Gaussian, σ=10 per cell per client" or "none (homomorphic sum)"


class Finding(_Model):
    kind: FindingKind
    severity: Severity
    view: Literal["central", "federated"] = "central"
    attribute: str  # "(overall)" for degenerate-model findings
    groups: list[str]
    value: float
    threshold: float
    ci_low: float | None = None
    ci_high: float | None = None
    significant: bool | None = None  # the whole CI lies past the threshold (None: no CI)
    first_seen_round: int | None = None
    last_seen_round: int | None = None
    message: str


class NoisyCounts(_Model):
    """Counts that may leave a node in plaintext mode, and the Gaussian mechanism that noised them."""

    counts: Counts
    mechanism: Literal["gaussian"] = "gaussian"
    noise_multiplier: float  # z: the ledger charges one Gaussian release with this multiplier, q = 1
    sensitivity: float  # L2 sensitivity of the whole table set (add/remove one record): √tables
    sigma: float  # std of every cell's noise: z · sensitivity
    threshold: float  # a group leaves only if its noisy size reaches this
    selection_delta: float  # what the threshold adds to δ (the choice of released groups)


# --------------------------------------------------------------------------------------------
# Small numeric helpers


def _binary(values: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must hold binary labels 0/1 (fairness audits are defined for binary tasks)")
    return arr.astype(np.int64)


def _cell_index(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """0=tp, 1=fp, 2=fn, 3=tn for each row."""
    return (1 - y_pred) * 2 + (1 - y_true)


def _div(num: npt.ArrayLike, den: npt.ArrayLike) -> np.ndarray:
    """num/den with NaN where den ≤ 0 (undefined rate), without warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    ok = den > 0
    return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def _rates(c: np.ndarray) -> dict[str, np.ndarray]:
    """Group metrics from confusion tables of shape (..., 4); NaN marks an undefined rate."""
    c = np.asarray(c, dtype=np.float64)
    tp, fp, fn, tn = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    n = tp + fp + fn + tn
    return {
        "size": n,
        "base_rate": _div(tp + fn, n),
        "accuracy": _div(tp + tn, n),
        "selection_rate": _div(tp + fp, n),
        "tpr": _div(tp, tp + fn),
        "fpr": _div(fp, fp + tn),
        "precision": _div(tp, tp + fp),
    }


def _opt(v: npt.ArrayLike) -> float | None:
    """A scalar (or 0-d array) as a float, or None when undefined (NaN)."""
    f = float(np.asarray(v, dtype=np.float64))
    return f if math.isfinite(f) else None


def _range(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """max, min, argmax, argmin over the last axis ignoring NaN; max/min NaN with < 2 defined values."""
    defined = ~np.isnan(v)
    hi = np.where(defined, v, -np.inf)
    lo = np.where(defined, v, np.inf)
    enough = defined.sum(axis=-1) >= 2
    mx = np.where(enough, hi.max(axis=-1), np.nan)
    mn = np.where(enough, lo.min(axis=-1), np.nan)
    return mx, mn, hi.argmax(axis=-1), lo.argmin(axis=-1)


def _disparity_values(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The four disparities over the last (group) axis; vectorised over leading (bootstrap) axes."""
    smax, smin, _, _ = _range(r["selection_rate"])
    tmax, tmin, _, _ = _range(r["tpr"])
    fmax, fmin, _, _ = _range(r["fpr"])
    tdiff, fdiff = tmax - tmin, fmax - fmin
    return {
        "demographic_parity_difference": smax - smin,
        "demographic_parity_ratio": _div(smin, smax),
        "equalized_odds_difference": np.fmax(tdiff, fdiff),  # fmax: one undefined side does not hide the other
        "equal_opportunity_difference": tdiff,
    }


# --------------------------------------------------------------------------------------------
# Overall metrics (documented definitions; no scikit-learn at runtime)


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """ROC-AUC as the Mann–Whitney statistic: P(score of a positive > score of a negative), ties count ½.

    Uses mid-ranks, so it equals the trapezoidal area under the ROC curve (scikit-learn's
    ``roc_auc_score``). ``None`` when only one class is present.
    """
    y = _binary(y_true, "y_true").astype(bool)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = midrank[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def expected_calibration_error(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): Σ_b (n_b/n)·|accuracy_b − confidence_b| over equal-width bins.

    Confidence is the score of the *predicted* label (``p`` if the prediction is 1, else ``1 − p``);
    bins are ``(k/B, (k+1)/B]`` with a confidence of exactly 0 in the first bin.
    """
    y, yhat = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    p = np.asarray(y_score, dtype=np.float64).reshape(-1)
    conf = np.where(yhat == 1, p, 1.0 - p)
    correct = (y == yhat).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    acc_b = np.bincount(idx, weights=correct, minlength=bins)
    conf_b = np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(acc_b - conf_b).sum() / y.size)  # Σ n_b/n · |acc_b/n_b − conf_b/n_b|


def log_loss(y_true: np.ndarray, y_score: np.ndarray, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of the positive-class probabilities, clipped to [eps, 1 − eps]."""
    y = _binary(y_true, "y_true")
    p = np.clip(np.asarray(y_score, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _positive_scores(y_score: np.ndarray | None, n: int) -> np.ndarray | None:
    if y_score is None:
        return None
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    s = s.reshape(-1)
    if s.size != n:
        raise ValueError(f"y_score has {s.size} values for {n} rows")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError("y_score must be positive-class probabilities in [0, 1]")
    return s


# --------------------------------------------------------------------------------------------
# Grouping


def _tables(
    groups: Mapping[str, np.ndarray | Sequence[object]], n: int, intersections: list[tuple[str, str]] | None
) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(table name, attributes, sorted group labels, per-row group code) for each attribute and pair."""
    cols: dict[str, np.ndarray] = {}
    for name, values in groups.items():
        arr = np.asarray(values).reshape(-1).astype(str)
        if arr.size != n:
            raise ValueError(f"sensitive attribute {name!r} has {arr.size} values for {n} rows")
        cols[name] = arr
    pairs = list(itertools.combinations(cols, 2)) if intersections is None else intersections
    out = []
    coded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, arr in cols.items():
        labels, codes = np.unique(arr, return_inverse=True)
        coded[name] = (labels, codes.reshape(-1))
        out.append((name, [name], labels, codes.reshape(-1)))
    for a, b in pairs:
        for attr in (a, b):
            if attr not in cols:
                raise ValueError(f"intersection ({a!r}, {b!r}) names {attr!r}, which is not a sensitive attribute")
        (la, ca), (lb, cb) = coded[a], coded[b]
        uniq, codes = np.unique(ca * len(lb) + cb, return_inverse=True)
        labels = np.array([f"{la[u // len(lb)]}{SEP}{lb[u % len(lb)]}" for u in uniq])
        if len(set(labels.tolist())) != len(labels):
            raise ValueError(f"group values of {a!r} and {b!r} contain {SEP!r}, so intersection labels collide")
        order = np.argsort(labels, kind="stable")  # labels sorted as strings, like single attributes
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        out.append((f"{a}{SEP}{b}", [a, b], labels[order], rank[codes.reshape(-1)]))
    return out


def _confusion(codes: np.ndarray, n_groups: int, cells: np.ndarray) -> np.ndarray:
    """(G, 4) confusion tables from per-row group codes and cell indices."""
    return np.bincount(codes * 4 + cells, minlength=n_groups * 4).reshape(n_groups, 4)


def _group_rows(labels: Sequence[str], tables: np.ndarray, keep: np.ndarray) -> list[GroupMetrics]:
    """One row per group; groups outside ``keep`` are suppressed (listed, without size or metrics)."""
    r = _rates(tables)
    rows = []
    for i, label in enumerate(labels):
        if not keep[i]:
            rows.append(GroupMetrics(group=str(label), suppressed=True, size=None))
            continue
        rows.append(
            GroupMetrics(
                group=str(label),
                size=int(round(float(r["size"][i]))),
                **{k: _opt(np.clip(r[k][i], 0.0, 1.0)) for k in r if k != "size"},
            )
        )
    return rows


def _disparities(
    labels: np.ndarray, tables: np.ndarray, keep: np.ndarray, boot: np.ndarray | None, confidence: float
) -> Disparities | None:
    """Point disparities over the kept groups; percentile CIs from bootstrap tables (B, G, 4) if given."""
    if keep.sum() < 2:
        return None
    kept = labels[keep]
    r = _rates(tables[keep])
    point = _disparity_values(r)
    spans = {
        "demographic_parity_difference": "selection_rate",
        "demographic_parity_ratio": "selection_rate",
        "equal_opportunity_difference": "tpr",
    }
    # equalized odds is set by whichever of the TPR and FPR differences is larger (TPR on a tie)
    tdiff, eo = point["equal_opportunity_difference"], point["equalized_odds_difference"]
    tpr_wider = bool(np.isfinite(tdiff) and tdiff >= eo)
    spans["equalized_odds_difference"] = "tpr" if tpr_wider else "fpr"
    ci: dict[str, tuple[float | None, float | None]] = {}
    if boot is not None:
        replicate = _disparity_values(_rates(boot[:, keep]))
        tail = (1.0 - confidence) / 2.0 * 100.0
        for k, v in replicate.items():
            v = v[np.isfinite(v)]
            ci[k] = (float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail))) if v.size else (None, None)
    out = {}
    for k, v in point.items():
        _, _, imax, imin = _range(r[spans[k]])
        value = _opt(v)
        lo, hi = ci.get(k, (None, None))
        out[k] = Disparity(
            value=value,
            ci_low=lo,
            ci_high=hi,
            groups=[str(kept[int(imax)]), str(kept[int(imin)])] if value is not None else [],
        )
    return Disparities(**out)


# --------------------------------------------------------------------------------------------
# The central audit


def audit(
    y_true: np.ndarray | Sequence[int],
    y_pred: np.ndarray | Sequence[int],
    y_score: np.ndarray | None,
    groups: Mapping[str, np.ndarray | Sequence[object]],
    cfg: FairnessConfig | None = None,
) -> Audit:
    """Overall metrics, per-group metrics per attribute and intersection, and disparities with bootstrap CIs.

    ``y_score``: positive-class probabilities, shape (n,) or (n, 2), or None (then AUC, ECE and log loss
    are None). ``groups``: sensitive attribute → per-row group key (``Encoded.groups``).
    Bootstrap: percentile CIs from resampling all rows with replacement (as fairlearn's ``n_boot``);
    drawn as one multinomial over each attribute's confusion cells, which has the same distribution
    as row resampling and costs O(replicates × cells) instead of O(replicates × rows).
    """
    cfg = cfg or FairnessConfig()
    y, yhat = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    n = y.size
    if n == 0 or yhat.size != n:
        raise ValueError(f"y_true has {n} rows and y_pred {yhat.size}; both need the same, non-zero length")
    scores = _positive_scores(y_score, n)
    cells = _cell_index(y, yhat)
    total = np.bincount(cells, minlength=4)
    tot = _rates(total)
    tp, fp, fn, _ = (int(c) for c in total)
    overall = OverallMetrics(
        n=n,
        accuracy=float(tot["accuracy"]),
        f1=_opt(_div(2 * tp, 2 * tp + fp + fn)),
        roc_auc=None if scores is None else roc_auc(y, scores),
        ece=None if scores is None else expected_calibration_error(y, yhat, scores, cfg.ece_bins),
        log_loss=None if scores is None else log_loss(y, scores),
        base_rate=float(tot["base_rate"]),
        selection_rate=float(tot["selection_rate"]),
        tpr=_opt(tot["tpr"]),
        fpr=_opt(tot["fpr"]),
    )
    attributes = []
    for i, (name, attrs, labels, codes) in enumerate(_tables(groups, n, cfg.intersections)):
        tables = _confusion(codes, len(labels), cells)
        keep = tables.sum(axis=1) >= cfg.min_group_size
        boot = None
        if cfg.bootstrap_n > 0 and keep.sum() >= 2:
            rng = np.random.default_rng([cfg.bootstrap_seed, i])
            boot = rng.multinomial(n, tables.reshape(-1) / n, size=cfg.bootstrap_n).reshape(-1, len(labels), 4)
        disp = _disparities(labels, tables, keep, boot, cfg.confidence)
        attributes.append(
            AttributeAudit(
                name=name,
                attributes=attrs,
                groups=_group_rows(labels.tolist(), tables, keep),
                disparities=disp,
                note=None
                if disp is not None
                else f"fewer than two groups with at least {cfg.min_group_size} rows: no disparities",
            )
        )
    return Audit(
        overall=overall,
        attributes=attributes,
        min_group_size=cfg.min_group_size,
        bootstrap_n=cfg.bootstrap_n,
        confidence=cfg.confidence,
    )


# --------------------------------------------------------------------------------------------
# Findings


_LABELS: dict[str, str] = {
    "demographic_parity_ratio": "demographic-parity ratio",
    "demographic_parity_difference": "demographic-parity difference",
    "equalized_odds_difference": "equalized-odds difference",
    "equal_opportunity_difference": "equal-opportunity difference",
}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def findings(
    result: Audit | FederatedAudit,
    cfg: FairnessConfig | None = None,
    round: int | None = None,
    view: Literal["central", "federated"] = "central",
) -> list[Finding]:
    """Threshold breaches per attribute, plus degenerate-model findings (low disparity ≠ fairness)."""
    cfg = cfg or FairnessConfig()
    out: list[Finding] = []

    def add(
        kind: FindingKind, severity: Severity, attribute: str, groups: list[str], value: float, **kw: object
    ) -> None:
        out.append(
            Finding(
                kind=kind,
                severity=severity,
                view=view,
                attribute=attribute,
                groups=groups,
                value=value,
                first_seen_round=round,
                last_seen_round=round,
                **kw,  # type: ignore[arg-type]
            )
        )

    rules: list[tuple[FindingKind, float | None, bool]] = [  # (metric, threshold, lower is worse)
        ("demographic_parity_ratio", cfg.dp_ratio_min, True),
        ("demographic_parity_difference", cfg.dp_diff_max, False),
        ("equalized_odds_difference", cfg.eo_diff_max, False),
        ("equal_opportunity_difference", cfg.eopp_diff_max, False),
    ]
    for att in result.attributes:
        if att.disparities is None:
            continue
        for kind, limit, lower_worse in rules:
            d: Disparity = getattr(att.disparities, kind)
            if limit is None or d.value is None:
                continue
            if lower_worse:
                breach, critical = d.value < limit, d.value < 1.0 - cfg.critical_factor * (1.0 - limit)
                significant = None if d.ci_high is None else d.ci_high < limit
                cmp = "below the minimum"
            else:
                breach, critical = d.value > limit, d.value > cfg.critical_factor * limit
                significant = None if d.ci_low is None else d.ci_low > limit
                cmp = "above the maximum"
            if not breach:
                continue
            ci = "" if d.ci_low is None else f" ({_confidence(result):.0%} CI {d.ci_low:.3f}–{d.ci_high:.3f})"
            add(
                kind,
                "critical" if critical else "warning",
                att.name,
                list(d.groups),
                d.value,
                threshold=limit,
                ci_low=d.ci_low,
                ci_high=d.ci_high,
                significant=significant,
                message=f"{_LABELS[kind]} for {att.name} is {d.value:.3f}{ci}, {cmp} {limit:g}; "
                f"between {' and '.join(d.groups)}",
            )

    base, sel, tpr = _overall_rates(result)
    if base is not None and sel is not None and 0.0 < base < 1.0:
        r = cfg.degenerate_rate_ratio
        few, many = sel < r * base, (1.0 - sel) < r * (1.0 - base)
        if few or many:
            constant = sel <= 0.0 or sel >= 1.0
            what = "predicts almost no positives" if few else "predicts almost only positives"
            if constant:
                what = "predicts only negatives" if few else "predicts only positives"
            add(
                "degenerate_selection_rate",
                "critical" if constant else "warning",
                "(overall)",
                [],
                sel,
                threshold=r * base if few else 1.0 - r * (1.0 - base),
                message=f"the model {what}: selection rate {_pct(sel)} against a base rate of {_pct(base)}. "
                "Low disparity from such a model is not evidence of fairness",
            )
    group_tprs = [g.tpr for att in result.attributes for g in att.groups if not g.suppressed and g.tpr is not None]
    if tpr is not None and tpr < cfg.degenerate_tpr_max and all(t < cfg.degenerate_tpr_max for t in group_tprs):
        worst = max([tpr, *group_tprs])
        add(
            "degenerate_low_tpr",
            "critical" if worst <= 0.0 else "warning",
            "(overall)",
            [],
            worst,
            threshold=cfg.degenerate_tpr_max,
            message=f"the true-positive rate is below {cfg.degenerate_tpr_max:g} overall and in every reported "
            f"group (highest {worst:.3f}): the model misses the positives of every group, so equal rates across "
            "groups are not evidence of fairness",
        )
    return out


def _confidence(result: Audit | FederatedAudit) -> float:
    return result.confidence if isinstance(result, Audit) else 0.95


def _overall_rates(result: Audit | FederatedAudit) -> tuple[float | None, float | None, float | None]:
    if isinstance(result, Audit):
        o = result.overall
        return o.base_rate, o.selection_rate, o.tpr
    if result.overall is None or result.overall.suppressed:
        return None, None, None
    g = result.overall
    return g.base_rate, g.selection_rate, g.tpr


def merge_findings(previous: Sequence[Finding], current: Sequence[Finding], round: int) -> list[Finding]:
    """Fold one round's findings into the history, keyed by (view, kind, attribute).

    A finding seen again keeps its ``first_seen_round`` and takes the new values; one not seen this
    round keeps its old ``last_seen_round`` (so a report can tell active from resolved).
    """
    merged = {(f.view, f.kind, f.attribute): f for f in previous}
    for f in current:
        key = (f.view, f.kind, f.attribute)
        first = merged[key].first_seen_round if key in merged else round
        merged[key] = f.model_copy(update={"first_seen_round": first, "last_seen_round": round})
    return list(merged.values())


def track_findings(rounds: Iterable[tuple[int, Sequence[Finding]]]) -> list[Finding]:
    """Findings over a whole run (rounds in any order), each with the round it was first seen."""
    history: list[Finding] = []
    for rnd, found in sorted(rounds, key=lambda item: item[0]):
        history = merge_findings(history, found, rnd)
    return history


# --------------------------------------------------------------------------------------------
# Federated fairness: per-group counts on each node, noise, sums, metrics


def group_confusion_counts(
    y_true: np.ndarray | Sequence[int],
    y_pred: np.ndarray | Sequence[int],
    groups: Mapping[str, np.ndarray | Sequence[object]],
    min_group_size: int,
    intersections: list[tuple[str, str]] | None = None,
) -> Counts:
    """A node's confusion tables per group, per attribute and intersection, plus the all-rows table.

    Every table the config defines is present (possibly empty), so the table set — and with it the
    noise sensitivity — does not depend on the data. A group with fewer than ``min_group_size``
    rows on this node is omitted entirely: it never leaves the node.
    """
    if min_group_size < 1:
        raise ValueError("min_group_size must be at least 1")
    y, yhat = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    if y.size != yhat.size:
        raise ValueError(f"y_true has {y.size} rows and y_pred {yhat.size}")
    cells = _cell_index(y, yhat)
    total = np.bincount(cells, minlength=4)
    out: Counts = {OVERALL: {OVERALL: [int(c) for c in total]} if y.size >= min_group_size else {}}
    for name, _, labels, codes in _tables(groups, y.size, intersections):
        tables = _confusion(codes, len(labels), cells)
        out[name] = {
            str(label): [int(c) for c in row]
            for label, row in zip(labels, tables, strict=True)
            if row.sum() >= min_group_size
        }
    return out


def release_threshold(min_group_size: int, sigma: float, selection_delta: float, tables: int) -> float:
    """Noisy size a group must reach to leave a node, so the *choice* of groups costs at most δ_sel.

    A neighbouring dataset can move at most one group per table across the true-size cut at
    ``min_group_size``; such a group (true size = minimum) passes only if the sum of its four
    Gaussian noises, N(0, 4σ²), reaches ``threshold − min_group_size``. Asking for
    ``selection_delta / tables`` per table (union bound) gives ``min + 2σ·Φ⁻¹(1 − δ_sel/T)``.
    """
    z = statistics.NormalDist().inv_cdf(1.0 - selection_delta / max(1, tables))
    return float(min_group_size + 2.0 * sigma * z)


def noisy_counts(
    counts: Counts,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    *,
    min_group_size: int,
    selection_delta: float = 1e-7,
) -> NoisyCounts:
    """Gaussian mechanism on a node's confusion tables: the counts to send and what to charge.

    Sensitivity: under add/remove-one-record adjacency (the DP-SGD unit), a record falls in exactly
    one cell of one group in each table, so the L2 sensitivity of all ``T`` tables together
    (attributes + intersections + the all-rows table) is ``√T``; every cell gets independent
    N(0, σ²) noise with ``σ = z·√T``. That is one Gaussian release with noise multiplier ``z`` and
    no subsampling, so the node's ledger composes it with its DP-SGD releases through the same
    RDP accountant (``Release(noise_multiplier=z, sample_rate=1, steps=1)``). The set of groups
    released would leak through the true-size cut, so a group also needs a noisy size (sum of its
    noised cells) of at least :func:`release_threshold`, which adds ``selection_delta`` to δ.
    Noisy cells are rounded to integers (post-processing) and not clipped at zero, so sums over
    clients stay unbiased.

    ``rng`` must be seeded from OS entropy on the node (the default), never from the config seed:
    seeded noise is predictable and not private.
    """
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
    if not 0.0 < selection_delta < 1.0:
        raise ValueError(f"selection_delta must be in (0, 1), got {selection_delta}")
    rng = rng if rng is not None else np.random.default_rng()  # OS entropy
    tables = max(1, len(counts))
    sensitivity = math.sqrt(tables)
    sigma = noise_multiplier * sensitivity
    threshold = release_threshold(min_group_size, sigma, selection_delta, tables)
    out: Counts = {}
    for table, rows in counts.items():
        out[table] = {}
        for group, cells in rows.items():
            if sum(cells) < min_group_size:
                continue  # the node's own cut; group_confusion_counts already applies it
            noisy = np.asarray(cells, dtype=np.float64) + rng.normal(0.0, sigma, size=4)
            if noisy.sum() >= threshold:
                out[table][group] = [int(v) for v in np.rint(noisy)]
    return NoisyCounts(
        counts=out,
        noise_multiplier=noise_multiplier,
        sensitivity=sensitivity,
        sigma=sigma,
        threshold=threshold,
        selection_delta=selection_delta,
    )


def merge_counts(parts: Iterable[Counts]) -> Counts:
    """Cell-wise sums over clients (union of tables and groups; a group a client omitted adds nothing)."""
    totals: Counts = {}
    for part in parts:
        for table, rows in part.items():
            dest = totals.setdefault(table, {})
            for group, cells in rows.items():
                if len(cells) != 4:
                    raise ValueError(f"counts for {table}/{group} need 4 cells {CELLS}, got {len(cells)}")
                acc = dest.setdefault(group, [0, 0, 0, 0])
                for i, c in enumerate(cells):
                    acc[i] += int(c)
    return totals


def metrics_from_counts(
    totals: Counts,
    cfg: FairnessConfig | None = None,
    *,
    round: int | None = None,
    clients: int | None = None,
    noise: str | None = None,
) -> FederatedAudit:
    """Group metrics and disparities from summed confusion tables, as the central audit computes them.

    Noisy cells below zero are read as zero; groups whose summed size is below the minimum are
    suppressed here too. Sizes are lower bounds: each node omits its own small groups.
    """
    cfg = cfg or FairnessConfig()
    overall = None
    attributes = []
    for table, rows in totals.items():
        labels = np.array(sorted(rows), dtype=object)
        tables = np.clip(np.array([rows[g] for g in labels], dtype=np.float64).reshape(-1, 4), 0.0, None)
        if table == OVERALL:
            if len(labels):
                overall = _group_rows([OVERALL], tables[:1], tables[:1].sum(axis=1) >= cfg.min_group_size)[0]
            continue
        keep = tables.sum(axis=1) >= cfg.min_group_size
        disp = _disparities(labels.astype(str), tables, keep, None, cfg.confidence)
        attributes.append(
            AttributeAudit(
                name=table,
                attributes=table.split(SEP),
                groups=_group_rows([str(g) for g in labels], tables, keep),
                disparities=disp,
                note=None
                if disp is not None
                else f"fewer than two groups with at least {cfg.min_group_size} rows: no disparities",
            )
        )
    return FederatedAudit(
        round=round,
        overall=overall,
        attributes=attributes,
        min_group_size=cfg.min_group_size,
        clients=clients,
        noise=noise,
    )


def client_spread(per_client_accuracy: Sequence[float]) -> dict[str, float | int]:
    """Client-level fairness of the global model: worst, best, spread and std of per-client accuracy.

    Only the distribution is returned — no client ids and nothing about any client's groups.
    """
    acc = np.asarray(per_client_accuracy, dtype=np.float64).reshape(-1)
    if acc.size == 0 or not np.all(np.isfinite(acc)):
        raise ValueError("per_client_accuracy needs at least one finite value")
    return {
        "clients": int(acc.size),
        "worst": float(acc.min()),
        "best": float(acc.max()),
        "mean": float(acc.mean()),
        "spread": float(acc.max() - acc.min()),
        "std": float(acc.std()),
    }


def dataset_fingerprint(
    x: np.ndarray, y: np.ndarray, groups: Mapping[str, np.ndarray | Sequence[object]] | None = None
) -> str:
    """SHA-256 over the evaluation set as evaluated (features, labels, sensitive groups): its provenance."""
    h = hashlib.sha256(b"fedguard-eval-set/1\0")
    for name, arr in (("x", np.ascontiguousarray(x)), ("y", np.ascontiguousarray(y))):
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\0".encode())
        h.update(arr.tobytes())
    for name in sorted(groups or {}):
        values = np.asarray((groups or {})[name]).reshape(-1).astype(str)
        h.update(f"group:{name}:{values.size}\0".encode())
        h.update("\x1f".join(values.tolist()).encode("utf-8"))
    return h.hexdigest()
