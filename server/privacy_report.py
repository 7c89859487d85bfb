"""The privacy report of one run: what each node spent, what left it, and what protected it.

Built only from the run store (what the server received and recorded) and the run's config;
rendered as JSON (validated by the pydantic models below), Markdown, or one self-contained HTML
file with an inline SVG plot of every client's ε per round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict

from common import records as R
from common.config import RunConfig, config_from_json
from common.secagg import describe_trust
from server.report_blocks import Block, Plot
from server.report_blocks import to_html as blocks_to_html
from server.report_blocks import to_markdown as blocks_to_markdown
from server.run_health import NodeHealth, num, run_health
from server.store import RunStore

THREAT_MODEL = (
    "Each client trains with DP-SGD (Opacus: Poisson sampling, per-sample gradient clipping, Gaussian noise), so "
    "every model update it sends is (ε, δ)-differentially private for each of its records, composed over every "
    "round and every run that used the dataset (recomputed by the node's ledger with a real accountant). The "
    "aggregation server is trusted to run the protocol but not with raw data: it receives only the values listed "
    "per client below. Raw records, exact dataset sizes, per-sample gradients, secret keys and error texts never "
    "leave a node. Sampling and noise come from the node's OS CSPRNG, never from the config seed. Composition "
    "across clients that share the same people is outside any single node's ledger and is not covered by these "
    "numbers."
)

#: The same for a run with ``dp.enabled = false``: nothing bounds what an update reveals about a record.
THREAT_MODEL_NO_DP = (
    "DP is disabled in this run: each client sends its model update without DP-SGD, so the updates are NOT "
    "differentially private and may reveal information about individual records; no ε bounds them. The "
    "aggregation server is trusted to run the protocol but not with raw data: it receives only the values listed "
    "per client below. Raw records, exact dataset sizes, per-sample gradients, secret keys and error texts never "
    "leave a node."
)


def _secure_agg(mode: str, dp_enabled: bool) -> str:
    """What the server can see in plaintext or homomorphic mode, and what bounds it (secure aggregation's own
    statement is ``common.secagg.describe_trust``)."""
    if mode == "none":
        update = "DP-protected update" if dp_enabled else "update, which is NOT differentially private (DP is disabled)"
        return (
            f"none: plaintext FedAvg. The server sees each client's {update}; no homomorphic encryption keys "
            "exist for this run."
        )
    if mode == "homomorphic":
        bound = (
            "DP-SGD still bounds per record" if dp_enabled else "nothing bounds per record (DP is disabled in this run)"
        )
        return (
            "homomorphic (TenSEAL CKKS, add-only): the server holds only the public context (no secret key, no "
            "Galois keys) and relays the contexts the evaluator sealed to each node's own key, unopened. It sees "
            "ciphertexts, their sizes and timings, which nodes replied, and the DP accounting values; it never sees "
            "an update or the global model, and the evaluator decrypts only a sum it recomputed from updates signed "
            "by distinct enrolled clients. Every key holder (each client and the evaluator) shares one key: the "
            f"server colluding with any one of them can read individual updates, which {bound}. Threshold "
            "(multiparty) HE would remove that and is not implemented."
        )
    return mode


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundPrivacy(_Model):
    round: int
    status: str
    reason: str | None
    epsilon_run: float | None  # this run's ε for the node's dataset after the round
    epsilon_total: float | None  # the dataset's ε over all runs (node ledger, at the budget δ)


class SentValue(_Model):
    key: str  # "record.key"
    privacy_class: str


class ClientPrivacy(_Model):
    node_id: str
    name: str = ""  # the name the operator knows the node by (kit name; node-N in simulation)
    mechanism: str
    noise_multiplier: float | None
    clipping_norm: float | None
    sample_rate: float | None
    steps_per_round: int | None
    delta: float | None
    accountant: str
    rounds: list[RoundPrivacy]
    epsilon_run: float | None
    epsilon_total: float | None
    budget_epsilon: float | None
    budget_delta: float | None
    budget_remaining: float | None
    unit_cap: int | None
    unit_epsilon: float | None
    unit_delta: float | None
    refusals: int
    #: Rounds by status, out of the rounds the node was asked (``accepted 2/3, refused 1/3``).
    participation: str = ""
    #: δ of all the node's releases in this run: the run's δ, plus the fairness counts' group selection.
    delta_total: float | None = None
    #: The node's privacy in a phrase (``server.run_health``): "updates not private (DP disabled)" without DP,
    #: and where a reply was lost after it may have trained, that its ledger may hold more.
    privacy: str = ""
    sent: list[SentValue]
    #: The federated-fairness counts release after the last round (Gaussian, in the same ledger).
    count_release: CountRelease | None = None


class CountRelease(_Model):
    status: str
    reason: str | None
    noise_multiplier: float | None
    sigma: float | None
    epsilon_run: float | None  # the run's ε on this node after the counts left


ClientPrivacy.model_rebuild()


class CentralDPRound(_Model):
    round: int
    noise_stdv: float
    clipped_updates: int
    epsilon: float
    delta: float


class CentralDP(_Model):
    noise_multiplier: float
    clipping_norm: float
    delta: float
    accountant: str
    rounds: list[CentralDPRound]
    epsilon: float | None


class AuditMIA(_Model):
    node: str
    attack: str
    members: int
    non_members: int
    auc: float
    tpr_at_fpr_0_1: float
    tpr_at_fpr_1: float
    fpr_resolution: float


class EmpiricalAudit(_Model):
    """``fedguard privacy audit``'s result (``server.audit_store``): a measured ε lower bound."""

    method: str
    meaning: str
    canary_design: str
    canaries: int
    included: int
    guesses: int
    guesses_in: int
    guesses_out: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower: float
    epsilon_upper: float | None  # None: DP off (∞)
    dp_enabled: bool
    verdict: Literal["consistent", "violated", "no-dp"]
    mia: AuditMIA
    wall_time_s: float


