"""Accounting overhead: what metering time, memory, energy and bytes adds to a training round.

Target: under 2% of round time. One process, side by side: FedGuard's real ClientApp trains real
DP-SGD rounds on a node holding a share of the demo data (``gss_wages``, the demo's FT-Transformer
and utility defaults), alternating rounds with accounting on and off (off: the meter, message
sizing and local usage log replaced by no-ops, the baseline). Because a loaded machine's round
times vary by more than 2%, the accounting work is also timed directly on each round's real
messages and reply, for both sides:

- node: start and stop the meter, size the received message and the reply (Flower wire format),
  coarsen the figures, append the exact ones to ``resources.jsonl``;
- server: size the pushed message and the pulled reply (``MeteredGrid``), meter the round, write
  the round's costs to the run store (SQLite, ``synchronous=FULL``).

    python bench/accounting_overhead.py [--rounds 6] [--rows 4000] [--out bench/results/accounting_overhead.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import client.app as client_app_module  # noqa: E402
from client.sent_log import log_usage  # noqa: E402
from common import records as R  # noqa: E402
from common.codec import numpy_to_record, state_to_numpy  # noqa: E402
from common.models import build_model  # noqa: E402
from common.resources import EnergyModel, Meter, energy_available, message_bytes, wire_figures  # noqa: E402
from fedguard.demo import demo_config, demo_frame  # noqa: E402
from server.store import RunStore  # noqa: E402


class _NoMeter:
    """The baseline arm's meter: nothing is read."""

    def __init__(self, model: EnergyModel | None = None) -> None:
        self.model, self.examples = model, None

    def stop(self) -> None:
        return None


@contextlib.contextmanager
def accounting_off() -> Iterator[None]:
    """Run the real ClientApp without its accounting (the side-by-side baseline)."""
    saved = client_app_module.Meter, client_app_module.message_bytes, client_app_module.log_usage
    client_app_module.Meter = _NoMeter  # type: ignore[assignment,misc]
    client_app_module.message_bytes = lambda msg: 0  # type: ignore[assignment]
    client_app_module.log_usage = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        client_app_module.Meter, client_app_module.message_bytes, client_app_module.log_usage = saved


def accounting_work(msg: Message, reply: Message, workdir: Path, store: RunStore, run_id: int, rnd: int) -> dict:
    """The accounting a round adds, on this round's real messages, timed per side (seconds)."""
    t0 = time.perf_counter()
    meter = Meter(EnergyModel())
    usage = meter.stop()
    usage.bytes_received, usage.bytes_sent = message_bytes(msg), message_bytes(reply)
    figures = wire_figures(usage)
    log_usage(workdir, run_id="bench", round_=rnd, purpose="train", reply_to="", usage=usage.to_dict(), sent=figures)
    t1 = time.perf_counter()
    server_meter = Meter(EnergyModel())
    sent, received = message_bytes(msg), message_bytes(reply)
    server_usage = server_meter.stop()
    store.record_costs(
        run_id,
        rnd,
        {1: {"sent": sent, "received": received, "messages": 2}},
        {1: "client"},
        server=server_usage.to_dict(),
        wall_seconds=server_usage.wall_seconds,
        aggregation_seconds=0.0,
    )
    t2 = time.perf_counter()
    return {"node_s": t1 - t0, "server_s": t2 - t1, "bytes_received": sent, "bytes_sent": received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per arm (on and off alternate)")
    parser.add_argument("--rows", type=int, default=4000, help="rows of the demo data on the node")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accounting_overhead.json")
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="fedguard-accounting-"))
    data = work / "node.csv"
    demo_frame().sample(n=args.rows, random_state=0).to_csv(data, index=False)
    cfg = demo_config(data, rounds=2 * args.rounds, clients=3)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": 1})})
    torch.manual_seed(cfg.seed)
    state = state_to_numpy(build_model(cfg.model.name, cfg.data.schema_, cfg.model.params))
    node_dir = work / "node"
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"data-path": str(data), "workdir": str(node_dir), "budget-epsilon": 1e6},
        state=RecordDict(),
        run_config={},
    )
    store = RunStore(work / "runs.db")
    run_id = store.create_run("accounting-bench", cfg.to_json(), cfg.digest(), None)

    def message(rnd: int) -> Message:
        config = ConfigRecord({R.RUN_CONFIG: cfg.to_json(), R.ROUND: rnd, R.RUN_UID: "bench"})
        content = RecordDict({R.ARRAYS: numpy_to_record(state), R.CONFIG: config})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    # Warm-up: data encoding cache, DP calibration, first imports; not timed.
    client_app_module.app(message(1), ctx)
    rows: list[dict[str, Any]] = []
    rnd = 1
    for i in range(args.rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for arm in order:
            rnd += 1
            msg = message(rnd)
            t0 = time.perf_counter()
            if arm == "on":
                reply = client_app_module.app(msg, ctx)
            else:
                with accounting_off():
                    reply = client_app_module.app(msg, ctx)
            wall = time.perf_counter() - t0
            assert R.ARRAYS in reply.content, dict(reply.content.get(R.REFUSAL, {}))
            row = {"arm": arm, "round": rnd, "round_s": wall}
            if arm == "on":
                row |= accounting_work(msg, reply, work / "direct", store, run_id, rnd)
            rows.append(row)
            print(f"round {rnd:2d} accounting {arm:3s}: {wall:6.2f} s", flush=True)
    store.close()

    on = [r["round_s"] for r in rows if r["arm"] == "on"]
    off = [r["round_s"] for r in rows if r["arm"] == "off"]
    node_s = statistics.median(r["node_s"] for r in rows if r["arm"] == "on")
    server_s = statistics.median(r["server_s"] for r in rows if r["arm"] == "on")
    round_s = statistics.median(off)
    direct_pct = 100 * (node_s + server_s) / round_s
    ab_pct = 100 * (statistics.median(on) - round_s) / round_s
    sample = next(r for r in rows if r["arm"] == "on")
    print()
    print("| round time, accounting off (median) | on (median) | A/B difference | node accounting | "
          "server accounting | direct overhead | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {round_s:.2f} s | {statistics.median(on):.2f} s | {ab_pct:+.1f}% | {1000 * node_s:.1f} ms | "
        f"{1000 * server_s:.1f} ms | {direct_pct:.2f}% | < 2% |"
    )
    print(
        f"\nper round: {sample['bytes_received']:,} bytes to the node, {sample['bytes_sent']:,} back; "
        f"energy {energy_available()} on this machine"
    )
    out = {
        "bench": "accounting_overhead",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"rows": args.rows, "rounds_per_arm": args.rounds, "model": cfg.model.name, "dp": cfg.dp.enabled},
        "energy": energy_available(),
        "round_s_off_median": round_s,
        "round_s_on_median": statistics.median(on),
        "ab_difference_pct": ab_pct,
        "node_accounting_s_median": node_s,
        "server_accounting_s_median": server_s,
        "direct_overhead_pct": direct_pct,
        "target_pct": 2.0,
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\nwrote {args.out} (work files in {work})")


if __name__ == "__main__":
    main()
