"""End-to-end round time, homomorphic vs plaintext, on the demo model and data (target ≤ 1.2×).

Why: the per-operation costs in ``bench/he_aggregation.py`` say little about what a user waits
for; this runs the real deployment demo (SuperLink, SuperNodes, FedGuard executors, TLS, signed
runs) twice in one go, once plaintext and once homomorphic, alternating so machine load hits
both alike, and compares round times from the run store: from one round's start to the next's, so
both modes include the same work (training, aggregation, the evaluator's scoring; in homomorphic
mode also encryption, the server's sum, the evaluator's verification, decryption and re-encryption).

    python bench/he_round.py [--rounds 3] [--clients 3] [--repeats 1] [--out bench/results/he_round.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedguard.demo import demo_config, write_demo_data  # noqa: E402
from fedguard.demo_deploy import deployed_demo  # noqa: E402
from server.store import RunStore  # noqa: E402


def _round_seconds(store_path: Path, run_id: int) -> list[float]:
    """Start-to-start times of consecutive rounds (a round's training, aggregation and scoring)."""
    with RunStore(store_path) as store:
        starts = [float(r["started_at"]) for r in store.rounds(run_id)]
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "he_round.json"))
    args = ap.parse_args()
    results: dict[str, list[float]] = {"plaintext": [], "homomorphic": []}
    bytes_per_client: list[int] = []
    with tempfile.TemporaryDirectory(prefix="fedguard-he-round-") as tmp:
        data = write_demo_data(Path(tmp))
        cfg = demo_config(data, rounds=args.rounds, clients=args.clients, epsilon=8.0)
        for rep in range(args.repeats):
            for mode in ("plaintext", "homomorphic") if rep % 2 == 0 else ("homomorphic", "plaintext"):
                work = Path(tmp) / f"{mode}-{rep}"
                t0 = time.perf_counter()
                store, run_id = deployed_demo(cfg, work, progress=lambda _: None, homomorphic=mode == "homomorphic")
                secs = _round_seconds(store, run_id)
                results[mode] += secs
                print(
                    f"{mode:12s} repeat {rep}: rounds {', '.join(f'{s:.1f}s' for s in secs)} "
                    f"(whole demo {time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
                if mode == "homomorphic":
                    with RunStore(store) as st:
                        for r in st.rounds(run_id):
                            bytes_per_client += r["meta"].get("homomorphic", {}).get("bytes_per_client", [])
    plain, enc = statistics.median(results["plaintext"]), statistics.median(results["homomorphic"])
    print()
    print("| mode | median round (s) | rounds measured |")
    print("|---|---|---|")
    print(f"| plaintext | {plain:.1f} | {len(results['plaintext'])} |")
    print(f"| homomorphic | {enc:.1f} | {len(results['homomorphic'])} |")
    print(
        f"\nhomomorphic / plaintext round time: {enc / plain:.2f}× (target ≤ 1.2×); "
        f"ciphertext per client and round: {statistics.median(bytes_per_client) / 1e3:.0f} KB"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rounds": args.rounds,
                "clients": args.clients,
                "repeats": args.repeats,
                "round_seconds": results,
                "median": {"plaintext": plain, "homomorphic": enc},
                "ratio": enc / plain,
                "bytes_per_client": bytes_per_client,
                "machine": platform.platform(),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