class PrivacyReport(_Model):
    format: Literal["fedguard-privacy-report/1"] = "fedguard-privacy-report/1"
    generated_at: float
    run_id: int
    run_name: str
    status: str
    error: str | None = None  # why a failed run failed
    config_hash: str
    #: The key each node's ledger files this run's releases under (`fedguard client budget`, signed ledger
    #: exports): how a reviewer matches a node's own accounting to this report. None for older runs.
    ledger_run_key: str | None = None
    seed: int
    seed_note: str
    rounds_planned: int
    resumed_from: int | None = None  # the interrupted run this one continues (fedguard run resume)
    target_epsilon: float | None
    target_delta: float | None
    engine: str
    transport: str
    secure_aggregation: str
    threat_model: str
    central_dp: CentralDP | None
    versions: dict[str, str]
    clients: list[ClientPrivacy]
    #: What a reviewer must not miss (server.run_health): a node that never contributed, a constant or
    #: skewed final model. A run can be "finished" and still useless; these say so.
    warnings: list[str] = []
    delta_total: float | None = None  # the run's δ, every release included
    empirical_audit: EmpiricalAudit | None = None  # only for runs `fedguard privacy audit` made


def build_privacy_report(store_path: str | Path, run_id: int) -> PrivacyReport:
    with RunStore(store_path) as store:
        run = store.run(run_id)
        client_rows = store.client_rounds(run_id)
        round_rows = store.rounds(run_id)
        # The federated fairness counts (after the last round); round 0 is reweighing's label counts, whose
        # ε the node's run ε already includes (server.run_health).
        counts = {int(r["node_id"]): r for r in store.count_releases(run_id) if int(r["round"]) > 0}
    health = run_health(store_path, run_id)
    cfg: RunConfig = config_from_json(run["config_json"])
    meta = run["meta"]
    by_node: dict[int, list[dict[str, object]]] = {}
    for row in client_rows:
        by_node.setdefault(int(row["node_id"]), []).append(row)
    clients = [_client(nh, by_node.get(nh.node_id, []), counts.get(nh.node_id), cfg) for nh in health.nodes]
    central = None
    if cfg.central_dp.enabled:
        central_rounds = [
            CentralDPRound(round=int(r["round"]), **r["meta"]["central_dp"])
            for r in round_rows
            if "central_dp" in r["meta"]
        ]
        central = CentralDP(
            noise_multiplier=cfg.central_dp.noise_multiplier,
            clipping_norm=cfg.central_dp.clipping_norm,
            delta=cfg.central_dp.delta,
            accountant="rdp (no sampling amplification)",
            rounds=central_rounds,
            epsilon=central_rounds[-1].epsilon if central_rounds else None,
        )
    return PrivacyReport(
        generated_at=time.time(),
        run_id=run_id,
        run_name=run["name"],
        status=run["status"],
        error=health.failure or None,
        config_hash=run["config_hash"],
        ledger_run_key=health.ledger_run_key,
        seed=cfg.seed,
        seed_note="the config seed drives data splits, model initialisation and client selection only; "
        "DP sampling and noise come from each node's OS CSPRNG",
        rounds_planned=cfg.rounds,
        resumed_from=run.get("resumed_from"),
        target_epsilon=cfg.dp.target_epsilon if cfg.dp.enabled else None,
        target_delta=cfg.dp.delta if cfg.dp.enabled else None,
        engine=str(meta.get("engine", "unknown")),
        transport=str(meta.get("transport", "unknown")),
        secure_aggregation=" ".join(describe_trust(cfg)) or _secure_agg(cfg.secure_aggregation, cfg.dp.enabled),
        threat_model=THREAT_MODEL if cfg.dp.enabled else THREAT_MODEL_NO_DP,
        central_dp=central,
        versions={str(k): str(v) for k, v in meta.get("versions", {}).items()},
        clients=clients,
        warnings=health.warnings,
        delta_total=health.delta_total,
        empirical_audit=_empirical_audit(store_path, run_id),
    )


