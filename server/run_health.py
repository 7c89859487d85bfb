"""A run's health from the run store: who took part, who refused and why, one ε per node, and what went wrong.

One read model for every place a person looks — the CLI summary (``simulate``, ``demo``,
``fedguard runs``), the privacy report and the dashboard — so they cannot disagree:

- nodes by the name the operator knows (the kit's name; ``node-N`` in simulation), each round's
  status and reason (a refusal's reason starts with its class, the node's error code);
- one ε per node: this run's at the node's accountant δ (``dp.delta`` less the group selection its
  count releases plan), every release included (DP-SGD rounds and the counts releases: the node's
  accountant composes them at that δ, so the largest value any authentic reply reported covers all;
  a reply the server rejected still counts, and a reply lost after the node may have trained says
  to check the node's ledger). The owner's budget δ only checks the budget and states the
  dataset's total;
- δ as the total of every release: the accountant's δ plus the group selection of the count
  releases that left (``fairness.count_selection_delta`` each): at most ``dp.delta``;
- without DP, no ε for the updates ("updates not private"), the counts' ε apart;
- warnings a reviewer must not miss: a node that never contributed (e.g. refused every round),
  no round scored although the run has a held-out set, a final model that is constant or skewed,
  or scores clearly below an earlier round's
  (``common.fairness.model_findings``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import records as R
from common.config import RunConfig, config_from_json
from common.errors import ConfigError
from common.fairness import Finding, model_findings, regression_finding
from common.privacy import eps_text
from server.store import RunStore

#: Said before a run without DP starts (server.app) and again in its summary, report and ``fedguard runs``.
DP_DISABLED = "DP is disabled (dp.enabled = false): the model updates are not differentially private"

_LOG_ID = re.compile(r" \(node log id (\w+)\)$")  # the tail server.validation.refusal_reason puts on a refusal


#: Said when a run with a held-out set ends without one scored round (e.g. the evaluator refused its data).
NOT_EVALUATED = (
    "no round's model was scored on the held-out set (the evaluator never returned a score; the server log "
    "names its replies): nothing shows whether the model learned"
)

#: What a node that may have spent budget without the server hearing of it is told to check.
LEDGER_NOTE = "ε may be higher: see the node's ledger (`fedguard client budget`)"


@dataclass
class NodeHealth:
    node_id: int
    name: str
    #: round → (status, reason) for every round the node was sampled in.
    rounds: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    #: This run's ε on the node at the run's δ: the largest ε of every authentic reply (accepted or not: a node
    #: that sent an update spent budget whatever the server did with it), the fairness counts included.
    #: None when no reply carried one, and with DP disabled (the updates are not private at all).
    epsilon: float | None = None
    #: The δ of every release together: the run's δ, plus the counts' group selection where they were sent.
    delta_total: float | None = None
    #: The fairness-counts release's ε (this run's composition after it), when the counts were sent.
    counts_epsilon: float | None = None
    #: False when the run trained without DP: the updates carry no guarantee at all.
    dp_enabled: bool = True
    #: A reply that never came (or failed) after the node may have trained: the ledger may hold more.
    may_be_higher: bool = False
    #: The values of the node's authentic training replies (latest first: a rejected reply keeps only its
    #: accounting values, so σ and q stay those of its latest accepted one) and of its counts reply.
    last_values: dict[str, object] = field(default_factory=dict)
    count_values: dict[str, object] = field(default_factory=dict)

    @property
    def privacy(self) -> str:
        """The node's privacy as one phrase: ``ε 3.120``, ``updates not private (DP disabled); …``."""
        if not self.dp_enabled:
            text = "updates not private (DP disabled)"
            if self.counts_epsilon is not None:
                text += f"; fairness counts ε {eps_text(self.counts_epsilon)}"
        else:
            text = f"ε {eps_text(self.epsilon)}" if self.epsilon is not None else "ε –"
        return text + (f" ({LEDGER_NOTE})" if self.may_be_higher else "")

    def view(self) -> dict[str, Any]:
        """The node as `fedguard runs --json` and the dashboard show it (one shape for both)."""
        return {
            "node_id": self.node_id,
            "name": self.name,
            "epsilon": self.epsilon,
            "delta_total": self.delta_total,
            # the ε as a phrase: "updates not private (DP disabled); …", or that the ledger may hold more
            "privacy": self.privacy,
            "counts_epsilon": self.counts_epsilon,
            "participation": self.tally,
            "reasons": self.reasons,
            "never_contributed": self.never_contributed,
            "rounds": {str(r): {"status": s, "reason": why} for r, (s, why) in self.rounds.items()},
        }

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
    warnings: list[str]
    dp_enabled: bool = True
    #: Why a failed run failed, as the ServerApp recorded it (None when it did not fail, or said nothing).
    error: str | None = None

    @property
    def failure(self) -> str:
        """The failure's first line (what went wrong; the fix follows on the next lines), or ''."""
        return self.error.splitlines()[0] if self.error else ""

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
        """The warnings in a few words, for run lists (``CONSTANT MODEL``, ``NO DP``, ``node-1 never contributed``)."""
        out = ["CONSTANT MODEL"] if self.constant_final else []
        out += [] if self.dp_enabled else ["NO DP"]
        out += [f"{n.name} never contributed" for n in self.nodes if n.never_contributed]
        out += ["NOT EVALUATED"] if NOT_EVALUATED in self.warnings else []
        out += [f.kind.replace("_", " ") for f in self.final_findings if f.kind != "constant_model"]
        return out


