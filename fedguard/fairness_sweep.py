"""``fedguard fairness sweep``: the accuracy/fairness trade-off of one mitigation method, run by run.

For the baseline (no mitigation) and each strength given, the config's federation runs on Flower's
simulation engine through ``fedguard.simulate.simulate`` — the same ServerApp, ClientApp, DP-SGD,
ledgers and node releases as ``fedguard simulate`` — with only ``mitigation.method`` and
``mitigation.strength`` changed. Each run has its own folder under the sweep's work dir with fresh
simulated nodes (partitions and ledgers are cleared first: a sweep is many runs of the same data,
and real budgets are never involved). From each run store it reads the final held-out accuracy,
the worst-group gaps of the mitigation attribute, the final round's findings and each node's ε;
for ``thresholds`` the post-processed numbers come from the policy the run wrote beside its
checkpoints, measured on the held-out rows not used to fit it.

The sweep JSON (``server.mitigation_report.FairnessSweep``) marks the configured option and the
Pareto-optimal ones and says which baseline findings each option clears;
``fedguard report fairness RUN --sweep sweep.json`` draws it as a Pareto chart and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from common.errors import ConfigError, FedGuardError
from fedguard.json_output import print_json

if TYPE_CHECKING:  # imported where used: `fedguard --help` stays fast
    from common.config import RunConfig
    from common.fairness import FairnessConfig, Finding
    from common.fairness.thresholds import ThresholdPolicy
    from server.mitigation_report import FairnessSweep, SweepOption

Progress = Callable[[str], None]
Method = Literal["reweighing", "fairfed", "qfedavg", "thresholds"]
METHODS: tuple[Method, ...] = ("reweighing", "fairfed", "qfedavg", "thresholds")
_MARKER = ".fedguard-sweep"


# -- the request ------------------------------------------------------------------------------


def check_request(method: str, values: Sequence[float]) -> list[float]:
    """The strengths to run, ascending; every mistake a ConfigError naming the option and the fix."""
    from common.fairness.config import MITIGATION_STRENGTH

    if method not in METHODS:
        raise ConfigError(
            f"unknown mitigation method {method!r}",
            where="--method",
            fix=f"choose one of {', '.join(METHODS)} (the baseline without mitigation always runs)",
        )
    if not values:
        raise ConfigError("no strengths to sweep", where="--values", fix="pass one or more values, e.g. --values 0.5 1")
    meaning = MITIGATION_STRENGTH[method]
    out: list[float] = []
    for v in values:
        if not math.isfinite(v):
            raise ConfigError(f"strength {v} is not a number", where="--values", fix=f"{method} strength: {meaning}")
        if v < 0:
            raise ConfigError(
                f"strength {v:g} is negative", where="--values", fix=f"strengths are ≥ 0; {method}: {meaning}"
            )
        if method == "thresholds" and v > 1:
            raise ConfigError(
                f"strength {v:g} is above 1 for thresholds",
                where="--values",
                fix="thresholds strength is the fraction of the gap between groups closed: pass values from 0 to 1",
            )
        if any(math.isclose(v, o) for o in out):
            raise ConfigError(f"strength {v:g} is given twice", where="--values", fix="list each value once")
        out.append(float(v))
    return sorted(out)


def option_config(cfg: RunConfig, method: str, strength: float | None) -> RunConfig:
    """The config with ``mitigation.method``/``strength`` replaced (everything else as the user set it),
    validated again: a method the config cannot use (fairfed under secure aggregation…) fails here."""
    from common.config import parse_config

    raw = json.loads(cfg.to_json())
    mitigation = dict(raw.get("mitigation") or {})
    mitigation["method"] = method
    if strength is not None:
        mitigation["strength"] = strength
    if method != "reweighing":
        mitigation["priors"] = None  # only reweighing reads them (and the config refuses them elsewhere)
    raw["mitigation"] = mitigation
    if method == "thresholds":  # the group thresholds decide alone: no prior calibration under them
        raw["evaluation"] = {**(raw.get("evaluation") or {}), "calibration": "none"}
    what = "no mitigation" if method == "none" else f"mitigation.method = {method!r}, strength {strength:g}"
    return parse_config(raw, f"the sweep's run with {what}")


# -- one option -------------------------------------------------------------------------------


def _fresh_sweep_dir(workdir: Path) -> None:
    """A sweep's simulated nodes start empty in every run; refuse a folder that is not an earlier sweep's
    (clearing it could destroy a real node's ledger)."""
    marker = workdir / _MARKER
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise ConfigError(
            f"{workdir} exists and is not a fairness-sweep work dir",
            where="--workdir",
            fix="pass a new or empty folder (each sweep run clears its simulated nodes' ledgers)",
        )
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("fairness sweep work dir: simulated nodes, cleared on every sweep\n", encoding="utf-8")


def _slug(method: str, strength: float | None) -> str:
    return "baseline" if strength is None else f"{method}-{strength:g}"


def measure(
    store_path: Path,
    run_id: int,
    *,
    label: str,
    method: str,
    strength: float | None,
    attribute: str,
    fairness: FairnessConfig,
    wall_s: float,
) -> SweepOption:
    """One option's numbers from its run store (and, for thresholds, from its policy file)."""
    from server.fairness_report import final_audit
    from server.mitigation_report import SweepOption, read_policy
    from server.run_health import run_health

    health = run_health(store_path, run_id)
    final = final_audit(store_path, run_id)
    accuracy = health.final_metrics.get("accuracy")
    values: dict[str, float | None] = {"dp_ratio": None, "dp_difference": None, "eo_difference": None}
    found: list[Finding] = []
    measured_on = "final model, held-out set"
    if final is not None:
        rnd, audit, found = final
        measured_on = f"round {rnd} model, held-out set ({audit.overall.n} rows)"
        att = next((a for a in audit.attributes if a.name == attribute), None)
        if att is not None and att.disparities is not None:
            d = att.disparities
            values = {
                "dp_ratio": d.demographic_parity_ratio.value,
                "dp_difference": d.demographic_parity_difference.value,
                "eo_difference": d.equalized_odds_difference.value,
            }
    scope, unprocessed = None, None
    if method == "thresholds" and strength is not None:
        policy = read_policy(store_path, run_id)
        if policy is None or policy.after is None:
            raise FedGuardError(
                f"the thresholds run {run_id} wrote no measured threshold policy",
                where=str(store_path),
                fix="thresholds need an evaluator (simulation.evaluator with held-out data) and a binary task",
            )
        after = policy.after
        accuracy = after.accuracy
        values = {
            "dp_ratio": after.demographic_parity_ratio,
            "dp_difference": after.demographic_parity_difference,
            "eo_difference": after.equalized_odds_difference,
        }
        # only the mitigation attribute was measured after post-processing: its findings replace the audit's
        found = policy_findings(policy, fairness)
        if policy.before is not None:
            b = policy.before
            unprocessed = {
                "accuracy": b.accuracy,
                "dp_ratio": b.demographic_parity_ratio,
                "dp_difference": b.demographic_parity_difference,
                "eo_difference": b.equalized_odds_difference,
            }
        scope = [attribute]
        measured_on = (
            f"round {policy.round} model after group thresholds, {after.rows} held-out rows not used to fit them; "
            f"findings on {attribute} only"
        )
    return SweepOption(
        label=label,
        method=cast(Literal["none", "reweighing", "fairfed", "qfedavg", "thresholds"], method),
        strength=strength,
        baseline=strength is None,
        run_id=run_id,
        store=str(store_path),
        status=health.status,
        accuracy=accuracy,
        measured_on=measured_on,
        unprocessed=unprocessed,
        findings=found,
        scope=scope,
        epsilon={n.name: n.epsilon for n in health.nodes},
        wall_s=round(wall_s, 1),
        **values,
    )


def policy_findings(policy: ThresholdPolicy, cfg: FairnessConfig) -> list[Finding]:
    """The audit's disparity findings for the policy's attribute, from its ``after`` summary (test rows)."""
    from common.fairness import AttributeAudit, Disparities, Disparity, FederatedAudit, GroupMetrics, findings

    after = policy.after
    if after is None:
        return []
    kept = {g: r for g, r in after.groups.items() if r is not None}

    def extremes(metric: str) -> tuple[list[str], float | None]:
        rated = [(getattr(r, metric), g) for g, r in kept.items() if getattr(r, metric) is not None]
        if len(rated) < 2:
            return [], None
        (lo, g_lo), (hi, g_hi) = min(rated), max(rated)
        return [g_hi, g_lo], hi - lo

    sel_groups, _ = extremes("selection_rate")
    tpr_groups, eopp = extremes("tpr")
    fpr_groups, fpr_diff = extremes("fpr")
    eo_groups = tpr_groups if (eopp or 0.0) >= (fpr_diff or 0.0) else fpr_groups
    if after.demographic_parity_ratio is None:
        disparities = None
    else:
        disparities = Disparities(
            demographic_parity_difference=Disparity(value=after.demographic_parity_difference, groups=sel_groups),
            demographic_parity_ratio=Disparity(value=after.demographic_parity_ratio, groups=sel_groups),
            equalized_odds_difference=Disparity(value=after.equalized_odds_difference, groups=eo_groups),
            equal_opportunity_difference=Disparity(value=eopp, groups=tpr_groups),
        )
    groups = [
        GroupMetrics(group=g, suppressed=True, size=None)
        if r is None
        else GroupMetrics(group=g, size=r.size, selection_rate=r.selection_rate, tpr=r.tpr, fpr=r.fpr)
        for g, r in after.groups.items()
    ]
    att = AttributeAudit(name=policy.attribute, attributes=[policy.attribute], groups=groups, disparities=disparities)
    view = FederatedAudit(overall=None, attributes=[att], min_group_size=policy.min_group_size)
    return findings(view, cfg, policy.round, view="central")


# -- the sweep --------------------------------------------------------------------------------


def run_sweep(
    cfg: RunConfig,
    method: str,
    values: Sequence[float],
    workdir: Path,
    out: Path,
    *,
    config_path: str = "",
    progress: Progress = print,
    run_progress: Progress | None = None,
) -> FairnessSweep:
    """Run the baseline and every strength, writing the sweep JSON to ``out`` after each run (atomically)."""
    from common.files import atomic_write
    from fedguard.simulate import simulate
    from server.mitigation_report import FairnessSweep, mark_sweep

    strengths = check_request(method, values)
    configured = cfg.mitigation.strength if cfg.mitigation.method == method else None
    if configured is not None and not any(math.isclose(configured, v) for v in strengths):
        progress(f"the config's own {method} strength {configured:g} is not in --values: running it too")
        strengths = sorted([*strengths, configured])
    base_cfg = option_config(cfg, "none", None)
    plan: list[tuple[str, str, float | None, RunConfig]] = [("baseline (no mitigation)", "none", None, base_cfg)]
    plan += [(f"{method} {v:g}", method, v, option_config(cfg, method, v)) for v in strengths]
    attribute = plan[-1][3].mitigation_attribute or ""
    constraint = cfg.mitigation.constraint
    gap_metric = "demographic_parity_difference" if constraint == "demographic_parity" else "equalized_odds_difference"
    workdir = workdir.resolve()
    _fresh_sweep_dir(workdir)
    sweep = FairnessSweep(
        generated_at=time.time(),
        config_path=config_path,
        config_hash=cfg.digest(),
        run_name=cfg.name,
        method=cast(Method, method),
        attribute=attribute,
        constraint=constraint,
        gap_metric=gap_metric,
        values=strengths,
        configured_strength=configured,
        complete=False,
        options=[],
    )
    progress(
        f"fairness sweep: {method} at strengths {', '.join(f'{v:g}' for v in strengths)} and the baseline "
        f"({len(plan)} simulated runs) for {attribute!r}; gap: worst-group {gap_metric.replace('_', ' ')}"
    )
    t_start = time.perf_counter()
    for i, (label, m, strength, run_cfg) in enumerate(plan, start=1):
        folder = workdir / _slug(method, strength)
        if folder.exists():
            shutil.rmtree(folder)  # fresh simulated nodes: a sweep's runs must not share ledgers
        progress(f"[{i}/{len(plan)}] {label}: running in {folder}")
        t0 = time.perf_counter()
        result = simulate(run_cfg, folder, folder / "runs.db", progress=run_progress or progress)
        wall = time.perf_counter() - t0
        option = measure(
            result.store_path,
            result.run_id,
            label=label,
            method=m,
            strength=strength,
            attribute=attribute,
            fairness=run_cfg.fairness,
            wall_s=wall,
        )
        if strength is None:
            is_configured = cfg.mitigation.method == "none"
        else:
            is_configured = configured is not None and math.isclose(strength, configured)
        option = option.model_copy(update={"configured": is_configured})
        sweep = mark_sweep(sweep.model_copy(update={"options": [*sweep.options, option]}))
        atomic_write(out, (sweep.model_dump_json(indent=2) + "\n").encode("utf-8"))
        gap = option.gap(gap_metric)
        progress(
            f"[{i}/{len(plan)}] {label}: done in {wall:.0f}s (sweep {time.perf_counter() - t_start:.0f}s) — "
            f"accuracy {_num(option.accuracy)}, {gap_metric.replace('_', ' ')} {_num(gap)}, "
            f"{len(option.findings)} finding(s)"
        )
    sweep = mark_sweep(sweep.model_copy(update={"complete": True, "generated_at": time.time()}))
    atomic_write(out, (sweep.model_dump_json(indent=2) + "\n").encode("utf-8"))
    return sweep


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def table(sweep: FairnessSweep) -> list[str]:
    """The sweep as the terminal shows it: one line per option."""
    from server.mitigation_report import finding_id

    base = next((o for o in sweep.options if o.baseline), None)
    head = f"{'option':<28} {'accuracy':>8} {'Δ pts':>6} {'DP ratio':>8} {'DP diff':>8} {'EO diff':>8}  marks; clears"
    lines = [head, "-" * len(head)]
    for o in sweep.options:
        change = (
            "–"
            if o.baseline or base is None or base.accuracy is None or o.accuracy is None
            else f"{100 * (o.accuracy - base.accuracy):+.1f}"
        )
        marks = [m for m, on in (("baseline", o.baseline), ("configured", o.configured), ("Pareto", o.pareto)) if on]
        clears = (
            "findings: " + (", ".join(finding_id(f) for f in o.findings) or "none")
            if o.baseline
            else "clears: " + (", ".join(o.clears) or "none")
        )
        lines.append(
            f"{o.label:<28} {_num(o.accuracy):>8} {change:>6} {_num(o.dp_ratio):>8} {_num(o.dp_difference):>8} "
            f"{_num(o.eo_difference):>8}  {', '.join(marks) or '–'}; {clears}"
        )
    lines.append(
        "Δ pts: accuracy against the baseline in points; each option is one run, and DP noise differs between runs"
    )
    return lines


# -- CLI --------------------------------------------------------------------------------------


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_fairness_sweep(args: argparse.Namespace) -> int:
    from common.config import load_config

    check_request(args.method, args.values)  # before the config is even read: the quickest mistakes first
    cfg = load_config(args.config)
    workdir = Path(args.workdir or Path(args.config).with_suffix("").name + "-sweep")
    out = Path(args.out) if args.out else workdir / "sweep.json"
    say = _stderr if args.json else print
    sweep = run_sweep(
        cfg, args.method, args.values, workdir, out.resolve(), config_path=str(args.config), progress=say,
        run_progress=_stderr if args.json else print,
    )  # fmt: skip
    if args.json:
        print_json(sweep.model_dump_json())
        return 0
    for line in table(sweep):
        print(line)
    shown = next((o for o in sweep.options if o.configured), sweep.options[0])
    print(f"sweep written to {out}")
    print(
        f"see it in the fairness report: fedguard report fairness {shown.run_id} --store {shown.store} "
        f"--sweep {out} --out fairness-sweep.html"
    )
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fedguard fairness sweep``."""
    p = sub.add_parser("fairness", help="group-fairness tools")
    psub = p.add_subparsers(dest="fairness_command", required=True)
    s = psub.add_parser(
        "sweep",
        help="run a mitigation method over a grid of strengths in simulation and compare accuracy with the "
        "worst-group gap (a Pareto view for the fairness report)",
    )
    s.add_argument("--config", required=True, help="run config TOML (its simulation section is used)")
    s.add_argument("--method", required=True, help=f"mitigation method: {', '.join(METHODS)}")
    s.add_argument(
        "--values", required=True, nargs="+", type=float, help="strengths to run (mitigation.strength; thresholds ≤ 1)"
    )
    s.add_argument("--workdir", help="the sweep's simulation folder (default: <config>-sweep)")
    s.add_argument("--out", help="the sweep JSON (default: <workdir>/sweep.json)")
    s.add_argument(
        "--json",
        action="store_true",
        help="print the sweep JSON on stdout, nothing else (progress goes to stderr)",
    )
    s.set_defaults(func=cmd_fairness_sweep, streams_progress=True)