def _client(
    nh: NodeHealth, rows: list[dict[str, object]], count: dict[str, object] | None, cfg: RunConfig
) -> ClientPrivacy:
    """One node's row: every number from the run's health (``server.run_health``), the one read model."""
    last, after = nh.last_values, nh.count_values
    latest = after or last  # the counts release came last: its totals include every release
    budget_eps, total = num(latest, R.BUDGET_EPSILON), num(latest, R.EPSILON_TOTAL)
    steps, unit_cap = num(last, R.STEPS), num(last, R.UNIT_CAP)
    sent = sorted({k for r in [*rows, *([count] if count else [])] for k in cast(list[str], r["received"])})
    return ClientPrivacy(
        node_id=str(nh.node_id),
        name=nh.name,
        participation=nh.tally,
        delta_total=nh.delta_total,
        privacy=nh.privacy,
        mechanism="DP-SGD (Opacus: Poisson sampling, per-sample clipping, Gaussian noise)"
        if cfg.dp.enabled
        else "none (DP disabled in the run config: updates are NOT differentially private)",
        noise_multiplier=num(last, R.NOISE_MULTIPLIER),
        clipping_norm=num(last, R.MAX_GRAD_NORM),
        sample_rate=num(last, R.SAMPLE_RATE),
        steps_per_round=int(steps) if steps is not None else None,
        delta=num(last, R.DELTA),
        accountant=cfg.dp.accountant,
        rounds=[
            RoundPrivacy(
                round=int(r["round"]),  # type: ignore[call-overload]
                status=str(r["status"]),
                reason=r["reason"],  # type: ignore[arg-type]
                epsilon_run=num(r["values"], R.EPSILON),  # type: ignore[arg-type]
                epsilon_total=num(r["values"], R.EPSILON_TOTAL),  # type: ignore[arg-type]
            )
            for r in rows
        ],
        epsilon_run=nh.epsilon,
        epsilon_total=total,
        budget_epsilon=budget_eps,
        budget_delta=num(latest, R.BUDGET_DELTA),
        budget_remaining=None if budget_eps is None or total is None else max(0.0, budget_eps - total),
        unit_cap=int(unit_cap) if unit_cap is not None else None,
        unit_epsilon=num(last, R.UNIT_EPSILON),
        unit_delta=num(last, R.UNIT_DELTA),
        refusals=nh.count("refused"),
        sent=[SentValue(key=k, privacy_class=_class_label(k, cfg.dp.enabled)) for k in sent],
        count_release=None
        if count is None
        else CountRelease(
            status=str(count["status"]),
            reason=count["reason"],  # type: ignore[arg-type]
            noise_multiplier=num(after, R.NOISE_MULTIPLIER),
            sigma=num(after, "count-sigma"),
            epsilon_run=nh.counts_epsilon,
        ),
    )


