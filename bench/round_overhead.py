"""Round overhead of a real deployment: the time per round that is not client training, and where it goes.

Why: with Flower's defaults a tiny 2-node round took ~30 s (docs/architecture.md) while the clients trained
for about a second. Every mode below runs a real federation on 127.0.0.1 — one flower-superlink
(TLS, node authentication), N flower-supernodes, FedGuard's ServerApp and ClientApp, a tiny
FT-Transformer with DP-SGD — and submits the run with ``flwr run``:

- ``flower-default``: plain Flower style. SuperNode ``--isolation subprocess``: Flower's
  SuperExec starts a fresh ``flwr-clientapp`` per message, which installs the app bundle and
  imports torch/Opacus; the ServerApp polls for replies every 3 s (what ``Grid.send_and_receive``
  sleeps; set through ``server.poll_interval``).
- ``executor``: FedGuard's deployment as shipped. SuperNode ``--isolation process`` + FedGuard's
  long-lived executor (installed ClientApp, torch stays imported); the ServerApp polls every 0.2 s
  and retries reply objects a node is still uploading after 20 ms instead of 1 s/2 s/4 s
  (``flower_internals.fast_reply_pulls``); the SuperNode's hard-coded 3 s idle wait between Fleet
  pulls is cut to 1 s, 0.25 s for 5 s after the node handled a message, and its object-retry
  backoff to 50 ms (``SuperNode(fleet_poll_interval=1.0)``, the default;
  ``flower_internals.shorten_fleet_poll``).
- ``executor-3s-fleet-poll``: as ``executor`` with the SuperNode's own 3 s wait and backoff
  (``fleet_poll_interval=None``): what the node-side polling change buys, in the same run.

Per round: wall = the ServerApp's round time (run store); training = the slowest sampled node's
DP-SGD loop time (the ClientApp's node log); overhead = wall − training. For the executor modes
the slowest node's executor record splits the wall time into *to node* (ServerApp upload to the
SuperLink + the SuperNode's fleet-poll wait, until the executor acquires the task), *pull* (task
input, including waiting while the SuperNode downloads the message objects), *app* (= training +
*app other*: data cache, model build, DP planning, ledger, reply encoding), *push* (reply to the
SuperNode) and *from node* (SuperNode reply wait + upload, the ServerApp's poll and reply download,
validation, aggregation, run store). Also measured
separately: a cold ``flwr-clientapp``-style start (interpreter + Flower + FedGuard ClientApp
imports), and message (de)serialization of the model with the number of wire objects a train
message's content becomes (each a separate request per hop; the model travels packed as one
Array, ``common.codec``).

    python bench/round_overhead.py [--nodes 3] [--rounds 3] [--modes flower-default executor]
                                   [--out bench/results/round_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tomli_w  # noqa: E402

from client.supernode import SuperNode  # noqa: E402
from common.kit import Federation, NodeSpec  # noqa: E402
from fedguard.provisioning import init_federation  # noqa: E402
from server.runs import recorded_end, start_run, wait_for_run  # noqa: E402
from server.store import RunStore  # noqa: E402
from server.superlink import SuperLink, TlsFiles  # noqa: E402
from tests.helpers import make_tabular, tabular_config  # noqa: E402

MODES = {
    "flower-default": {"executor": False, "server_poll": 3.0, "fleet_poll": None},
    "executor": {"executor": True, "server_poll": 0.2, "fleet_poll": 1.0},
    "executor-3s-fleet-poll": {"executor": True, "server_poll": 0.2, "fleet_poll": None},
}
_TRAINED = re.compile(r"round (\d+): trained \d+ steps in ([\d.]+)s")


def write_toml(cfg: Any, path: Path) -> Path:
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    path.write_text(tomli_w.dumps(strip(json.loads(cfg.to_json()))), encoding="utf-8")
    return path


def cold_start_seconds(reps: int = 2) -> float:
    """What a fresh flwr-clientapp pays before it can run the ClientApp: interpreter + imports."""
    code = "import flwr.supernode.runtime.run_clientapp, client.app"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def serialization_ms(reps: int = 20) -> dict[str, float]:
    """Encode a train message's content (model + run config) into Flower's wire objects and decode the model (ms)."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from common import records as R
    from common.codec import numpy_to_record, record_to_numpy, state_to_numpy
    from common.models import build_model

    cfg = tabular_config(None)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    state = state_to_numpy(model)
    enc, dec, size, objects = [], [], 0, 0
    for _ in range(reps):
        t0 = time.perf_counter()
        content = RecordDict({R.ARRAYS: numpy_to_record(state), R.CONFIG: ConfigRecord({R.RUN_CONFIG: cfg.to_json()})})
        blobs = {k: o.deflate() for k, o in get_all_nested_objects(content).items()}
        t1 = time.perf_counter()
        record_to_numpy(content[R.ARRAYS])
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
        size, objects = sum(len(b) for b in blobs.values()), len(blobs)
    return {
        "encode_ms": 1000 * statistics.median(enc),
        "decode_ms": 1000 * statistics.median(dec),
        "message_bytes": size,
        # each is one HTTPS request per hop (pushed or pulled, node-authenticated on the fleet API)
        "wire_objects": objects,
        "tensors": len(state),
        "parameters": sum(int(v.size) for v in state.values()),
    }


