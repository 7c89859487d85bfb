"""Empirical privacy of the demo federation: the one-run ε lower bound and a membership-inference
attack beside the accountant's ε, at ε_upper ∈ {1, 3, 8, ∞ (no DP)}.

Why: the accountant's ε is an upper bound that holds only if DP-SGD ran as planned; the audit
(``fedguard privacy audit``, ``fedguard/privacy_audit.py``) measures a lower bound on the same
federation. The table shows how far apart they are on FedGuard's own demo (gss_wages,
FT-Transformer, ``fedguard.demo.demo_config``: the config a demo user gets) and what the audit
costs in wall time.

Method: for each target ε one ``fedguard privacy audit --json`` in its own process (a fresh Ray
and a throw-away work dir): m canaries (least-frequent categories, uniform numeric values, a
random label), each added with probability ½ to one node's training rows, the whole federation
trained through ``fedguard.simulate``, canaries scored by loss on the final model, k = m/10 IN
and k OUT guesses, ε_lower at the run's δ with 95% confidence; loss-threshold MIA on node 0's
training records vs the simulation's held-out records.

``--workload wide`` checks the audit's power where it has some: a synthetic table with a wide
categorical column the data barely uses (like a postcode), so each canary gets a category of its
own and a never-trained twin (``fedguard.privacy_audit.craft_canaries``), a small FT-Transformer
and a high learning rate (the configuration of ``tests/test_privacy_audit.py``).

    python bench/privacy_audit.py [--workload demo|wide] [--rows 4000] [--rounds 3] [--clients 3]
                                  [--canaries 500] [--epsilons 1 3 8 inf] [--out bench/results/privacy_audit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.config import RunConfig, parse_config  # noqa: E402
from fedguard.demo import UTILITY_ROUNDS, demo_config, write_demo_data  # noqa: E402

WIDE_CODES = 1000  # categories of the wide column; the data uses 5


def wide_data(path: Path, rows: int, seed: int = 1) -> Path:
    """A learnable synthetic task plus a wide, nearly unused categorical column."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rows), rng.exponential(size=rows).clip(0, 6)
    c = rng.choice(["x", "y", "z"], size=rows)
    y = (2.0 * a - 1.0 * b + (c == "z") * 1.5 + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    code = rng.choice([f"k{i:03d}" for i in range(5)], size=rows)
    pd.DataFrame({"a": a, "b": b, "c": c, "code": code, "group": rng.choice(["g1", "g2"], size=rows), "y": y}).to_csv(
        path, index=False
    )
    return path


def wide_config(data: Path, rounds: int, clients: int, epsilon: float) -> RunConfig:
    schema = {
        "task": "tabular",
        "label": "y",
        "classes": ["0", "1"],
        "sensitive": ["group"],
        "features": [
            {"name": "a", "type": "numeric", "range": [-3, 3]},
            {"name": "b", "type": "numeric", "range": [0, 6]},
            {"name": "c", "type": "categorical", "categories": ["x", "y", "z"]},
            {"name": "code", "type": "categorical", "categories": [f"k{i:03d}" for i in range(WIDE_CODES)]},
        ],
    }
    return parse_config(
        {
            "name": "audit-wide",
            "seed": 3,
            "rounds": rounds,
            "clients_per_round": clients,
            "train": {"local_epochs": 10, "batch_size": 64, "learning_rate": WIDE_LR, "optimizer": "adam"},
            "dp": {"target_epsilon": epsilon, "delta": 1e-5},
            "model": {"name": "ft-transformer", "params": {"d_model": 16, "layers": 1, "heads": 2}},
            "data": {"schema": schema, "validation_fraction": 0.1},
            "server": {"round_timeout": 600, "wait_for_nodes": 60, "optimizer": {"name": "fedavg"}},
            "simulation": {"num_clients": clients, "data_path": str(data), "holdout_fraction": 0.2},
        },
        "wide audit config",
    )


WIDE_LR = 0.05


def _eps_arg(v: str) -> float | None:
    return None if v.lower() in ("inf", "none", "nodp") else float(v)


def audit_one(data: Path, epsilon: float | None, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One audit of the demo config at ``epsilon`` (None: DP off), in a fresh process."""
    if args.workload == "wide":
        cfg = wide_config(data, args.rounds, args.clients, epsilon or 8.0)
    else:
        cfg = demo_config(data, rounds=args.rounds, clients=args.clients, epsilon=epsilon or 8.0)
    if epsilon is None:
        cfg = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"enabled": False})})
    cfg_path = workdir / f"audit-eps-{epsilon or 'inf'}.toml"
    cfg_path.write_text(cfg.to_toml(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedguard.cli", "privacy", "audit", "--config", str(cfg_path),
            "--canaries", str(args.canaries), "--workdir", str(workdir / f"run-eps-{epsilon or 'inf'}"), "--json",
        ],
        env=env, capture_output=True, text=True, timeout=args.timeout,
    )  # fmt: skip
    if proc.returncode not in (0, 1):  # 1: the audit ran and found a violation (still a result)
        raise RuntimeError(f"audit at ε={epsilon} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    audit = json.loads(proc.stdout[proc.stdout.index("{") :])
    audit["target_epsilon"] = epsilon
    audit["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return audit


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.workload} workload, {args.rows or 'all'} rows, {args.clients} clients, {args.rounds} rounds; "
        f"m={args.canaries} canaries, k=m/10 IN + m/10 OUT guesses, 95% confidence",
        "| target ε | ε_upper (accountant) | ε_lower (audit) | correct / guesses | MIA AUC | MIA TPR@0.1%FPR "
        "| MIA TPR@1%FPR | audit wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        upper = "∞ (no DP)" if r["epsilon_upper"] is None else f"{r['epsilon_upper']:.2f}"
        target = "∞" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        m = r["mia"]
        lines.append(
            f"| {target} | {upper} | {r['epsilon_lower']:.2f} | {r['correct']} / {r['guesses']} | {m['auc']:.3f} "
            f"| {m['tpr_at_fpr_0_1']:.4f} | {m['tpr_at_fpr_1']:.4f} | {r['wall_time_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["demo", "wide"], default="demo")
    ap.add_argument("--rows", type=int, default=None, help="demo: a random subset of rows (default: all); wide: rows")
    ap.add_argument("--rounds", type=int, default=UTILITY_ROUNDS)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--canaries", type=int, default=500)
    ap.add_argument("--epsilons", nargs="+", type=_eps_arg, default=[1.0, 3.0, 8.0, None])
    ap.add_argument("--timeout", type=float, default=3600.0, help="per audit, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "privacy_audit.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedguard-audit-bench-") as tmp:
        workdir = Path(tmp)
        if args.workload == "wide":
            data = wide_data(workdir / "wide.csv", args.rows or 1000)
        else:
            data = write_demo_data(workdir / "demo")
        if args.rows and args.workload == "demo":
            import pandas as pd

            pd.read_csv(data).sample(n=args.rows, random_state=0).to_csv(data, index=False)
        results = []
        for eps in args.epsilons:
            print(f"auditing the demo at target ε={eps if eps is not None else '∞ (no DP)'} ...", flush=True)
            results.append(audit_one(data, eps, args, workdir))
    out = table(results, args)
    print(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
