"""Prior calibration: decisions whose class shares match the held-out set's, and a temperature for the
probabilities, fitted by the central evaluator.

Why: under DP on skewed nodes a global model's decision boundary can swing from round to round (the
5-node Dirichlet 0.5 review federation predicts one class for most rows every other round) while
its *ranking* of rows stays good. One offset per class, added to the model's log-probabilities
before the argmax, so that the share of rows given each class equals that class's share among
labelled rows (Saerens et al. 2002's prior shift, solved for the decision rather than the posterior;
"logit adjustment"), removes the swing at no privacy cost: it is post-processing of the released
model, fitted on the evaluation service's own held-out rows, never on a node's data.

The evaluator fits the offsets on all its held-out rows (the released calibration,
``calibration.json`` beside the checkpoints, applied by ``fedguard evaluate --calibration``) and
reports metrics by two-fold cross-fitting: each row is decided with offsets fitted on the other
fold only, so no row's own label ever moves its decision and the held-out numbers stay honest.
The model's own decisions (argmax, no offsets) are reported beside them (``uncalibrated_*``).

The same calibration scales the probabilities by one temperature (Guo et al. 2017): DP-Adam's
noisy steps grow a model's logits faster than its accuracy (the demo's round-3 model gave 88% of
held-out rows a probability ≥ 0.99 at accuracy 0.745, held-out loss 1.28), so the model's own
scores overstate its certainty. ``softmax(log p / T)``, with T minimizing the cross-entropy on the
fitting rows, leaves every decision as it was (it divides each row's log-odds by the same T) and
makes the scores mean what they say. The evaluator scores (``calibrated_loss``, and the fairness
audit's calibration error and log loss) the cross-fitted tempered probabilities; ``loss`` stays the
model's own.

Offsets are kept only when they are needed and clearly help: the decisions' class shares differ
from the labels' beyond chance (Stuart–Maxwell test of marginal homogeneity on the fitting rows,
McNemar's for two classes, p < ``SHIFT_LEVEL``) and, of the fitting rows whose decision the offsets
change, clearly more become right than wrong (a one-sided sign test: gained − lost ≥
max(1, √(gained + lost))); otherwise they are zero and the model decides alone. Matching shares
that already agree only adds the fitting rows' sampling noise (on 425 held-out news articles in five
topics ungated offsets cost a well-balanced model 1.6 points, 0.960 → 0.944); where the classes
overlap unevenly the accuracy-best boundary does not give the label shares (tabular ``computers``,
5 skewed nodes, ε = 8: share-matched decisions 0.851 against the model's own 0.858 over 5 seeds);
and on a small hold-out a fold's offsets can look no worse on its own rows by chance and cost the
other fold (178 drug reviews, a model with no signal on the majority class: "at least as accurate"
put the calibrated accuracy over 3 points under the model's own in 7–12% of simulated draws, the
sign test in at most 0.5%). A model whose own decisions are all one class is the one exception: it is the
majority baseline whatever its accuracy, and share-matched decisions from a weak ranking of a rare
class are often less accurate than "everyone is the majority" while telling the classes apart
(churn, 27% leavers: the sign test left 4 of 90 DP runs constant at the majority's macro-F1). Its
offsets are kept when the decisions they change are right clearly more often than a ranking without
information would make them (:func:`signal_z` ≥ ``SIGNAL_Z``, 0.1% one-sided), so a model that
swung to one class is repaired (``churn``: 0.731 → 0.795) and one with no signal stays constant and
flagged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize_scalar
from scipy.stats import chi2

from common.errors import ConfigError
from common.json_files import parse_json_file, read_json_file

FORMAT: Literal["fedguard-calibration/1"] = "fedguard-calibration/1"
_FLOOR = 1e-12  # probabilities below this count as this (log 0 would make an offset useless)
_ITERATIONS = 300  # multi-class: fixed-point steps on the offsets
FOLDS = 2  # cross-fitting folds for the reported metrics
#: Offsets are fitted only when the test of equal decision and label shares gives p below this.
SHIFT_LEVEL = 0.05
#: A model whose own decisions are all one class keeps offsets when the decisions they change are right
#: more often than a ranking without information would make them: z at least this (one-sided, 0.1%).
SIGNAL_Z = 3.09
#: The temperatures a fit may choose (1/T is searched in the inverse range).
TEMPERATURE_RANGE = (0.05, 100.0)
#: Prefix of the metrics of the model's own decisions when the reported ones are prior-calibrated.
UNCALIBRATED = "uncalibrated_"
#: The latest round's calibration, beside a run's checkpoints (written by the server, read by ``fedguard evaluate``).
CALIBRATION_FILE = "calibration.json"

__all__ = [
    "CALIBRATION_FILE",
    "FORMAT",
    "UNCALIBRATED",
    "PriorCalibration",
    "apply_offsets",
    "calibration_from_json",
    "clearly_better",
    "cross_fitted",
    "cross_fitted_tempered",
    "fit_offsets",
    "fit_temperature",
    "load_calibration",
    "mean_log_loss",
    "share_shift_p_value",
    "signal_z",
    "tempered",
]


class PriorCalibration(BaseModel):
    """Per-class offsets on the log-probabilities, fitted so decisions match the held-out class shares."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["fedguard-calibration/1"] = FORMAT
    method: Literal["prior"] = "prior"
    classes: list[str]
    offsets: list[float] = Field(description="added to log p(class) before the argmax; the first is 0")
    class_shares: list[float] = Field(description="each class's share of the labelled rows fitted on")
    rows: int = Field(ge=0)
    round: int | None = None  # the round of the model the offsets were fitted for
    shift_p_value: float | None = Field(
        None, description="test of equal decision and label shares on these rows; offsets are 0 unless below 0.05"
    )
    own_accuracy: float | None = Field(None, description="accuracy of the model's own decisions on these rows")
    matched_accuracy: float | None = Field(
        None,
        description="accuracy of share-matched decisions on these rows; offsets are 0 unless clearly above "
        "own_accuracy (rows_gained, rows_lost)",
    )
    rows_gained: int | None = Field(
        None, ge=0, description="rows the share-matched decisions get right and the model's own get wrong"
    )
    rows_lost: int | None = Field(
        None,
        ge=0,
        description="rows the model's own decisions get right and the share-matched ones get wrong; "
        "offsets are 0 unless rows_gained − rows_lost ≥ max(1, √(rows_gained + rows_lost))",
    )
    signal_z: float | None = Field(
        None,
        allow_inf_nan=False,
        description="only when the model's own decisions are all one class: how far above chance (standard "
        "errors) the decisions the offsets change are right; offsets are 0 unless at least 3.09 (then the "
        "rows_gained/rows_lost rule does not apply)",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="calibrated probabilities: softmax(log p / temperature); decisions do not change",
    )
    rule: str = "class = argmax over classes of log p(class) + offset(class)"


