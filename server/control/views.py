"""Read models of the run store for the API and the dashboard (the same numbers in both).

Everything here reads ``server.store.RunStore`` only: per round the global model's metrics, each
node's status and ε, the fairness audit's disparities and findings, duration, and the bytes a
node sent where the store has them (homomorphic rounds record ciphertext sizes), and the cost
report's figures (time, bytes, energy, emissions per round and node).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common import records as R
from common.config import config_from_json
from common.errors import ConfigError
from common.fairness import Audit, findings
from common.secagg import describe_trust
from server.cost_report import build_cost_report, priced_text
from server.run_health import RunHealth, node_label, run_health
from server.store import RunStore

DISPARITIES = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equal_opportunity_difference",
)


def run_summary(run: dict[str, Any], rounds_done: int) -> dict[str, Any]:
    return {
        "run_id": int(run["run_id"]),
        "name": run["name"],
        "status": run["status"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "rounds_done": rounds_done,
        "flower_run_id": run["flower_run_id"],
        "config_hash": run["config_hash"],
        "error": run["error"],
        "resumed_from": run.get("resumed_from"),
    }


def list_runs(store_path: Path) -> list[dict[str, Any]]:
    with RunStore(store_path) as store:
        runs = store.runs()
        out = [run_summary(r, len(store.rounds(int(r["run_id"])))) for r in reversed(runs)]
    for r in out:
        health = run_health(store_path, r["run_id"])
        r["warnings"], r["flags"] = health.warnings, health.flags
    return out


def health_view(health: RunHealth) -> dict[str, Any]:
    """Each node by name with this run's ε (every release, the fairness counts included — the privacy
    report's and `fedguard runs`' number), δ in total, its rounds by status, and the run's warnings."""
    return {
        "warnings": health.warnings,
        "delta_total": health.delta_total,
        "ledger_run_key": health.ledger_run_key,
        "nodes": [n.view() for n in health.nodes],
        "findings": [{"severity": f.severity, "kind": f.kind, "message": f.message} for f in health.final_findings],
    }


def run_detail(store_path: Path, run_id: int) -> dict[str, Any]:
    """A run (raises StoreError when unknown) with its config summary."""
    with RunStore(store_path) as store:
        run = store.run(run_id)
        rounds = store.rounds(run_id)
    out = run_summary(run, len(rounds))
    try:
        cfg = config_from_json(run["config_json"])
        out["config"] = {
            "rounds": cfg.rounds,
            "clients_per_round": cfg.clients_per_round,
            "model": cfg.model.name,
            "dp_enabled": cfg.dp.enabled,
            "target_epsilon": cfg.dp.target_epsilon if cfg.dp.enabled else None,
            "delta": cfg.dp.delta if cfg.dp.enabled else None,
            "secure_aggregation": cfg.secure_aggregation,
            "trust": describe_trust(cfg),  # secure aggregation: the mode, t, who could learn what with whom
            "eo_diff_max": cfg.fairness.eo_diff_max,
            "dp_diff_max": cfg.fairness.dp_diff_max,
        }
    except ConfigError:
        out["config"] = None
    out["meta"] = run["meta"]
    out["health"] = health_view(run_health(store_path, run_id))
    return out


def _disparities(audit: Audit) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for att in audit.attributes:
        if att.disparities is None:
            continue
        out[att.name] = {k: getattr(att.disparities, k).value for k in DISPARITIES}
    return out


def run_rounds(store_path: Path, run_id: int) -> dict[str, Any]:
    """Per-round view of a run: metrics, ε and status per node, fairness, time and bytes."""
    with RunStore(store_path) as store:
        run = store.run(run_id)
        rounds = store.rounds(run_id)
        clients = store.client_rounds(run_id)
        evals = store.evaluations(run_id)
        audits = store.audits(run_id)
        names = store.node_names(run_id)
    try:
        fcfg = config_from_json(run["config_json"]).fairness
    except ConfigError:
        fcfg = None
    audit_by_round = {}
    for a in audits:
        try:
            audit_by_round[a["round"]] = Audit.model_validate_json(a["audit_json"])
        except ValidationError:
            pass  # an audit an older FedGuard wrote in another shape: its round shows no fairness data
    numbers = sorted({r["round"] for r in rounds} | set(evals) | set(audit_by_round))
    by_round = {r["round"]: r for r in rounds}
    out = []
    for n in numbers:
        r = by_round.get(n)
        per_node = [c for c in clients if c["round"] == n]
        audit = audit_by_round.get(n)
        he = (r or {}).get("meta", {}).get("homomorphic", {}) if r else {}
        sent = he.get("bytes_per_client") if isinstance(he, dict) else None
        out.append(
            {
                "round": n,
                "started_at": r["started_at"] if r else None,
                "finished_at": r["finished_at"] if r else None,
                "seconds": (r["finished_at"] - r["started_at"]) if r else None,
                "sampled": r["sampled"] if r else None,
                "accepted": r["accepted"] if r else None,
                "aggregated": bool(r["aggregated"]) if r else None,
                "bytes_sent": int(sum(sent)) if sent else None,
                "metrics": evals.get(n, {}),
                "clients": [
                    {
                        "node_id": c["node_id"],
                        "name": node_label(c["node_id"], names),
                        "status": c["status"],
                        "reason": c["reason"],
                        "epsilon": c["epsilon"],
                    }
                    for c in per_node
                ],
                "fairness": None
                if audit is None
                else {
                    "disparities": _disparities(audit),
                    "findings": [
                        {"severity": f.severity, "kind": f.kind, "attribute": f.attribute, "message": f.message}
                        for f in (findings(audit, fcfg, n) if fcfg is not None else [])
                    ],
                },
            }
        )
    return {"run_id": run_id, "status": run["status"], "rounds": out}


def _energy_label(labels: set[str]) -> str | None:
    return None if not labels else next(iter(labels)) if len(labels) == 1 else "mixed"


def run_costs(store_path: Path, run_id: int) -> dict[str, Any] | None:
    """The run's cost report (``server.cost_report``) with each round's energy labelled measured/estimated/mixed.

    ``None`` when the run has no cost rows (a run recorded before resource accounting): the
    dashboard says "not recorded" rather than showing zeros that look like a free run.
    """
    rep = build_cost_report(store_path, run_id)
    if not rep.rounds:
        return None
    with RunStore(store_path) as store:
        server = {int(c["round"]): c["server"] for c in store.round_costs(run_id)}
        clients = store.client_rounds(run_id)
    out = rep.model_dump(mode="json") | {"priced_text": priced_text(rep)}
    for r in out["rounds"]:
        labels = {str(server[r["round"]]["energy_label"])} if server.get(r["round"], {}).get("energy_label") else set()
        labels |= {
            "measured" if c["values"].get(R.ENERGY_MEASURED) else "estimated"
            for c in clients
            if c["round"] == r["round"] and c["status"] == "accepted" and R.ENERGY_WH in c["values"]
        }
        r["energy_label"] = _energy_label(labels)
    return out
