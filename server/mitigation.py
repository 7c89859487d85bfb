"""The server's side of ``[mitigation]``: reweighing's table before round 1, fairfed/qfedavg weights each round.

The server sees only what nodes release through a charged Gaussian mechanism (``client.mitigation``)
and keeps no node's counts beyond the round that uses them: the reweighing table comes from the
*sum* of the nodes' noised label counts (or from the config's public priors); fairfed and qfedavg
turn each accepted reply's noised counts of the global model into an aggregation multiplier, and the
round's record keeps only the multipliers and the spread of per-node accuracy (no node's counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from common import records as R
from common.config import RunConfig
from common.errors import ConfigError
from common.fairness import Counts, client_spread, merge_counts
from common.fairness.mitigation import (
    WeightTable,
    accuracy,
    fairfed_step,
    label_table,
    priors_table,
    qfedavg_multipliers,
    reweighing_weights,
)
from common.files import atomic_write
from server.checkpoint import checkpoint_dir
from server.federated_fairness import parse_counts
from server.grid_io import collect_replies
from server.validation import (
    Outcome,
    Rejected,
    accounting_values,
    check_records,
    check_values,
    received_keys,
    status_of,
)

if TYPE_CHECKING:  # server.rounds imports this module
    from server.rounds.base import Federation

REWEIGHING_FILE = "reweighing.json"


def counts_of(reply: Message) -> Counts:
    """The noised counts a reply carries in its ``mitigation-counts`` record; Rejected when malformed."""
    try:
        return parse_counts(str(reply.content[R.MITIGATION_COUNTS][R.COUNTS_JSON]))
    except (KeyError, TypeError, ValueError) as exc:
        raise Rejected(f"malformed mitigation counts: {exc}") from None


def prepare(fed: Federation, resumed_from: int | None) -> None:
    """Reweighing: fix the run's weight table before round 1 and send it with every train message.

    A resumed run reuses its original's table (asking again would be a release nobody planned).
    """
    cfg = fed.cfg
    if cfg.mitigation.method != "reweighing":
        return
    if resumed_from is not None:
        table = read_reweighing(fed.store.path, resumed_from)
        if table is None:
            raise ConfigError(
                f"run {resumed_from} used reweighing but its weight table ({REWEIGHING_FILE} beside its checkpoints) "
                "is missing; resuming would ask the nodes for a release the run never planned",
                where=str(checkpoint_dir(fed.store.path, resumed_from)),
                fix="restore the file from a backup of the run folder, or start a new run",
            )
    elif cfg.mitigation.priors is not None:
        table = reweighing_weights(
            priors_table(cfg.mitigation.priors, cfg.data.schema_.classes), cfg.mitigation.strength
        )
        fed.progress(f"reweighing: weights from the config's public priors for {cfg.mitigation_attribute!r}")
    else:
        table = _from_label_counts(fed)
    atomic_write(checkpoint_dir(fed.store.path, fed.run_id) / REWEIGHING_FILE, json.dumps(table, indent=1).encode())
    fed.base[R.REWEIGHING_JSON] = json.dumps(table)
    fed.progress("reweighing: " + describe(table, cfg))


def describe(table: WeightTable, cfg: RunConfig) -> str:
    classes = cfg.data.schema_.classes
    cells = [f"{g}/{classes[int(c)]} {w:.2f}" for g, row in sorted(table.items()) for c, w in sorted(row.items())]
    return f"per-record weights for {cfg.mitigation_attribute!r} (after clipping, ≤ 1): " + (", ".join(cells) or "none")


def _from_label_counts(fed: Federation) -> WeightTable:
    """Ask every online client for noised group × label counts (one charged release each); sum; weigh."""
    cfg = fed.cfg
    clients = fed.refresh()
    fed.progress(f"reweighing: asking {len(clients)} client(s) for noised group × label counts")
    messages = [
        Message(
            RecordDict({R.CONFIG: ConfigRecord({**fed.base, R.ROUND: 0})}),
            dst_node_id=node,
            message_type="query.label_counts",
            group_id="mitigation",
        )
        for node in clients
    ]
    gate = fed.envelope(messages, 0)
    query_timeout, poll = fed.timeouts
    replies, silent, unreachable = collect_replies(fed.grid, messages, query_timeout, poll)
    parts: list[Counts] = []
    outcomes: list[Outcome] = []
    for reply in replies:
        outcome = gate.check(reply) or status_of(reply)
        if outcome is None:
            node = int(reply.metadata.src_node_id)
            try:
                check_records(reply.content, {R.MITIGATION_COUNTS, R.METRICS})
                check_values(reply.content[R.METRICS], R.METRICS)
                parts.append(counts_of(reply))
                outcome = Outcome(
                    node, "accepted", values=accounting_values(reply.content), received=received_keys(reply.content)
                )
            except Rejected as exc:
                outcome = Outcome(node, "rejected", str(exc), values=accounting_values(reply.content))
        outcomes.append(outcome)
    outcomes += [Outcome(n, "dropped", "no reply") for n in silent] + [
        Outcome(n, "failed", "undeliverable") for n in unreachable
    ]
    fed.store.record_count_releases(fed.run_id, 0, [o.row() for o in outcomes])  # each node's ε counts it
    for o in outcomes:
        if o.status != "accepted":
            fed.progress(f"  reweighing: {fed.label(o.node_id)} {o.status}: {o.reason}")
    if not parts:
        fed.progress("  reweighing: no client sent label counts; every record keeps weight 1")
        return {}
    attribute = cfg.mitigation_attribute or ""
    return reweighing_weights(label_table(merge_counts(parts), attribute), cfg.mitigation.strength)


class RoundWeighting:
    """fairfed / qfedavg: this round's multiplier per node from its noised counts of the global model.

    ``multipliers`` (fairfed's running weights, by node id) survive a resume through the checkpoint.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.multipliers: dict[str, float] = {}
        self.local: dict[int, Counts] = {}

    def start_round(self) -> None:
        self.local = {}

    def take(self, node: int, reply: Message) -> None:
        """Keep an accepted reply's counts until the round's aggregation (Rejected when malformed)."""
        self.local[node] = counts_of(reply)

    def round_multipliers(self, nodes: list[int]) -> list[float]:
        """The multiplier of each node in ``nodes`` (the order their updates were added)."""
        m, attribute = self.cfg.mitigation, self.cfg.mitigation_attribute or ""
        local = {str(n): c for n, c in self.local.items()}
        if m.method == "fairfed":
            merged = merge_counts(local.values())
            self.multipliers = fairfed_step(self.multipliers, local, merged, attribute, m.constraint, m.strength)
            current = self.multipliers
        else:
            current = qfedavg_multipliers(local, m.strength)
        return [current.get(str(n), 1.0) for n in nodes]

    def meta(self, nodes: list[int], multipliers: list[float], label: Any) -> dict[str, Any]:
        """What the round records: each node's multiplier (by name) and the spread of per-node noised accuracy."""
        acc = [a for c in self.local.values() if (a := accuracy(c)) is not None]
        return {
            "method": self.cfg.mitigation.method,
            "weights": {label(n): round(k, 4) for n, k in zip(nodes, multipliers, strict=True)},
            "spread": client_spread(acc) if acc else None,
        }


def read_reweighing(store_path: Path, run_id: int) -> WeightTable | None:
    """The reweighing table a run used (None when it used none)."""
    path = checkpoint_dir(store_path, run_id) / REWEIGHING_FILE
    return json.loads(path.read_text()) if path.is_file() else None
