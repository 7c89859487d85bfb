"""Fairness mitigation under DP, measured on the path a user runs: ``fedguard simulate``.

Why: issue 24's promise — a reviewer who sees a fairness finding gets options that fix it, with
their privacy counted and their accuracy cost shown — must hold for what ``fedguard simulate``
gives a user. Every federation here is ``fedguard.simulate.simulate(cfg, workdir)`` (as in
``bench/utility.py``: the product's partitioner, Flower's simulation engine, the real ServerApp and
ClientApp with the node's ledger and DP-SGD) from a config written as a user would write it, with a
``[mitigation]`` section naming the method. There is no private federation loop; every number is
read back from the run store, the run's health (``server.run_health``) and, for ``thresholds``, the
policy file the run writes beside its checkpoint.

Data: ``demo`` (the demo's survey, ``fedguard.demo.demo_frame()`` with the demo's schema: income
above the survey median; gender and marital status sensitive) and ``churn`` (``bench/utility.py``'s
IBM telco table: did the customer leave; gender and senior citizen sensitive). The mitigated
attribute is each schema's first sensitive column (gender in both).

Each run: 5 clients, Dirichlet(0.5) label split, seed (split, hold-out, model initialisation; DP
noise is always from ``os.urandom`` on the node), ε = 8 per node in total at δ = 1e-6 (at most
1/(10·n) on the largest node; the product plans the mitigation releases and the fairness counts
into the same target; the run's per-node ε from ``run_health`` is checked against it), the tabular
recipe's rounds (20 of one local epoch; the README's table was measured with the recipe before
2026-12-07's change: 10 rounds of two), the product's default recipe. Methods (``mitigation.method``, strength 1
each): ``none`` (the baseline), ``reweighing`` (per-record weights from DP group × label counts),
``fairfed`` and ``qfedavg`` (aggregation weights from per-round DP counts), ``thresholds`` (group
thresholds fitted by the evaluator on half of its held-out rows; its numbers are the other half's,
before and after, from ``thresholds.json``).

Per run: held-out accuracy; for the mitigated attribute the worst-group demographic-parity ratio,
DP difference and equalized-odds difference of the final model; the final findings; each node's
ε; wall time. Target (issue 24), for the best method per dataset: the worst-group gap (DP
difference) halved or the baseline's findings on the attribute cleared, at a cost of at most 1.5
accuracy points, means over seeds against ``none``.

    python bench/fairness_mitigation.py [--quick] [--datasets demo churn] [--seeds 1 2 3]
        [--methods none reweighing fairfed qfedavg thresholds] [--rounds 20] [--workers 1]
        [--out bench/results/fairness_mitigation.json] [--fresh] [--report]

Each finished run is written to the JSON at once; a rerun skips the runs already there (``--fresh``
starts over). ``--quick``: one seed, 3 rounds, ``none`` and ``thresholds`` unless ``--methods``
names others, into ``fairness_mitigation-quick.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.utility import (  # noqa: E402
    DATASETS,
    ROUNDS,  # the tabular recipe's rounds (common.config.RECIPES)
    partition_summary,
    save_results,
    simulate_fresh,  # noqa: E402
    write_dataset,
)
from bench.utility import run_config as utility_config  # noqa: E402

NUM_CLIENTS = 5
ALPHA = 0.5
EPSILON = 8.0
#: δ ≤ 1/(10·n) on every node (the product refuses a larger one): Dirichlet(0.5) gives the demo's survey nodes of
#: over 10,000 training rows, which refuse δ = 1e-5 in every round.
DELTA = 1e-6
STRENGTH = 1.0
METHODS = ("none", "reweighing", "fairfed", "qfedavg", "thresholds")
QUICK_METHODS = ("none", "thresholds")
BENCH_DATASETS = ("demo", "churn")
#: Target: the best method's worst-group gap halved (or the findings cleared) at ≤ 1.5 accuracy points.
MAX_COST_POINTS = 1.5
GAP_FACTOR = 0.5
#: The fairness findings that concern one attribute (the degenerate-model ones say "(overall)").
GAP_KINDS = (
    "demographic_parity_ratio",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
)
#: Model findings under which a small gap says nothing (common.fairness: a degenerate or constant model).
DEGENERATE = ("constant_model", "degenerate_selection_rate", "degenerate_low_tpr")
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "fedguard-bench-fairness"


# --------------------------------------------------------------------------- data and configs


def write_bench_dataset(name: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    """``folder/<name>.csv`` and its schema: the demo's survey and schema, or a ``bench/utility.py`` table."""
    if name != "demo":
        return write_dataset(name, folder)
    from fedguard.demo import DEMO_SCHEMA, demo_frame  # the schema demo_config gives the demo

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.csv"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        demo_frame().to_csv(tmp, index=False)
        tmp.replace(path)
    return path, json.loads(json.dumps(DEMO_SCHEMA))


