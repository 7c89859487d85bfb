"""Findings about the model itself: a constant or skewed model on every evaluation, and a final model that
scores clearly below an earlier round's.

The fairness audit needs sensitive columns; these findings do not. They read four numbers every
evaluation reports with its accuracy (:func:`prediction_summary`), so a model that predicts the
majority class for every row is called out whether or not the schema names a sensitive column:
its accuracy is that class's share, not learning, and a report must never say "finished" over it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from common.fairness.audit_findings import Finding
from common.fairness.config import FairnessConfig

#: Keys :func:`prediction_summary` adds to an evaluation's metrics (aggregates of the held-out set).
PREDICTED_CLASSES = "predicted_classes"  # how many distinct classes the model predicted
TOP_CLASS = "top_class"  # index of the class it predicted most
TOP_CLASS_SHARE = "top_class_share"  # share of held-out rows predicted as that class
POSITIVE_RATE = "positive_rate"  # binary: share of rows predicted as class 1
BASE_RATE = "base_rate"  # binary: share of rows whose label is class 1
TRUE_CLASSES = "true_classes"  # how many distinct classes the held-out labels hold
SUMMARY_KEYS = (PREDICTED_CLASSES, TOP_CLASS, TOP_CLASS_SHARE, POSITIVE_RATE, BASE_RATE, TRUE_CLASSES)

#: What to try when a model collapses to one class; concrete, in config terms.
CONSTANT_ADVICE = (
    "lower train.learning_rate (e.g. halve it), raise train.batch_size (less DP noise per step), run more "
    "rounds, and check the label balance of the nodes' data (a model that predicts the majority class scores "
    "that class's share); with a rare class, raise dp.max_grad_norm (e.g. to 5): the records the model gets "
    "wrong have the largest gradients, so clipping at a small norm weighs them least and pushes the model "
    "further to the majority class"
)


def prediction_summary(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """What the model predicted overall, and how many classes the held-out labels hold, as metrics: enough to
    tell a constant or skewed model (a model can only be called constant against labels that vary)."""
    counts = np.bincount(y_pred.astype(np.int64), minlength=num_classes)
    n = max(1, len(y_pred))
    top = int(np.argmax(counts))
    out = {
        PREDICTED_CLASSES: float(np.count_nonzero(counts)),
        TOP_CLASS: float(top),
        TOP_CLASS_SHARE: float(counts[top] / n),
        TRUE_CLASSES: float(len(np.unique(y_true))),
    }
    if num_classes == 2:
        out[POSITIVE_RATE] = float(np.mean(y_pred == 1)) if len(y_pred) else 0.0
        out[BASE_RATE] = float(np.mean(y_true == 1)) if len(y_true) else 0.0
    return out


def _class_name(index: int, classes: Sequence[str] | None) -> str:
    return repr(classes[index]) if classes and 0 <= index < len(classes) else f"#{index}"


def is_constant(metrics: Mapping[str, float]) -> bool:
    """The model predicted one class for every held-out row although the rows carry at least two.

    False on an empty held-out set (nothing was predicted), on a single-label one (one predicted class may
    simply be right), and for an evaluation from before the summary.
    """
    if metrics.get("n", 1.0) <= 0 or PREDICTED_CLASSES not in metrics:
        return False
    return metrics[PREDICTED_CLASSES] <= 1 and metrics.get(TRUE_CLASSES, 2.0) >= 2


def model_findings(
    metrics: Mapping[str, float],
    cfg: FairnessConfig | None = None,
    round: int | None = None,
    classes: Sequence[str] | None = None,
) -> list[Finding]:
    """A constant model (critical) or, for binary tasks, a class predicted for a share of rows off its base rate
    by more than ``cfg.prediction_skew_factor`` either way (warning; the positive class checked first). Empty
    for metrics without :func:`prediction_summary` and for an empty held-out set (no rows: nothing to judge)."""
    cfg = cfg or FairnessConfig()
    if metrics.get("n", 1.0) <= 0:
        return []
    common: dict[str, object] = {
        "attribute": "(overall)",
        "groups": [],
        "first_seen_round": round,
        "last_seen_round": round,
    }
    if is_constant(metrics):
        top = _class_name(int(metrics.get(TOP_CLASS, 0)), classes)
        acc = metrics.get("accuracy")
        share = f": its accuracy {acc:.3f} is that class's share of the held-out set" if acc is not None else ""
        return [
            Finding(
                kind="constant_model",
                severity="critical",
                value=1.0,
                threshold=1.0,
                message=f"the model predicts one class ({top}) for every held-out row{share}, not learning. "
                f"Try: {CONSTANT_ADVICE}",
                **common,  # type: ignore[arg-type]
            )
        ]
    pos, base = metrics.get(POSITIVE_RATE), metrics.get(BASE_RATE)
    if pos is None or base is None:
        return []
    factor = cfg.prediction_skew_factor
    # Each class's predicted share against its own base rate, the positive class first. With a majority
    # positive class (base rate above 1/factor, e.g. "yes" at 80%) its share can never exceed factor × base:
    # a model answering "yes" for 99.5% of rows only shows as "no" predicted for 0.5% against 20%.
    for index, rate, base_rate in ((1, pos, base), (0, 1.0 - pos, 1.0 - base)):
        if base_rate <= 0.0:
            continue
        ratio = rate / base_rate
        if 1.0 / factor <= ratio <= factor:
            continue
        # Too few reads as "below 1/1.5 = 0.67×": "0.54×, below the 1.5× limit" would read as within it.
        side = f"above the {factor:g}× limit" if ratio > factor else f"below 1/{factor:g} = {1 / factor:.2f}×"
        return [
            Finding(
                kind="skewed_prediction_rate",
                severity="warning",
                value=rate,
                threshold=factor * base_rate if ratio > factor else base_rate / factor,
                message=f"the model predicts {_class_name(index, classes)} for {100 * rate:.1f}% of held-out rows "
                f"against a base rate of {100 * base_rate:.1f}% ({ratio:.2f}×, {side}): its errors fall mostly "
                "on one class",
                **common,  # type: ignore[arg-type]
            )
        ]
    return []


def constant_streak(evaluations: Mapping[int, Mapping[str, float]]) -> int:
    """How many of the latest evaluated rounds in a row (round 0, the initial model, excluded) were constant."""
    streak = 0
    for rnd in sorted((r for r in evaluations if r > 0), reverse=True):
        if not is_constant(evaluations[rnd]):
            break
        streak += 1
    return streak


def constant_streak_line(rnd: int, streak: int, metrics: Mapping[str, float], classes: Sequence[str] | None) -> str:
    """The round line's call-out for a model constant for ``streak`` consecutive rounds."""
    top = _class_name(int(metrics.get(TOP_CLASS, 0)), classes)
    return (
        f"  round {rnd}: WARNING the model has predicted one class ({top}) for every held-out row for {streak} "
        f"consecutive round(s). Try: {CONSTANT_ADVICE}"
    )