def trained_seconds(node_log: Path, run_round: dict[int, float]) -> None:
    """Fill ``run_round[round] = max training seconds`` from one node's log (the latest run's entries)."""
    if not node_log.is_file():
        return
    for m in _TRAINED.finditer(node_log.read_text(encoding="utf-8", errors="replace")):
        rnd, secs = int(m.group(1)), float(m.group(2))
        run_round[rnd] = max(run_round.get(rnd, 0.0), secs)


def run_mode(name: str, base: Path, kits: Any, n_nodes: int, rounds: int, progress: Any) -> dict[str, Any]:
    spec = MODES[name]
    work = base / name
    server = SuperLink(
        work / "server",
        TlsFiles(kits.server_kit / "ca.crt", kits.server_kit / "server.crt", kits.server_kit / "server.key"),
    )
    nodes: list[SuperNode] = []
    try:
        t0 = time.perf_counter()
        server.start(timeout=120)
        for i in range(n_nodes):
            kit = kits.node_kits[f"node{i}"]
            server.register_node(kit / "node.pub", f"node{i}")
            data = work / f"node{i}" / "data.csv"
            data.parent.mkdir(parents=True, exist_ok=True)
            make_tabular(300, seed=100 + i).to_csv(data, index=False)
            nodes.append(
                SuperNode(
                    work / f"node{i}",
                    superlink=server.address,
                    root_certificates=kit / "ca.crt",
                    private_key=kit / "node.key",
                    node_config={
                        "data-path": str(data),
                        "workdir": str(work / f"node{i}" / "work"),
                        "budget-epsilon": 100.0,
                    },
                    executor=spec["executor"],
                    isolation="process" if spec["executor"] else "subprocess",
                    fleet_poll_interval=spec["fleet_poll"],
                )
            )
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_ready(timeout=180)
        startup = time.perf_counter() - t0
        progress(f"[{name}] federation up in {startup:.1f}s; running {rounds} rounds on {n_nodes} nodes")
        cfg = tabular_config(
            None,
            rounds=rounds,
            clients_per_round=n_nodes,
            server={"round_timeout": 300, "wait_for_nodes": 120, "poll_interval": spec["server_poll"]},
        )
        config = write_toml(cfg, work / "run.toml")
        store_path = work / "server" / "runs.db"
        t1, submitted = time.perf_counter(), time.time()
        run_id = start_run(server.address, kits.server_kit / "ca.crt", ROOT, config, store_path, server.flwr_home)
        status = wait_for_run(  # asks the SuperLink (a flwr process) only when the store records the end
            run_id,
            server.address,
            kits.server_kit / "ca.crt",
            server.flwr_home,
            timeout=1800,
            ended=recorded_end(store_path, run_id),
        )
        run_wall = time.perf_counter() - t1
        if not status.succeeded:
            raise RuntimeError(f"{name}: run {run_id} ended {status.status}: {status.details}")
        with RunStore(store_path) as store:
            rows = store.rounds(1)
        train: dict[int, float] = {}
        for node in nodes:
            trained_seconds(node.workdir / "work" / "node.log", train)
        events: dict[int, list[dict[str, Any]]] = {}
        for node in nodes:
            if node.events_path.is_file():
                for line in node.events_path.read_text(encoding="utf-8").splitlines():
                    e = json.loads(line)
                    if e["message_type"] == "train" and int(e["run_id"]) == run_id:
                        events.setdefault(int(e["group_id"]), []).append(e)
        per_round = []
        for row in rows:
            rnd = int(row["round"])
            wall = float(row["finished_at"]) - float(row["started_at"])
            t_train = train.get(rnd, float("nan"))
            entry: dict[str, Any] = {
                "round": rnd,
                "accepted": int(row["accepted"]),
                "wall_s": wall,
                "train_s": t_train,
                "overhead_s": wall - t_train,
            }
            if rnd in events:
                slow = max(events[rnd], key=lambda e: e["total_seconds"])
                entry |= {
                    "pull_s": slow["pull_seconds"],
                    "app_other_s": slow["app_seconds"] - t_train,
                    "push_s": slow["push_seconds"],
                    "to_node_s": slow["acquired_at"] - float(row["started_at"]),
                    "from_node_s": float(row["finished_at"]) - slow["acquired_at"] - slow["total_seconds"],
                }
            per_round.append(entry)
        steady = [r for r in per_round if r["round"] > 1] or per_round
        return {
            "mode": name,
            "settings": spec,
            "federation_startup_s": startup,
            "run_wall_s": run_wall,
            # flwr run → round 1 starts: bundle upload, ServerApp process + imports, nodes, role queries
            "submit_to_round1_s": float(rows[0]["started_at"]) - submitted if rows else None,
            "load_average_after": os.getloadavg(),
            "rounds": per_round,
            "steady_overhead_s": statistics.mean(r["overhead_s"] for r in steady),
            "steady_wall_s": statistics.mean(r["wall_s"] for r in steady),
            "steady_train_s": statistics.mean(r["train_s"] for r in steady),
            "breakdown_steady": {
                k: statistics.mean(r[k] for r in steady)
                for k in ("to_node_s", "pull_s", "app_other_s", "push_s", "from_node_s")
                if all(k in r for r in steady)
            },
        }
    finally:
        for node in nodes:
            node.stop()
        server.stop()