def about(name: str) -> str:
    if name == "demo":
        return "the demo's survey (stevedata gss_wages): real income above the survey median"
    return DATASETS[name].about


@dataclass(frozen=True)
class Job:
    dataset: str
    seed: int
    method: str
    rounds: int = ROUNDS

    @property
    def key(self) -> str:
        return f"{self.dataset}/seed{self.seed}/{self.method}"


def run_config(data_path: Path, schema: dict[str, Any], *, method: str, seed: int, rounds: int) -> dict[str, Any]:
    """The raw config a user would write: ``bench/utility.py``'s (the product's defaults, Dirichlet 0.5)
    at this bench's δ, plus, for a method, ``[mitigation]``."""
    if method not in METHODS:
        raise ValueError(f"unknown mitigation method {method!r}; choose from {', '.join(METHODS)}")
    raw = utility_config(
        data_path, schema, split="dir0.5", epsilon=EPSILON, seed=seed, method="fedguard", rounds=rounds
    )
    raw["name"] = f"fairness-{method}"
    raw["dp"]["delta"] = DELTA
    if method != "none":
        raw["mitigation"] = {"method": method, "strength": STRENGTH}
    return raw


# --------------------------------------------------------------------------- reading a run back


def _gaps(disparities: Any) -> dict[str, float | None]:
    """The worst-group gaps of one attribute's audit (None: fewer than two reported groups)."""
    if disparities is None:
        return {"dp_ratio": None, "dp_difference": None, "eo_difference": None}
    return {
        "dp_ratio": disparities.demographic_parity_ratio.value,
        "dp_difference": disparities.demographic_parity_difference.value,
        "eo_difference": disparities.equalized_odds_difference.value,
    }


def policy_numbers(summary: Any) -> dict[str, float | None]:
    """Accuracy and gaps of a threshold policy's ``before`` or ``after`` summary (rows not used for fitting)."""
    if summary is None:
        return {"accuracy": None, "dp_ratio": None, "dp_difference": None, "eo_difference": None, "rows": None}
    return {
        "accuracy": summary.accuracy,
        "dp_ratio": summary.demographic_parity_ratio,
        "dp_difference": summary.demographic_parity_difference,
        "eo_difference": summary.equalized_odds_difference,
        "rows": summary.rows,
    }


