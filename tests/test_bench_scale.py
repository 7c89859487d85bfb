"""bench/scale.py splits a round into the clients' own work and the fixed rest from the nodes' resource logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import round_breakdown


def _log(workdir: Path, node: str, calls: list[tuple[int | None, str, float]]) -> None:
    folder = workdir / "partitions" / node
    folder.mkdir(parents=True)
    lines = [json.dumps({"round": r, "purpose": p, "usage": {"wall_seconds": s}}) for r, p, s in calls]
    (folder / "resources.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_fixed_cost_is_the_cycle_minus_the_critical_path_of_the_calls(tmp_path: Path) -> None:
    # round 1: four train calls of 0.3 s on 2 actors (0.6 s) + a 0.1 s evaluation; round 2: one long call
    _log(tmp_path, "node-0", [(None, "query.role", 0.01), (1, "train", 0.3), (2, "train", 0.9)])
    _log(tmp_path, "node-1", [(1, "train", 0.3), (2, "train", 0.1)])
    _log(tmp_path, "node-2", [(1, "train", 0.3), (1, "train", 0.3)])
    _log(tmp_path, "node-3", [(0, "evaluate", 0.5), (1, "evaluate", 0.1), (2, "evaluate", 0.2)])
    parts = round_breakdown(tmp_path, [100.0, 101.0, 102.5, 104.0], actors=2)
    assert [p["round"] for p in parts] == [1, 2, 3]
    assert parts[0]["cycle_s"] == pytest.approx(1.0)
    assert parts[0]["client_s"] == pytest.approx(0.7)  # Σ 1.2 s ÷ 2 actors + 0.1 s evaluation
    assert parts[0]["fixed_s"] == pytest.approx(0.3)
    assert parts[1]["client_s"] == pytest.approx(1.1)  # the 0.9 s call outlasts Σ 1.0 ÷ 2 = 0.5 s
    assert parts[1]["fixed_s"] == pytest.approx(0.4)
    assert parts[2]["client_s"] == 0.0  # no call logged: the whole cycle is fixed cost
    assert parts[2]["fixed_s"] == pytest.approx(1.5)
