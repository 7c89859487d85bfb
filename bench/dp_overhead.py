"""How much DP-SGD costs over plain training for each built-in model, per per-sample-gradient engine.

Why: the per-sample-gradient engine dominates a DP client's CPU time, and the cheapest engine
depends on the model's shape; ``grad_sample_mode = "auto"`` (``client.training.auto_grad_sample_mode``)
is set from this script. Engines: ``bk`` (FedGuard's book-keeping path, ``client.training.BKModule``;
built-in from-scratch models only), then Opacus's ``hooks`` (Opacus's own default), ``ew``, ``ghost``
and ``functorch``. The table marks the one FedGuard uses (``auto``) and Opacus's default; the JSON
has the same under ``summary``.

Method: one process, one torch thread, the same model init, optimizer (SGD) and fixed-size batches
for plain and every mode; rounds of steps are interleaved in shuffled order and repeated, and the
median samples per CPU-second is reported (process CPU time, not wall time: another process's load
stretches wall time far more; on CUDA, wall time with synchronisation, since the work is on the
GPU). Batches are fixed-size (``poisson_sampling=False``) so every engine sees the same work;
Poisson sampling itself costs next to nothing. ``× plain`` = plain samples/s ÷ mode samples/s (the
slowdown). Peak memory is the peak resident-set growth of a fresh child process
over its first 5 steps (Linux: high-water mark reset via /proc/self/clear_refs, then VmHWM − VmRSS;
process-isolated, so modes do not hide each other's peaks; includes allocator slack); on CUDA, the
growth of ``torch.cuda.max_memory_allocated`` over a fresh trainer's first 5 steps, in-process (a
child would spend seconds initialising CUDA; tensors only, no allocator cache).

``--device auto`` (the default) trains on CUDA when torch sees a GPU, like a node does.

    python bench/dp_overhead.py [--quick] [--device auto] [--models ft-transformer] [--batch-size 64 256]
                                [--params '{"d_model": 64}'] [--out bench/results/dp_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client.training import BK_MODE, PrivacyEngine, auto_grad_sample_mode  # noqa: E402
from common.devices import resolve_device  # noqa: E402
from common.models import MODELS, build_model, count_parameters  # noqa: E402
from common.schema import DataSchema  # noqa: E402

MODES = (BK_MODE, "hooks", "ew", "ghost", "functorch")
OPACUS_DEFAULT = "hooks"  # PrivacyEngine.make_private's grad_sample_mode default
N_ROWS = 1024  # synthetic rows to draw batches from


# --------------------------------------------------------------------------- workloads


def tabular_schema() -> DataSchema:
    """13 features like the demo credit data: 10 numeric, 3 categorical (4, 7, 12 categories)."""
    feats: list[dict[str, Any]] = [{"name": f"num{i}"} for i in range(10)]
    for i, k in enumerate((4, 7, 12)):
        feats.append({"name": f"cat{i}", "type": "categorical", "categories": [f"c{j}" for j in range(k)]})
    return DataSchema(task="tabular", features=feats, label="y", classes=["bad", "good"])


def text_schema() -> DataSchema:
    return DataSchema(task="text", text_column="text", label="y", classes=["neg", "pos"])


def synthetic_data(schema: DataSchema, n: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, schema.num_classes, (n,), generator=g)
    if schema.task == "text":
        from common.tokenizer import CLS_ID, VOCAB_SIZE

        x = torch.randint(3, VOCAB_SIZE, (n, seq_len), generator=g)
        x[:, 0] = CLS_ID
        return x, y
    cols = []
    for f in schema.features:
        if f.type == "categorical":
            assert f.categories
            cols.append(torch.randint(0, len(f.categories), (n, 1), generator=g).float())
        else:
            cols.append(torch.rand(n, 1, generator=g) * 2 - 1)
    return torch.cat(cols, dim=1), y


#: Every built-in model has a workload, so the default ``--models`` (all of them) runs every row it lists.
#: The pretrained models read the same byte-encoded text as the from-scratch one and tokenize it
#: with their own WordPiece inside the model.
WORKLOADS: dict[str, Callable[[], DataSchema]] = {
    "ft-transformer": tabular_schema,
    "text-transformer": text_schema,
    "minilm-lora": text_schema,
    "minilm-full": text_schema,
}
assert set(WORKLOADS) == set(MODELS), "bench/dp_overhead.py: add a workload for every built-in model"


# --------------------------------------------------------------------------- one trainer per mode


class Trainer:
    """A model + optimizer (+ Opacus wrapping for DP modes) that can run k steps on fixed batches."""

    def __init__(
        self, name: str, mode: str, params: dict[str, Any], batch: int, seq_len: int, device: str = "cpu"
    ) -> None:
        self.mode = mode
        self.device = torch.device(device)
        schema = WORKLOADS[name]()
        torch.manual_seed(0)
        model = build_model(name, schema, params).to(self.device)
        model.train()
        self.n_params = count_parameters(model)
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        crit: nn.Module = nn.CrossEntropyLoss()
        x, y = synthetic_data(schema, N_ROWS, seq_len)
        self.batches = [
            (x[i : i + batch].to(self.device), y[i : i + batch].to(self.device))
            for i in range(0, N_ROWS - batch + 1, batch)
        ]
        self.batch = batch
        self.i = 0
        if mode != "plain":
            loader = DataLoader(TensorDataset(x, y), batch_size=batch)
            kw: dict[str, Any] = dict(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
                poisson_sampling=False,
            )
            if mode == "ghost":
                model, opt, crit, _ = PrivacyEngine().make_private(criterion=crit, **kw)
            else:
                model, opt, _ = PrivacyEngine().make_private(**kw)
        self.model, self.opt, self.crit = model, opt, crit

    def steps(self, k: int) -> float:
        """Run k optimizer steps; return the seconds they took: process CPU time, or wall time on CUDA.

        CPU time, not wall time, on the CPU: on a shared machine another process's load stretches
        wall time much more than the CPU time of a single-threaded loop (cache and core sharing
        remain). On CUDA the work runs on the GPU, so wall time between synchronisations.
        """
        cuda = self.device.type == "cuda"
        clock = time.perf_counter if cuda else time.process_time
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = clock()
        for _ in range(k):
            xb, yb = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.opt.zero_grad(set_to_none=True)
            loss = self.crit(self.model(xb), yb)
            loss.backward()
            self.opt.step()
        if cuda:
            torch.cuda.synchronize(self.device)
        return clock() - t0


def _proc_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_child(name: str, mode: str, params: dict[str, Any], batch: int, seq_len: int) -> tuple[int, str]:
    """In a fresh process: peak resident-memory growth (KiB) over 5 training steps, and the method.

    Linux: reset the high-water mark (``/proc/self/clear_refs`` ← 5), then ``VmHWM − VmRSS``.
    Elsewhere ``ru_maxrss`` growth, which misses peaks lower than the import-time high-water mark.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    tr = Trainer(name, mode, params, batch, seq_len)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        base = _proc_kib("VmRSS")
        tr.steps(5)
        return _proc_kib("VmHWM") - base, "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tr.steps(5)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "ru_maxrss"