def read_run(store_path: Path, run_id: int, attribute: str) -> dict[str, Any]:
    """Final held-out accuracy, the attribute's gaps and findings, each node's ε and the last mitigation meta."""
    from common.config import config_from_json
    from common.fairness import findings
    from common.fairness.metrics import Audit
    from common.fairness.thresholds import load_policy
    from server.checkpoint import checkpoint_dir
    from server.run_health import run_health
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run(run_id)
        evals = store.evaluations(run_id)
        audits = store.audits(run_id)
        rounds = store.rounds(run_id)
    cfg = config_from_json(run["config_json"])
    health = run_health(store_path, run_id)
    last = max(evals)
    out: dict[str, Any] = {
        "status": run["status"],
        "attribute": attribute,
        "final_round": last,
        "accuracy": evals[last]["accuracy"],
        "macro_f1": evals[last].get("macro_f1"),
        "curve": [{"round": r, "accuracy": m["accuracy"]} for r, m in sorted(evals.items())],
    }
    final = next((a for a in reversed(audits) if a["round"] == last), None)
    if final is None:
        raise RuntimeError(f"run {run_id} has no fairness audit of its final round {last}")
    audit = Audit.model_validate_json(final["audit_json"])
    att = next((a for a in audit.attributes if a.name == attribute), None)
    if att is None:
        raise RuntimeError(f"the final audit of run {run_id} has no attribute {attribute!r}")
    out.update(_gaps(att.disparities))
    out["groups"] = {
        g.group: None if g.suppressed else {"size": g.size, "selection_rate": g.selection_rate, "tpr": g.tpr}
        for g in att.groups
    }
    found = findings(audit, cfg.fairness, last) + list(health.final_findings)
    out["findings"] = [
        {"kind": f.kind, "attribute": f.attribute, "severity": f.severity, "value": round(f.value, 4)}
        for f in found
        if f.attribute in (attribute, "(overall)")
    ]
    out["all_findings"] = sorted({f"{f.attribute}: {f.kind}" for f in found})
    out["epsilon"] = {n.name: n.epsilon for n in health.nodes}
    eps = [e for e in out["epsilon"].values() if e is not None]
    out["epsilon_max"] = max(eps) if eps else None
    out["epsilon_within_target"] = bool(eps) and max(eps) <= EPSILON * (1 + 1e-9)
    out["delta_total"] = health.delta_total
    out["participation"] = {n.name: n.tally for n in health.nodes}
    out["not_accepted"] = sum(len(n.rounds) - n.count("accepted") for n in health.nodes)
    out["reasons"] = sorted({f"{n.name} {why}" for n in health.nodes for why in n.reasons})
    out["warnings"] = health.warnings
    metas = [r["meta"].get("mitigation") for r in rounds if r["meta"].get("mitigation")]
    out["mitigation_meta_rounds"] = len(metas)
    out["mitigation_meta_last"] = metas[-1] if metas else None
    if cfg.mitigation.method == "thresholds":
        path = checkpoint_dir(Path(store_path), run_id) / "thresholds.json"
        if not path.exists():
            raise RuntimeError(f"a thresholds run wrote no policy at {path}")
        policy = load_policy(path)  # the product's reader: a file it cannot read fails here, not silently
        out["policy"] = policy.model_dump(mode="json", exclude={"before", "after"})
        out["own_before"] = policy_numbers(policy.before)
        out["after"] = policy_numbers(policy.after)
        out["after_findings"] = sorted(gap_findings(out["after"], cfg.fairness))
        out["own_before_findings"] = sorted(gap_findings(out["own_before"], cfg.fairness))
        out["after_model_findings"] = degenerate_after(policy.after, evals[last].get("base_rate"), cfg.fairness)
    return out


def run_federation(raw: dict[str, Any], workdir: Path, log: Path | None = None) -> dict[str, Any]:
    """One ``fedguard simulate`` of ``raw`` in ``workdir`` (fresh); what the run store says about it."""
    cfg, result, wall = simulate_fresh(raw, workdir, log, "fairness mitigation bench")
    workdir = Path(workdir)
    attribute = cfg.mitigation_attribute or cfg.data.schema_.sensitive[0]
    seconds = round(wall, 1)
    out = read_run(result.store_path, result.run_id, attribute)
    schema = cfg.data.schema_
    out["partitions"] = partition_summary(workdir / "partitions", schema.label, list(schema.classes))
    out["seconds"] = seconds
    return out


def _job_worker(job: Job, data_dir: str, workroot: str, keep: bool) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    data_path, schema = write_bench_dataset(job.dataset, Path(data_dir))
    raw = run_config(data_path, schema, method=job.method, seed=job.seed, rounds=job.rounds)
    workdir = Path(workroot) / job.key.replace("/", "-")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    out = run_federation(raw, workdir, Path(str(workdir) + ".log"))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**asdict(job), "key": job.key, "strength": STRENGTH, **out}


# --------------------------------------------------------------------------- summary and target


def measured(run: dict[str, Any]) -> dict[str, Any]:
    """What the model a user gets scores: the post-processed numbers for thresholds, the model's otherwise."""
    after = run.get("after") or {}
    keys = ("accuracy", "dp_ratio", "dp_difference", "eo_difference")
    return {k: after.get(k) if "after" in run else run.get(k) for k in keys}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _attribute_findings(run: dict[str, Any]) -> set[str]:
    """The gap findings of the mitigated attribute; for thresholds, of the model before post-processing."""
    return {f["kind"] for f in run["findings"] if f["attribute"] == run["attribute"] and f["kind"] in GAP_KINDS}


