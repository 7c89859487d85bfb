"""Following a run: the deployed demo's live lines follow this demo's run, never an earlier demo's in the
same folder; waiting for a run reads the SuperLink's status (a ``flwr`` process) only when needed.

A demo folder's run store keeps earlier demos' runs; "the latest run" was the previous demo's until
this run's ServerApp wrote its first row, so the demo printed the old run's accuracies as live
progress and then skipped this run's rounds as already seen (0.740 printed, 0.716 in the summary).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedguard.demo_deploy import _follow
from server.runs import RunStatus, recorded_end, wait_for_run
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


def _counting_status(monkeypatch, answer) -> list[str]:
    """``run_status`` replaced by ``answer()``, each SuperLink read (a ``flwr ls`` process) counted."""
    reads: list[str] = []

    def status(*args, **kwargs) -> RunStatus:
        reads.append(answer())
        return RunStatus(run_id=222, status=reads[-1], details="", elapsed=1.0, raw={})

    monkeypatch.setattr("server.runs.run_status", status)
    return reads


@pytest.mark.parametrize("with_store", [True, False])
def test_waiting_asks_the_superlink_when_the_store_records_the_end(tmp_path: Path, monkeypatch, with_store) -> None:
    """Each status read is a flwr process (~1.3 CPU-s); following a run must not spend the server's CPU
    on them while the run store says the run is still working."""
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        run = _run(store, 222, [0.5])
    polls: list[int] = []

    def tick() -> None:  # the ServerApp records its end at the 5th poll; the SuperLink follows
        polls.append(1)
        if len(polls) == 5:
            with RunStore(path) as store:
                store.finish_run(run, "finished")

    def superlink() -> str:
        with RunStore(path) as store:
            return "finished:completed" if store.run(run)["status"] != "running" else "running"

    reads = _counting_status(monkeypatch, superlink)
    ended = recorded_end(path, 222) if with_store else None
    status = wait_for_run(222, "127.0.0.1:9", Path("ca"), tmp_path, poll=0.01, on_poll=tick, ended=ended)
    assert status.succeeded and len(polls) == 5
    # with the store: the first read, then the one after the end was recorded; without: one per poll
    assert reads == (["running", "finished:completed"] if with_store else ["running"] * 5 + ["finished:completed"])


def test_a_run_whose_serverapp_died_is_still_seen_to_end(tmp_path: Path, monkeypatch) -> None:
    """A ServerApp that dies never records its end: the SuperLink is asked every check_every seconds anyway."""
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        _run(store, 222, [0.5])  # stays "running" in the store
    t0 = time.monotonic()
    reads = _counting_status(monkeypatch, lambda: "finished:failed" if time.monotonic() - t0 > 0.3 else "running")
    status = wait_for_run(
        222, "127.0.0.1:9", Path("ca"), tmp_path, poll=0.01, ended=recorded_end(path, 222), check_every=0.1, timeout=30
    )
    assert status.status == "finished:failed"
    assert 2 <= len(reads) <= 8  # about every 0.1 s, not every 0.01 s poll


def test_recorded_end_reads_this_flower_runs_row(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    assert recorded_end(path, 222)() is False  # no store yet: the ServerApp has not started
    with RunStore(path) as store:
        _run(store, 111, [0.5])
        other = store.runs()[0]["run_id"]
        store.finish_run(other, "finished")  # an earlier run's end is not this run's
        this = _run(store, 222, [0.5])
    assert recorded_end(path, 222)() is False
    with RunStore(path) as store:
        store.finish_run(this, "failed", "boom")
    assert recorded_end(path, 222)() is True
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert recorded_end(garbage, 222)() is True  # cannot tell: ask the SuperLink