def cuda_memory(name: str, mode: str, params: dict[str, Any], batch: int, seq_len: int, device: str) -> float:
    """On CUDA: growth of the allocated-tensor high-water mark over a fresh trainer's first 5 steps (MiB).

    Fresh, as the CPU child is: a trainer that has already stepped holds its per-sample gradients
    between steps, so its growth over later steps would hide them.
    """
    dev = torch.device(device)
    tr = Trainer(name, mode, params, batch, seq_len, device)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    tr.steps(5)
    peak = torch.cuda.max_memory_allocated(dev)
    del tr
    torch.cuda.empty_cache()
    return round((peak - base) / 2**20, 1)


def measure_memory(name: str, mode: str, params: dict[str, Any], batch: int, seq_len: int) -> float | None:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from bench.dp_overhead import memory_child;"
        "a = sys.argv; print(*memory_child(a[2], a[3], json.loads(a[4]), int(a[5]), int(a[6])))"
    )
    args = [sys.executable, "-c", code, str(ROOT), name, mode, json.dumps(params), str(batch), str(seq_len)]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if r.returncode != 0:
        return None
    kib, _method = r.stdout.strip().splitlines()[-1].split()
    return round(int(kib) / 1024, 1)  # MiB


# --------------------------------------------------------------------------- benchmark


