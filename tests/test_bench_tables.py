"""The benchmark tables in bench/README.md and README.md are the ones the benchmarks print from their
committed results (bench/results/*.json): a number edited by hand, or a rerun whose table was not
pasted back, fails here."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import dp_overhead, fairness_mitigation, pretrained, secure_aggregation, utility
from bench import text_utility as tu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH_README = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _gpu_pretrained() -> list[dict[str, Any]]:
    return [_load(f"pretrained_gpu_b{b}.json") for b in (64, 256)]


TABLES = {
    "dp_overhead on the CPU": lambda: dp_overhead.markdown_table(_load("dp_overhead.json")["rows"]),
    "dp_overhead on the GPU": lambda: dp_overhead.markdown_table(_load("dp_overhead_gpu.json")["rows"]),
    "pretrained on the GPU": lambda: pretrained.markdown_table(_gpu_pretrained()),
    "text utility": lambda: tu.markdown_table(_load("text_utility.json")),
    "text utility per seed": lambda: tu.per_seed_table(_load("text_utility.json")),
    "text probes": lambda: tu.probe_table({**(r := _load("text_utility.json")), "summary": tu.summarize(r)}),
    "utility": lambda: utility.markdown_table(_load("utility.json")["summary"], [8, 3, 1]),
    "utility per seed": lambda: utility.per_seed_table(_load("utility.json")),
    "utility targets": lambda: utility.targets_table(_load("utility.json")["summary"]),
}

#: The tables README.md quotes, as their benchmarks print them.
README_TABLES = {
    "utility": lambda: utility.readme_table(_load("utility.json")["summary"]),
    "text utility": lambda: tu.readme_table(_load("text_utility.json")),
    "fairness mitigation": lambda: fairness_mitigation.readme_table(_load("fairness_mitigation.json")["summary"]),
    "secure aggregation": lambda: secure_aggregation.readme_table(_load("secure_aggregation.json")["rows"]),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_bench_readme_shows_the_table_its_benchmark_prints(name: str) -> None:
    table = TABLES[name]()
    assert table in BENCH_README, f"bench/README.md lacks the {name} table its results print:\n{table}"


@pytest.mark.parametrize("name", list(README_TABLES))
def test_readme_shows_the_table_its_benchmark_prints(name: str) -> None:
    table = README_TABLES[name]()
    assert table in README, f"README.md lacks the {name} table its results print:\n{table}"


def test_a_changed_run_no_longer_matches_the_readme_tables() -> None:
    """The README checks bite: one federation's accuracy changed by 0.01 moves its cell's mean."""
    results = _load("text_utility.json")
    key = next(k for k in sorted(results["runs"]) if k.endswith("/eps8/seed1/minilm-lora") and "/n3/iid/" in k)
    results["runs"][key]["accuracy"] += 0.01
    results["summary"] = tu.summarize(results)
    assert tu.readme_table(_load("text_utility.json")) in README
    assert tu.readme_table(results) not in README
    results = _load("utility.json")
    results["runs"]["spam/dir0.5/eps8/seed1/fedguard"]["accuracy"] += 0.01
    summary = utility.summarize(results)
    assert utility.readme_table(summary) not in README
    assert utility.targets_table(summary) not in BENCH_README


def test_a_changed_result_no_longer_matches_the_readme() -> None:
    """The check bites: one measured ratio changed by 0.01 gives a table bench/README.md does not hold."""
    runs = copy.deepcopy(_gpu_pretrained())
    runs[1]["rows"][1]["x_plain"] += 0.01
    assert pretrained.markdown_table(_gpu_pretrained()) in BENCH_README
    assert pretrained.markdown_table(runs) not in BENCH_README


def test_readme_gpu_summary_quotes_the_gpu_results() -> None:
    """README's short GPU table: the default engine's rows of bench/pretrained.py, both batches."""
    by_batch = {r["batch_size"]: {row["variant"]: row for row in r["rows"]} for r in _gpu_pretrained()}
    for variant in ("lora DP hooks", "full DP ghost"):
        for batch in (64, 256):
            r = by_batch[batch][variant]
            cell = f"{r['samples_per_s']:,.0f}/s, {r['x_plain']:.2f}×, {r['peak_memory_mib']:,.0f} MiB"
            assert cell in README, f"README.md's GPU table lacks {variant} at batch {batch}: {cell}"
