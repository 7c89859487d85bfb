"""Disaggregated metrics: one confusion table per group, the same rates for the central and federated views.

Every group metric is a function of the group's binary confusion table ``[tp, fp, fn, tn]``
(fairlearn's ``MetricFrame`` as one concept): :func:`audit` computes the tables from predictions
on the held-out set, :func:`metrics_from_counts` from the (noised) tables nodes summed; both go
through the same :func:`_rates`, so a central and a federated number mean the same thing.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from pydantic import Field

from common.fairness.config import FairnessConfig, _Model

#: Joins the values (and attribute names) of an intersection: ``"female × married"``.
SEP = " × "
#: Table name and group key of the all-rows table in federated counts.
OVERALL = "(all)"
#: Order of the four cells of a confusion table.
CELLS = ("tp", "fp", "fn", "tn")

#: attribute (or intersection) → group → ``[tp, fp, fn, tn]``
Counts = dict[str, dict[str, list[int]]]


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
    """Group metrics from summed per-client confusion counts; CIs cover the counts' noise and sampling."""

    round: int | None = None
    overall: GroupMetrics | None
    attributes: list[AttributeAudit]
    min_group_size: int
    clients: int | None = None
    noise: str | None = None  # e.g. "Gaussian, σ=10 per cell per client" or "none (homomorphic sum)"
    bootstrap_n: int = 0  # parametric replicates behind the disparities' CIs (0: no CIs)
    confidence: float | None = None  # the CIs' level (None: no CIs)


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


def metrics_from_counts(
    totals: Counts,
    cfg: FairnessConfig | None = None,
    *,
    round: int | None = None,
    clients: int | None = None,
    noise: str | None = None,
    noise_sd: Mapping[str, Mapping[str, float]] | None = None,
) -> FederatedAudit:
    """Group metrics and disparities from summed confusion tables, as the central audit computes them.

    Noisy cells below zero are read as zero; groups whose summed size is below the minimum are
    suppressed here too. Sizes are lower bounds: each node omits its own small groups.

    Disparities get CIs (``cfg.bootstrap_n`` replicates) from a parametric bootstrap over both of
    their errors: every summed cell's Gaussian noise (standard deviation ``noise_sd[table][group]``,
    σ·√(clients that sent the group); none when omitted) and the sampling of the rows (one multinomial
    over the table's cells, as the central audit's bootstrap). A disparity that only the noise made —
    a small group's noised positives clipped to 0 read as a demographic-parity ratio of 0 — then
    shows an interval that reaches the threshold, and its finding is not significant.
    """
    cfg = cfg or FairnessConfig()
    overall = None
    attributes = []
    for i, (table, rows) in enumerate(totals.items()):
        labels = np.array(sorted(rows), dtype=object)
        observed = np.array([rows[g] for g in labels], dtype=np.float64).reshape(-1, 4)
        tables = np.clip(observed, 0.0, None)
        if table == OVERALL:
            if len(labels):
                overall = _group_rows([OVERALL], tables[:1], tables[:1].sum(axis=1) >= cfg.min_group_size)[0]
            continue
        keep = tables.sum(axis=1) >= cfg.min_group_size
        boot = None
        if cfg.bootstrap_n > 0 and keep.sum() >= 2:
            sd = np.array([float((noise_sd or {}).get(table, {}).get(str(g), 0.0)) for g in labels])
            boot = _noisy_replicates(observed, sd, cfg.bootstrap_n, np.random.default_rng([cfg.bootstrap_seed, i]))
        disp = _disparities(labels.astype(str), tables, keep, boot, cfg.confidence)
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
        bootstrap_n=cfg.bootstrap_n,
        confidence=cfg.confidence if cfg.bootstrap_n > 0 else None,
    )


def _noisy_replicates(observed: np.ndarray, sd: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, G, 4) tables: the summed counts with their noise drawn again, then the rows resampled.

    The true counts lie within the Gaussian noise of the observed ones (same spread, either
    direction); each replicate draws them, clips at zero, and resamples that many rows from them.
    """
    drawn = np.clip(observed[None] + rng.normal(size=(n, *observed.shape)) * sd[None, :, None], 0.0, None)
    flat = drawn.reshape(n, -1)
    total = flat.sum(axis=1, keepdims=True)
    shares = np.where(total > 0, flat / np.where(total > 0, total, 1.0), 1.0 / flat.shape[1])
    return rng.multinomial(np.rint(total[:, 0]).astype(np.int64), shares).reshape(drawn.shape).astype(np.float64)


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
