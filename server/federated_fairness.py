"""The federated fairness view: per-group counts from every client, summed; no client's counts kept.

After the last round the server asks each client for the final model's confusion counts per
sensitive group on its validation split. Counts leave a node only Gaussian-noised (charged to its
ledger) and only for groups above its minimum size; the server sums them in memory and stores
the totals, the metrics computed from them, the spread of per-client accuracy (no client named)
and each node's accounting values — never one client's counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import records as R
from common.codec import numpy_to_record
from common.config import RunConfig
from common.fairness import OVERALL, Counts, FederatedAudit, client_spread, merge_counts, metrics_from_counts
from common.privacy import counts_mechanism
from server.grid_io import collect_replies
from server.validation import (
    Envelope,
    Outcome,
    Rejected,
    accounting_values,
    check_records,
    check_values,
    received_keys,
    status_of,
)

_ACCOUNTING = (
    R.EPSILON,
    R.DELTA,
    R.NOISE_MULTIPLIER,
    R.EPSILON_TOTAL,
    R.BUDGET_EPSILON,
    R.BUDGET_DELTA,
    R.SELECTION_DELTA_RUN,
)


@dataclass
class FederatedView:
    audit: FederatedAudit | None  # None when no client sent counts
    spread: dict[str, float | int] | None
    outcomes: list[Outcome]


def parse_counts(raw: str) -> Counts:
    """A client's counts, checked structurally: table → group → four finite integers."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("counts are not a table mapping")
    out: Counts = {}
    for table, rows in data.items():
        if not isinstance(rows, dict):
            raise ValueError(f"table {table!r} is not a group mapping")
        out[str(table)] = {}
        for group, cells in rows.items():
            if not (isinstance(cells, list) and len(cells) == 4 and all(isinstance(c, int) for c in cells)):
                raise ValueError(f"{table}/{group}: expected four integers")
            out[str(table)][str(group)] = cells
    return out


def _classify(reply: Message) -> tuple[Outcome, Counts | None]:
    """The payload check of a counts reply (its envelope already passed): allow-listed, finite, parsable."""
    if (status := status_of(reply)) is not None:
        return status, None
    node, content = int(reply.metadata.src_node_id), reply.content
    try:
        check_records(content, {R.FAIRNESS_COUNTS, R.METRICS})
        metrics = check_values(content[R.METRICS], R.METRICS)
        rec = content[R.FAIRNESS_COUNTS]
        counts = parse_counts(str(rec[R.COUNTS_JSON]))
    except Rejected as exc:  # signed by the node: whatever it released still counts towards its ε
        return Outcome(node, "rejected", str(exc), values=accounting_values(content)), None
    except (KeyError, TypeError, ValueError) as exc:
        return Outcome(node, "rejected", f"malformed fairness counts: {exc}", values=accounting_values(content)), None
    values: dict[str, Any] = {k: metrics[k] for k in _ACCOUNTING if k in metrics}
    values["count-sigma"] = float(rec.get(R.COUNT_SIGMA, math.nan))
    return Outcome(node, "accepted", values=values, received=received_keys(content)), counts


def summed_noise_sd(parts: list[Counts], sigmas: list[float], z: float) -> dict[str, dict[str, float]]:
    """Per table and group, the standard deviation of the summed cells' noise: √Σ σᵢ² over the clients that sent it.

    A node that did not state its σ is taken at the run's: ``z``·√tables, what every node must use.
    """
    var: dict[str, dict[str, float]] = {}
    for part, s in zip(parts, sigmas, strict=True):
        s = s if math.isfinite(s) and s > 0 else counts_mechanism(z, len(part)).sigma
        for table, rows in part.items():
            for group in rows:
                var.setdefault(table, {})[group] = var.get(table, {}).get(group, 0.0) + s * s
    return {t: {g: math.sqrt(v) for g, v in rows.items()} for t, rows in var.items()}


def _accuracy(counts: Counts) -> float | None:
    cells = counts.get(OVERALL, {}).get(OVERALL)
    if not cells:
        return None  # the node's validation split is below the minimum size: nothing about it left
    tp, fp, fn, tn = (max(0, c) for c in cells)
    n = tp + fp + fn + tn
    return (tp + tn) / n if n else None


def collect(
    grid: Grid,
    cfg: RunConfig,
    global_state: dict[str, np.ndarray],
    base: dict[str, Any],
    clients: list[int],
    rnd: int,
    node_keys: dict[int, bytes] | None,
    flower_run_id: int | None,
) -> FederatedView:
    """Ask ``clients`` for noised counts of the model of round ``rnd``; sum what arrives."""
    arrays = numpy_to_record(global_state)
    messages = [
        Message(
            RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord({**base, R.ROUND: rnd})}),
            dst_node_id=node,
            message_type="query.fairness",
            group_id="fairness",
        )
        for node in clients
    ]
    gate = Envelope(messages, node_keys, int(flower_run_id or 0), rnd)
    replies, silent, unreachable = collect_replies(grid, messages, cfg.server.round_timeout, cfg.server.poll_interval)
    outcomes: list[Outcome] = []
    parts: list[Counts] = []
    sigmas: list[float] = []
    accuracy: list[float] = []
    sigma = math.nan
    for reply in replies:
        left_out = gate.check(reply)
        outcome, counts = (left_out, None) if left_out is not None else _classify(reply)
        outcomes.append(outcome)
        if counts is not None:
            parts.append(counts)
            sigma = outcome.values["count-sigma"]
            sigmas.append(sigma)
            acc = _accuracy(counts)
            if acc is not None:
                accuracy.append(acc)
    outcomes += [Outcome(n, "dropped", f"no reply within {cfg.server.round_timeout:g}s") for n in silent]
    outcomes += [Outcome(n, "failed", "the message could not be delivered") for n in unreachable]
    if not parts:
        return FederatedView(None, None, outcomes)
    noise = (
        f"Gaussian mechanism on every cell, σ = {sigma:.1f} per client (z = {cfg.fairness.count_noise_multiplier:g}), "
        f"charged to each node's privacy ledger; a group leaves a node only if its noisy size clears a threshold "
        f"(δ += {cfg.fairness.count_selection_delta:g})"
    )
    audit = metrics_from_counts(
        merge_counts(parts),
        cfg.fairness,
        round=rnd,
        clients=len(parts),
        noise=noise,
        noise_sd=summed_noise_sd(parts, sigmas, cfg.fairness.count_noise_multiplier),
    )
    return FederatedView(audit, client_spread(accuracy) if accuracy else None, outcomes)
