"""Scale of a simulated federation: time per round and server memory for 10, 100 and 1,000 virtual clients.

Why: operators size large simulations (and the server) from how a round's cost grows. Each
size runs in its own process on Flower's simulation engine (Ray), with FedGuard's ServerApp and
ClientApp unchanged: the demo data (gss_wages) split IID over N virtual clients, 10% sampled per
round, each training the demo FT-Transformer with DP-SGD (Opacus, target ε per client) and
charging its own ledger. What is measured, per size:

- time per round: the ServerApp's round time (run store: push, the sampled clients' DP training
  on Ray's actors, validation, streaming FedAvg), median over rounds 2..R. Round 1 is shown
  apart: it also asks every one of the N nodes its role once (client or evaluator).
- time per client call: round time / clients per round (with ``actors`` = cores in parallel).
- where a round's time goes: the *cycle* (start of round r to start of round r+1: what a user
  waits per round, the evaluator's scoring of the held-out set included), the *client work* on
  its critical path (each sampled node's train call and the evaluator's call, timed by the node
  itself in its ``resources.jsonl``: max(Σ train calls ÷ actors, the longest one) + the evaluate
  call) and the *fixed cost* = cycle − client work: what the round costs whatever the clients do
  (dispatch, Ray's actor calls, the ServerApp's validation, aggregation, checkpoint and run store).
- server memory: the driver process's peak RSS (ServerApp, run store, Ray driver; the clients run
  in Ray's worker processes), and its growth from the start of round 1 to the end of the run —
  the part that would grow with the number of clients if updates were held rather than summed.

Two modes run side by side, one size after the other: ``fedguard`` (as shipped: the simulation
engine's message dispatch without a sweep over every node, every 20 ms, and reply polls that start
at 20 ms: ``fedguard.simulate.speed_up_simulation``)
and ``flower`` (Flower's own dispatch, every 0.1 s over every registered node, and fixed 0.2 s reply
polls: what FedGuard did before).

    python bench/scale.py [--clients 10 100 1000] [--rounds 4] [--modes fedguard flower]
                          [--ray-address auto] [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """Peak resident memory of this process, sampled every 50 ms; ``mark()`` notes the current value."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = self.at_mark = _rss_mb()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def mark(self) -> None:
        self.at_mark = _rss_mb()
        self.peak = max(self.peak, self.at_mark)


def round_breakdown(workdir: Path, starts: list[float], actors: int) -> list[dict[str, float]]:
    """Per round with a successor: cycle, client work on the critical path and the fixed rest (see above)."""
    calls: dict[tuple[int, str], list[float]] = {}
    for log in (workdir / "partitions").glob("node-*/resources.jsonl"):
        for line in log.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("round") is not None and rec["purpose"] in ("train", "evaluate"):
                calls.setdefault((int(rec["round"]), rec["purpose"]), []).append(rec["usage"]["wall_seconds"])
    out = []
    for rnd in range(1, len(starts)):
        train = calls.get((rnd, "train"), [])
        client = max(sum(train) / actors, max(train, default=0.0)) + sum(calls.get((rnd, "evaluate"), []))
        cycle = starts[rnd] - starts[rnd - 1]
        out.append({"round": rnd, "cycle_s": cycle, "client_s": client, "fixed_s": cycle - client})
    return out