def print_table(results: list[dict[str, Any]], cold: float, ser: dict[str, float]) -> None:
    cols = ("to_node_s", "pull_s", "app_other_s", "push_s", "from_node_s")
    print()
    print(
        f"{'mode':<28}{'round':>6}{'wall s':>8}{'train s':>8}{'overhead':>10}"
        f"{'to node':>9}{'pull':>7}{'app-other':>11}{'push':>7}{'from node':>11}"
    )
    for res in results:
        for r in res["rounds"]:
            split = "".join(
                f"{r[k]:>{w}.2f}" if k in r else f"{'-':>{w}}" for k, w in zip(cols, (9, 7, 11, 7, 11), strict=True)
            )
            print(
                f"{res['mode']:<28}{r['round']:>6}{r['wall_s']:>8.2f}{r['train_s']:>8.2f}{r['overhead_s']:>10.2f}"
                + split
            )
    print()
    print(
        f"{'mode':<28}{'steady overhead s/round':>25}{'steady wall s':>15}{'federation start s':>20}"
        f"{'flwr run→round 1 s':>20}"
    )
    for res in results:
        print(
            f"{res['mode']:<28}{res['steady_overhead_s']:>25.2f}{res['steady_wall_s']:>15.2f}"
            f"{res['federation_startup_s']:>20.1f}{res['submit_to_round1_s'] or float('nan'):>20.1f}"
        )
    print()
    print(
        "cold flwr-clientapp-style start (interpreter + Flower + ClientApp imports), "
        f"paid per message in flower-default: {cold:.2f}s"
    )
    print(
        f"message encode/decode ({ser['parameters']:,} parameters in {ser['tensors']} tensors, "
        f"{ser['message_bytes']:,} bytes in {ser['wire_objects']} wire objects): "
        f"{ser['encode_ms']:.1f} ms / {ser['decode_ms']:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "round_overhead.json")
    args = parser.parse_args()

    import tempfile

    base = args.workdir or Path(tempfile.mkdtemp(prefix="fedguard-round-overhead-"))
    base.mkdir(parents=True, exist_ok=True)
    progress = lambda s: print(s, flush=True)  # noqa: E731
    names = [f"node{i}" for i in range(args.nodes)]
    kits = init_federation(
        Federation(
            name="bench",
            nodes=[NodeSpec(name=n, organisation="bench") for n in names]
            + [NodeSpec(name="evaluator-unused", organisation="bench", role="evaluator")],
        ),
        base / "kits",
        generate_node_keys=True,
    )
    progress("measuring a cold ClientApp process start and message (de)serialization ...")
    cold = cold_start_seconds()
    ser = serialization_ms()
    results = [run_mode(m, base, kits, args.nodes, args.rounds, progress) for m in args.modes]
    print_table(results, cold, ser)

    import flwr

    out = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "flwr": flwr.__version__,
        },
        "nodes": args.nodes,
        "rounds": args.rounds,
        "cold_clientapp_start_s": cold,
        "serialization": ser,
        "modes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\nwrote {args.out} (work files in {base})")


if __name__ == "__main__":
    main()
