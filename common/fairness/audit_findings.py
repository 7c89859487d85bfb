"""Audit findings: threshold breaches and degenerate-model warnings, tracked across rounds.

A finding is what a reviewer acts on; a low disparity from a model that predicts one class is
reported as a degenerate model, never as evidence of fairness.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from common.fairness.config import FairnessConfig, _Model
from common.fairness.metrics import Audit, Disparity, FederatedAudit

Severity = Literal["warning", "critical"]
FindingKind = Literal[
    "demographic_parity_ratio",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "degenerate_selection_rate",
    "degenerate_low_tpr",
    "constant_model",
    "skewed_prediction_rate",
    "no_better_than_majority",
    "final_model_regressed",
]


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
    significant: bool | None = None  # the whole CI lies past the threshold (None: no CI); False: never critical
    first_seen_round: int | None = None
    last_seen_round: int | None = None
    message: str


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
            chance = ""
            if significant is False:  # the interval reaches the limit: never critical on a maybe
                critical = False
                cause = "the counts' DP noise or chance" if view == "federated" else "chance"
                chance = f"; not significant: the interval reaches {limit:g}, so {cause} could explain it"
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
                f"between {' and '.join(d.groups)}{chance}",
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
    return result.confidence if result.confidence is not None else 0.95


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
