"""``run plan``: ask every online node what a run would cost it, before anything is trained.

Each node answers a ``query.plan`` message from its own size and ledger: its noise multiplier,
ε per round and for the whole run, what its dataset has spent, and whether its remaining budget
covers the run. Exact dataset sizes never leave a node (the sampling rate reveals n only to
within one batch).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import records as R
from common.config import RunConfig, federation_warning
from common.privacy import eps_text
from server.grid_io import Progress, collect_replies, discover_roles, wait_for_nodes
from server.validation import refusal_reason


@dataclass
class NodePlan:
    node_id: int
    status: str  # planned | refused | failed | silent
    values: dict[str, float]
    reason: str | None = None
    #: The node's name as round lines give it (simulation: ``node-3``); None where only the id is known.
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or str(self.node_id)

    @property
    def affordable(self) -> bool:
        return self.status == "planned" and bool(self.values.get(R.PLAN_AFFORDABLE))


def plan_federation(grid: Grid, cfg: RunConfig, sim_data_dir: str | None, progress: Progress = print) -> list[NodePlan]:
    nodes = wait_for_nodes(grid, cfg.clients_per_round, cfg.server.wait_for_nodes, progress)
    base: dict[str, object] = {R.RUN_CONFIG: cfg.to_json(), R.RUN_UID: f"plan-{uuid.uuid4().hex}"}
    if sim_data_dir:
        base[R.SIM_DATA_DIR] = sim_data_dir
    names: dict[int, str] = {}  # self-reported, so taken in simulation only (as Federation.learn_names does)
    roles = discover_roles(grid, nodes, {}, base, cfg.server.round_timeout, cfg.server.poll_interval, None, None, names)
    nodes = [n for n in nodes if roles.get(n, "client") == "client"]  # the evaluator spends no budget
    messages = [
        Message(RecordDict({R.CONFIG: ConfigRecord(base)}), dst_node_id=node, message_type="query.plan")
        for node in nodes
    ]
    progress(f"asking {len(nodes)} node(s) for their privacy plan")
    replies, silent, unreachable = collect_replies(grid, messages, cfg.server.round_timeout, cfg.server.poll_interval)
    plans = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            plans.append(NodePlan(node, "failed", {}, f"error {reply.error.code}: {reply.error.reason}"))
        elif R.REFUSAL in reply.content:
            plans.append(NodePlan(node, "refused", {}, refusal_reason(reply.content)))
        elif R.PLAN in reply.content:
            values = {k: float(v) for k, v in reply.content[R.PLAN].items() if isinstance(v, int | float)}
            plans.append(NodePlan(node, "planned", values))
        else:
            plans.append(NodePlan(node, "failed", {}, "reply without a plan record"))
    plans += [NodePlan(n, "silent", {}, "no reply in time") for n in silent | unreachable]
    for p in plans if sim_data_dir else []:
        p.name = names.get(p.node_id)
    return sorted(plans, key=lambda p: (p.name or "", p.node_id))


def plan_table(plans: list[NodePlan], cfg: RunConfig) -> str:
    lines = [
        f"privacy plan for {cfg.rounds} round(s), target ε={cfg.dp.target_epsilon} per run, δ={cfg.dp.delta:g} "
        f"[{cfg.dp.accountant}]",
        f"{'node':>22}  {'σ':>6}  {'q':>7}  {'steps':>5}  {'ε/round':>8}  {'ε run':>7}  {'spent':>7}  "
        f"{'after':>7}  {'budget':>7}  verdict",
    ]
    for p in plans:
        v = p.values
        if p.status != "planned":
            lines.append(f"{p.label:>22}  {p.status}: {p.reason}")
            continue
        verdict = "ok" if p.affordable else "CANNOT AFFORD: remaining budget too small"
        lines.append(
            f"{p.label:>22}  {v[R.NOISE_MULTIPLIER]:6.3f}  {v[R.SAMPLE_RATE]:7.4f}  {int(v[R.PLAN_STEPS]):5d}  "
            f"{eps_text(v[R.PLAN_EPSILON_ROUND]):>8}  {eps_text(v[R.PLAN_EPSILON_RUN]):>7}  "
            f"{eps_text(v[R.EPSILON_TOTAL]):>7}  {eps_text(v[R.PLAN_EPSILON_AFTER]):>7}  "
            f"{v[R.BUDGET_EPSILON]:>7g}  {verdict}"
        )
    warning = federation_warning(cfg, [p.values[R.SAMPLE_RATE] for p in plans if p.status == "planned"])
    if warning:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)