def gap_findings(numbers: dict[str, float | None], fairness_cfg: Any) -> set[str]:
    """The gap findings the run's ``[fairness]`` thresholds give a policy's ``after`` numbers (the run's
    audit scores the stored model, which does not see the post-processing)."""
    out = set()
    if numbers["dp_ratio"] is not None and numbers["dp_ratio"] < fairness_cfg.dp_ratio_min:
        out.add("demographic_parity_ratio")
    if numbers["eo_difference"] is not None and numbers["eo_difference"] > fairness_cfg.eo_diff_max:
        out.add("equalized_odds_difference")
    limit = fairness_cfg.dp_diff_max
    if limit is not None and numbers["dp_difference"] is not None and numbers["dp_difference"] > limit:
        out.add("demographic_parity_difference")
    return out


def degenerate_after(summary: Any, base_rate: float | None, fairness_cfg: Any) -> list[str]:
    """Thresholds: the audit's degenerate-selection rule (common.fairness) on the post-processed decisions:
    their selection rate (over the reported groups) against the held-out base rate."""
    sized = [g for g in (summary.groups.values() if summary else []) if g is not None and g.size]
    if base_rate is None or not sized or not 0.0 < base_rate < 1.0:
        return []
    sel = sum(g.size * g.selection_rate for g in sized) / sum(g.size for g in sized)
    r = fairness_cfg.degenerate_rate_ratio
    return ["degenerate_selection_rate"] if sel < r * base_rate or 1.0 - sel < r * (1.0 - base_rate) else []


def _overall_findings(run: dict[str, Any]) -> set[str]:
    """Findings about the model itself (constant, skewed, degenerate): a small gap from such a model is no fix.
    For thresholds, of the post-processed decisions (the stored model's are in ``findings``)."""
    if "after" in run:
        return set(run.get("after_model_findings", []))
    return {f["kind"] for f in run["findings"] if f["attribute"] == "(overall)"}


def _before_model_findings(run: dict[str, Any], base: dict[str, Any] | None) -> set[str]:
    """The model findings of what a method is compared with (thresholds: its own model; else the none run)."""
    if "after" in run:
        return {f["kind"] for f in run["findings"] if f["attribute"] == "(overall)"}
    return _overall_findings(base) if base else set()


