"""Findings about the model itself: a constant or skewed model, or one no better than the majority class, on
every evaluation, and a final model that scores clearly below an earlier round's.

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
MAJORITY_CLASS = "majority_class"  # index of the held-out labels' most common class
MAJORITY_SHARE = "majority_share"  # its share of the held-out rows: the accuracy of always predicting it
SUMMARY_KEYS: tuple[str, ...] = (PREDICTED_CLASSES, TOP_CLASS, TOP_CLASS_SHARE, POSITIVE_RATE, BASE_RATE)
SUMMARY_KEYS += (TRUE_CLASSES, MAJORITY_CLASS, MAJORITY_SHARE)

#: What to try when a model collapses to one class; concrete, in config terms.
CONSTANT_ADVICE = (
    "lower train.learning_rate (e.g. halve it), raise train.batch_size (less DP noise per step), run more "
    "rounds, and check the label balance of the nodes' data (a model that predicts the majority class scores "
    "that class's share); with a rare class, raise dp.max_grad_norm (e.g. to 5): the records the model gets "
    "wrong have the largest gradients, so clipping at a small norm weighs them least and pushes the model "
    "further to the majority class"
)

#: What to try when a model scores no better than always predicting the majority class.
NO_SKILL_ADVICE = (
    "the same config without DP ([dp] enabled = false, in simulation) shows whether the features carry the signal; "
    "if they do without DP and not with it, the noise drowns it at this data size: give each node more training rows "
    "(fewer, larger nodes), or raise dp.target_epsilon or train.batch_size; if they do not, check that the held-out "
    "set is drawn like the nodes' data and that the label column is the one meant"
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
    if len(y_true):
        label_counts = np.bincount(y_true.astype(np.int64), minlength=num_classes)
        out[MAJORITY_CLASS] = float(np.argmax(label_counts))
        out[MAJORITY_SHARE] = float(label_counts.max() / len(y_true))
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
    """A constant model (critical); otherwise, for binary tasks, a class predicted for a share of rows off its
    base rate by more than ``cfg.prediction_skew_factor`` either way (warning; the positive class checked first),
    and a model whose accuracy is not above the majority class's share (warning; not for round 0, the
    untrained initial model). Empty for metrics without :func:`prediction_summary` and for an empty held-out
    set (no rows: nothing to judge)."""
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
    no_skill = _no_better_than_majority(metrics, classes, common) if round != 0 else []
    return _skewed(metrics, cfg, classes, common) + no_skill


def majority_baseline(metrics: Mapping[str, float]) -> tuple[float, int] | None:
    """The held-out labels' most common class's share and index (always predicting it scores that share), or None
    when the evaluation cannot say: no summary, no rows, or labels that do not vary (then the constant is right).
    Binary evaluations from before ``majority_share`` take it from the base rate."""
    share, majority = metrics.get(MAJORITY_SHARE), metrics.get(MAJORITY_CLASS)
    if share is None and metrics.get(BASE_RATE) is not None:
        base = metrics[BASE_RATE]
        share, majority = max(base, 1.0 - base), float(base > 0.5)
    if share is None or majority is None or metrics.get("n", 1.0) <= 0 or metrics.get(TRUE_CLASSES, 2.0) < 2:
        return None
    return share, int(majority)


def no_better_than_majority(metrics: Mapping[str, float]) -> bool:
    """Held-out accuracy at or below the majority class's share: whatever the decisions look like (spread over the
    classes by prior calibration, say), the model adds nothing to always predicting that class."""
    baseline, acc = majority_baseline(metrics), metrics.get("accuracy")
    return baseline is not None and acc is not None and bool(np.isfinite(acc)) and acc <= baseline[0] + 1e-9


def _no_better_than_majority(
    metrics: Mapping[str, float], classes: Sequence[str] | None, common: dict[str, object]
) -> list[Finding]:
    baseline = majority_baseline(metrics)
    if baseline is None or not no_better_than_majority(metrics):
        return []
    acc, (share, majority) = metrics["accuracy"], baseline
    own = metrics.get("uncalibrated_accuracy")
    own_note = f"; the model's own decisions {own:.3f}" if own is not None and abs(own - acc) > 5e-4 else ""
    f1 = metrics.get("macro_f1")
    f1_note = f"; macro-F1 {f1:.3f}" if f1 is not None and np.isfinite(f1) else ""
    said = (
        f"the model's held-out accuracy ({acc:.3f}{own_note}{f1_note}) is not above {share:.3f}, what predicting the "
        f"most common class ({_class_name(majority, classes)}) for every row scores"
    )
    pos, base = metrics.get(POSITIVE_RATE), metrics.get(BASE_RATE)
    if pos is not None and base is not None:  # binary: against answering at random at the model's own rates
        chance = pos * base + (1.0 - pos) * (1.0 - base)
        said += (
            f"; it beats answering at random at the rate it predicts each class ({chance:.3f}), so it tells some "
            "rows apart, but not well enough to beat that constant"
            if acc > chance
            else f", nor answering at random at the rate it predicts each class ({chance:.3f}): it has learned "
            "nothing that holds on these rows"
        )
    return [
        Finding(
            kind="no_better_than_majority",
            severity="warning",
            value=acc,
            threshold=share,
            message=f"{said}. Try: {NO_SKILL_ADVICE}",
            **common,  # type: ignore[arg-type]
        )
    ]


def _skewed(
    metrics: Mapping[str, float], cfg: FairnessConfig, classes: Sequence[str] | None, common: dict[str, object]
) -> list[Finding]:
    """A binary model's class predicted for a share of rows off its base rate beyond ``cfg.prediction_skew_factor``."""
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