#: What to try when the final model scores below an earlier round's.
REGRESSION_ADVICE = (
    "fewer local steps per round (a larger train.batch_size, or more rounds at the same ε) and a look at the "
    "nodes' label balance: FedAvg over nodes that each hold mostly one class swings between rounds. Picking the "
    "round by this held-out score would overstate how the model does on new data"
)


def regression_finding(
    evaluations: Mapping[int, Mapping[str, float]], cfg: FairnessConfig | None = None
) -> Finding | None:
    """A final model that scores clearly below an earlier round's (rounds ≥ 1 whose model was not constant:
    the initial model's score is chance, a constant model's a class share), or None.

    "Clearly": by more than ``cfg.regression_margin`` and more than two standard errors of the better round's
    held-out accuracy, so a small hold-out's noise raises nothing. The run reports the final model; a reviewer
    must know when it is not the best this federation produced.
    """
    cfg = cfg or FairnessConfig()
    rounds = sorted(r for r in evaluations if r > 0 and "accuracy" in evaluations[r])
    earlier = [r for r in rounds[:-1] if not is_constant(evaluations[r])]  # a class share is not a model's skill
    if not earlier:
        return None
    final = rounds[-1]
    best = max(earlier, key=lambda r: (evaluations[r]["accuracy"], -r))
    a_best, a_final = evaluations[best]["accuracy"], evaluations[final]["accuracy"]
    n = evaluations[best].get("n", 0.0)
    se = float(np.sqrt(a_best * (1.0 - a_best) / n)) if n > 0 else float("inf")
    margin = max(cfg.regression_margin, 2.0 * se)
    if a_best - a_final <= margin:
        return None
    curve = ", ".join(f"{evaluations[r]['accuracy']:.3f}" for r in rounds)
    return Finding(
        kind="final_model_regressed",
        severity="warning",
        attribute="(overall)",
        groups=[],
        value=a_final,
        threshold=a_best - margin,
        first_seen_round=best,
        last_seen_round=final,
        message=f"the final model (round {final}) scores {a_final:.3f} on the held-out set, {a_best - a_final:.3f} "
        f"below round {best}'s {a_best:.3f} (held-out accuracy by round: {curve}). Try: {REGRESSION_ADVICE}",
    )
