"""The mitigation parts of the fairness report: what the run did to close its gaps, and the options a sweep compared.

A run with ``[mitigation]`` gets a section built from its config, the per-round multipliers and
spread in the round meta, each node's ε and the thresholds policy beside its checkpoints;
``fedguard fairness sweep`` writes a :class:`FairnessSweep` (the baseline and every strength of
one method, Pareto-marked) that the report can show as a trade-off chart and table. Kept apart
from ``server.fairness_report`` (which imports the models and blocks from here, never the other
way round) so the report of one run's audits stays readable on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.config import RunConfig
from common.errors import FedGuardError
from common.fairness import Finding
from common.fairness.config import MITIGATION_STRENGTH
from common.fairness.thresholds import ThresholdPolicy, load_policy
from server.charts import TradeoffPoint
from server.report_blocks import Block, Tradeoff
from server.run_health import natural_key, run_health


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MitigationRound(_Model):
    """One round's mitigation data from the round meta: each node's aggregation multiplier, the accuracy spread."""

    round: int
    weights: dict[str, float] = Field(default_factory=dict)  # node name → multiplier
    spread: dict[str, float | int | None] | None = None


class MitigationSummary(_Model):
    """What the run did to close its gaps, and what it cost the nodes in privacy."""

    method: Literal["reweighing", "fairfed", "qfedavg", "thresholds"]
    attribute: str
    strength: float
    strength_meaning: str
    constraint: Literal["demographic_parity", "equalized_odds"]
    noise_multiplier: float
    public_priors: bool = False
    releases: str  # which node releases the method adds (they are in each node's ε)
    epsilon: dict[str, float | None] = Field(default_factory=dict)  # node name → this run's ε, releases included
    rounds: list[MitigationRound] = Field(default_factory=list)
    policy: ThresholdPolicy | None = None  # thresholds: the policy file beside the checkpoints


class SweepOption(_Model):
    """One point of a sweep: a simulated run of the config with one mitigation choice."""

    label: str
    method: Literal["none", "reweighing", "fairfed", "qfedavg", "thresholds"]
    strength: float | None = None  # None: the baseline (no mitigation)
    baseline: bool = False
    configured: bool = False  # the config's own method and strength
    pareto: bool = False  # no other option is at least as accurate with at most the same gap, and better in one
    run_id: int
    store: str
    status: str
    accuracy: float | None
    dp_ratio: float | None = None
    dp_difference: float | None = None
    eo_difference: float | None = None
    measured_on: str  # which rows the numbers are from
    #: thresholds: the same model's own decisions on the same rows (accuracy, dp_ratio, dp_difference, eo_difference)
    unprocessed: dict[str, float | None] | None = None
    findings: list[Finding] = Field(default_factory=list)
    scope: list[str] | None = None  # the attributes its findings cover (None: all; thresholds: the mitigated one)
    clears: list[str] = Field(default_factory=list)  # baseline findings (finding_id) this option no longer has
    introduces: list[str] = Field(default_factory=list)  # findings the baseline did not have
    epsilon: dict[str, float | None] = Field(default_factory=dict)  # node name → ε, mitigation releases included
    wall_s: float = Field(ge=0.0)

    def gap(self, metric: str) -> float | None:
        return self.dp_difference if metric == "demographic_parity_difference" else self.eo_difference


class FairnessSweep(_Model):
    """``fedguard fairness sweep`` output: the baseline and every strength of one method, Pareto-marked."""

    format: Literal["fedguard-fairness-sweep/1"] = "fedguard-fairness-sweep/1"
    generated_at: float
    config_path: str
    config_hash: str
    run_name: str
    method: Literal["reweighing", "fairfed", "qfedavg", "thresholds"]
    attribute: str
    constraint: Literal["demographic_parity", "equalized_odds"]
    gap_metric: Literal["demographic_parity_difference", "equalized_odds_difference"]
    values: list[float]
    configured_strength: float | None = None  # the config's strength when its method is the swept one
    complete: bool = True  # False while the sweep is still running (the file is rewritten after each run)
    options: list[SweepOption]


# -- building: the run's section from its config and store, a sweep's marks ----------------
#: Which node releases each method adds; every one is planned with the node's DP-SGD rounds and
#: composed into the node's ε by its own accountant (so the ε shown per node already includes it).
RELEASES = {
    "reweighing": "one release per node before round 1: the group × label counts of its training split "
    "(Gaussian, z = {z:g})",
    "reweighing-priors": "none: the weights come from the public priors the config declares",
    "fairfed": "one release per node per round it takes part in: its per-group confusion counts of the global "
    "model it received, on all its rows (Gaussian, z = {z:g})",
    "qfedavg": "one release per node per round it takes part in: its per-group confusion counts of the global "
    "model it received, on all its rows (Gaussian, z = {z:g})",
    "thresholds": "none: the thresholds are fitted on the evaluator's held-out data; nodes release nothing for them",
}
METHOD_NAMES = {
    "reweighing": "reweighing with DP group × label statistics (Kamiran & Calders)",
    "fairfed": "fairness-aware aggregation weights (FairFed-style)",
    "qfedavg": "aggregation weights for nodes left behind (q-FedAvg-style)",
    "thresholds": "group-specific decision thresholds at the evaluator (post-processing)",
}
GAP_LABELS = {
    "demographic_parity_difference": "demographic-parity difference",
    "equalized_odds_difference": "equalized-odds difference",
}
ATTRIBUTE_AT_PREDICTION = (
    "Group thresholds need the sensitive attribute at prediction time: whoever applies this model must know each "
    "person's group, and must be allowed to use it for the decision. Without it, use the model's own threshold."
)


def mitigation_summary(
    cfg: RunConfig,
    rounds: Sequence[dict[str, Any]],
    epsilon: dict[str, float | None],
    policy: ThresholdPolicy | None = None,
) -> MitigationSummary | None:
    """The run's mitigation as the report states it; None when the config has none.

    ``rounds``: the store's round rows (their meta's ``"mitigation"`` key holds each round's node
    multipliers and spread); ``epsilon``: node name → this run's ε (``server.run_health``);
    ``policy``: the thresholds policy the run wrote beside its checkpoints, when there is one.
    """
    m = cfg.mitigation
    if m.method == "none":
        return None
    key = "reweighing-priors" if m.method == "reweighing" and m.priors is not None else m.method
    per_round = []
    for row in rounds:
        data = (row.get("meta") or {}).get("mitigation")
        if not isinstance(data, dict):
            continue
        weights, spread = data.get("weights"), data.get("spread")
        per_round.append(
            MitigationRound(
                round=int(row["round"]),
                weights=_numbers(weights) if isinstance(weights, dict) else {},
                spread=_numbers(spread) if isinstance(spread, dict) else None,
            )
        )
    return MitigationSummary(
        method=m.method,
        attribute=cfg.mitigation_attribute or "",
        strength=m.strength,
        strength_meaning=MITIGATION_STRENGTH[m.method],
        constraint=m.constraint,
        noise_multiplier=m.noise_multiplier,
        public_priors=m.priors is not None,
        releases=RELEASES[key].format(z=m.noise_multiplier),
        epsilon=epsilon,
        rounds=per_round,
        policy=policy,
    )


def _number(v: object) -> float | None:
    """A JSON number as a float; None for anything else (booleans included)."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _numbers(d: dict[Any, Any]) -> dict[str, float]:
    return {str(k): n for k, v in d.items() if (n := _number(v)) is not None}