def _after_findings(run: dict[str, Any]) -> set[str]:
    """Gap findings on the attribute of what a user gets (for thresholds: after post-processing)."""
    return set(run["after_findings"]) if "after" in run else _attribute_findings(run)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per dataset × method: every seed and the mean, against ``none`` on the same seeds; then the target."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in results["runs"].values():
        by.setdefault((r["dataset"], r["method"]), {})[int(r["seed"])] = r
    cells: dict[str, dict[str, Any]] = {}
    order = ["demo", *DATASETS]
    for (name, method), runs in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]), METHODS.index(kv[0][1]))):
        base = by.get((name, "none"), {})
        seeds = sorted(runs)
        paired = [s for s in seeds if s in base]
        per_seed = {str(s): measured(runs[s]) for s in seeds}
        cell: dict[str, Any] = {
            "dataset": name,
            "method": method,
            "seeds": seeds,
            "per_seed": per_seed,
            "mean": {k: _mean([v[k] for v in per_seed.values()]) for k in ("accuracy", "dp_ratio", "dp_difference",
                                                                           "eo_difference")},
            "epsilon_max": max((runs[s]["epsilon_max"] or 0.0) for s in seeds),
            "epsilon_within_target": all(runs[s]["epsilon_within_target"] for s in seeds),
            "seconds_mean": _mean([runs[s]["seconds"] for s in seeds]),
            "findings": {str(s): sorted(_after_findings(runs[s])) for s in seeds},
            "model_findings": {str(s): sorted(_overall_findings(runs[s])) for s in seeds},
        }  # fmt: skip
        own = [s for s in seeds if "own_before" in runs[s]]
        if own:  # thresholds: the same model and rows before post-processing
            cell["own_before_mean"] = {
                k: _mean([runs[s]["own_before"][k] for s in own])
                for k in ("accuracy", "dp_ratio", "dp_difference", "eo_difference")
            }
        if method == "thresholds":  # before: the same model on the same rows, without the thresholds
            compare = own
            before = {s: runs[s]["own_before"] for s in own}
            had = set().union(*(set(runs[s]["own_before_findings"]) for s in own))
            if paired:
                cell["cost_vs_none_points"] = 100 * statistics.fmean(
                    measured(base[s])["accuracy"] - measured(runs[s])["accuracy"] for s in paired
                )
        else:
            compare = paired if method != "none" else []
            before = {s: measured(base[s]) for s in paired}
            had = set().union(*(_attribute_findings(base[s]) for s in paired))
        if compare:
            after = {s: measured(runs[s]) for s in compare}
            cell["compared_seeds"] = compare
            cell["cost_points"] = 100 * statistics.fmean(before[s]["accuracy"] - after[s]["accuracy"] for s in compare)
            gap_before = _mean([before[s]["dp_difference"] for s in compare])
            gap_after = _mean([after[s]["dp_difference"] for s in compare])
            cell["gap_before"], cell["gap_after"] = gap_before, gap_after
            cell["gap_halved"] = None if not gap_before or gap_after is None else gap_after <= GAP_FACTOR * gap_before
            left = set().union(*(_after_findings(runs[s]) for s in compare))
            cell["baseline_findings"] = sorted(had)
            cell["cleared"] = sorted(had - left)
            cell["introduced"] = sorted(left - had)  # e.g. an equalized-odds gap opened by parity thresholds
            cell["findings_cleared"] = bool(had) and not (had & left)
            # a gap closed by a model that predicts one class, or almost, is no fix
            cell["baseline_degenerate"] = any(
                k in DEGENERATE for s in compare for k in _before_model_findings(runs[s], base.get(s))
            )
            cell["degenerate"] = any(k in DEGENERATE for s in compare for k in _overall_findings(runs[s]))
            cell["target_met"] = bool(
                (cell["gap_halved"] or cell["findings_cleared"])
                and cell["cost_points"] <= MAX_COST_POINTS
                and not cell["degenerate"]
            )
        cells[f"{name}/{method}"] = cell
    return {"cells": cells, "targets": best_methods(cells)}


