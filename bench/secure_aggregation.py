"""What secure aggregation costs: plaintext FedAvg vs homomorphic (CKKS) vs threshold secure aggregation (SecAgg).

Why: the issue asks for an aggregation in which no single party can read an update, with upload
≤ 2× float32 and a deployed-demo round ≤ 1.5× plaintext; these numbers choose the mechanism.

Method (protocol costs, in process): K nodes each hold a float32 update ~ N(0, 0.02) (DP-SGD-like)
and a declared integer weight in [100, 5000]. ``secagg`` drives FedGuard's real server protocol
(``server.rounds.secagg.SecAggRounds``: key advertisement, share routing, masked-sum intake,
unmask, dequantize, optimizer step) against the real node code (``client.secagg_node``: key pairs,
Shamir shares sealed per peer, masking, reveal) through an in-process grid; only DP-SGD training
is replaced by the given update. Dropouts leave during training (after sharing keys, before
sending: the server then regenerates the dropout's pairwise masks with every survivor, the
costlier case). ``homomorphic`` times ``common.he`` with FedGuard's scheme: a client's
``encrypt_update``, the server's check-and-add (``CiphertextSum``), the evaluator's decrypt.
``plaintext`` times the server's streaming ``WeightedMean``. Errors are max |aggregate − float64
FedAvg| of the mean update.

Reported: upload per client ÷ (4 bytes × parameters) (secagg: every reply of the round, keys and
shares included, in Flower's wire format), client and server seconds per 1M parameters (wall,
client = median node total over the round, server = the protocol's own time outside the nodes),
extra messages per node per round beyond train and its reply, and the max error.
``--deployed`` also runs ``fedguard demo`` as a real deployment (TLS SuperLink, SuperNodes)
in plaintext and in secagg mode and compares their mean round time.

    python bench/secure_aggregation.py [--quick] [--sizes ...] [--clients 3 10] [--deployed] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from client import secagg_node  # noqa: E402
from common import he  # noqa: E402
from common import records as R  # noqa: E402
from common import secagg as S  # noqa: E402
from common.codec import record_to_numpy  # noqa: E402
from common.config import RunConfig, parse_config  # noqa: E402
from common.resources import message_bytes  # noqa: E402
from server.aggregation import WeightedMean  # noqa: E402
from server.grid_io import MeteredGrid  # noqa: E402
from server.rounds.base import Federation  # noqa: E402
from server.rounds.secagg import SecAggRounds  # noqa: E402

TARGETS = {"upload_x_float32": 2.0, "deployed_round_x_plaintext": 1.5}
SCHEMA = {
    "task": "tabular",
    "label": "y",
    "classes": ["0", "1"],
    "features": [{"name": "a", "type": "numeric"}],
}


def config(clients: int) -> RunConfig:
    return parse_config(
        {"clients_per_round": clients, "secure_aggregation": "secagg", "data": {"schema": SCHEMA}}, "bench config"
    )


def make_updates(n: int, k: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    ups = [rng.normal(0, 0.02, n).astype(np.float32) for _ in range(k)]
    return ups, [int(w) for w in rng.integers(100, 5001, k)]


class NodesGrid:
    """A Grid whose nodes run FedGuard's secagg node code in this process; training is replaced by ``updates``.

    ``silent`` nodes never answer train messages (they dropped after sharing keys); ``node_seconds``
    is each node's time in the protocol.
    """

    def __init__(self, cfg: RunConfig, updates: dict[int, np.ndarray], weights: dict[int, int], silent: set[int]):
        self.cfg, self.updates, self.weights, self.silent = cfg, updates, weights, silent
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in updates}
        self.node_seconds: dict[int, float] = dict.fromkeys(updates, 0.0)
        self.settings = SimpleNamespace(workdir=Path(tempfile.mkdtemp(prefix="secagg-bench-")))
        self._ready: dict[str, Message] = {}
        self._count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._count}"
            ids.append(msg.metadata.message_id)
            node, kind = int(msg.metadata.dst_node_id), msg.metadata.message_type
            if kind == "train" and node in self.silent:
                continue
            t0 = time.perf_counter()
            self._ready[msg.metadata.message_id] = Message(self._answer(msg, node, kind), reply_to=msg)
            self.node_seconds[node] += time.perf_counter() - t0
        return ids

    def _answer(self, msg: Message, node: int, kind: str) -> RecordDict:
        ctx, cfg = self.contexts[node], self.cfg
        if kind == "query.secagg_keys":
            return RecordDict({S.SECAGG: secagg_node.advertise(msg, ctx, self.weights[node])})
        if kind == "query.secagg_shares":
            return RecordDict({S.SECAGG: secagg_node.share(msg, ctx, cfg)})
        if kind == "query.secagg_unmask":
            return RecordDict({S.SECAGG: secagg_node.unmask(msg, ctx, cfg)})
        secagg_node.receive(msg, ctx, cfg)
        old = record_to_numpy(msg.content[R.ARRAYS])
        new = OrderedDict(w=old["w"] + self.updates[node])
        update = secagg_node.masked_update(msg, ctx, cfg, self.settings, new, old)  # type: ignore[arg-type]
        metrics = MetricRecord({R.NUM_EXAMPLES: self.weights[node]})
        return RecordDict({S.SECAGG_MASKED: update, R.METRICS: metrics})

    def pull_messages(self, ids: Any) -> list[Message]:
        return [self._ready.pop(i) for i in ids if i in self._ready]


def fedavg(ups: list[np.ndarray], ws: list[float]) -> np.ndarray:
    acc = np.zeros(ups[0].size)
    for u, w in zip(ups, ws, strict=True):
        acc += np.float64(w) * u
    return acc / sum(ws)


def bench_secagg(n: int, ups: list[np.ndarray], ws: list[int], dropouts: int) -> dict[str, Any]:
    k = len(ups)
    cfg = config(k)
    nodes = [1000 + 7 * i for i in range(k)]
    silent = set(nodes[:dropouts])
    grid = NodesGrid(cfg, dict(zip(nodes, ups, strict=True)), dict(zip(nodes, ws, strict=True)), silent)
    metered = MeteredGrid(grid)  # type: ignore[arg-type]
    base = {R.RUN_CONFIG: cfg.to_json(), R.RUN_UID: "bench"}
    fed = Federation(
        metered, cfg, None, 1, 1, base, signed=False, evaluator_key="", meter=None,  # type: ignore[arg-type]
        progress=lambda _: None, rng=np.random.default_rng(0),
    )  # fmt: skip
    rounds = SecAggRounds(fed, OrderedDict(w=np.zeros(n, dtype=np.float32)))
    t0 = time.perf_counter()
    messages, outcomes = rounds.configure_train(1, nodes)
    gate = fed.envelope(messages, 1)
    ids = metered.push_messages(messages)
    for reply in metered.pull_messages(ids):
        outcomes.append(gate.check(reply) or rounds.accept(reply))
    result = rounds.aggregate(1, outcomes, 1)
    total = time.perf_counter() - t0
    traffic = metered.take()
    row: dict[str, Any] = {"mode": "secagg", "params": n, "clients": k, "dropouts": dropouts}
    alive = [nd for nd in nodes if nd not in silent]
    node_s = [grid.node_seconds[nd] for nd in alive]
    per_m = n / 1e6
    row.update(
        t=rounds.session.threshold if rounds.session else None,
        upload_x_float32=round(statistics.median(traffic[nd]["received"] for nd in alive) / (4 * n), 3),
        client_s_per_1m=round(statistics.median(node_s) / per_m, 3),
        server_s_per_1m=round((total - sum(grid.node_seconds.values())) / per_m, 3),
        extra_messages=statistics.median(traffic[nd]["messages"] for nd in alive) / 2 - 1,
    )
    if not result.updated:
        row.update(outcome=f"discarded: {result.discarded}", max_error=None)
        return row
    mean = rounds.state["w"].astype(np.float64)
    keep = [i for i, nd in enumerate(nodes) if nd not in silent]
    ref = fedavg([ups[i] for i in keep], [ws[i] for i in keep])
    row.update(
        outcome="updated",
        max_error=float(np.abs(mean - ref).max()),
        error_bound=result.meta["secagg"]["error_bound"],
    )
    return row


def bench_plaintext(n: int, ups: list[np.ndarray], ws: list[int]) -> dict[str, Any]:
    from common.codec import numpy_to_record

    state = OrderedDict(w=np.zeros(n, dtype=np.float32))
    agg = WeightedMean(state)
    t0 = time.perf_counter()
    for u, w in zip(ups, ws, strict=True):
        agg.add(OrderedDict(w=u), float(w))
    result = agg.result()
    server = time.perf_counter() - t0
    reply = Message(RecordDict({R.ARRAYS: numpy_to_record(OrderedDict(w=ups[0]))}), 1, "train")
    return {
        "mode": "plaintext",
        "params": n,
        "clients": len(ups),
        "dropouts": 0,
        "upload_x_float32": round(message_bytes(reply) / (4 * n), 3),
        "client_s_per_1m": 0.0,
        "server_s_per_1m": round(server / (n / 1e6), 3),
        "extra_messages": 0,
        "outcome": "updated",
        "max_error": float(np.abs(result["w"] - fedavg(ups, [float(w) for w in ws])).max()),
    }


def bench_homomorphic(n: int, ups: list[np.ndarray], ws: list[int]) -> dict[str, Any]:
    k, bound = len(ups), 1.0
    ctx = he.create_context("fedguard-add", max_clients=k, bound=bound)
    pub = he.load_public_context(he.public_context_bytes(ctx))
    ratios = [w / max(ws) for w in ws]
    client_s, blobs = [], []
    for u, r in zip(ups, ratios, strict=True):
        t0 = time.perf_counter()
        blobs.append(he.encrypt_update(ctx, np.clip(u, -bound, bound), r, bound=bound))
        client_s.append(time.perf_counter() - t0)
    total = he.CiphertextSum(pub, n, max_clients=k)
    t0 = time.perf_counter()
    for i, b in enumerate(blobs):
        total.add(b, where=f"client {i}")
    summed = total.result()
    server = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, _ = he.decrypt_sum(ctx, summed, n, max_weight=float(k))
    decrypt = time.perf_counter() - t0
    per_m = n / 1e6
    return {
        "mode": "homomorphic",
        "params": n,
        "clients": k,
        "dropouts": 0,
        "upload_x_float32": round(sum(len(x) for x in blobs[0]) / (4 * n), 3),
        "client_s_per_1m": round(statistics.median(client_s) / per_m, 3),
        "server_s_per_1m": round(server / per_m, 3),
        "evaluator_decrypt_s_per_1m": round(decrypt / per_m, 3),
        "extra_messages": 1,  # the evaluator's aggregate exchange (per round, not per node)
        "outcome": "updated",
        "max_error": float(np.abs(mean - fedavg(ups, ratios)).max()),
    }


def deployed(rounds: int, repeats: int) -> dict[str, Any]:
    """Round times of ``fedguard demo`` deployed (3 clients + evaluator), plaintext and secagg alternating.

    The machine is shared: alternating the modes ``repeats`` times spreads other load over both.
    """
    from fedguard.demo import demo_config, write_demo_data
    from fedguard.demo_deploy import deployed_demo
    from server.store import RunStore

    each: dict[str, list[float]] = {"none": [], "secagg": []}
    for _ in range(repeats):
        for mode in each:
            workdir = Path(tempfile.mkdtemp(prefix=f"secagg-bench-demo-{mode}-"))
            data = write_demo_data(workdir)
            cfg = demo_config(data, rounds=rounds, clients=3).model_copy(update={"secure_aggregation": mode})
            store_path, run_id = deployed_demo(cfg, workdir, progress=lambda _: None)
            with RunStore(store_path) as store:
                each[mode] += [r["finished_at"] - r["started_at"] for r in store.rounds(run_id)]
    plain, masked = statistics.mean(each["none"]), statistics.mean(each["secagg"])
    return {
        "rounds": rounds,
        "repeats": repeats,
        "round_seconds": {"plaintext": plain, "secagg": masked},
        "each_round": {"plaintext": each["none"], "secagg": each["secagg"]},
        "ratio": masked / plain,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'mode':<12}{'params':>10}{'clients':>8}{'drop':>5}{'up ×f32':>9}{'client s/1M':>12}"
    head += f"{'server s/1M':>12}{'extra msg':>10}{'max error':>11}  outcome"
    print(head)
    for r in rows:
        err = "—" if r["max_error"] is None else f"{r['max_error']:.1e}"
        print(
            f"{r['mode']:<12}{r['params']:>10,}{r['clients']:>8}{r['dropouts']:>5}{r['upload_x_float32']:>9.3f}"
            f"{r['client_s_per_1m']:>12.3f}{r['server_s_per_1m']:>12.3f}{r['extra_messages']:>10g}{err:>11}  "
            f"{r['outcome'][:60]}"
        )


def readme_table(rows: list[dict[str, Any]], params: int = 1_000_000, clients: int = 10) -> str:
    """README.md's table: the largest model with 10 clients, every mode and dropout count (checked by
    tests/test_bench_tables.py)."""
    lines = [
        "| mode | dropouts | upload × float32 | client s / 1M | server s / 1M | extra messages | max error vs FedAvg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["params"] != params or r["clients"] != clients:
            continue
        err = "—" if r["max_error"] is None else f"{r['max_error']:.1e}".replace("e-0", "e-")
        client = f"{r['client_s_per_1m']:.3f}" if r["client_s_per_1m"] else "0"
        lines.append(
            f"| {r['mode']} | {r['dropouts']} | {r['upload_x_float32']:.3f} | {client} "
            f"| {r['server_s_per_1m']:.3f} | {r['extra_messages']:g} | {err} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k parameters, 3 clients, 0/1 dropouts")
    ap.add_argument("--sizes", nargs="+", type=int, default=None)
    ap.add_argument("--clients", nargs="+", type=int, default=None)
    ap.add_argument("--deployed", action="store_true", help="also time the deployed demo in both modes")
    ap.add_argument("--deployed-rounds", type=int, default=2)
    ap.add_argument("--deployed-repeats", type=int, default=2)
    ap.add_argument("--deployed-only", action="store_true", help="only the deployed demo (keeps the protocol rows)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "secure_aggregation.json")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000])
    clients = args.clients or ([3] if args.quick else [3, 10])
    drops = [0, 1] if args.quick else [0, 1, 2]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp task

    rows: list[dict[str, Any]] = []
    if args.deployed_only and args.out.exists():
        rows = json.loads(args.out.read_text("utf-8"))["rows"]
        sizes = []
    for n in sizes:
        for k in clients:
            ups, ws = make_updates(n, k)
            print(f"... {n:,} params x {k} clients", file=sys.stderr, flush=True)
            rows.append(bench_plaintext(n, ups, ws))
            rows.append(bench_homomorphic(n, ups, ws))
            rows += [bench_secagg(n, ups, ws, d) for d in drops]
    print_table(rows)
    if any(r["params"] == 1_000_000 and r["clients"] == 10 for r in rows):
        print("\nREADME.md's table (1M parameters, 10 clients)\n")
        print(readme_table(rows))
    result: dict[str, Any] = {"rows": rows}
    if args.deployed or args.deployed_only:
        print("... deployed demo, plaintext and secagg alternating", file=sys.stderr, flush=True)
        result["deployed"] = dep = deployed(args.deployed_rounds, args.deployed_repeats)
        plain, masked = dep["round_seconds"]["plaintext"], dep["round_seconds"]["secagg"]
        print(
            f"deployed demo ({dep['repeats']}× {dep['rounds']} rounds, 3 clients): plaintext {plain:.1f} s per round, "
            f"secagg {masked:.1f} s: {dep['ratio']:.2f}× (target ≤ {TARGETS['deployed_round_x_plaintext']}×)"
        )
    ups_ok = all(r["upload_x_float32"] <= TARGETS["upload_x_float32"] for r in rows if r["mode"] == "secagg")
    print(f"secagg upload ≤ {TARGETS['upload_x_float32']}× float32 in every row: {'yes' if ups_ok else 'NO'}")
    result["meta"] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "targets": TARGETS,
        "timing": "wall seconds; client = median node total per round; server = protocol time outside the nodes",
        "updates": "float32 ~ N(0, 0.02); weights integers in [100, 5000]; dropouts leave during training",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