def modes_for(name: str) -> tuple[str, ...]:
    """Every engine that applies: ``bk`` handles the built-in from-scratch models, not pretrained ones."""
    return MODES if not MODELS[name].pretrained else tuple(m for m in MODES if m != BK_MODE)


def role(name: str, mode: str) -> str:
    """``auto`` for the engine FedGuard uses, ``opacus`` for Opacus's default, both or neither."""
    tags = [t for t, m in (("auto", auto_grad_sample_mode(name)), ("opacus", OPACUS_DEFAULT)) if m == mode]
    return "+".join(tags)


def bench_model(
    name: str,
    params: dict[str, Any],
    batch: int,
    seq_len: int,
    *,
    repeats: int,
    round_s: float,
    memory: bool,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    trainers: dict[str, Trainer] = {}
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    modes = modes_for(name)
    for mode in ("plain", *modes):
        try:
            tr = Trainer(name, mode, params, batch, seq_len, device)
            tr.steps(3)  # warm-up, and surfaces modes that fail on the first step
            trainers[mode] = tr
        except Exception as exc:  # report, don't crash: a failing mode is a result
            failed[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    # Steps per round so that each round takes about round_s for every mode.
    k = {m: max(1, round(round_s / max(tr.steps(2) / 2, 1e-4))) for m, tr in trainers.items()}
    sps: dict[str, list[float]] = {m: [] for m in trainers}
    order = list(trainers)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for m in order:
            sps[m].append(k[m] * batch / trainers[m].steps(k[m]))
    plain = statistics.median(sps["plain"]) if "plain" in sps else float("nan")
    n_params = next(iter(trainers.values())).n_params if trainers else 0
    for mode in ("plain", *modes):
        row: dict[str, Any] = {
            "model": name,
            "mode": mode,
            "role": role(name, mode),
            "batch_size": batch,
            "params": n_params,
        }
        if mode in failed:
            row.update(status="failed", error=failed[mode])
        else:
            med = statistics.median(sps[mode])
            row.update(
                status="ok",
                samples_per_s=round(med, 1),
                samples_per_s_runs=[round(v, 1) for v in sps[mode]],
                cost_vs_plain=round(plain / med, 3),
            )
            if memory and torch.device(device).type == "cuda":
                row["peak_mem_mib"] = cuda_memory(name, mode, params, batch, seq_len, device)
            elif memory:
                row["peak_mem_mib"] = measure_memory(name, mode, params, batch, seq_len)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<18} {'params':>8} {'batch':>5} {'mode':<10} {'used by':<11} {'samples/s':>10} {'× plain':>8}"
    head += f" {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(
                f"{r['model']:<18} {r['params']:>8,} {r['batch_size']:>5} {r['mode']:<10} {r['role']:<11} FAILED:",
                r["error"],
            )
            continue
        mem = r.get("peak_mem_mib")
        mem_s = f"{mem:9.1f}" if isinstance(mem, float) else f"{'-':>9}"
        print(
            f"{r['model']:<18} {r['params']:>8,} {r['batch_size']:>5} {r['mode']:<10} {r['role']:<11} "
            f"{r['samples_per_s']:>10.0f} {r['cost_vs_plain']:>7.2f}× {mem_s}"
        )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The bench/README table: per model and batch, plain samples/s (peak) and each engine's × plain / peak MiB."""
    lines = [
        "| model | batch | plain samples/s (peak) | " + " | ".join(MODES) + " |",
        "|---|---|---|" + "---|" * len(MODES),
    ]
    for key in dict.fromkeys((r["model"], r["batch_size"]) for r in rows):
        by_mode = {r["mode"]: r for r in rows if (r["model"], r["batch_size"]) == key and r["status"] == "ok"}

        def mem(r: dict[str, Any]) -> str:
            return f"{r['peak_mem_mib']:,.0f}" if isinstance(r.get("peak_mem_mib"), float) else "-"

        cells = []
        for mode in MODES:
            r = by_mode.get(mode)
            cell = "—" if r is None else f"{r['cost_vs_plain']:.2f}× / {mem(r)}"
            cells.append(f"**{cell}**" if r is not None and "auto" in r["role"] else cell)
        plain = by_mode.get("plain")
        first = "failed" if plain is None else f"{plain['samples_per_s']:,.0f} ({mem(plain)} MiB)"
        lines.append(f"| {key[0]} | {key[1]} | {first} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and batch: FedGuard's engine (``auto``) and Opacus's default next to the fastest, × plain."""
    out = []
    for key in dict.fromkeys((r["model"], r["batch_size"]) for r in rows):
        ok = {r["mode"]: r for r in rows if (r["model"], r["batch_size"]) == key and r["status"] == "ok"}
        dp = [r for m, r in ok.items() if m != "plain"]
        if not dp:
            continue
        best = min(dp, key=lambda r: r["cost_vs_plain"])
        auto = auto_grad_sample_mode(key[0])

        def cost(mode: str, ok: dict[str, dict[str, Any]] = ok) -> float | None:
            return ok[mode]["cost_vs_plain"] if mode in ok else None

        out.append(
            {
                "model": key[0],
                "batch_size": key[1],
                "auto_mode": auto,
                "auto_vs_plain": cost(auto),
                "opacus_default_vs_plain": cost(OPACUS_DEFAULT),
                "fastest_mode": best["mode"],
                "fastest_vs_plain": best["cost_vs_plain"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds; no memory children")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch-size", nargs="+", type=int, default=[64, 256], help="logical DP batch size(s)")
    ap.add_argument("--seq-len", type=int, default=128, help="text sequence length (tokens incl. [CLS])")
    ap.add_argument("--params", default="{}", help="JSON hyper-parameter overrides, e.g. '{\"d_model\": 64}'")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp_overhead.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dev = resolve_device(args.device, where="--device")
    cuda = dev.type == "cuda"
    print(f"device: {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if cuda else ""), flush=True)
    repeats = args.repeats or (3 if args.quick else 9)
    round_s = 0.15 if args.quick else 0.4
    params = json.loads(args.params)
    rows: list[dict[str, Any]] = []
    cells = [(name, batch) for name in args.models for batch in args.batch_size]
    t0 = time.perf_counter()
    for i, (name, batch) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {name} batch {batch} ({time.perf_counter() - t0:.0f}s elapsed)", flush=True)
        rows += bench_model(
            name,
            params,
            batch,
            args.seq_len,
            repeats=repeats,
            round_s=round_s,
            memory=not (args.quick or args.no_memory),
            device=str(dev),
        )
    print_table(rows)
    print("\n" + markdown_table(rows) + "\n")
    summary = summarize(rows)
    for s in summary:
        print(
            f"{s['model']} batch {s['batch_size']}: FedGuard ({s['auto_mode']}) {s['auto_vs_plain']}× plain, "
            f"Opacus default ({OPACUS_DEFAULT}) {s['opacus_default_vs_plain']}×; fastest {s['fastest_mode']} "
            f"{s['fastest_vs_plain']}×"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "repeats": repeats,
        "seq_len": args.seq_len,
        "params_override": params,
        "memory_metric": "growth of torch.cuda.max_memory_allocated over a fresh trainer's first 5 steps (MiB)"
        if cuda
        else "peak RSS growth (MiB, VmHWM - VmRSS after clear_refs) of a fresh child over 5 steps",
        "optimizer": "SGD lr=0.05",
        "timing": ("samples per wall-second (CUDA, synchronised)" if cuda else "samples per process-CPU-second")
        + ", median of interleaved rounds; batches fixed-size",
    }
    out = {"meta": meta, "summary": summary, "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