def finding_id(f: Finding) -> str:
    """A finding across runs: what was breached for which attribute (``demographic_parity_ratio: gender``)."""
    return f"{f.kind}: {f.attribute}"


def _finding_text(fid: str) -> str:
    kind, _, attribute = fid.partition(": ")
    return f"{kind.replace('_', ' ')} " + (attribute if attribute.startswith("(") else f"({attribute})")


def pareto_flags(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For (accuracy, gap) pairs: True where no other point is at least as accurate with at most the same gap,
    and strictly better in one of them. A point missing either number is never optimal."""
    full = [(a, g) for a, g in points if a is not None and g is not None]
    out = []
    for a, g in points:
        if a is None or g is None:
            out.append(False)
            continue
        out.append(not any(a2 >= a and g2 <= g and (a2 > a or g2 < g) for a2, g2 in full))
    return out


def mark_sweep(sweep: FairnessSweep) -> FairnessSweep:
    """The sweep with its Pareto-optimal options marked and, per option, the baseline findings it clears
    and the findings it adds (by :func:`finding_id`); an option whose findings cover only some attributes
    (``scope``) is compared on those alone, so it never clears a finding it did not measure."""
    flags = pareto_flags([(o.accuracy, o.gap(sweep.gap_metric)) for o in sweep.options])
    base = next((o for o in sweep.options if o.baseline), None)
    options = []
    for o, flag in zip(sweep.options, flags, strict=True):
        ids = {finding_id(f) for f in o.findings}
        base_ids = {finding_id(f) for f in (base.findings if base else []) if o.scope is None or f.attribute in o.scope}
        options.append(
            o.model_copy(
                update={
                    "pareto": flag,
                    "clears": sorted(base_ids - ids) if not o.baseline else [],
                    "introduces": sorted(ids - base_ids) if base and not o.baseline else [],
                }
            )
        )
    return sweep.model_copy(update={"options": options})


def load_sweep(path: str | Path) -> FairnessSweep:
    """A sweep file written by ``fedguard fairness sweep``, validated."""
    p = Path(path)
    if not p.is_file():
        raise FedGuardError("sweep file not found", where=str(p), fix="pass the JSON `fedguard fairness sweep` wrote")
    try:
        return FairnessSweep.model_validate_json(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[:6]
        raise FedGuardError(
            "not a fairness sweep file: " + " ".join(first),
            where=str(p),
            fix="pass the JSON `fedguard fairness sweep --out FILE` wrote (format fedguard-fairness-sweep/1)",
        ) from None


def mitigation_from_store(
    store_path: str | Path, run_id: int, cfg: RunConfig, rounds: Sequence[dict[str, Any]]
) -> MitigationSummary | None:
    """The mitigation section of a recorded run (``rounds``: its store round rows); None when it has none."""
    if cfg.mitigation.method == "none":
        return None
    epsilon = {n.name: n.epsilon for n in run_health(store_path, run_id).nodes}
    return mitigation_summary(cfg, rounds, epsilon, read_policy(Path(store_path), run_id))


def read_policy(store_path: Path, run_id: int) -> ThresholdPolicy | None:
    """The thresholds policy a run wrote beside its checkpoints (validated), or None when it wrote none."""
    from server.checkpoint import checkpoint_dir

    path = checkpoint_dir(store_path, run_id) / "thresholds.json"
    return load_policy(path) if path.is_file() else None


# -- rendering -----------------------------------------------------------------------------
def _fmt(v: float | int | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def mitigation_blocks(m: MitigationSummary) -> list[Block]:
    constraint = m.constraint.replace("_", " ")
    eps = ", ".join(f"{name} {'–' if e is None else f'{e:.3f}'}" for name, e in m.epsilon.items()) or "not reported"
    blocks: list[Block] = [
        ("h2", "Mitigation"),
        (
            "ul",
            [
                f"Method: {m.method} — {METHOD_NAMES[m.method]}",
                f"Attribute: {m.attribute}; constraint: {constraint}",
                f"Strength: {m.strength:g} ({m.strength_meaning})",
                f"Node releases it adds: {m.releases}",
                (
                    "Privacy cost: every such release is planned with the node's DP-SGD rounds and composed into "
                    f"the node's ε by its own accountant, so the ε per node already includes it: {eps}"
                    if _releases(m)
                    else f"Privacy cost: none beyond the run's other releases; the ε per node: {eps}"
                ),
            ],
        ),
    ]
    if m.rounds:
        nodes = sorted({n for r in m.rounds for n in r.weights}, key=natural_key)
        if nodes:
            blocks += [
                ("h3", "Aggregation multipliers per round"),
                (
                    "p",
                    "Each node's multiplier on its FedAvg weight (from its noised counts; 1 = plain FedAvg). "
                    "No node sent an exact local metric.",
                ),
                (
                    "table",
                    (
                        ["round", *nodes],
                        [[str(r.round), *[_fmt(r.weights.get(n)) for n in nodes]] for r in m.rounds],
                    ),
                ),
            ]
        order = ["clients", "worst", "best", "mean", "spread", "std"]  # ClientSpread's, then any others
        present = {k for r in m.rounds for k in (r.spread or {})}
        keys = [k for k in order if k in present] + sorted(present - set(order))
        if keys:
            blocks += [
                ("h3", "Per-node accuracy spread per round"),
                ("p", "From the nodes' noised counts of the global model; a distribution, no node named."),
                (
                    "table",
                    (
                        ["round", *keys],
                        [[str(r.round), *[_spread_cell((r.spread or {}).get(k)) for k in keys]] for r in m.rounds],
                    ),
                ),
            ]
    if m.method == "thresholds":
        blocks += _policy_blocks(m.policy)
    return blocks


def _spread_cell(v: float | int | None) -> str:
    """A count as an integer, a rate to three decimals."""
    return str(int(v)) if v is not None and float(v).is_integer() and abs(v) >= 1 else _fmt(v)


def _releases(m: MitigationSummary) -> bool:
    return m.method in ("fairfed", "qfedavg") or (m.method == "reweighing" and not m.public_priors)


def _policy_blocks(policy: ThresholdPolicy | None) -> list[Block]:
    blocks: list[Block] = [("h3", "Threshold policy"), ("p", ATTRIBUTE_AT_PREDICTION)]
    if policy is None:
        blocks.append(("p", "No threshold policy was written for this run (no evaluation fitted one)."))
        return blocks
    rows = [[g, _fmt(t)] for g, t in policy.thresholds.items()]
    rows.append(["any other group (unseen, or too small to fit)", _fmt(policy.default_threshold)])
    blocks.append(("table", (["group", "threshold on P(positive)"], rows)))
    fitted_for = "" if policy.round is None else f" for the round {policy.round} model"
    blocks.append(
        (
            "p",
            f"Fitted{fitted_for} on {policy.calibration_rows} calibration rows of the evaluator's held-out data; the "
            "numbers below are measured on the held-out rows not used to fit them. Every other number and finding "
            "in this report is of the model's own decisions, before the thresholds.",
        )
    )
    before, after = policy.before, policy.after
    if before is not None and after is not None:
        metrics = [
            ("accuracy", "accuracy"),
            ("demographic_parity_ratio", "demographic-parity ratio"),
            ("demographic_parity_difference", "demographic-parity difference"),
            ("equalized_odds_difference", "equalized-odds difference"),
        ]
        rows = [[label, _fmt(getattr(before, key)), _fmt(getattr(after, key))] for key, label in metrics]
        blocks.append(("table", (["metric", "before thresholds", "after thresholds"], rows)))
        header = ["group", "selection rate before → after", "TPR before → after", "FPR before → after"]
        changes = []
        for group, now in after.groups.items():
            was = before.groups.get(group)
            if now is None or was is None:
                changes.append([group, "suppressed", "suppressed", "suppressed"])
            else:
                cells = [f"{_fmt(getattr(was, k))} → {_fmt(getattr(now, k))}" for k in ("selection_rate", "tpr", "fpr")]
                changes.append([group, *cells])
        blocks.append(("table", (header, changes)))
    if policy.note:
        blocks.append(("p", policy.note))
    return blocks


def sweep_blocks(sweep: FairnessSweep) -> list[Block]:
    gap_label = GAP_LABELS[sweep.gap_metric]
    base = next((o for o in sweep.options if o.baseline), None)
    values = ", ".join(f"{v:g}" for v in sweep.values)
    blocks: list[Block] = [
        ("h2", f"Mitigation options: {sweep.method} over strengths {values}"),
        (
            "p",
            f"{len(sweep.options)} simulated runs of {sweep.config_path} (config hash {sweep.config_hash[:16]}), "
            f"each with fresh simulated nodes: the baseline without mitigation and {sweep.method} "
            f"({METHOD_NAMES[sweep.method]}) at each strength ({MITIGATION_STRENGTH[sweep.method]}). "
            f"Gap: the worst-group {gap_label} for {sweep.attribute} on the held-out data. Pareto-optimal: no other "
            "option is at least as accurate with at most the same gap and better in one of them. Each option is one "
            "run and DP noise differs from run to run, so a difference of a point or two between options may be "
            "noise rather than the method."
            + (
                " Threshold options are measured on the held-out rows not used to fit their thresholds."
                if sweep.method == "thresholds"
                else ""
            )
            + ("" if sweep.complete else " The sweep did not finish: only the options run so far are shown."),
        ),
    ]
    if sweep.configured_strength is None:
        blocks.append(
            (
                "p",
                f"The config does not use {sweep.method}"
                + (": its own choice is the baseline." if base is not None and base.configured else "."),
            )
        )
    points = [
        TradeoffPoint(o.label, float(g), float(o.accuracy), o.pareto, o.baseline, o.configured)
        for o in sweep.options
        if o.accuracy is not None and (g := o.gap(sweep.gap_metric)) is not None
    ]
    blocks.append(
        (
            "plot",
            Tradeoff(
                title=f"Accuracy vs worst-group {gap_label} ({sweep.attribute})",
                points=points,
                xlabel=f"worst-group {gap_label} (lower is fairer)",
                ylabel="held-out accuracy",
                chart_id="sweep-pareto",
            ),
        )
    )
    rows = []
    for o in sweep.options:
        change = (
            None if base is None or base.accuracy is None or o.accuracy is None else 100 * (o.accuracy - base.accuracy)
        )
        eps = [e for e in o.epsilon.values() if e is not None]
        marks = [m for m, on in (("baseline", o.baseline), ("configured", o.configured), ("Pareto", o.pareto)) if on]
        rows.append(
            [
                o.label,
                ", ".join(marks) or "–",
                _fmt(o.accuracy),
                "–" if o.baseline or change is None else f"{change:+.1f}",
                _fmt(o.dp_ratio),
                _fmt(o.dp_difference),
                _fmt(o.eo_difference),
                str(len(o.findings)),
                ", ".join(_finding_text(f) for f in o.clears) or "–",
                "–" if not eps else f"{max(eps):.3f}",
            ]
        )
    blocks.append(
        (
            "table",
            (
                [
                    "option",
                    "marked",
                    "accuracy",
                    "accuracy vs baseline (points)",
                    "DP ratio",
                    "DP difference",
                    "EO difference",
                    "findings",
                    "clears",
                    "largest node ε (every release)",
                ],
                rows,
            ),
        )
    )
    lines = []
    for o in sweep.options:
        if o.baseline:
            found = ", ".join(_finding_text(finding_id(f)) for f in o.findings) or "none"
            lines.append(f"{o.label}: findings {found}")
            continue
        text = f"{o.label}: clears " + (", ".join(_finding_text(f) for f in o.clears) or "no baseline finding")
        if o.introduces:
            text += "; adds " + ", ".join(_finding_text(f) for f in o.introduces)
        if o.unprocessed:
            u = o.unprocessed
            text += (
                f"; the same model without thresholds, on the same rows: accuracy {_fmt(u.get('accuracy'))}, "
                f"DP difference {_fmt(u.get('dp_difference'))}, EO difference {_fmt(u.get('eo_difference'))}"
            )
        lines.append(text + f" ({o.measured_on})")
    blocks.append(("ul", lines))
    return blocks