def best_methods(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per dataset: the method that meets the target with the smallest gap left (else the smallest gap left by a
    model that is not degenerate)."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(c["dataset"] for c in cells.values()):
        tried = [c for c in cells.values() if c["dataset"] == name and "target_met" in c]
        if not tried:
            continue
        best = min(
            tried,
            key=lambda c: (not c["target_met"], c["degenerate"], c["gap_after"] if c["gap_after"] is not None else 1.0),
        )
        out[name] = {
            "best_method": best["method"],
            "target_met": best["target_met"],
            "degenerate": best["degenerate"],
            "baseline_degenerate": best["baseline_degenerate"],
            "cost_points": best["cost_points"],
            "gap_before": best["gap_before"],
            "gap_after": best["gap_after"],
            "cleared": best["cleared"],
            "introduced": best["introduced"],
            "met_by": [c["method"] for c in tried if c["target_met"]],
        }
    return out


def _f(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    """Mean over seeds [every seed] per dataset × method, against ``none``; ✓ where the target holds."""
    lines = [
        "| dataset | method | accuracy | cost (points) | gap before → after | DP ratio | DP difference "
        "| EO difference | findings (attribute; model) | ε max | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"].values():
        m, per = cell["mean"], cell["per_seed"]

        def seeds_of(key: str, per: dict[str, Any] = per) -> str:
            return " / ".join(_f(v[key]) for v in per.values())

        found = "; ".join(
            f"s{s}: {', '.join([*v, *(f'{k} (model)' for k in cell['model_findings'][s])]).replace('_', ' ') or 'none'}"
            for s, v in cell["findings"].items()
        )
        cost = _f(cell.get("cost_points"), "+.2f") if "cost_points" in cell else "–"
        target = "–" if "target_met" not in cell else ("✓" if cell["target_met"] else "✗")
        gap = f"{_f(cell['gap_before'])} → {_f(cell['gap_after'])}" if "gap_before" in cell else "–"
        lines.append(
            f"| {cell['dataset']} | {cell['method']} | {_f(m['accuracy'])} ({seeds_of('accuracy')}) | {cost} | {gap} "
            f"| {_f(m['dp_ratio'])} ({seeds_of('dp_ratio')}) | {_f(m['dp_difference'])} ({seeds_of('dp_difference')}) "
            f"| {_f(m['eo_difference'])} ({seeds_of('eo_difference')}) | {found} | {_f(cell['epsilon_max'])} "
            f"| {target} |"
        )
    return "\n".join(lines)


#: How README.md names each finding.
_FINDING_LABEL = {
    "demographic_parity_ratio": "DP ratio",
    "demographic_parity_difference": "DP difference",
    "equalized_odds_difference": "EO difference",
}


def readme_table(summary: dict[str, Any]) -> str:
    """README.md's short table: means over seeds, thresholds against the same model before post-processing,
    and how many seeds ended with each finding on the mitigated attribute (checked by tests/test_bench_tables.py)."""
    lines = [
        "| data | method | accuracy | DP difference | DP ratio | EO difference | findings on the attribute (seeds) "
        "| max node ε |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for cell in summary["cells"].values():
        m, before = cell["mean"], cell.get("own_before_mean")

        def value(key: str, m: dict[str, Any] = m, before: dict[str, Any] | None = before) -> str:
            shown = before is not None and key in ("accuracy", "dp_difference")
            return _f(m[key]) + (f" ({_f(before[key])} before)" if shown else "")

        names = sorted({f for found in cell["findings"].values() for f in found})
        found = ", ".join(
            f"{_FINDING_LABEL.get(f, f.replace('_', ' '))} {sum(f in v for v in cell['findings'].values())} of "
            f"{len(cell['findings'])}"
            for f in names
        )
        method = cell["method"] + ("¹" if before else "")
        lines.append(
            f"| {cell['dataset']} | {method} | {value('accuracy')} | {value('dp_difference')} | {value('dp_ratio')} "
            f"| {value('eo_difference')} | {found or 'none'} | {_f(cell['epsilon_max'])} |"
        )
    return "\n".join(lines)


def print_report(summary: dict[str, Any]) -> None:
    print("\nmean over seeds (every seed); the mitigated attribute's worst-group gaps; cost = points of accuracy")
    print("lost against none on the same seeds; thresholds: after post-processing against the same model before it,")
    print("on the hold-out rows not used to fit the thresholds\n")
    print(markdown_table(summary))
    print("\nREADME.md's table\n")
    print(readme_table(summary))
    print()
    for cell in summary["cells"].values():
        if "own_before_mean" in cell:
            b = cell["own_before_mean"]
            print(
                f"{cell['dataset']} {cell['method']}: the same model before post-processing, same rows: accuracy "
                f"{_f(b['accuracy'])}, DP ratio {_f(b['dp_ratio'])}, DP difference {_f(b['dp_difference'])}, "
                f"EO difference {_f(b['eo_difference'])} (the table's before for this row); against none's runs "
                f"the accuracy cost is {_f(cell.get('cost_vs_none_points'), '+.2f')} points"
            )
    for name, t in summary["targets"].items():
        print(
            f"{name}: best {t['best_method']}: DP difference {_f(t['gap_before'])} → {_f(t['gap_after'])}, cost "
            f"{t['cost_points']:+.2f} points, cleared {', '.join(t['cleared']) or 'nothing'}, new findings "
            f"{', '.join(t['introduced']) or 'none'}; target (gap halved or "
            f"finding cleared at ≤ {MAX_COST_POINTS} points): {'met' if t['target_met'] else 'NOT met'}"
            + (f" (met by {', '.join(t['met_by'])})" if t["met_by"] else "")
            + (
                " — the baseline model is degenerate (constant or nearly): its gaps say nothing"
                if t["baseline_degenerate"]
                else ""
            )
        )


# --------------------------------------------------------------------------- main


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"meta": {}, "runs": {}}


def _progress_line(r: dict[str, Any]) -> str:
    m = measured(r)
    eps = "–" if r["epsilon_max"] is None else f"{r['epsilon_max']:.3f}"
    kinds = ", ".join(sorted(f"{f['kind']} ({f['attribute']})" for f in r["findings"])) or "none"
    found = f"findings of the model: {kinds}"
    if "own_before" in r:
        b = r["own_before"]
        after = ", ".join([*r["after_findings"], *r["after_model_findings"]]) or "none"
        found = (
            f"before post-processing: acc {_f(b['accuracy'])} DP ratio {_f(b['dp_ratio'])}, findings of the "
            f"model: {kinds}; after: {after}"
        )
    return (
        f"acc {_f(m['accuracy'])} DP ratio {_f(m['dp_ratio'])} DP diff {_f(m['dp_difference'])} "
        f"EO diff {_f(m['eo_difference'])}; {found}; "
        f"ε max {eps} (≤ {EPSILON:g}: {r['epsilon_within_target']}); node-rounds not accepted {r['not_accepted']}"
        + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 3 rounds, none and thresholds (unless --methods)")
    ap.add_argument("--datasets", nargs="+", default=list(BENCH_DATASETS), choices=["demo", *DATASETS])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help=f"rounds per run (default {ROUNDS}, the recipe's)")
    ap.add_argument("--workers", type=int, default=1, help="federations at a time (each starts its own Ray)")
    ap.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/fairness_mitigation.json)"
    )
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="data files and run folders")
    ap.add_argument("--keep", action="store_true", help="keep each run's folder (partitions, run store, policy)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--report", action="store_true", help="only print the tables of the results in --out")
    args = ap.parse_args(argv)
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    rounds = args.rounds or (3 if args.quick else ROUNDS)
    seeds = args.seeds[:1] if args.quick else args.seeds
    out = args.out or ROOT / "bench" / "results" / (
        "fairness_mitigation-quick.json" if args.quick else "fairness_mitigation.json"
    )
    results = {"meta": {}, "runs": {}} if args.fresh else load_results(out)
    if args.report:
        print_report(summarize(results))
        return 0
    if results.get("meta", {}).get("rounds") not in (None, rounds):
        raise SystemExit(f"{out} holds {results['meta']['rounds']}-round runs; pass --fresh or another --out")
    from common.config import RECIPES

    if rounds < ROUNDS:
        print(
            f"note: {rounds} rounds, fewer than the recipe's {ROUNDS}: the models are less trained than a "
            "user's and the numbers are not the benchmark's (the README table uses the recipe's rounds)"
        )
    results["meta"] = {
        "rounds": rounds,
        "recipe_rounds": ROUNDS,
        "clients": NUM_CLIENTS,
        "partitioner": f"dirichlet alpha {ALPHA}",
        "target_epsilon": EPSILON,
        "delta": DELTA,
        "strength": STRENGTH,
        "holdout_fraction": 0.2,
        "recipe": RECIPES["tabular"],
        "datasets": {d: about(d) for d in args.datasets},
        "workers": args.workers,
        "python": platform.python_version(),
        "versions": {p: importlib.metadata.version(p) for p in ("flwr", "torch", "opacus")},
        "cpus": os.cpu_count(),
    }
    data_dir, workroot = args.workdir / "data", args.workdir / "runs"
    for d in args.datasets:
        write_bench_dataset(d, data_dir)  # once, before the workers read them
    jobs = [
        Job(d, s, m, rounds)
        for s in seeds
        for d in args.datasets
        for m in methods
        if f"{d}/seed{s}/{m}" not in results["runs"]
    ]
    print(f"{len(jobs)} runs to do ({len(results['runs'])} already in {out}); {args.workers} at a time", flush=True)
    t0, done, failed = time.perf_counter(), 0, 0
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(_job_worker, j, str(data_dir), str(workroot), args.keep): j.key for j in jobs}
        for fut in as_completed(futures):
            done += 1
            name = futures[fut]
            try:
                r = fut.result()
            except Exception as exc:  # a failed run is reported and left out; a rerun retries it
                failed += 1
                log = workroot / (name.replace("/", "-") + ".log")
                print(f"[{done}/{len(jobs)}] {name}: FAILED {type(exc).__name__}: {exc} (log {log})", flush=True)
                continue
            results["runs"][r["key"]] = r
            print(
                f"[{done}/{len(jobs)}] {name}: {_progress_line(r)} ({r['seconds']:.0f}s; "
                f"{(time.perf_counter() - t0) / 60:.1f} min)",
                flush=True,
            )
            results["summary"] = summarize(results)
            save_results(out, results)
    results["summary"] = summarize(results)
    save_results(out, results)
    print_report(results["summary"])
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