def _empirical_audit(store_path: str | Path, run_id: int) -> EmpiricalAudit | None:
    from server.audit_store import load_audit

    found = load_audit(store_path, run_id)
    return EmpiricalAudit.model_validate(found) if found else None


def _class_label(key: str, dp_enabled: bool = True) -> str:
    record, _, name = key.partition(".")
    cls = R.key_class(record, name)
    if cls == "dp" and not dp_enabled:  # the model update travels, but nothing made it private
        return "model update, NOT DP-protected (DP disabled)"
    return R.CLASS_LABELS.get(cls or "", "unclassified")


def _fmt(v: float | int | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


# -- rendering -----------------------------------------------------------------------------


def _blocks(rep: PrivacyReport) -> list[Block]:
    """The report once, as neutral blocks; Markdown and HTML render the same content."""
    rounds = _rounds(rep)
    warned = f", WITH {len(rep.warnings)} WARNING(S) (below)" if rep.warnings else ""
    blocks: list[Block] = [
        ("h1", f"Privacy report — run {rep.run_id} ({rep.run_name})"),
    ]
    if rep.warnings:
        blocks += [("h2", "Warnings"), ("ul", [f"WARNING: {w}" for w in rep.warnings])]
    blocks += [
        ("plot", _epsilon_plot(rep)),
        (
            "ul",
            [
                f"Status: {rep.status}{f' ({rep.error})' if rep.error else ''}{warned}; "
                f"{rep.rounds_planned} rounds planned",
                *(
                    [
                        f"Resumes run {rep.resumed_from}: the rounds before the interruption, and every "
                        f"release they made, are in run {rep.resumed_from}'s report; each node's ε total "
                        "(its ledger) includes both"
                    ]
                    if rep.resumed_from is not None
                    else []
                ),
                f"Target per client and run: ε={_fmt(rep.target_epsilon, 'g')}, δ={_fmt(rep.target_delta, 'g')}",
                f"δ in total (every release of the run: the accountant's δ, plus the fairness counts' group "
                f"selection where they were sent): {_fmt(rep.delta_total, '.3g')}",
                f"Engine: {rep.engine}",
                f"Transport: {rep.transport}",
                f"Secure aggregation and key custody: {rep.secure_aggregation}",
                f"Config hash: {rep.config_hash}; seed {rep.seed} ({rep.seed_note})",
                *(
                    [
                        f"Ledger key: {rep.ledger_run_key} (each node's ledger, `fedguard client budget` and its "
                        "signed ledger export file this run's releases under it)"
                    ]
                    if rep.ledger_run_key
                    else []
                ),
                "Software: " + ", ".join(f"{k} {v}" for k, v in rep.versions.items()),
            ],
        ),
        ("h2", "Threat model"),
        ("p", rep.threat_model),
        ("h2", "Clients"),
        (
            "table",
            (
                [
                    "node",
                    "rounds",
                    "mechanism",
                    "σ",
                    "C",
                    "q",
                    "steps/round",
                    "δ (accountant)",
                    "accountant",
                    "ε this run",
                    "δ total (of that ε)",
                    "ε total",
                    "budget ε",
                    "remaining",
                    "refusals",
                ],
                [
                    [
                        _name(c),
                        c.participation,
                        c.mechanism.split(" (")[0],
                        _fmt(c.noise_multiplier),
                        _fmt(c.clipping_norm, "g"),
                        _fmt(c.sample_rate, ".4f"),
                        _fmt(c.steps_per_round, "d"),
                        _fmt(c.delta, "g"),
                        c.accountant,
                        _epsilon_cell(c),
                        _fmt(c.delta_total, ".3g"),
                        _fmt(c.epsilon_total),
                        _fmt(c.budget_epsilon, "g"),
                        _fmt(c.budget_remaining),
                        str(c.refusals),
                    ]
                    for c in rep.clients
                ],
            ),
        ),
        ("h3", "ε after each round (this run)"),
        (
            "table",
            (
                ["node", *[f"round {r}" for r in rounds]],
                [[_name(c), *[_round_cell(c, r) for r in rounds]] for c in rep.clients],
            ),
        ),
    ]
    missed = [(c, r) for c in rep.clients for r in c.rounds if r.status != "accepted"]
    if missed:
        blocks += [
            ("h3", "Rounds a node did not contribute to, and why"),
            ("ul", [f"{_name(c)}, round {r.round}: {r.status}: {r.reason or 'no reason recorded'}" for c, r in missed]),
        ]
    units = [c for c in rep.clients if c.unit_cap]
    if units:
        blocks += [
            ("h3", "Privacy units (group privacy)"),
            (
                "ul",
                [
                    f"{_name(c)}: at most {c.unit_cap} records per unit → ε={_fmt(c.unit_epsilon)} "
                    f"at δ={_fmt(c.unit_delta, '.2g')} per unit"
                    for c in units
                ],
            ),
        ]
    released = [c for c in rep.clients if c.count_release]
    if released:
        blocks += [
            ("h3", "Federated fairness counts (after the last round)"),
            (
                "p",
                "Each client sent per-group confusion counts of the final model on its validation split, every "
                "cell with Gaussian noise (one release, no subsampling), charged to its ledger with the DP-SGD "
                "rounds through the same accountant; groups below the minimum size never left. ε this run and "
                "ε total above include it.",
            ),
            (
                "ul",
                [
                    f"{_name(c)}: "
                    + (
                        f"z={_fmt(c.count_release.noise_multiplier, 'g')}, σ={_fmt(c.count_release.sigma, '.1f')} "
                        f"per cell; ε this run after it {_fmt(c.count_release.epsilon_run)}"
                        if c.count_release.status == "accepted"
                        else f"{c.count_release.status}: {c.count_release.reason}"
                        + (
                            f" (sent all the same: ε this run after it {_fmt(c.count_release.epsilon_run)})"
                            if c.count_release.epsilon_run is not None
                            else ""
                        )
                    )
                    for c in released
                    if c.count_release
                ],
            ),
        ]
    blocks += [
        ("h3", "Values that left each node, by privacy class"),
        ("ul", [f"{_name(c)}: {_sent_by_class(c)}" for c in rep.clients]),
    ]
    if rep.central_dp:
        cd = rep.central_dp
        blocks += [
            ("h2", "Central (user-level) DP"),
            (
                "p",
                f"σ={cd.noise_multiplier}, clipping norm {cd.clipping_norm}, δ={cd.delta:g}, {cd.accountant}: "
                f"user-level ε={_fmt(cd.epsilon)} after {len(cd.rounds)} noised aggregate(s). This is separate "
                "from (and in addition to) the clients' record-level ε above.",
            ),
        ]
    if rep.empirical_audit:
        blocks += _audit_blocks(rep.empirical_audit)
    return blocks


def _audit_blocks(a: EmpiricalAudit) -> list[Block]:
    """The "Empirical privacy audit" section; a bound above the accountant's is marked critical (red)."""
    upper = "∞ (DP off)" if a.epsilon_upper is None else _fmt(a.epsilon_upper)
    status = {"violated": "critical", "no-dp": "warning", "consistent": "ok"}[a.verdict]
    verdict = {
        "violated": "ε_lower exceeds the accountant's ε_upper: the claimed DP guarantee does NOT hold for this "
        "training (noise, clipping or accounting is broken)",
        "no-dp": "DP is off: nothing bounds what the model reveals; the measured bound shows how much",
        "consistent": "ε_lower ≤ ε_upper: the audit found no contradiction with the accountant",
    }[a.verdict]
    m = a.mia
    return [
        ("h2", "Empirical privacy audit"),
        ("p", f"Method: {a.method}. {a.meaning}"),
        (
            "table",
            (
                [
                    "canaries m",
                    "included",
                    "guesses (IN+OUT)",
                    "correct",
                    "confidence",
                    "δ",
                    "ε_lower",
                    "ε_upper",
                    "status",
                ],
                [
                    [
                        str(a.canaries),
                        str(a.included),
                        f"{a.guesses} ({a.guesses_in}+{a.guesses_out})",
                        str(a.correct),
                        f"{a.confidence:.0%}",
                        _fmt(a.delta, "g"),
                        _fmt(a.epsilon_lower),
                        upper,
                        status,
                    ]
                ],
            ),
        ),
        ("p", f"Verdict: {verdict}."),
        ("p", f"Canaries: {a.canary_design} Audit wall time {a.wall_time_s:.0f}s."),
        ("h3", "Membership inference"),
        (
            "p",
            f"{m.attack} on node {m.node}'s training records ({m.members}) against held-out records of the same "
            f"distribution ({m.non_members}); FPR below 1/{m.non_members} = {m.fpr_resolution:.2g} cannot be "
            "resolved with this many held-out records.",
        ),
        (
            "table",
            (
                ["AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR"],
                [[_fmt(m.auc), _fmt(m.tpr_at_fpr_0_1, ".4f"), _fmt(m.tpr_at_fpr_1, ".4f")]],
            ),
        ),
    ]


def _sent_by_class(c: ClientPrivacy) -> str:
    by_class: dict[str, list[str]] = {}
    for v in c.sent:
        by_class.setdefault(v.privacy_class, []).append(v.key)
    return "; ".join(f"{cls}: {', '.join(keys)}" for cls, keys in by_class.items()) or "nothing"


def _epsilon_cell(c: ClientPrivacy) -> str:
    """The node's ε this run, or the phrase that qualifies it (DP disabled; a lost reply: see its ledger)."""
    plain = c.privacy in ("", f"ε {_fmt(c.epsilon_run)}")
    return _fmt(c.epsilon_run) if plain else c.privacy


def _name(c: ClientPrivacy) -> str:
    return c.name or f"node {c.node_id}"


def _round_cell(c: ClientPrivacy, rnd: int) -> str:
    """ε after the round, or the status and the reason's class (a refusal's node error code)."""
    for r in c.rounds:
        if r.round == rnd:
            if r.status == "accepted":
                return _fmt(r.epsilon_run)
            return f"{r.status}: {r.reason.split(' (')[0]}" if r.reason else r.status
    return "–"


def to_markdown(rep: PrivacyReport) -> str:
    return blocks_to_markdown(_blocks(rep))


def _rounds(rep: PrivacyReport) -> list[int]:
    return sorted({r.round for c in rep.clients for r in c.rounds})


def _epsilon_plot(rep: PrivacyReport) -> Plot:
    """ε (this run) per client after each round, from 0 before the run's first round, against the target."""
    start = min(_rounds(rep), default=1) - 1
    series = {
        _name(c): [(start, 0.0)] + [(r.round, r.epsilon_run) for r in c.rounds if r.epsilon_run is not None]
        for c in rep.clients
    }
    return Plot(
        title="ε per client after each round (this run)",
        series=series,
        ylabel="ε (this run)",
        y_min=0.0,
        threshold=rep.target_epsilon,
        threshold_label="target ε",
        series_class="eps-series",
        chart_id="privacy-epsilon",
    )


def to_html(rep: PrivacyReport) -> str:
    """One self-contained page (no scripts, no external resources) readable offline."""
    return blocks_to_html(_blocks(rep), f"FedGuard privacy report {rep.run_id}", rep.model_dump_json())


def render(rep: PrivacyReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rep.model_dump(mode="json"), indent=2) + "\n"
    if fmt == "md":
        return to_markdown(rep)
    return to_html(rep)