def node_label(node_id: int, names: dict[int, str]) -> str:
    """A node as people read it: its name, else ``node <SuperLink id>``; a name two nodes share gets the id
    appended (``node-1 (4417…)``), so one node can never pass for another."""
    name = names.get(node_id)
    if not name:
        return f"node {node_id}"
    shared = any(other != node_id and n == name for other, n in names.items())
    return f"{name} ({node_id})" if shared else name


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders ``node-2`` before ``node-10`` (digit runs compare as numbers)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def num(values: dict[str, object], key: str) -> float | None:
    """A reported number, or None when absent (or not a number)."""
    v = values.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


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
    dp_enabled = cfg.dp.enabled if cfg is not None else True
    nodes: dict[int, NodeHealth] = {}
    for row in clients:  # ordered by round
        node_id = int(row["node_id"])
        node = nodes.setdefault(node_id, NodeHealth(node_id, node_label(node_id, names), dp_enabled=dp_enabled))
        node.rounds[int(row["round"])] = (str(row["status"]), row["reason"])
        _take(node, row, "last_values")
    for node_id, count in counts.items():
        node = nodes.setdefault(node_id, NodeHealth(node_id, node_label(node_id, names), dp_enabled=dp_enabled))
        _take(node, count, "count_values")
    selection_delta = cfg.fairness.count_selection_delta if cfg is not None else 0.0
    for node in nodes.values():
        _account(node, cfg.dp.delta if cfg is not None else None, selection_delta)
    final_round = max(evals) if evals else None
    final = evals[final_round] if final_round is not None else {}
    classes = cfg.data.schema_.classes if cfg is not None else None
    fcfg = cfg.fairness if cfg is not None else None
    found = model_findings(final, fcfg, final_round, classes) if final else []
    regressed = regression_finding(evals, fcfg)
    found += [regressed] if regressed is not None else []
    ordered = sorted(nodes.values(), key=lambda n: (natural_key(n.name), n.node_id))
    warnings = [_never_line(n) for n in ordered if n.never_contributed]
    warnings += [f"{n.name}: a reply was lost after it may have trained; {LEDGER_NOTE}" for n in ordered
                 if n.may_be_higher]  # fmt: skip
    if not dp_enabled and ordered:
        warnings.append(DP_DISABLED)
    if cfg is not None and cfg.data.evaluation_path is not None and clients and not evals:
        warnings.append(NOT_EVALUATED)
    warnings += [f.message for f in found]
    return RunHealth(
        run_id=run_id,
        status=str(run["status"]),
        ledger_run_key=run["meta"].get("ledger_run_key"),
        nodes=ordered,
        final_round=final_round,
        final_metrics=final,
        final_findings=found,
        warnings=warnings,
        dp_enabled=dp_enabled,
        error=run.get("error") or None,
    )


def _take(node: NodeHealth, row: dict[str, object], slot: str) -> None:
    """Keep the accounting values of an authentic reply (accepted, or rejected after its signature passed:
    the node spent budget on it either way); note a reply lost after the node may have trained."""
    values = row["values"] if isinstance(row.get("values"), dict) else {}
    eps = num(values, R.EPSILON)  # type: ignore[arg-type]
    if eps is not None:  # its ε composes every earlier release of the run, a lost one included
        setattr(node, slot, {**getattr(node, slot), **values})  # a rejected reply keeps its accounting values only
        node.epsilon = eps if node.epsilon is None else max(node.epsilon, eps)
        node.may_be_higher = False
    elif _may_have_spent(row) and (node.dp_enabled or slot == "count_values"):
        node.may_be_higher = True


def _may_have_spent(row: dict[str, object]) -> bool:
    """No reply in time, or an error reply: the node may have trained (and spent budget) all the same."""
    return row["status"] == "dropped" or (row["status"] == "failed" and str(row["reason"] or "").startswith("error"))


def _account(node: NodeHealth, run_delta: float | None, selection_delta: float) -> None:
    """ε: the largest this run's releases reached (every release of a run composes at the run's δ, so the
    latest value covers every earlier one); δ: the run's, plus the group selection of its count releases."""
    counts_sent = num(node.count_values, R.EPSILON) is not None
    node.counts_epsilon = num(node.count_values, R.EPSILON)
    if node.epsilon is None:
        return
    reported_delta = num(node.count_values or node.last_values, R.DELTA)  # the node's accountant δ
    delta = reported_delta if reported_delta is not None else run_delta
    # The node reports the selection δ of its count releases so far (mitigation's and the fairness counts');
    # older nodes did not: then the fairness counts' one release, where sent.
    reported = [
        v for vals in (node.last_values, node.count_values) if (v := num(vals, R.SELECTION_DELTA_RUN)) is not None
    ]
    added = max(reported) if reported else (selection_delta if counts_sent else 0.0)
    node.delta_total = None if delta is None else delta + added
    if not node.dp_enabled:
        node.epsilon = None  # the updates carry no guarantee: no run ε to speak of (counts_epsilon says the rest)


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
