"""What DP-SGD costs on the pretrained all-MiniLM-L6-v2: LoRA vs full fine-tuning, plain vs Opacus.

Why: the pretrained path is only worth shipping if DP stays cheap. Targets (issue 11): LoRA DP ≤
1.1× its plain time, full fine-tuning with ghost clipping ≤ 2.0×.

Method: one process, ``--threads`` torch threads (default 1, as a client gets), real English text
(the text demo's tweets, tokenized by the model's own WordPiece to ≤ ``--max-tokens``), fixed-size
batches (``poisson_sampling=False``: every variant does the same work), SGD. For each variant a
warm-up step, then ``--repeats`` rounds of ``--steps`` steps, rounds of all variants interleaved in
shuffled order; the median samples per CPU-second is reported (process CPU time: other processes'
load stretches wall time far more; on CUDA, wall time with synchronisation). ``× plain`` = plain
samples/s ÷ variant samples/s for the same fine-tuning kind. Peak memory: on CUDA
``max_memory_allocated``; on CPU the growth of the resident-set high-water mark over the variant's
first steps (Linux: reset via /proc/self/clear_refs, then VmHWM − VmRSS; includes allocator slack,
a lower bound when memory is reused from earlier variants).

    python bench/pretrained.py [--batch-size 32] [--steps 3] [--repeats 3] [--device auto]
                               [--out bench/results/pretrained.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from common.devices import resolve_device  # noqa: E402
from common.models import build_model, count_parameters  # noqa: E402
from common.schema import DataSchema  # noqa: E402
from common.tokenizer import encode_texts  # noqa: E402

#: (name, model, grad_sample_mode or None for plain); "full" freezes the token-embedding table
#: (the default), "full+emb" trains it too.
VARIANTS = [
    ("lora plain", "minilm-lora", None),
    ("lora DP hooks", "minilm-lora", "hooks"),
    ("lora DP ghost", "minilm-lora", "ghost"),
    ("full plain", "minilm-full", None),
    ("full DP hooks", "minilm-full", "hooks"),
    ("full DP ghost", "minilm-full", "ghost"),
    ("full+emb plain", "minilm-full+emb", None),
    ("full+emb DP hooks", "minilm-full+emb", "hooks"),
    ("full+emb DP ghost", "minilm-full+emb", "ghost"),
]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Variant:
    """One model + optimizer (+ Opacus engine) with a ``step()`` on the next fixed batch."""

    def __init__(self, base: nn.Module, mode: str | None, x: torch.Tensor, y: torch.Tensor, batch: int, dev) -> None:
        self.model = copy.deepcopy(base).to(dev).train()
        self.dev = dev
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt: Any = torch.optim.SGD(params, lr=1e-3)
        self.crit: Any = nn.CrossEntropyLoss()
        loader = DataLoader(TensorDataset(x, y), batch_size=batch, drop_last=True)
        self.net: nn.Module = self.model
        if mode is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore")
                out = PrivacyEngine().make_private(
                    module=self.model,
                    optimizer=self.opt,
                    data_loader=loader,
                    criterion=self.crit,
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    poisson_sampling=False,
                    grad_sample_mode=mode,
                )
            if mode == "ghost":
                self.net, self.opt, self.crit, loader = out
            else:
                self.net, self.opt, loader = out
        self.batches = [(xb.to(dev), yb.to(dev)) for xb, yb in loader]
        self.i = 0

    def step(self) -> None:
        xb, yb = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            self.crit(self.net(xb), yb).backward()
        self.opt.step()


def _timed(v: Variant, steps: int, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter() if cuda else time.process_time()
    for _ in range(steps):
        v.step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() if cuda else time.process_time()) - t0


_KIND = {"lora": "LoRA", "full": "full (embeddings frozen)", "full+emb": "full+embeddings"}


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The bench/README table: one row per variant, samples/s, × plain and peak MiB per run (batch size).

    ``(default)`` and bold mark the engine FedGuard uses for that model (``auto``).
    """
    from client.training import auto_grad_sample_mode

    head = "| variant | trainable |" + "".join(
        f" batch {r['batch_size']}: samples/s | × plain | peak MiB |" for r in results
    )
    lines = [head, "|---|---:|" + "---:|---:|---:|" * len(results)]
    for i, row in enumerate(results[0]["rows"]):
        kind, mode = row["variant"].split(" ")[0], row["grad_sample_mode"]
        default = mode == auto_grad_sample_mode(row["model"].removesuffix("+emb"))
        label = f"{_KIND.get(kind, kind)} {'plain' if mode == 'plain' else 'DP ' + mode}" + (
            " (default)" if default else ""
        )
        cells = []
        for res in results:
            r = res["rows"][i]
            ratio = f"{r['x_plain']:.2f}"
            cells.append(
                f"{r['samples_per_s']:,.0f} | {f'**{ratio}**' if default else ratio} | {r['peak_memory_mib']:,.0f}"
            )
        lines.append(f"| {label} | {row['trainable_parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", nargs="*", default=[v[0] for v in VARIANTS])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrained.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    from fedguard.demo import text_demo_frame

    texts = text_demo_frame()["text"].sample(n=args.batch_size * 4, random_state=0).tolist()
    x = encode_texts(texts, 256)
    y = torch.arange(len(texts)) % 2
    schema = DataSchema(task="text", text_column="text", label="y", classes=["a", "b"])
    params = {"max_tokens": args.max_tokens}
    torch.manual_seed(0)
    chosen = [v for v in VARIANTS if v[0] in args.variants]
    bases = {}
    for key in sorted({m for _, m, _ in chosen}):
        extra = {"freeze_embeddings": False} if key == "minilm-full+emb" else {}
        bases[key] = build_model(key.removesuffix("+emb"), schema, params | extra)
    runs: dict[str, Variant] = {}
    peaks: dict[str, float] = {}
    for name, model, mode in chosen:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
        else:
            _reset_peak()
            base_mem = _rss_kb("VmRSS") * 1024
        runs[name] = Variant(bases[model], mode, x, y, args.batch_size, dev)
        runs[name].step()  # warm-up, and the first step's peak
        runs[name].step()
        peak = torch.cuda.max_memory_allocated(dev) if cuda else _rss_kb("VmHWM") * 1024
        peaks[name] = max(0.0, (peak - base_mem) / 2**20)
        print(f"  ready: {name}", flush=True)
    rates: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.repeats):
        order = list(runs)
        random.shuffle(order)
        for name in order:
            rates[name].append(args.steps * args.batch_size / _timed(runs[name], args.steps, cuda))
    rows = []
    for name, model, mode in chosen:
        sps = statistics.median(rates[name])
        plain = name.split(" ")[0] + " plain"
        ratio = statistics.median(rates[plain]) / sps if plain in rates else float("nan")
        rows.append(
            {
                "variant": name,
                "model": model,
                "grad_sample_mode": mode or "plain",
                "trainable_parameters": count_parameters(runs[name].model),
                "samples_per_s": sps,
                "x_plain": ratio,
                "peak_memory_mib": peaks[name],
            }
        )
    unit = "samples/s (wall, CUDA)" if cuda else "samples per CPU-second"
    print(
        f"\nMiniLM-L6 fine-tuning, batch {args.batch_size}, ≤{args.max_tokens} tokens, {dev}, {args.threads} thread(s)"
    )
    print(f"{'variant':<18} {'trainable':>11} {unit:>24} {'× plain':>8} {'peak MiB':>9}")
    for r in rows:
        print(
            f"{r['variant']:<18} {r['trainable_parameters']:>11,} {r['samples_per_s']:>24.1f} "
            f"{r['x_plain']:>8.2f} {r['peak_memory_mib']:>9.0f}"
        )
    out = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "unit": unit,
        "rows": rows,
    }
    print("\n" + markdown_table([out]) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
