"""The fairness report of one run: group metrics over rounds, findings, suppressed groups, provenance.

Built from audits that were already computed (``common.fairness.audit`` per round on the held-out
set, optionally a federated audit from summed client counts and a client-level spread); rendered
as JSON (validated by the pydantic models below), Markdown, or one self-contained HTML file with
inline SVG plots of selection rate and TPR per group over rounds. Same neutral-block rendering
as the privacy report, so Markdown and HTML always say the same thing.
The run's mitigation section and a sweep's trade-off come from ``server.mitigation_report``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.calibration import UNCALIBRATED
from common.errors import StoreError
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
from server.charts import Series
from server.mitigation_report import (
    FairnessSweep,
    MitigationSummary,
    mitigation_blocks,
    mitigation_from_store,
    sweep_blocks,
)
from server.report_blocks import Block, Plot
from server.report_blocks import to_html as blocks_to_html
from server.report_blocks import to_markdown as blocks_to_markdown

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
    "own validation split. Counts left a node only encrypted (homomorphic mode) or with Gaussian noise charged to "
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


OWN_DECISIONS = "the model's own (the most probable class)"
CALIBRATED_DECISIONS = (
    "prior-calibrated by the evaluator: one offset per class on the model's log-probabilities, fitted so "
    "the decisions' class shares match the held-out labels'; each row decided with offsets fitted on the "
    "other half of the held-out rows (the model's own accuracy is in the run's evaluations)"
)


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
    #: How the audited decisions were made from the model's scores (prior calibration, common.calibration).
    decisions: str = OWN_DECISIONS
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
        decisions=CALIBRATED_DECISIONS
        if any(UNCALIBRATED + "accuracy" in m for m in (metrics_by_round or {}).values())
        else OWN_DECISIONS,
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


# -- rendering -----------------------------------------------------------------------------
def _fmt(v: float | int | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _latest(rep: FairnessReport) -> RoundAudit | None:
    return rep.rounds[-1] if rep.rounds else None


def _group_cells(g: GroupMetrics) -> list[str]:
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
    rows = [_group_cells(g) for g in att.groups if not g.suppressed]
    blocks: list[Block] = [("h" + level, att.name)] + ([("table", (_GROUP_HEADER, rows))] if rows else [])
    if small := [g.group for g in att.groups if g.suppressed]:  # a sentence, not a row of "suppressed" each
        blocks.append(("p", f"{_some(small)} suppressed: fewer than {min_size} rows (see Suppressed groups)."))
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


#: Names listed where many groups share one fate (zip codes: hundreds); the JSON keeps every one.
_LISTED = 12


def _some(groups: list[str]) -> str:
    """``3 groups (a, b, c)`` or ``260 groups (10000, 10001, … and 248 more)``."""
    shown = ", ".join(groups[:_LISTED]) + (f", … and {len(groups) - _LISTED} more" if len(groups) > _LISTED else "")
    return f"{len(groups)} group{'s' if len(groups) != 1 else ''} ({shown})"


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


def report_blocks(rep: FairnessReport) -> list[Block]:
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
                f"Decisions audited: {rep.decisions}",
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
        blocks += mitigation_blocks(rep.mitigation)

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
            if not sel and not tpr:
                blocks += [("h3", att.name), ("p", f"No group with at least {cfg.min_group_size} rows in any round.")]
                continue
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
        alike: dict[tuple[str, str, tuple[int, ...]], list[str]] = {}
        for sg in rep.suppressed:  # one line per view, attribute and rounds, however many groups share it
            alike.setdefault((sg.view, sg.attribute, tuple(sg.rounds)), []).append(sg.group)
        blocks.append(
            (
                "ul",
                [
                    f"{view} — {attribute}: {_some(groups)}, fewer than {cfg.min_group_size} rows"
                    + (f", rounds {', '.join(map(str, rounds))}" if rounds else "")
                    for (view, attribute, rounds), groups in alike.items()
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
        rows: list[list[str]] = []
        hidden: dict[str, list[str]] = {}
        for att in fed.attributes:
            c_groups = {g.group: g for g in central[att.name].groups} if att.name in central else {}
            names = sorted({g.group for g in att.groups} | set(c_groups))
            f_groups = {g.group: g for g in att.groups}
            for name in names:
                c, f = c_groups.get(name), f_groups.get(name)
                if (c is None or c.suppressed) and (f is None or f.suppressed):
                    hidden.setdefault(att.name, []).append(name)
                    continue
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
        if hidden:
            left_out = "; ".join(f"{att}: {_some(names)}" for att, names in hidden.items())
            blocks.append(("p", f"Suppressed in both views, so not in this table: {left_out}."))
        blocks.append(("h3", "Federated disparities"))
        for att in fed.attributes:
            blocks += _attribute_blocks(att, "4", fed.confidence, fed.min_group_size)

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
        blocks += sweep_blocks(rep.sweep)

    blocks += [("h2", "Definitions"), ("ul", list(rep.definitions))]
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
    return blocks_to_markdown(report_blocks(rep))


def _rate_plot(title: str, ylabel: str, series: Series) -> Plot:
    """A rate in [0, 1] per group over rounds, on a fixed axis so charts compare at a glance."""
    return Plot(title=title, series=series, ylabel=ylabel, y_min=0.0, y_max=1.0)


def to_html(rep: FairnessReport) -> str:
    """One self-contained page readable offline: inline CSS and SVG, no external resources, no executable script."""
    return blocks_to_html(report_blocks(rep), f"FedGuard fairness report {rep.run_id}", rep.model_dump_json())


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
    mitigation = mitigation_from_store(store_path, run_id, cfg, round_rows)
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
