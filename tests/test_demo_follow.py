"""The deployed demo's live lines follow this demo's run, never an earlier demo's in the same folder.

A demo folder's run store keeps earlier demos' runs; "the latest run" was the previous demo's until
this run's ServerApp wrote its first row, so the demo printed the old run's accuracies as live
progress and then skipped this run's rounds as already seen (0.740 printed, 0.716 in the summary).
"""

from __future__ import annotations

from pathlib import Path

from fedguard.demo_deploy import _follow
from server.store import RunStore
from server.validation import Outcome


def _run(store: RunStore, flower_id: int, accuracies: list[float]) -> int:
    run = store.create_run("fedguard-demo", "{}", "hash", flower_id)
    for rnd, acc in enumerate(accuracies):
        if rnd:
            store.record_round(run, rnd, 0.0, [Outcome(5, "accepted").row()], aggregated=True)
        store.record_evaluation(run, rnd, {"accuracy": acc, "loss": 0.5})
    return run


def test_live_lines_are_this_runs_not_the_previous_demos(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        _run(store, 111, [0.507, 0.719, 0.734, 0.740])  # the previous demo, finished
    lines: list[str] = []
    seen: set[tuple[str, int]] = set()
    assert _follow(path, 222, seen, lines.append) is None  # this run has not written a row yet
    assert lines == []
    with RunStore(path) as store:
        this = _run(store, 222, [0.507, 0.733, 0.724, 0.716])
    assert _follow(path, 222, seen, lines.append) == this
    assert "  round 3: held-out accuracy 0.716 (evaluator node)" in lines
    assert not any("0.740" in line or "0.719" in line for line in lines)
    assert sum("accepted" in line for line in lines) == 3
    assert _follow(path, 222, seen, lines.append) == this and len(lines) == 7  # nothing printed twice
