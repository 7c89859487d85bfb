"""``fedguard`` — one CLI, grouped by role. User mistakes print a FedGuard error, never a trace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.errors import FedGuardError


def _print_summary(store_path: Path, run_id: int, as_json: bool) -> None:
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run(run_id)
        evals = store.evaluations(run_id)
        clients = store.client_rounds(run_id)
    eps: dict[int, float] = {}
    for row in clients:
        if row["status"] == "accepted" and row["epsilon"] is not None:
            eps[row["node_id"]] = max(eps.get(row["node_id"], 0.0), row["epsilon"])
    final = evals[max(evals)] if evals else {}
    if as_json:
        print(
            json.dumps(
                {
                    "run_id": run_id,
                    "status": run["status"],
                    "store": str(store_path),
                    "final": final,
                    "epsilon_per_node": eps,
                    "evaluations": evals,
                }
            )
        )
        return
    print(f"\nrun {run_id} {run['status']}")
    for rnd, m in evals.items():
        print(f"  round {rnd}: accuracy {m['accuracy']:.3f}  loss {m['loss']:.3f}  macro-F1 {m['macro_f1']:.3f}")
    for node, e in sorted(eps.items()):
        print(f"  node {node}: ε spent {e:.3f}")
    print(f"run store: {store_path}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.config import load_config
    from fedguard.simulate import simulate

    cfg = load_config(args.config)
    workdir = Path(args.workdir or Path(args.config).with_suffix("").name + "-sim")
    t0 = time.perf_counter()
    result = simulate(cfg, workdir, Path(args.store) if args.store else None)
    _print_summary(result.store_path, result.run_id, args.json)
    if not args.json:
        print(f"wall time {time.perf_counter() - t0:.0f}s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedguard.demo import demo_config, write_demo_data
    from fedguard.simulate import simulate

    workdir = Path(args.workdir).resolve()
    t0 = time.perf_counter()
    data = write_demo_data(workdir)
    print(f"FedGuard demo: income above the median from the General Social Survey (gss_wages) → {data}")
    cfg = demo_config(data, rounds=args.rounds, clients=args.clients, epsilon=args.epsilon)
    print(
        f"{cfg.simulation.num_clients} clients × {cfg.rounds} rounds, DP-SGD target ε={cfg.dp.target_epsilon}, "
        f"δ={cfg.dp.delta:g}; sensitive attributes {cfg.data.schema_.sensitive} are never model inputs"
    )
    result = simulate(cfg, workdir)
    _print_summary(result.store_path, result.run_id, args.json)
    if not args.json:
        print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from common.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid (config hash {cfg.digest()[:16]})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from common.models import MODELS

    for name, spec in MODELS.items():
        print(f"{name:20s} task={spec.task:8s} default grad_sample_mode={spec.default_grad_sample_mode}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from server.store import RunStore

    store_path = Path(args.store)
    if args.run_id is not None:
        _print_summary(store_path, args.run_id, args.json)
        return 0
    if not store_path.exists():
        raise FedGuardError("run store not found", where=str(store_path), fix="pass --store PATH")
    with RunStore(store_path) as store:
        runs = store.runs()
    if args.json:
        print(json.dumps([{k: r[k] for k in ("run_id", "name", "status", "config_hash")} for r in runs]))
    for r in runs if not args.json else []:
        print(f"{r['run_id']:4d}  {r['status']:9s}  {r['name']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedguard", description="Privacy-preserving federated training")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a complete DP federation offline on real data")
    d.add_argument("--workdir", default="fedguard-demo", help="where data, partitions and the run store go")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--clients", type=int, default=3)
    d.add_argument("--epsilon", type=float, default=8.0, help="target ε per client for the whole run")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("simulate", help="run a federation from a config on Flower's simulation engine")
    s.add_argument("--config", required=True, help="run config TOML")
    s.add_argument("--workdir", help="where partitions and node caches go (default: <config>-sim)")
    s.add_argument("--store", help="run store path (default: <workdir>/runs.db)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a run config")
    cc.add_argument("config")
    cc.set_defaults(func=cmd_config_check)

    m = sub.add_parser("models", help="list built-in models")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("runs", help="list runs in a run store, or show one")
    r.add_argument("run_id", nargs="?", type=int)
    r.add_argument("--store", default="fedguard-demo/runs.db")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FedGuardError as exc:
        print(f"fedguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
