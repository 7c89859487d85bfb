"""A run's health from the run store: who took part, who refused and why, one ε per node, and what went wrong.

One read model for every place a person looks — the CLI summary (``simulate``, ``demo``,
``fedguard runs``), the privacy report and the dashboard — so they cannot disagree:

- nodes by the name the operator knows (the kit's name; ``node-N`` in simulation), each round's
  status and reason (a refusal's reason starts with its class, the node's error code);
- one ε per node: this run's, every release included (DP-SGD rounds and the fairness-counts
  release: the node's accountant composes them, so the latest value covers all);
- δ as the total of every release: the accountant's δ plus, when the fairness counts left, the
  δ their group selection adds (``fairness.count_selection_delta``);
- warnings a reviewer must not miss: a node that never contributed (e.g. refused every round),
  a final model that is constant or skewed (``common.fairness.model_findings``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import records as R
from common.config import RunConfig, config_from_json
from common.errors import ConfigError
from common.fairness import Finding, constant_streak, model_findings
from server.store import RunStore

_LOG_ID = re.compile(r" \(node log id (\w+)\)$")  # the tail server.validation.refusal_reason puts on a refusal


@dataclass
class NodeHealth:
    node_id: int
    name: str
    #: round → (status, reason) for every round the node was sampled in.
    rounds: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    #: This run's ε on the node, every release included (None: nothing accepted from it).
    epsilon: float | None = None
    #: The δ of every release together: the accountant's, plus the counts' group selection.
    delta_total: float | None = None

    def count(self, status: str) -> int:
        return sum(s == status for s, _ in self.rounds.values())

    @property
    def tally(self) -> str:
        """``accepted 2/3, refused 1/3`` — every status the node had, out of the rounds it was asked."""
        counts = Counter(s for s, _ in self.rounds.values())
        n = len(self.rounds)
        return ", ".join(f"{s} {k}/{n}" for s, k in sorted(counts.items(), key=lambda kv: kv[0] != "accepted"))

    @property
    def reasons(self) -> list[str]:
        """Distinct reasons of the rounds it did not contribute to, oldest first; a refusal's node log ids
        (one per round) gathered behind its class: ``refused: budget-exhausted (node log ids a1, b2)``."""
        ids: dict[str, list[str]] = {}
        for s, r in self.rounds.values():
            if s == "accepted" or not r:
                continue
            m = _LOG_ID.search(r)
            ids.setdefault(f"{s}: {r[: m.start()] if m else r}", []).extend([m.group(1)] if m else [])
        return [f"{k} (node log id{'s' if len(v) > 1 else ''} {', '.join(v)})" if v else k for k, v in ids.items()]

    @property
    def never_contributed(self) -> bool:
        return bool(self.rounds) and self.count("accepted") == 0


@dataclass
class RunHealth:
    run_id: int
    status: str
    ledger_run_key: str | None
    nodes: list[NodeHealth]
    final_round: int | None
    final_metrics: dict[str, float]
    #: Findings about the final model itself (constant, skewed); they need no sensitive columns.
    final_findings: list[Finding]
    #: Consecutive latest rounds whose model predicted one class.
    constant_rounds: int
    warnings: list[str]

    def node(self, node_id: int) -> NodeHealth | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)

    @property
    def delta_total(self) -> float | None:
        """The run's δ: the largest of its nodes' totals (each node's guarantee holds at its own)."""
        values = [n.delta_total for n in self.nodes if n.delta_total is not None]
        return max(values) if values else None

    @property
    def constant_final(self) -> bool:
        return any(f.kind == "constant_model" for f in self.final_findings)

    @property
    def flags(self) -> list[str]:
        """The warnings in a few words, for run lists (``CONSTANT MODEL``, ``node-1 never contributed``)."""
        out = ["CONSTANT MODEL"] if self.constant_final else []
        out += [f"{n.name} never contributed" for n in self.nodes if n.never_contributed]
        out += [f.kind.replace("_", " ") for f in self.final_findings if f.kind != "constant_model"]
        if self.constant_rounds and not self.constant_final and any("consecutive" in w for w in self.warnings):
            out.append(f"constant for {self.constant_rounds} rounds")
        return out


def node_label(node_id: int, names: dict[int, str]) -> str:
    """A node as people read it: its name, else ``node <SuperLink id>``."""
    return names.get(node_id) or f"node {node_id}"


def _num(values: dict[str, object], key: str) -> float | None:
    v = values.get(key)
    return float(v) if isinstance(v, int | float) else None


def run_health(store_path: str | Path, run_id: int) -> RunHealth:
    with RunStore(store_path) as store:
        run = store.run(run_id)
        clients = store.client_rounds(run_id)
        counts = {int(r["node_id"]): r for r in store.count_releases(run_id)}
        evals = store.evaluations(run_id)
        names = store.node_names(run_id)
    try:
        cfg: RunConfig | None = config_from_json(run["config_json"])
    except ConfigError:
        cfg = None
    nodes: dict[int, NodeHealth] = {}
    last_values: dict[int, dict[str, object]] = {}
    for row in clients:  # ordered by round
        node = nodes.setdefault(row["node_id"], NodeHealth(row["node_id"], node_label(row["node_id"], names)))
        node.rounds[int(row["round"])] = (str(row["status"]), row["reason"])
        if row["status"] == "accepted" and _num(row["values"], R.EPSILON) is not None:
            last_values[row["node_id"]] = row["values"]
    selection_delta = cfg.fairness.count_selection_delta if cfg is not None else 0.0
    for node_id, node in nodes.items():
        values = last_values.get(node_id, {})
        extra = 0.0
        count = counts.get(node_id)
        if count is not None and count["status"] == "accepted" and _num(count["values"], R.EPSILON) is not None:
            values, extra = count["values"], selection_delta  # the last release: its ε covers every earlier one
        node.epsilon = _num(values, R.EPSILON)
        delta = _num(values, R.DELTA)
        node.delta_total = None if delta is None else delta + extra
    final_round = max(evals) if evals else None
    final = evals[final_round] if final_round is not None else {}
    classes = cfg.data.schema_.classes if cfg is not None else None
    fcfg = cfg.fairness if cfg is not None else None
    found = model_findings(final, fcfg, final_round, classes) if final else []
    streak = constant_streak(evals)
    ordered = sorted(nodes.values(), key=lambda n: (n.name, n.node_id))
    warnings = [_never_line(n) for n in ordered if n.never_contributed]
    warnings += [f.message for f in found]
    if streak >= (fcfg.constant_rounds if fcfg else 3) and not any(f.kind == "constant_model" for f in found):
        warnings.append(f"the model predicted one class for {streak} consecutive rounds")
    return RunHealth(
        run_id=run_id,
        status=str(run["status"]),
        ledger_run_key=run["meta"].get("ledger_run_key"),
        nodes=ordered,
        final_round=final_round,
        final_metrics=final,
        final_findings=found,
        constant_rounds=streak,
        warnings=warnings,
    )


def _never_line(n: NodeHealth) -> str:
    statuses = Counter(s for s, _ in n.rounds.values())
    how = "refused every round" if set(statuses) == {"refused"} else "contributed to no round"
    reasons = "; ".join(n.reasons) or "no reason recorded"
    return f"{n.name} {how} it was asked ({len(n.rounds)}): {reasons}. Its data did not shape the model"


def round_outcomes(health: RunHealth) -> dict[int, list[tuple[str, str, str | None]]]:
    """round → (node name, status, reason) for every node sampled in it."""
    out: dict[int, list[tuple[str, str, str | None]]] = {}
    for n in health.nodes:
        for rnd, (status, reason) in n.rounds.items():
            out.setdefault(rnd, []).append((n.name, status, reason))
    return dict(sorted(out.items()))


def round_summary(entries: list[tuple[str, str, str | None]]) -> str:
    """``2/3 accepted, 1 refused — node-1 refused: budget-exhausted (node log id …)``."""
    tally = Counter(s for _, s, _ in entries)
    head = f"{tally.get('accepted', 0)}/{len(entries)} accepted" + "".join(
        f", {k} {s}" for s, k in sorted(tally.items()) if s != "accepted"
    )
    others = [f"{name} {s}: {r}" for name, s, r in entries if s != "accepted"]
    return head + (" — " + "; ".join(others) if others else "")
