"""What the DP integrity guards (client/dp_guards.py) cost per round, on the demo models.

Why: the guards run on every real DP round on every node, so they must stay cheap (target: < 2%
of a round's time).

Method: one process, one torch thread (as a client gets), one node's share of the demo data (the
survey for ``ft-transformer``, the tweets for ``minilm-lora``), the demo's own config and DP plan.
Whole local rounds (``client.training.train_local``: Opacus wrapping, Poisson sampling, DP-SGD)
with and without guards are interleaved in shuffled order, ``--repeats`` times each, from the same
starting model. Reported per variant: median wall and process-CPU seconds per round; ``overhead``
= median guarded ÷ median plain − 1, also for the fastest (least disturbed) round's CPU time
(all noisy on a shared machine: other processes' load moves them by more than the guards cost),
and ``guards`` = the time the guards themselves measured inside the guarded rounds ÷ the round's
wall time (the direct figure, median over rounds).

    python bench/dp_guards.py [--models ft-transformer minilm-lora] [--repeats 5] [--rows 2000]
                              [--out bench/results/dp_guards.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from client.training import train_local  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import Encoded, encode  # noqa: E402
from common.models import build_model, count_parameters, text_encoding  # noqa: E402
from common.pretrained import pretrained_available  # noqa: E402
from common.privacy import DPPlan, plan_dp  # noqa: E402
from fedguard.demo import demo_config, demo_frame, text_demo_frame  # noqa: E402


def setup(model: str, rows: int) -> tuple[RunConfig, Encoded, DPPlan]:
    """The demo config for ``model``, one node's share of its data (``rows`` rows) and its DP plan."""
    text = model == "minilm-lora"
    frame = text_demo_frame() if text else demo_frame()
    df = frame.sample(n=min(rows, len(frame)), random_state=0).reset_index(drop=True)
    cfg = demo_config(Path(tempfile.gettempdir()) / "fedguard-bench-guards.csv", model=model)
    if text:  # shorter texts: a round in seconds, not minutes, on 2 CPU cores
        cfg = cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"params": {**cfg.model.params, "max_tokens": 32}})}
        )
    data = encode(df, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params))
    n = len(data)
    plan = plan_dp(
        n,
        cfg.dp,
        batch_size=cfg.train.logical_batch_size(n),
        local_epochs=cfg.train.local_epochs,
        rounds=cfg.rounds,
    )
    return cfg, data, plan


def one_round(model: torch.nn.Module, cfg: RunConfig, data: Encoded, plan: DPPlan, guards: bool) -> dict[str, float]:
    m = copy.deepcopy(model)
    w0, c0 = time.perf_counter(), time.process_time()
    result = train_local(m, data, cfg, plan, torch.device("cpu"), guards=guards)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    out = {"wall_s": wall, "cpu_s": cpu, "steps": float(result.steps)}
    if result.guards is not None:
        out["guard_s"] = result.guards.seconds
        out["noise_ratio"] = result.guards.noise_ratio
    return out


def bench_model(name: str, rows: int, repeats: int) -> dict[str, Any]:
    cfg, data, plan = setup(name, rows)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    one_round(model, cfg, data, plan, guards=True)  # warm-up (imports, pre-flight, allocator)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    order = [True, False] * repeats
    random.Random(0).shuffle(order)
    for guarded in order:
        runs[guarded].append(one_round(model, cfg, data, plan, guards=guarded))

    def med(key: str, guarded: bool) -> float:
        return statistics.median(r[key] for r in runs[guarded])

    def best(key: str, guarded: bool) -> float:
        return min(r[key] for r in runs[guarded])

    guard_share = statistics.median(r["guard_s"] / r["wall_s"] for r in runs[True])
    return {
        "model": name,
        "rows": len(data),
        "parameters": count_parameters(model),
        "trainable": trainable,
        "optimizer": cfg.train.optimizer,
        "steps_per_round": int(runs[True][0]["steps"]),
        "noise_multiplier": plan.noise_multiplier,
        "plain_wall_s": med("wall_s", False),
        "guarded_wall_s": med("wall_s", True),
        "plain_cpu_s": med("cpu_s", False),
        "guarded_cpu_s": med("cpu_s", True),
        "overhead_wall": med("wall_s", True) / med("wall_s", False) - 1,
        "overhead_cpu": med("cpu_s", True) / med("cpu_s", False) - 1,
        "best_plain_cpu_s": best("cpu_s", False),
        "best_guarded_cpu_s": best("cpu_s", True),
        "overhead_best_cpu": best("cpu_s", True) / best("cpu_s", False) - 1,
        "guard_s": statistics.median(r["guard_s"] for r in runs[True]),
        "guard_share": guard_share,
        "noise_ratio": statistics.median(r["noise_ratio"] for r in runs[True]),
        "repeats": repeats,
        "rounds": {"guarded": runs[True], "plain": runs[False]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["ft-transformer", "minilm-lora"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8000, help="rows of one node's data (minilm-lora: a quarter)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp_guards.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = []
    for name in args.models:
        if name.startswith("minilm") and not pretrained_available():
            print(f"skip {name}: the pretrained extra is not installed", file=sys.stderr)
            continue
        rows = args.rows // 4 if name.startswith("minilm") else args.rows
        print(f"{name}: {args.repeats} rounds with and without guards …", file=sys.stderr, flush=True)
        results.append(bench_model(name, rows, args.repeats))
    head = (
        f"{'model':<16}{'rows':>6}{'trainable':>11}{'steps':>7}{'plain s':>9}{'guarded s':>11}"
        f"{'Δ wall':>9}{'Δ cpu':>8}{'Δ best cpu':>12}{'guards ms':>11}{'guards %':>10}{'noise²/σ²C²d':>14}"
    )
    print(head)
    for r in results:
        print(
            f"{r['model']:<16}{r['rows']:>6}{r['trainable']:>11,}{r['steps_per_round']:>7}"
            f"{r['plain_wall_s']:>9.2f}{r['guarded_wall_s']:>11.2f}{r['overhead_wall']:>+9.1%}"
            f"{r['overhead_cpu']:>+8.1%}{r['overhead_best_cpu']:>+12.1%}{r['guard_s'] * 1e3:>11.1f}"
            f"{r['guard_share']:>10.2%}{r['noise_ratio']:>14.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
