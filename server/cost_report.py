"""The cost report of one run: what each round, client and the whole run cost in time, bytes and energy.

Built only from the run store. The server's own figures are exact (its time, aggregation time,
energy, and the bytes of every message to and from each node, in Flower's wire format); a client's
time and energy appear only if its owner let coarsened figures leave (policy ``allow_values``
``"resource-figures"``; rounded up to 2 significant digits), else the client counts for bytes only.
Energy is labelled measured (RAPL/NVML) or estimated (CPU time × watts per core, see
``common.resources``); emissions are energy × each machine's declared grid carbon intensity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from common import records as R
from common.fairness.model_findings import is_constant, majority_baseline, no_better_than_majority
from server.report_blocks import Block, Plot
from server.report_blocks import to_html as blocks_to_html
from server.report_blocks import to_markdown as blocks_to_markdown
from server.store import RunStore


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundCost(_Model):
    round: int  # 0: setup (role discovery, scoring the initial model)
    wall_seconds: float | None
    aggregation_seconds: float | None
    bytes_sent: int  # server → nodes
    bytes_received: int  # nodes → server
    server_energy_wh: float | None
    server_emissions_g: float | None
    clients_trained: int
    clients_reporting: int  # accepted clients that sent resource figures
    client_cpu_seconds: float | None
    client_energy_wh: float | None
    client_emissions_g: float | None
    energy_wh: float  # server + reporting clients
    emissions_g: float
    cumulative_energy_wh: float
    cumulative_emissions_g: float
    cumulative_bytes: int
    cumulative_seconds: float
    accuracy: float | None
    accuracy_gain_points: float | None  # vs the previous scored round, in percentage points


class ClientCost(_Model):
    node_id: str
    role: str
    rounds_trained: int
    bytes_sent: int  # server → node
    bytes_received: int  # node → server
    bytes_share: float
    reported: bool  # sent coarsened resource figures
    wall_seconds: float | None
    cpu_seconds: float | None
    peak_ram_mb: float | None
    gpu_seconds: float | None
    examples_processed: float | None
    energy_wh: float | None
    emissions_g: float | None
    energy_share: float | None  # of the run's total energy
    energy_label: str | None  # measured | estimated | mixed
    carbon_intensity: float | None


class CostTotals(_Model):
    wall_seconds: float
    aggregation_seconds: float
    bytes_sent: int
    bytes_received: int
    server_energy_wh: float
    client_energy_wh: float
    energy_wh: float
    emissions_g: float
    energy_label: str  # measured | estimated | mixed
    clients_not_reporting: int


class CostReport(_Model):
    run_id: int
    run_name: str
    status: str
    totals: CostTotals
    accuracy_start: float | None
    accuracy_end: float | None
    accuracy_gain_points: float | None
    #: The points the per-point figures divide by: final accuracy above the better of the initial model's and
    #: always predicting the held-out majority class (points up to that share take no learning).
    priced_points: float | None = None
    priced_from: float | None = None
    wh_per_point: float | None
    emissions_g_per_point: float | None
    bytes_per_point: float | None
    seconds_per_point: float | None
    server_energy_source: str | None
    rounds: list[RoundCost]
    clients: list[ClientCost]
    notes: list[str]


def _sum(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _label(labels: set[str]) -> str:
    return next(iter(labels)) if len(labels) == 1 else "mixed" if labels else "estimated"


def build_cost_report(store_path: str | Path, run_id: int) -> CostReport:
    with RunStore(store_path) as store:
        run = store.run(run_id)
        costs = store.round_costs(run_id)
        traffic = store.node_traffic(run_id)
        clients = store.client_rounds(run_id)
        evals = store.evaluations(run_id)
    accuracy = {r: float(m["accuracy"]) for r, m in evals.items() if "accuracy" in m}
    reported = [c for c in clients if c["status"] == "accepted" and R.ENERGY_WH in c["values"]]
    labels: set[str] = set()

    rounds: list[RoundCost] = []
    cum_e = cum_g = cum_s = 0.0
    cum_b = 0
    prev_acc: float | None = None
    for c in costs:
        rnd = int(c["round"])
        server = c["server"]
        if server.get("energy_label"):
            labels.add(str(server["energy_label"]))
        mine = [x for x in reported if x["round"] == rnd]
        labels |= {"measured" if x["values"].get(R.ENERGY_MEASURED) else "estimated" for x in mine}
        s_wh, s_g = server.get("energy_wh"), server.get("emissions_g")
        c_wh = _sum([x["values"].get(R.ENERGY_WH) for x in mine])
        c_g = _sum([x["values"].get(R.EMISSIONS_G) for x in mine])
        energy = (s_wh or 0.0) + (c_wh or 0.0)
        emissions = (s_g or 0.0) + (c_g or 0.0)
        cum_e, cum_g = cum_e + energy, cum_g + emissions
        cum_b += int(c["bytes_sent"]) + int(c["bytes_received"])
        cum_s += float(c["wall_seconds"] or 0.0)
        acc = accuracy.get(rnd)
        gain = None if acc is None or prev_acc is None else 100.0 * (acc - prev_acc)
        prev_acc = acc if acc is not None else prev_acc
        rounds.append(
            RoundCost(
                round=rnd,
                wall_seconds=c["wall_seconds"],
                aggregation_seconds=c["aggregation_seconds"],
                bytes_sent=int(c["bytes_sent"]),
                bytes_received=int(c["bytes_received"]),
                server_energy_wh=s_wh,
                server_emissions_g=s_g,
                clients_trained=sum(1 for x in clients if x["round"] == rnd and x["status"] == "accepted"),
                clients_reporting=len(mine),
                client_cpu_seconds=_sum([x["values"].get(R.CPU_SECONDS) for x in mine]),
                client_energy_wh=c_wh,
                client_emissions_g=c_g,
                energy_wh=energy,
                emissions_g=emissions,
                cumulative_energy_wh=cum_e,
                cumulative_emissions_g=cum_g,
                cumulative_bytes=cum_b,
                cumulative_seconds=cum_s,
                accuracy=acc,
                accuracy_gain_points=gain,
            )
        )

    total_bytes = sum(int(t["bytes_sent"]) + int(t["bytes_received"]) for t in traffic) or 1
    per_node: dict[int, list[dict[str, Any]]] = {}
    for t in traffic:
        per_node.setdefault(t["node_id"], []).append(t)
    client_costs: list[ClientCost] = []
    for node, rows in sorted(per_node.items()):
        trained = [x for x in clients if x["node_id"] == node and x["status"] == "accepted"]
        figs = [x["values"] for x in trained if R.ENERGY_WH in x["values"]]
        energy = _sum([v.get(R.ENERGY_WH) for v in figs])
        node_labels = {"measured" if v.get(R.ENERGY_MEASURED) else "estimated" for v in figs}
        peaks = [v[R.PEAK_RAM_MB] for v in figs if R.PEAK_RAM_MB in v]
        sent = sum(int(r["bytes_sent"]) for r in rows)
        received = sum(int(r["bytes_received"]) for r in rows)
        client_costs.append(
            ClientCost(
                node_id=str(node),
                role=next((str(r["role"]) for r in rows if r["role"]), "client"),
                rounds_trained=len(trained),
                bytes_sent=sent,
                bytes_received=received,
                bytes_share=(sent + received) / total_bytes,
                reported=bool(figs),
                wall_seconds=_sum([v.get(R.WALL_SECONDS) for v in figs]),
                cpu_seconds=_sum([v.get(R.CPU_SECONDS) for v in figs]),
                peak_ram_mb=max(peaks) if peaks else None,
                gpu_seconds=_sum([v.get(R.GPU_SECONDS) for v in figs]),
                examples_processed=_sum([v.get(R.EXAMPLES_PROCESSED) for v in figs]),
                energy_wh=energy,
                emissions_g=_sum([v.get(R.EMISSIONS_G) for v in figs]),
                energy_share=None if energy is None or cum_e <= 0 else energy / cum_e,
                energy_label=_label(node_labels) if figs else None,
                carbon_intensity=figs[-1].get(R.CARBON_INTENSITY) if figs else None,
            )
        )

    server_wh = sum(r.server_energy_wh or 0.0 for r in rounds)
    silent = [c for c in client_costs if c.role == "client" and c.rounds_trained and not c.reported]
    totals = CostTotals(
        wall_seconds=cum_s,
        aggregation_seconds=sum(r.aggregation_seconds or 0.0 for r in rounds),
        bytes_sent=sum(r.bytes_sent for r in rounds),
        bytes_received=sum(r.bytes_received for r in rounds),
        server_energy_wh=server_wh,
        client_energy_wh=cum_e - server_wh,
        energy_wh=cum_e,
        emissions_g=cum_g,
        energy_label=_label(labels),
        clients_not_reporting=len(silent),
    )
    scored = sorted(accuracy)
    acc0 = accuracy[scored[0]] if scored else None
    acc1 = accuracy[scored[-1]] if scored else None
    gain = None if acc0 is None or acc1 is None or len(scored) < 2 else 100.0 * (acc1 - acc0)
    # A final model that predicts one class scores that class's share, and one no better than always predicting the
    # majority class has learned nothing usable: their "gain" (from the initial model's chance) is none to price.
    constant = bool(scored) and is_constant(evals[scored[-1]])
    useless = bool(scored) and not constant and no_better_than_majority(evals[scored[-1]])

    baseline = majority_baseline(evals[scored[-1]]) if scored else None
    priced_from = None if acc0 is None else max(acc0, baseline[0]) if baseline is not None else acc0
    priced = None if gain is None or acc1 is None or priced_from is None else 100.0 * (acc1 - priced_from)

    def per_point(total: float) -> float | None:
        return total / priced if priced is not None and priced > 0 and not (constant or useless) else None

    notes = [
        "Bytes are the server's own exact figures: every message to and from each node in Flower's wire format "
        "(its serialized object tree), role queries, scoring and fairness counts included; TLS and gRPC framing "
        "are not counted.",
        "Client time and energy are the figures clients' owners let leave, each rounded up to 2 significant "
        "digits; the exact figures stay in each node's resources.jsonl.",
        f"Energy is {totals.energy_label}: measured only where the machine exposes RAPL (CPU) or NVML (GPU) "
        "counters, otherwise estimated as CPU seconds × watts per busy core (+ GPU seconds × watts per GPU), "
        "configurable per machine (watts-per-core, gpu-watts); emissions use each machine's declared grid carbon "
        "intensity (carbon-intensity, gCO2e/kWh).",
    ]
    if silent:
        notes.append(
            f"{len(silent)} client(s) trained without sending resource figures (their owners' policies keep them "
            "local): their energy is not in the totals, only their bytes."
        )
    if gain is not None and gain <= 0:
        notes.append("Held-out accuracy did not improve: no cost per accuracy point.")
    elif constant:
        notes.append(
            "The final model predicts one class for every held-out row: its accuracy is that class's share, "
            "not learning; no cost per accuracy point."
        )
    elif useless:
        notes.append(
            "The final model's held-out accuracy is not above what always predicting the majority class scores: "
            "no cost per accuracy point."
        )
    elif priced is not None and priced > 0 and acc0 is not None and priced_from is not None and priced_from > acc0:
        notes.append(
            f"Cost per accuracy point counts the {priced:.1f} point(s) above always predicting the majority class "
            f"({priced_from:.3f}), not the {gain:.1f} from the initial model's {acc0:.3f}: points up to the "
            "majority's share take no learning."
        )
    server_source = next((c["server"].get("energy_source") for c in reversed(costs) if c["server"]), None)
    return CostReport(
        run_id=run_id,
        run_name=str(run["name"]),
        status=str(run["status"]),
        totals=totals,
        accuracy_start=acc0,
        accuracy_end=acc1,
        accuracy_gain_points=gain,
        priced_points=priced,
        priced_from=priced_from,
        wh_per_point=per_point(cum_e),
        emissions_g_per_point=per_point(cum_g),
        bytes_per_point=per_point(float(totals.bytes_sent + totals.bytes_received)),
        seconds_per_point=per_point(cum_s),
        server_energy_source=server_source,
        rounds=rounds,
        clients=client_costs,
        notes=notes,
    )


# -- formatting ----------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _f(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def priced_text(rep: CostReport) -> str:
    """The points the per-point figures divide by, as the summary, the report and the dashboard say it:
    "+0.3 points above the majority class's 0.970" (or "+10.0 points" when they count from the initial model)."""
    if rep.priced_points is None:
        return "–"
    start, first = rep.priced_from, rep.accuracy_start
    above = "" if start is None or first is None or start <= first else f" above the majority class's {start:.3f}"
    return f"+{rep.priced_points:.1f} points{above}"


def _blocks(rep: CostReport) -> list[Block]:
    t = rep.totals
    blocks: list[Block] = [
        ("h1", f"Cost report — run {rep.run_id} ({rep.run_name})"),
        (
            "ul",
            [
                f"Status: {rep.status}; {len([r for r in rep.rounds if r.round > 0])} round(s) recorded",
                f"Energy: {_f(t.energy_wh)} Wh ({t.energy_label}): server {_f(t.server_energy_wh)} Wh, "
                f"clients {_f(t.client_energy_wh)} Wh",
                f"Emissions: {_f(t.emissions_g)} gCO2e",
                f"Bytes: {fmt_bytes(t.bytes_sent)} sent to nodes, {fmt_bytes(t.bytes_received)} received",
                f"Server time: {_f(t.wall_seconds, '.1f')} s, "
                f"of which aggregation {_f(t.aggregation_seconds, '.2f')} s",
                f"Held-out accuracy: {_f(rep.accuracy_start, '.3f')} → {_f(rep.accuracy_end, '.3f')} "
                f"({_f(rep.accuracy_gain_points, '+.1f')} points)",
                "Cost per accuracy point: "
                + (
                    f"{_f(rep.wh_per_point)} Wh, {_f(rep.emissions_g_per_point)} gCO2e, "
                    f"{fmt_bytes(rep.bytes_per_point)}, {_f(rep.seconds_per_point, '.1f')} s "
                    f"(over {priced_text(rep)})"
                    if rep.wh_per_point is not None
                    else "n/a (held-out accuracy did not improve, the final model is constant, or no evaluation)"
                ),
                f"Server energy: {rep.server_energy_source or 'not recorded'}",
            ],
        ),
        ("h2", "Per round"),
        ("plot", _energy_plot(rep)),
        (
            "table",
            (
                [
                    "round",
                    "time s",
                    "aggregation s",
                    "sent",
                    "received",
                    "energy Wh",
                    "gCO2e",
                    "clients reporting",
                    "cum. energy Wh",
                    "cum. gCO2e",
                    "cum. bytes",
                    "cum. time s",
                    "accuracy",
                    "gain (points)",
                ],
                [
                    [
                        "setup" if r.round == 0 else str(r.round),
                        _f(r.wall_seconds, ".1f"),
                        _f(r.aggregation_seconds, ".3f"),
                        fmt_bytes(r.bytes_sent),
                        fmt_bytes(r.bytes_received),
                        _f(r.energy_wh),
                        _f(r.emissions_g),
                        f"{r.clients_reporting}/{r.clients_trained}",
                        _f(r.cumulative_energy_wh),
                        _f(r.cumulative_emissions_g),
                        fmt_bytes(r.cumulative_bytes),
                        _f(r.cumulative_seconds, ".1f"),
                        _f(r.accuracy, ".3f"),
                        _f(r.accuracy_gain_points, "+.1f"),
                    ]
                    for r in rep.rounds
                ],
            ),
        ),
        ("h2", "Per node"),
        (
            "table",
            (
                [
                    "node",
                    "role",
                    "rounds trained",
                    "sent to it",
                    "received from it",
                    "share of bytes",
                    "CPU s",
                    "peak RAM MB",
                    "examples",
                    "energy Wh",
                    "gCO2e",
                    "share of energy",
                    "energy is",
                ],
                [
                    [
                        c.node_id,
                        c.role,
                        str(c.rounds_trained),
                        fmt_bytes(c.bytes_sent),
                        fmt_bytes(c.bytes_received),
                        _pct(c.bytes_share),
                        _f(c.cpu_seconds),
                        _f(c.peak_ram_mb),
                        _f(c.examples_processed),
                        _f(c.energy_wh),
                        _f(c.emissions_g),
                        _pct(c.energy_share),
                        c.energy_label or ("not sent" if c.role == "client" else "–"),
                    ]
                    for c in rep.clients
                ],
            ),
        ),
        ("h2", "How these figures were obtained"),
        ("ul", rep.notes),
    ]
    return blocks


def _energy_plot(rep: CostReport) -> Plot:
    """Energy per round and its running total (round 0: setup), as the dashboard shows it."""
    return Plot(
        title="Energy per round and cumulative",
        series={
            "cumulative Wh": [(r.round, r.cumulative_energy_wh) for r in rep.rounds],
            "Wh this round": [(r.round, r.energy_wh) for r in rep.rounds],
        },
        ylabel="Wh",
        y_min=0.0,
        chart_id="cost-energy",
    )


def to_markdown(rep: CostReport) -> str:
    return blocks_to_markdown(_blocks(rep))


def to_html(rep: CostReport) -> str:
    """One self-contained page (no scripts, no external resources) readable offline."""
    return blocks_to_html(_blocks(rep), f"FedGuard cost report {rep.run_id}", rep.model_dump_json())


def render(rep: CostReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rep.model_dump(mode="json"), indent=2) + "\n"
    if fmt == "md":
        return to_markdown(rep)
    return to_html(rep)


def summary_lines(store_path: str | Path, run_id: int) -> list[str]:
    """What the demo prints at the end: the run's total energy, emissions and bytes."""
    rep = build_cost_report(store_path, run_id)
    t = rep.totals
    lines = [
        f"cost: {t.energy_wh:.3g} Wh ({t.energy_label}), {t.emissions_g:.3g} gCO2e; "
        f"{fmt_bytes(t.bytes_sent)} sent to nodes, {fmt_bytes(t.bytes_received)} received; "
        f"{t.wall_seconds:.1f} s on the server"
    ]
    if rep.wh_per_point is not None:
        lines.append(
            f"cost per accuracy point: {rep.wh_per_point:.3g} Wh, {fmt_bytes(rep.bytes_per_point)} ({priced_text(rep)})"
        )
    if t.clients_not_reporting:
        lines.append(f"{t.clients_not_reporting} client(s) kept their resource figures local: bytes only")
    return lines