def one_size(n: int, rounds: int, workdir: Path, ray_address: str | None, mode: str = "fedguard") -> dict[str, Any]:
    """Run one simulated federation of ``n`` clients in this process and measure it."""
    from common.config import parse_config
    from fedguard import simulate as simulate_module
    from fedguard.demo import demo_config, fresh_demo_ledger, write_demo_data
    from fedguard.simulate import simulate
    from server.store import RunStore

    if mode == "flower":  # what FedGuard did before: Flower's dispatch loop, fixed reply polls
        simulate_module.speed_up_simulation = lambda: None  # type: ignore[attr-defined]

    sampler = RssSampler()
    sampler.start()
    data = write_demo_data(workdir)
    raw = demo_config(data, rounds=rounds, clients=n).model_dump(by_alias=True)
    per_round = max(1, n // 10)
    raw["clients_per_round"] = per_round
    raw["train"]["batch_size"] = 16  # ~27 training rows per client at n = 1,000
    raw["server"]["min_replies"] = 1
    raw["fairness"]["federated_counts"] = False  # would query all n clients once at the end
    cfg = parse_config(raw, f"scale bench, {n} clients")
    fresh_demo_ledger(workdir)

    def progress(line: str) -> None:
        if line.startswith("round 1/"):
            sampler.mark()  # model built, run recorded, Ray up, round 0 scored
        print(f"  [{n}] {line[:160]}", flush=True)

    t0 = time.perf_counter()
    result = simulate(cfg, workdir, progress=progress, ray_address=ray_address)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    with RunStore(result.store_path) as store:
        rows = store.rounds(result.run_id)
        clients = store.client_rounds(result.run_id)
    times = [r["finished_at"] - r["started_at"] for r in rows]
    later = times[1:] or times
    # local Ray: one actor per client_cpus of this machine's CPUs; on a cluster not known here, so no split
    actors = None if ray_address else max(1, int((os.cpu_count() or 1) // cfg.simulation.client_cpus))
    parts = round_breakdown(workdir, [r["started_at"] for r in rows], actors) if actors else []
    steady = parts[1:] or parts  # round 1 also asks every node its role
    accepted = sum(c["status"] == "accepted" for c in clients)
    return {
        "mode": mode,
        "clients": n,
        "clients_per_round": per_round,
        "rounds": rounds,
        "round1_s": times[0],
        "round_s": statistics.median(later),
        "per_client_call_s": statistics.median(later) / per_round,
        "actors": actors,
        "breakdown": parts,
        **{k: statistics.median(p[k] for p in steady) if steady else None for k in ("cycle_s", "client_s", "fixed_s")},
        "accepted": accepted,
        "sampled": sum(r["sampled"] for r in rows),
        "server_peak_rss_mb": sampler.peak,
        "server_rss_growth_mb": sampler.peak - sampler.at_mark,
        "wall_s": wall,
        "final_accuracy": result.final_metrics.get("accuracy"),
    }


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["fedguard", "flower"], choices=["fedguard", "flower"])
    ap.add_argument("--ray-address", help="attach to an existing Ray cluster (auto or HOST:PORT)")
    ap.add_argument("--workdir", default="/tmp/fedguard-bench-scale")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = ap.parse_args()
    if args.one:
        mode = args.modes[0]
        row = one_size(args.one, args.rounds, Path(args.workdir) / f"{mode}-n{args.one}", args.ray_address, mode)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = []
    for n in args.clients:
        for mode in args.modes:
            print(
                f"{n} virtual clients, {max(1, n // 10)} sampled per round, {args.rounds} rounds, {mode} ...",
                flush=True,
            )
            cmd = [sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds), "--workdir", args.workdir]
            cmd += ["--modes", mode] + (["--ray-address", args.ray_address] if args.ray_address else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {n}-client simulation ({mode}) failed (exit {proc.returncode})")
            rows.append(json.loads(result[-1][len("RESULT ") :]))
            print(f"  round {rows[-1]['round_s']:.2f} s (median of rounds 2..)", flush=True)
    print()
    header = (
        "| mode | clients | per round | round 1 s (+roles) | s/round | s/client call | × clients/round | × s/round"
        " | fedguard ÷ flower s/round | cycle s | client work s | fixed s | server peak RSS MB | RSS growth MB |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        base = next(b for b in rows if b["mode"] == r["mode"])
        flower = next((b for b in rows if b["mode"] == "flower" and b["clients"] == r["clients"]), None)
        r["x_clients_per_round"] = r["clients_per_round"] / base["clients_per_round"]
        r["x_round_s"] = r["round_s"] / base["round_s"]
        r["vs_flower"] = r["round_s"] / flower["round_s"] if flower else None
        print(
            f"| {r['mode']} | {r['clients']:,} | {r['clients_per_round']} | {r['round1_s']:.1f} | {r['round_s']:.2f} | "
            f"{r['per_client_call_s']:.2f} | {r['x_clients_per_round']:.0f}× | {r['x_round_s']:.1f}× | "
            f"{'' if r['vs_flower'] is None else format(r['vs_flower'], '.2f')} | "
            f"{_num(r.get('cycle_s'))} | {_num(r.get('client_s'))} | {_num(r.get('fixed_s'))} | "
            f"{r['server_peak_rss_mb']:.0f} | {r['server_rss_growth_mb']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "rounds": args.rounds}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
