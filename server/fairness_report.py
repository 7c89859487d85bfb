"""The fairness report of one run: group metrics over rounds, findings, suppressed groups, provenance.

Built from audits that were already computed (``common.fairness.audit`` per round on the held-out
set, optionally a federated audit from summed client counts and a client-level spread); rendered
as JSON (validated by the pydantic models below), Markdown, or one self-contained HTML file with
inline SVG plots of selection rate and TPR per group over rounds. Same neutral-block rendering
as the privacy report, so Markdown and HTML always say the same thing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.config import RunConfig
from common.errors import FedGuardError, StoreError
from common.fairness import (
    AttributeAudit,
    Audit,
    FairnessConfig,
    FederatedAudit,
    Finding,
    GroupMetrics,
    findings,
    merge_findings,
    model_findings,
    track_findings,
)
from common.fairness.config import MITIGATION_STRENGTH
from common.fairness.thresholds import ThresholdPolicy, load_policy
from server.charts import Series, TradeoffPoint
from server.report_blocks import Block, Plot, Tradeoff
from server.report_blocks import to_html as blocks_to_html
from server.report_blocks import to_markdown as blocks_to_markdown
from server.run_health import natural_key

DEFINITIONS = [
    "Per group: accuracy (tp+tn)/n, selection rate (tp+fp)/n, true-positive rate tp/(tp+fn), false-positive "
    "rate fp/(fp+tn), precision tp/(tp+fp); a rate with a zero denominator is undefined (–) and left out of "
    "disparities.",
    "Disparities over the groups of one attribute that are not suppressed: demographic-parity difference "
    "(max − min selection rate) and ratio (min / max), equal-opportunity difference (max − min TPR), "
    "equalized-odds difference (the larger of the TPR and FPR differences), as fairlearn defines them.",
    "Confidence intervals: percentile bootstrap, resampling the evaluation rows with replacement (fixed seed).",
    "ROC-AUC: Mann–Whitney statistic with mid-ranks (ties count ½). Calibration error (ECE): top-label, "
    "equal-width bins, Σ (n_b/n)·|accuracy_b − confidence_b|. Log loss: mean binary cross-entropy.",
    "Suppressed: a group with fewer rows than the minimum group size; neither its metrics nor its exact size "
    "are shown, and it is left out of disparities — it is never dropped silently.",
    "Degenerate-model findings: a model whose selection rate is far from the base rate, or whose TPR is low for "
    "every group, can show little disparity without being fair.",
]

FEDERATED_NOTE = (
    "The federated view sums per-group confusion counts that each client computed for the global model on its "
    "own validation split. Counts left a node only encrypted (homomorphic mode) or with Laplace noise charged to "
    "the node's privacy ledger (plaintext mode); a group below a node's minimum size never left that node, so "
    "federated group sizes are lower bounds. It describes the clients' validation data, not the held-out set."
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Provenance(_Model):
    evaluation_size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # common.fairness.dataset_fingerprint or the file's hash
    source: str | None = None  # e.g. "holdout.csv" or "20% held out of gss_wages (seed 7)"


class RoundAudit(_Model):
    round: int
    audit: Audit


class ClientSpread(_Model):
    """Per-client accuracy of the global model, as a distribution: no client ids, no client groups."""

    clients: int
    worst: float
    best: float
    mean: float
    spread: float
    std: float


class SuppressedGroup(_Model):
    view: Literal["central", "federated"]
    attribute: str
    group: str
    rounds: list[int]


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


class FairnessReport(_Model):
    format: Literal["fedguard-fairness-report/1"] = "fedguard-fairness-report/1"
    generated_at: float
    run_id: int
    run_name: str
    config: FairnessConfig
    provenance: Provenance
    rounds: list[RoundAudit]
    findings: list[Finding]
    suppressed: list[SuppressedGroup]
    federated: FederatedAudit | None = None
    client_spread: ClientSpread | None = None
    mitigation: MitigationSummary | None = None
    sweep: FairnessSweep | None = None
    definitions: list[str] = Field(default_factory=lambda: list(DEFINITIONS))


def build_fairness_report(
    run_id: int,
    run_name: str,
    audits_by_round: Sequence[tuple[int, Audit]],
    provenance: Provenance | dict[str, object],
    federated: FederatedAudit | None = None,
    client_spread: ClientSpread | dict[str, float | int] | None = None,
    cfg: FairnessConfig | None = None,
    metrics_by_round: dict[int, dict[str, float]] | None = None,
    classes: Sequence[str] | None = None,
    mitigation: MitigationSummary | None = None,
    sweep: FairnessSweep | None = None,
) -> FairnessReport:
    """Assemble the report; findings are computed here from the audits, with the round each was first seen.

    ``cfg`` must be the config the audits were computed with (its thresholds make the findings).
    ``metrics_by_round`` (the evaluations) adds the model findings (a constant or skewed model) to rounds
    whose audit did not already call the model degenerate.
    """
    cfg = cfg or FairnessConfig()
    rounds = sorted(audits_by_round, key=lambda item: item[0])
    found = track_findings((rnd, _round_findings(a, cfg, rnd, metrics_by_round, classes)) for rnd, a in rounds)
    if federated is not None:
        fed_round = federated.round if federated.round is not None else (rounds[-1][0] if rounds else 0)
        found = merge_findings(found, findings(federated, cfg, fed_round, view="federated"), fed_round)
    suppressed: dict[tuple[str, str, str], list[int]] = {}
    for rnd, a in rounds:
        for att in a.attributes:
            for g in att.groups:
                if g.suppressed:
                    suppressed.setdefault(("central", att.name, g.group), []).append(rnd)
    if federated is not None:
        for att in federated.attributes:
            for g in att.groups:
                if g.suppressed:
                    seen = suppressed.setdefault(("federated", att.name, g.group), [])
                    seen += [] if federated.round is None else [federated.round]
    severity_order = {"critical": 0, "warning": 1}
    return FairnessReport(
        generated_at=time.time(),
        run_id=run_id,
        run_name=run_name,
        config=cfg,
        provenance=provenance if isinstance(provenance, Provenance) else Provenance.model_validate(provenance),
        rounds=[RoundAudit(round=rnd, audit=a) for rnd, a in rounds],
        findings=sorted(found, key=lambda f: (severity_order[f.severity], f.first_seen_round or 0, f.attribute)),
        suppressed=[
            SuppressedGroup(view=v, attribute=att, group=g, rounds=rs)  # type: ignore[arg-type]
            for (v, att, g), rs in suppressed.items()
        ],
        federated=federated,
        client_spread=client_spread
        if client_spread is None or isinstance(client_spread, ClientSpread)
        else ClientSpread.model_validate(client_spread),
        mitigation=mitigation,
        sweep=sweep,
    )


def _round_findings(
    a: Audit,
    cfg: FairnessConfig,
    rnd: int,
    metrics_by_round: dict[int, dict[str, float]] | None,
    classes: Sequence[str] | None,
) -> list[Finding]:
    found = findings(a, cfg, rnd)
    if any(f.kind.startswith("degenerate_") for f in found):
        return found  # the audit already says the model is degenerate
    return found + model_findings((metrics_by_round or {}).get(rnd, {}), cfg, rnd, classes)


# -- mitigation: the run's own, and the options a sweep compared -----------------------------
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


# -- rendering -----------------------------------------------------------------------------
def _fmt(v: float | int | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _latest(rep: FairnessReport) -> RoundAudit | None:
    return rep.rounds[-1] if rep.rounds else None


def _group_cells(g: GroupMetrics, min_size: int) -> list[str]:
    if g.suppressed:
        return [
            g.group,
            f"< {min_size}",
            "suppressed",
            "suppressed",
            "suppressed",
            "suppressed",
            "suppressed",
            "suppressed",
        ]
    return [
        g.group,
        _fmt(g.size, "d"),
        _fmt(g.base_rate),
        _fmt(g.accuracy),
        _fmt(g.selection_rate),
        _fmt(g.tpr),
        _fmt(g.fpr),
        _fmt(g.precision),
    ]


_GROUP_HEADER = ["group", "size", "base rate", "accuracy", "selection rate", "TPR", "FPR", "precision"]
_DISPARITIES = [
    ("demographic_parity_difference", "demographic-parity difference"),
    ("demographic_parity_ratio", "demographic-parity ratio"),
    ("equalized_odds_difference", "equalized-odds difference"),
    ("equal_opportunity_difference", "equal-opportunity difference"),
]


def _attribute_blocks(att: AttributeAudit, level: str, confidence: float | None, min_size: int) -> list[Block]:
    rows = [_group_cells(g, min_size) for g in att.groups]
    blocks: list[Block] = [("h" + level, att.name), ("table", (_GROUP_HEADER, rows))]
    if att.disparities is None:
        blocks.append(("p", att.note or "no disparities"))
        return blocks
    header = ["disparity", "value"]
    if confidence is not None:
        header.append(f"{confidence:.0%} CI")
    header.append("groups")
    rows = []
    for key, label in _DISPARITIES:
        d = getattr(att.disparities, key)
        row = [label, _fmt(d.value)]
        if confidence is not None:
            row.append("–" if d.ci_low is None else f"{d.ci_low:.3f} – {d.ci_high:.3f}")
        row.append(" vs ".join(d.groups) or "–")
        rows.append(row)
    blocks.append(("table", (header, rows)))
    return blocks


def _series(rep: FairnessReport, attribute: str, metric: str) -> Series:
    out: Series = {}
    for ra in rep.rounds:
        for att in ra.audit.attributes:
            if att.name != attribute:
                continue
            for g in att.groups:
                v = getattr(g, metric)
                if not g.suppressed and v is not None:
                    out.setdefault(g.group, []).append((ra.round, float(v)))
    return out


def _finding_row(f: Finding) -> list[str]:
    ci = "–" if f.ci_low is None else f"{f.ci_low:.3f} – {f.ci_high:.3f}"
    return [
        f.severity,
        f.view,
        f.kind.replace("_", " "),
        f.attribute,
        ", ".join(f.groups) or "all",
        _fmt(f.value),
        _fmt(f.threshold, "g"),
        ci,
        _fmt(f.first_seen_round, "d"),
        _fmt(f.last_seen_round, "d"),
    ]


def _blocks(rep: FairnessReport) -> list[Block]:
    """The report once, as neutral blocks; Markdown and HTML render the same content."""
    cfg, prov = rep.config, rep.provenance
    latest = _latest(rep)
    last_round = latest.round if latest else None
    blocks: list[Block] = [
        ("h1", f"Fairness report — run {rep.run_id} ({rep.run_name})"),
        (
            "ul",
            [
                f"Rounds audited: {', '.join(str(r.round) for r in rep.rounds) or 'none'}",
                f"Evaluation set: {prov.evaluation_size} rows"
                + (f" ({prov.source})" if prov.source else "")
                + f"; SHA-256 {prov.sha256}",
                f"Minimum group size: {cfg.min_group_size} (smaller groups are shown as suppressed)",
                f"Thresholds: demographic-parity ratio ≥ {cfg.dp_ratio_min:g}, equalized-odds difference ≤ "
                f"{cfg.eo_diff_max:g}, equal-opportunity difference ≤ {cfg.eopp_diff_max:g}"
                + (f", demographic-parity difference ≤ {cfg.dp_diff_max:g}" if cfg.dp_diff_max is not None else "")
                + f"; critical beyond {cfg.critical_factor:g}× the allowed gap",
                f"Bootstrap: {cfg.bootstrap_n} replicates, {cfg.confidence:.0%} percentile intervals, seed "
                f"{cfg.bootstrap_seed}",
            ],
        ),
        ("h2", "Findings"),
    ]
    if rep.findings:
        active = [f for f in rep.findings if f.last_seen_round == last_round or f.view == "federated"]
        blocks += [
            ("p", f"{len(rep.findings)} finding(s), {len(active)} present in the latest round."),
            (
                "table",
                (
                    [
                        "severity",
                        "view",
                        "finding",
                        "attribute",
                        "groups",
                        "value",
                        "threshold",
                        "CI",
                        "first seen",
                        "last seen",
                    ],
                    [_finding_row(f) for f in rep.findings],
                ),
            ),
            ("ul", [f"{f.severity}: {f.message}" for f in rep.findings]),
        ]
    else:
        blocks.append(("p", "No findings: every disparity is within its threshold and the model is not degenerate."))

    if rep.mitigation is not None:
        blocks += _mitigation_blocks(rep.mitigation)

    blocks += [("h2", "Overall metrics per round")]
    blocks.append(
        (
            "table",
            (
                [
                    "round",
                    "n",
                    "accuracy",
                    "F1",
                    "ROC-AUC",
                    "ECE",
                    "log loss",
                    "base rate",
                    "selection rate",
                    "TPR",
                    "FPR",
                ],
                [
                    [
                        str(r.round),
                        str(o.n),
                        _fmt(o.accuracy),
                        _fmt(o.f1),
                        _fmt(o.roc_auc),
                        _fmt(o.ece),
                        _fmt(o.log_loss),
                        _fmt(o.base_rate),
                        _fmt(o.selection_rate),
                        _fmt(o.tpr),
                        _fmt(o.fpr),
                    ]
                    for r in rep.rounds
                    for o in [r.audit.overall]
                ],
            ),
        )
    )

    if latest is not None:
        blocks.append(("h2", f"Groups and disparities — round {latest.round} (central, held-out set)"))
        for att in latest.audit.attributes:
            confidence = latest.audit.confidence if latest.audit.bootstrap_n else None
            blocks += _attribute_blocks(att, "3", confidence, latest.audit.min_group_size)

        blocks.append(("h2", "Selection rate and TPR per group over rounds"))
        rounds = [r.round for r in rep.rounds]
        for att in latest.audit.attributes:
            sel, tpr = _series(rep, att.name, "selection_rate"), _series(rep, att.name, "tpr")
            blocks += [
                ("h3", att.name),
                ("plot", _rate_plot(f"{att.name}: selection rate", "selection rate", sel)),
                ("plot", _rate_plot(f"{att.name}: true-positive rate", "TPR", tpr)),
                (
                    "table",
                    (
                        ["group (selection rate / TPR)", *[f"round {r}" for r in rounds]],
                        [
                            [g.group, *[_over_round(sel, tpr, g.group, r) for r in rounds]]
                            for g in att.groups
                            if not g.suppressed
                        ],
                    ),
                ),
            ]

    blocks.append(("h2", "Suppressed groups"))
    if rep.suppressed:
        blocks.append(
            (
                "ul",
                [
                    f"{s.view} — {s.attribute}: {s.group} (fewer than {cfg.min_group_size} rows)"
                    + (f", rounds {', '.join(map(str, s.rounds))}" if s.rounds else "")
                    for s in rep.suppressed
                ],
            )
        )
    else:
        blocks.append(("p", f"None: every group has at least {cfg.min_group_size} rows."))

    blocks.append(("h2", "Central vs federated view"))
    if rep.federated is None:
        blocks.append(("p", "No federated view for this run (clients did not report per-group counts)."))
    else:
        fed = rep.federated
        blocks.append(("p", FEDERATED_NOTE))
        blocks.append(
            (
                "ul",
                [
                    f"Round {_fmt(fed.round, 'd')}; clients: {_fmt(fed.clients, 'd')}; "
                    f"noise: {fed.noise or 'not stated'}",
                    "Overall (federated): "
                    + (
                        "suppressed"
                        if fed.overall is None or fed.overall.suppressed
                        else f"n ≥ {fed.overall.size}, accuracy {_fmt(fed.overall.accuracy)}, selection rate "
                        f"{_fmt(fed.overall.selection_rate)}, TPR {_fmt(fed.overall.tpr)}"
                    ),
                ],
            )
        )
        central = {a.name: a for a in latest.audit.attributes} if latest else {}
        rows = []
        for att in fed.attributes:
            c_groups = {g.group: g for g in central[att.name].groups} if att.name in central else {}
            names = sorted({g.group for g in att.groups} | set(c_groups))
            f_groups = {g.group: g for g in att.groups}
            for name in names:
                c, f = c_groups.get(name), f_groups.get(name)
                rows.append(
                    [
                        att.name,
                        name,
                        _cmp_cell(c, "selection_rate"),
                        _cmp_cell(f, "selection_rate"),
                        _cmp_cell(c, "tpr"),
                        _cmp_cell(f, "tpr"),
                        _cmp_cell(c, "fpr"),
                        _cmp_cell(f, "fpr"),
                    ]
                )
        blocks.append(
            (
                "table",
                (
                    [
                        "attribute",
                        "group",
                        "selection (central)",
                        "selection (federated)",
                        "TPR (central)",
                        "TPR (federated)",
                        "FPR (central)",
                        "FPR (federated)",
                    ],
                    rows,
                ),
            )
        )
        blocks.append(("h3", "Federated disparities"))
        for att in fed.attributes:
            blocks += _attribute_blocks(att, "4", None, fed.min_group_size)

    blocks.append(("h2", "Client-level fairness"))
    if rep.client_spread is None:
        blocks.append(("p", "Not reported for this run."))
    else:
        cs = rep.client_spread
        blocks.append(
            (
                "p",
                f"Accuracy of the global model on each of {cs.clients} clients' validation splits: worst "
                f"{cs.worst:.3f}, best {cs.best:.3f}, mean {cs.mean:.3f}, spread {cs.spread:.3f}, std {cs.std:.3f}. "
                "Reported as a distribution only: no client is named and no client's groups are shown.",
            )
        )

    if rep.sweep is not None:
        blocks += _sweep_blocks(rep.sweep)

    blocks += [("h2", "Definitions"), ("ul", list(rep.definitions))]
    return blocks


def _mitigation_blocks(m: MitigationSummary) -> list[Block]:
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


def _sweep_blocks(sweep: FairnessSweep) -> list[Block]:
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


def _over_round(sel: Series, tpr: Series, group: str, rnd: int) -> str:
    s = dict(sel.get(group, [])).get(rnd)
    t = dict(tpr.get(group, [])).get(rnd)
    return "–" if s is None and t is None else f"{_fmt(s)} / {_fmt(t)}"


def _cmp_cell(g: GroupMetrics | None, metric: str) -> str:
    if g is None:
        return "–"
    if g.suppressed:
        return "suppressed"
    return _fmt(getattr(g, metric))


def to_markdown(rep: FairnessReport) -> str:
    return blocks_to_markdown(_blocks(rep))


def _rate_plot(title: str, ylabel: str, series: Series) -> Plot:
    """A rate in [0, 1] per group over rounds, on a fixed axis so charts compare at a glance."""
    return Plot(title=title, series=series, ylabel=ylabel, y_min=0.0, y_max=1.0)


def to_html(rep: FairnessReport) -> str:
    """One self-contained page readable offline: inline CSS and SVG, no external resources, no executable script."""
    return blocks_to_html(_blocks(rep), f"FedGuard fairness report {rep.run_id}", rep.model_dump_json())


def render(rep: FairnessReport, fmt: str) -> str:
    """``fmt``: "json", "md" or "html"."""
    if fmt == "json":
        return json.dumps(rep.model_dump(mode="json"), indent=2) + "\n"
    if fmt == "md":
        return to_markdown(rep)
    if fmt == "html":
        return to_html(rep)
    raise ValueError(f"unknown report format {fmt!r}: use json, md or html")


def fairness_report_from_store(
    store_path: str | Path, run_id: int, sweep: FairnessSweep | None = None
) -> FairnessReport:
    """The report of a recorded run: every round's audit as the evaluator (or server) stored it, the run's
    mitigation, and (``sweep``) the options a ``fedguard fairness sweep`` compared."""
    from common.config import config_from_json
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run(run_id)
        rows = store.audits(run_id)
        fed = store.federated(run_id)
        evals = store.evaluations(run_id)
        round_rows = store.rounds(run_id)
    if not rows:
        raise StoreError(
            f"run {run_id} has no fairness audits",
            where=str(store_path),
            fix="audits need a binary task with sensitive columns and an evaluator node or data.evaluation_path",
        )
    cfg = config_from_json(run["config_json"])
    audits = [(r["round"], Audit.model_validate_json(r["audit_json"])) for r in rows]
    prov = rows[-1]["provenance"] or {"evaluation_size": audits[-1][1].overall.n, "sha256": "0" * 64}
    federated = FederatedAudit.model_validate_json(fed["audit_json"]) if fed and fed["audit_json"] else None
    spread = fed["spread"] if fed else None
    mitigation = None
    if cfg.mitigation.method != "none":
        from server.run_health import run_health

        epsilon = {n.name: n.epsilon for n in run_health(store_path, run_id).nodes}
        mitigation = mitigation_summary(cfg, round_rows, epsilon, read_policy(Path(store_path), run_id))
    return build_fairness_report(
        run_id,
        run["name"],
        audits,
        prov,
        federated=federated,
        client_spread=spread,
        cfg=cfg.fairness,
        metrics_by_round=evals,
        classes=cfg.data.schema_.classes,
        mitigation=mitigation,
        sweep=sweep,
    )


def read_policy(store_path: Path, run_id: int) -> ThresholdPolicy | None:
    """The thresholds policy a run wrote beside its checkpoints (validated), or None when it wrote none."""
    from server.checkpoint import checkpoint_dir

    path = checkpoint_dir(store_path, run_id) / "thresholds.json"
    return load_policy(path) if path.is_file() else None


def final_audit(store_path: str | Path, run_id: int) -> tuple[int, Audit, list[Finding]] | None:
    """The last audited round of a run, its audit and that round's findings (the model findings included)."""
    from common.config import config_from_json
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run(run_id)
        rows = store.audits(run_id)
        evals = store.evaluations(run_id)
    if not rows:
        return None
    cfg = config_from_json(run["config_json"])
    rnd, a = int(rows[-1]["round"]), Audit.model_validate_json(rows[-1]["audit_json"])
    return rnd, a, _round_findings(a, cfg.fairness, rnd, evals, cfg.data.schema_.classes)