def _log_probs(probs: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (rows, classes ≥ 2); got {p.shape}")
    return np.log(np.clip(p, _FLOOR, 1.0))


def apply_offsets(probs: np.ndarray | Sequence[Sequence[float]], offsets: np.ndarray | Sequence[float]) -> np.ndarray:
    """Class decisions after the offsets: argmax of log-probability + offset, per row."""
    lp = _log_probs(probs)
    b = np.asarray(offsets, dtype=np.float64)
    if b.shape != (lp.shape[1],):
        raise ValueError(f"{b.size} offsets for {lp.shape[1]} classes")
    return np.argmax(lp + b, axis=1).astype(np.int64)


def tempered(probs: np.ndarray | Sequence[Sequence[float]], temperature: float) -> np.ndarray:
    """The probabilities after the temperature: ``softmax(log p / T)`` per row (T = 1: unchanged)."""
    z = _log_probs(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(lp: np.ndarray, labels: np.ndarray, inverse_t: float) -> float:
    """Mean cross-entropy of ``softmax(inverse_t · lp)`` against ``labels``."""
    z = lp * inverse_t
    top = z.max(axis=1)
    return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(z.shape[0]), labels]))


def fit_temperature(probs: np.ndarray | Sequence[Sequence[float]], y: np.ndarray | Sequence[int]) -> float:
    """The temperature T that minimizes the cross-entropy of ``softmax(log p / T)`` on these rows.

    The loss is convex in 1/T, so a bounded scalar search finds its minimum; 1.0 with no rows."""
    lp, labels = _log_probs(probs), np.asarray(y, dtype=np.int64)
    if labels.shape != (lp.shape[0],):
        raise ValueError(f"{labels.size} labels for {lp.shape[0]} rows")
    if not labels.size:
        return 1.0
    lo, hi = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]
    best = minimize_scalar(lambda s: _nll(lp, labels, s), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    inverse = float(best.x) if _nll(lp, labels, float(best.x)) <= _nll(lp, labels, 1.0) else 1.0
    return 1.0 / inverse


def _binary_offset(lp: np.ndarray, positives: int) -> float:
    """The offset on class 1 that makes exactly ``positives`` rows positive: midway between the
    ``positives``-th and the next largest margin (log p1 − log p0), so ties stay on the model's side."""
    margin = np.sort(lp[:, 1] - lp[:, 0])[::-1]
    n = margin.size
    if positives <= 0:
        return -float(margin[0]) - 1.0
    if positives >= n:
        return -float(margin[-1]) + 1.0
    return -float(margin[positives - 1] + margin[positives]) / 2.0


def share_shift_p_value(decided: np.ndarray, labels: np.ndarray, k: int) -> float:
    """p-value of "the decisions' class shares equal the labels'" on these rows (paired: one decision
    and one label per row): Stuart–Maxwell's test of marginal homogeneity, McNemar's for two classes."""
    table = np.zeros((k, k))
    np.add.at(table, (labels, decided), 1.0)  # rows: label, columns: decision
    diff = (table.sum(1) - table.sum(0))[:-1]  # one class is implied by the others
    if not diff.any():
        return 1.0
    cov = -(table + table.T)
    np.fill_diagonal(cov, table.sum(1) + table.sum(0) - 2 * np.diag(table))
    cov = cov[:-1, :-1]
    stat = float(diff @ np.linalg.pinv(cov) @ diff)
    return float(chi2.sf(stat, max(1, int(np.linalg.matrix_rank(cov)))))


def fit_offsets(probs: np.ndarray | Sequence[Sequence[float]], y: np.ndarray | Sequence[int]) -> np.ndarray:
    """Offsets (first class 0) that make the decisions' class shares match the labels' on these rows.

    Zeros when the model's own shares already agree with the labels' within chance
    (:func:`share_shift_p_value` ≥ ``SHIFT_LEVEL``), when the share-matched decisions are not clearly
    more accurate on these rows than the model's own (:func:`clearly_better`; for a model whose own
    decisions are all one class: not right clearly more often than chance, :func:`signal_z`), or when
    fewer than two label classes are among the rows (there is no prior to match).
    """
    return _fit(probs, y).offsets


@dataclass(frozen=True)
class _Fit:
    offsets: np.ndarray
    shift_p_value: float | None  # None: no rows
    own_accuracy: float | None
    matched_accuracy: float | None  # None: fewer than two label classes
    gained: int | None = None  # rows the matched decisions get right and the model's own wrong
    lost: int | None = None  # rows the model's own decisions get right and the matched ones wrong
    signal_z: float | None = None  # own decisions all one class: the changed decisions' hits over chance


def clearly_better(gained: int, lost: int) -> bool:
    """Whether changed decisions that made ``gained`` rows right and ``lost`` rows wrong are clearly an
    improvement: a one-sided sign test at z = 1 (gained − lost ≥ √(gained + lost)), and at least one
    row net. Why not "at least as accurate": on a small hold-out a fold's offsets often tie or win by
    a row on the rows they were fitted on and then cost the other fold."""
    return gained - lost >= max(1.0, math.sqrt(gained + lost))


def signal_z(targets: np.ndarray, hits: int, labels: np.ndarray, k: int) -> float:
    """How many standard errors above chance ``hits`` right decisions among rows newly decided
    ``targets`` are, were the model's ranking no information about the labels (the changed rows'
    labels then a draw without replacement from ``labels``); −inf when nothing or everything changed.

    Why: a model whose own decisions are all one class is the majority baseline whatever its accuracy
    (the constant-model finding flags it), so the question for its offsets is not whether they beat
    its accuracy (where a rare class is hard to rank they seldom do) but whether its ranking carries
    signal that the share-matched decisions pass on."""
    n, m = labels.size, targets.size
    if m == 0 or m >= n:
        return -math.inf
    share = (np.bincount(labels, minlength=k)[:k] / n)[targets]
    var = float((share * (1 - share)).sum()) * (n - m) / (n - 1)
    return (hits - float(share.sum())) / math.sqrt(var) if var > 0 else -math.inf


def _fit(
    probs: np.ndarray | Sequence[Sequence[float]], y: np.ndarray | Sequence[int], constant: bool | None = None
) -> _Fit:
    """The offsets :func:`fit_offsets` returns, with the share test's p-value, both accuracies and the
    changed decisions' gained and lost rows behind them. ``constant``: whether the model's own decisions
    are all one class (default: on these rows; :func:`cross_fitted` passes it for all held-out rows).

    Offsets are kept when the shares differ beyond chance and the decisions they change either clearly
    gain rows (:func:`clearly_better`) or, for a model whose own decisions are all one class, are right
    clearly more often than chance (:func:`signal_z` ≥ ``SIGNAL_Z``)."""
    lp = _log_probs(probs)
    labels = np.asarray(y, dtype=np.int64)
    n, k = lp.shape
    if labels.shape != (n,):
        raise ValueError(f"{labels.size} labels for {n} rows")
    if n == 0:
        return _Fit(np.zeros(k), None, None, None)
    own_decided = np.argmax(lp, axis=1)
    own_right = own_decided == labels
    p, own = share_shift_p_value(own_decided, labels, k), float(own_right.mean())
    if np.count_nonzero(np.bincount(labels, minlength=k)[:k]) < 2:
        return _Fit(np.zeros(k), p, own, None)
    matched = _matched_offsets(lp, labels)
    matched_decided = np.argmax(lp + matched, axis=1)
    matched_right = matched_decided == labels
    gained, lost = int(np.sum(matched_right & ~own_right)), int(np.sum(own_right & ~matched_right))
    if constant is None:
        constant = np.unique(own_decided).size == 1
    changed = matched_decided != own_decided
    z = signal_z(matched_decided[changed], int(matched_right[changed].sum()), labels, k) if constant else None
    helps = z >= SIGNAL_Z if z is not None else clearly_better(gained, lost)
    keep = p < SHIFT_LEVEL and helps
    return _Fit(matched if keep else np.zeros(k), p, own, float(matched_right.mean()), gained, lost, z)


def _matched_offsets(lp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Offsets whose decisions give each class its share of ``labels``. Binary: exact, by the margin
    quantile. More classes: fixed-point steps ``b += log share − log predicted share`` (smoothed),
    keeping the offsets whose shares are closest in total variation."""
    n, k = lp.shape
    counts = np.bincount(labels, minlength=k)[:k]
    if k == 2:
        return np.array([0.0, _binary_offset(lp, int(counts[1]))])
    target = (counts + 0.5) / (n + 0.5 * k)
    b = np.zeros(k)
    best, best_gap = b.copy(), math.inf
    for _ in range(_ITERATIONS):
        shares = np.bincount(np.argmax(lp + b, axis=1), minlength=k) / n
        gap = 0.5 * float(np.abs(shares - counts / n).sum())
        if gap < best_gap:
            best, best_gap = b.copy(), gap
        if gap == 0.0:
            break
        b = b + 0.5 * (np.log(target) - np.log((shares * n + 0.5) / (n + 0.5 * k)))
        b -= b[0]
    return best


def _folds(labels: np.ndarray, seed: int) -> np.ndarray:
    """Fold index per row: each class's rows dealt to the folds in a seeded order (stratified)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(labels.size, dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(rows.size) % FOLDS
    return fold


def cross_fitted(
    probs: np.ndarray, y: np.ndarray | Sequence[int], classes: Sequence[str], *, seed: int, round_: int | None = None
) -> tuple[np.ndarray, PriorCalibration]:
    """Cross-fitted calibrated decisions for every row (offsets from the other fold), and the
    calibration fitted on all rows (the one to release)."""
    labels = np.asarray(y, dtype=np.int64)
    decided = np.argmax(_log_probs(probs), axis=1).astype(np.int64)
    constant = np.unique(decided).size == 1  # the constant-model finding's question, on every held-out row
    fold = _folds(labels, seed)
    for f in range(FOLDS):
        rows = fold == f
        if rows.any() and (~rows).any():
            decided[rows] = apply_offsets(probs[rows], _fit(probs[~rows], labels[~rows], constant).offsets)
    fit = _fit(probs, labels, constant)
    k = len(classes)
    shares = np.bincount(labels, minlength=k)[:k] / max(labels.size, 1)
    cal = PriorCalibration(
        classes=list(classes),
        offsets=[float(v) for v in fit.offsets],
        class_shares=[float(v) for v in shares],
        rows=int(labels.size),
        round=round_,
        shift_p_value=fit.shift_p_value,
        own_accuracy=fit.own_accuracy,
        matched_accuracy=fit.matched_accuracy,
        rows_gained=fit.gained,
        rows_lost=fit.lost,
        signal_z=None if fit.signal_z is None else max(-1e6, fit.signal_z),
        temperature=fit_temperature(probs, labels),
    )
    return decided, cal


def mean_log_loss(probs: np.ndarray, y: np.ndarray | Sequence[int]) -> float:
    """Mean cross-entropy of class probabilities against the labels (0 rows: 0), clipped at 1e-15 as the
    fairness audit's log loss is, so the two agree on binary tasks."""
    labels = np.asarray(y, dtype=np.int64)
    if not labels.size:
        return 0.0
    p = np.asarray(probs, dtype=np.float64)[np.arange(labels.size), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))


def cross_fitted_tempered(probs: np.ndarray, y: np.ndarray | Sequence[int], *, seed: int) -> np.ndarray:
    """Every row's temperature-scaled probabilities, its temperature fitted on the other fold (the folds
    :func:`cross_fitted` uses), so no row's own label sets the scale of its scores."""
    labels = np.asarray(y, dtype=np.int64)
    out = np.asarray(probs, dtype=np.float64).copy()
    fold = _folds(labels, seed)
    for f in range(FOLDS):
        rows = fold == f
        if rows.any() and (~rows).any():
            out[rows] = tempered(probs[rows], fit_temperature(probs[~rows], labels[~rows]))
    return out


# -- files ---------------------------------------------------------------------------------------


def calibration_from_json(text: str | bytes, where: str) -> PriorCalibration:
    """Parse a calibration file's text; anything else is a ConfigError naming the file and the field."""
    fix = "pass a calibration written by FedGuard (calibration.json beside the run's checkpoints)"
    cal = parse_json_file(text, where, PriorCalibration, FORMAT, "calibration", fix)
    if len(cal.offsets) != len(cal.classes) or not all(math.isfinite(v) for v in cal.offsets):
        raise ConfigError(
            f"invalid calibration: {len(cal.offsets)} offsets for {len(cal.classes)} classes, all must be finite",
            where=where,
            fix=fix,
        )
    return cal


def load_calibration(path: Path) -> PriorCalibration:
    data = read_json_file(path, "calibration", "pass --calibration with the path of a calibration.json file")
    return calibration_from_json(data, str(path))
