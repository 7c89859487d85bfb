"""What homomorphic aggregation costs per scheme: upload size, client, server and evaluator time, error.

Why: ``common/he.py`` picks its CKKS scheme (``fedguard-add``: N=8192, moduli [60, 60], scale 2^40,
symmetric encryption) from these numbers, against TenSEAL's defaults and a 58-bit data prime
(smaller uploads, slower server); the targets are ≤ 8× upload expansion over float32,
≤ 1.0 s client time and ≤ 0.1 s server time per client per 1M parameters.

Method: K clients each hold a float32 update uniform in ±B (B = 1) and a public weight in [0.2, 1];
each encrypts ``w·Δ`` plus ``w`` (``he.encrypt_update``). The server checks and adds every update
against the public context (``he.CiphertextSum``: deserialize, structural check, add); the evaluator
recomputes that sum from the individual ciphertexts and compares bytes (``he.verify_sum``), then
decrypts the weighted mean (``he.decrypt_sum``, rounded to 7 decimals). ``× numpy`` divides the
server's deserialize+check+add time by a plaintext float64 weighted sum of the same updates,
measured in the same run. Errors are max |HE − numpy| of the weighted mean, as released (rounded)
and before rounding.

Timing: process CPU seconds (TenSEAL runs single-threaded here, so CPU = wall on an idle machine,
while other processes' load stretches wall time: the machine is shared), normalized per 1M
parameters (and per client for the server); the client time is the median over clients. The JSON
also holds wall times. Process-pool variants time only the client, in wall seconds (the work is in
child processes): ``cold`` starts a pool per update (a fresh ClientApp process per message pays
this), ``warm`` reuses one (a long-lived node executor).

    python bench/he_aggregation.py [--quick] [--sizes 100000 1000000] [--clients 10]
                                   [--variants fedguard-add tenseal-default ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tenseal as ts  # type: ignore[import-untyped]  # noqa: E402

from common import he  # noqa: E402

BOUND = 1.0
T = TypeVar("T")
TARGETS = {"expansion": 8.0, "client_s_per_1m": 1.0, "server_s_per_client_per_1m": 0.1}
#: The measured alternative to fedguard-add: a 58-bit data prime (zstd then compresses ciphertexts).
COMPACT = he.HEScheme("add-58bit", 8192, (58, 60), 40, True, "add-only, 58-bit data prime (comparison)")
#: variant → (scheme, workers, pool reuse)
VARIANTS: dict[str, tuple[str | he.HEScheme, int, bool]] = {
    "tenseal-default": ("tenseal-default", 1, False),
    "add-58bit": (COMPACT, 1, False),
    "fedguard-add": ("fedguard-add", 1, False),
    "fedguard-add/2proc-cold": ("fedguard-add", 2, False),
    "fedguard-add/2proc-warm": ("fedguard-add", 2, True),
}


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def make_updates(n: int, k: int, seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    ups = [rng.uniform(-BOUND, BOUND, n).astype(np.float32) for _ in range(k)]
    ws = [float(w) for w in rng.uniform(0.2, 1.0, k)]
    return ups, ws


def bench_variant(variant: str, n: int, ups: list[np.ndarray], ws: list[float]) -> dict[str, Any]:
    scheme, workers, warm = VARIANTS[variant]
    k = len(ups)
    per_m = n / 1e6
    ctx = he.create_context(scheme, max_clients=k, bound=BOUND)
    pub_bytes = he.public_context_bytes(ctx)
    pub = he.load_public_context(pub_bytes)
    name = scheme if isinstance(scheme, str) else scheme.name
    row: dict[str, Any] = {"variant": variant, "scheme": name, "params": n, "clients": k, "workers": workers}

    # ---- clients
    pool = he.EncryptPool(ctx, workers) if warm else None
    try:
        if pool is not None:  # start the workers outside the timing (a long-lived node has them)
            he.encrypt_update(ctx, ups[0][: 4096 * 2 * workers], ws[0], bound=BOUND, pool=pool)
        n_timed = k if workers == 1 else min(k, 3)  # pool variants time the client only
        enc_wall: list[float] = []
        enc_cpu: list[float] = []
        blobs: list[list[bytes]] = []
        for u, w in zip(ups[:n_timed], ws[:n_timed], strict=True):

            def encrypt(u: np.ndarray = u, w: float = w) -> list[bytes]:
                return he.encrypt_update(ctx, u, w, bound=BOUND, workers=workers, pool=pool)

            b, wall, cpu = timed(encrypt)
            enc_wall.append(wall)
            enc_cpu.append(cpu)
            blobs.append(b)
    finally:
        if pool is not None:
            pool.close()
    up_bytes = sum(len(x) for x in blobs[0])
    row.update(
        ciphertexts=len(blobs[0]),
        upload_mb=round(up_bytes / 1e6, 2),
        expansion=round(up_bytes / (4 * n), 3),
        timing="cpu" if workers == 1 else "wall",
        client_s_per_1m=round(statistics.median(enc_cpu if workers == 1 else enc_wall) / per_m, 3),
        client_wall_s_per_1m=round(statistics.median(enc_wall) / per_m, 3),
        client_runs_wall_s=[round(x, 3) for x in enc_wall],
        public_context_kb=round(len(pub_bytes) / 1e3, 1),
        secret_context_kb=round(len(he.secret_context_bytes(ctx)) / 1e3, 1),
    )
    if workers != 1:
        return row

    # ---- plaintext reference, same run
    def plain() -> np.ndarray:
        acc = np.zeros(n)
        for u, w in zip(ups, ws, strict=True):
            acc += np.float64(w) * u  # float64: a Python float times float32 would stay float32
        return acc

    acc, _, numpy_s = timed(plain)
    ref = acc / sum(ws)

    # ---- server: deserialize + structural check + add, then serialize the sum once
    total = he.CiphertextSum(pub, n, max_clients=k)

    def add_all() -> None:
        for i, b in enumerate(blobs):
            total.add(b, where=f"client {i}")

    _, server_wall, server_s = timed(add_all)
    server_sum, _, result_s = timed(total.result)

    # ---- evaluator: recompute and compare, decrypt
    mine, verify_wall, verify_s = timed(lambda: he.verify_sum(ctx, blobs, server_sum, n_params=n))
    (mean, sum_w), _, decrypt_s = timed(lambda: he.decrypt_sum(ctx, mine, n, max_weight=k))
    he.check_aggregate_norm(mean, BOUND)
    exact, _ = he.decrypt_sum(ctx, mine, n, round_digits=15)
    row.update(
        server_s_per_client_per_1m=round(server_s / k / per_m, 4),
        server_wall_s_per_client_per_1m=round(server_wall / k / per_m, 4),
        server_result_serialize_s_per_1m=round(result_s / per_m, 3),
        numpy_sum_s=round(numpy_s, 5),
        server_vs_numpy=round(server_s / numpy_s, 1),
        verify_s_per_client_per_1m=round(verify_s / k / per_m, 4),
        verify_s=round(verify_s, 3),
        verify_wall_s=round(verify_wall, 3),
        decrypt_s_per_1m=round(decrypt_s / per_m, 3),
        sum_w_error=abs(sum_w - sum(ws)),
        max_abs_err=float(np.abs(mean - ref).max()),
        max_abs_err_unrounded=float(np.abs(exact - ref).max()),
    )
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'variant':<24} {'params':>9} {'K':>3} {'expan':>6} {'client':>7} {'server':>7} {'x numpy':>8} "
        f"{'verify':>7} {'decrypt':>7} {'err':>8} {'err raw':>8}"
    )
    print(head)
    print(f"{'':<24} {'':>9} {'':>3} {'×f32':>6} {'s/1M':>7} {'s/c/1M':>7} {'':>8} {'s/c/1M':>7} {'s/1M':>7}")
    print("-" * len(head))
    for r in rows:

        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "-"

        print(
            f"{r['variant']:<24} {r['params']:>9,} {r['clients']:>3} {r['expansion']:>6.2f} "
            f"{r['client_s_per_1m']:>7.3f} {f('server_s_per_client_per_1m', '7.4f'):>7} "
            f"{f('server_vs_numpy', '8.0f'):>8} {f('verify_s_per_client_per_1m', '7.4f'):>7} "
            f"{f('decrypt_s_per_1m', '7.3f'):>7} {f('max_abs_err', '8.1e'):>8} {f('max_abs_err_unrounded', '8.1e'):>8}"
        )


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["variant"] != "fedguard-add":
            continue
        for key, limit in TARGETS.items():
            verdict = "PASS" if r[key] <= limit else "MISS"
            lines.append(f"{verdict} {r['variant']} {r['params']:,}: {key} {r[key]} (target <= {limit})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k parameters, 3 clients")
    ap.add_argument("--sizes", nargs="+", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "he_aggregation.json")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000])
    k = args.clients or (3 if args.quick else 10)

    rows: list[dict[str, Any]] = []
    for n in sizes:
        ups, ws = make_updates(n, k)
        for variant in args.variants:
            print(f"... {variant} {n:,} params x {k} clients", file=sys.stderr, flush=True)
            rows.append(bench_variant(variant, n, ups, ws))
    print_table(rows)
    verdicts = check_targets(rows)
    print("\n".join(verdicts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "tenseal": ts.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "bound": BOUND,
        "schemes": {s.name: vars(s) for s in (*he.SCHEMES.values(), COMPACT)},
        "capacity": {s.name: he.capacity(s) for s in (*he.SCHEMES.values(), COMPACT)},
        "targets": TARGETS,
        "timing": "process CPU seconds (row timing=cpu) or wall seconds for process pools (timing=wall); "
        "client = median over clients of encrypt+serialize; *_wall_* fields are wall-clock",
        "error": "max |HE weighted mean - float64 numpy|, released (rounded to 7 decimals) and unrounded",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts}, indent=2) + "\n", "utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
