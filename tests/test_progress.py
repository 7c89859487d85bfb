"""Progress on long work (common.progress): readable on a terminal, plain and periodic elsewhere, no escape codes
in logs; on the node, local steps done / total in the node's log; the executor names each task it works on."""

from __future__ import annotations

import io
import logging
import math
import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest
import torch

from client import training
from client.executor import TaskRecord, _announce, task_label
from client.node import node_logger
from client.supernode import SuperNode
from common import progress
from common.data import encode
from common.models import build_model
from common.privacy import plan_dp
from common.progress import PlainFormatter, Progress, RunProgress, strip_ansi
from tests.helpers import ROOT, make_tabular, tabular_config, wait_until

ESC = re.compile("\x1b")


class Terminal:
    """A pseudo-terminal: ``stream`` is a real TTY to write to; ``text()`` is everything written so far."""

    def __init__(self) -> None:
        self._master, slave = pty.openpty()
        self.stream: TextIO = os.fdopen(slave, "w", buffering=1)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # the slave side was closed
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self._chunks).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.stream.close()
        self._reader.join(timeout=5)
        os.close(self._master)


@contextmanager
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        term.close()


def test_strip_ansi_removes_colour_cursor_and_title_codes() -> None:
    coloured = "\x1b[36m(ClientAppActor pid=42)\x1b[0m \x1b[92mINFO\x1b[0m: done\x1b[2K\r\x1b]0;title\x07"
    assert strip_ansi(coloured) == "(ClientAppActor pid=42) INFO: done\r"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "\x1b[31mred %s\x1b[0m", ("\x1b[1mbold\x1b[0m",), None)
    assert PlainFormatter("%(levelname)s %(message)s").format(record) == "INFO red bold"


def test_run_progress_in_plain_mode_says_every_round_with_eta_and_replies_without_escape_codes() -> None:
    lines: list[str] = []
    with RunProgress(4, lines.append, stream=io.StringIO(), every_s=0.0, heartbeat_s=None) as run:
        for rnd in range(1, 5):
            run.round_started(rnd, expected=3)
            run.replied(rnd, "node-0")
            run.replied(rnd, "node-2")
            run.replied(rnd + 1, "node-9")  # a late reply to another round is not counted
            run.round_done(rnd)
    for rnd in range(1, 5):
        assert any(line.startswith(f"round {rnd}/4 done, ") for line in lines), lines
        assert f"round {rnd}: 2/3 nodes replied (node-0, node-2)" in lines
    done = [line for line in lines if " done, " in line]
    assert all(re.fullmatch(r"round [123]/4 done, \d+s elapsed, ~\d+s left", line) for line in done[:3]), done
    assert re.fullmatch(r"round 4/4 done, \d+s elapsed", done[3])  # nothing left to estimate
    assert not any(ESC.search(line) for line in lines)


def test_run_progress_throttles_replies_but_always_says_when_all_are_in() -> None:
    lines: list[str] = []
    with RunProgress(1, lines.append, every_s=3600.0, heartbeat_s=None) as run:
        run.round_started(1, expected=12)
        for i in range(12):
            run.replied(1, f"node-{i}")
    assert lines == [
        "round 1: 12/12 nodes replied (node-0, node-1, node-2, node-3, node-4, node-5, node-6, node-7, node-8, "
        "node-9 and 2 more)"
    ]


def test_run_progress_on_a_terminal_draws_a_bar_of_rounds_and_keeps_the_round_lines() -> None:
    lines: list[str] = []
    with terminal() as term:
        with RunProgress(3, lines.append, stream=term.stream, every_s=0.0) as run:
            for rnd in range(1, 4):
                run.round_started(rnd, expected=2)
                run.replied(rnd, "node-0")
                run.round_done(rnd)
        wait_until(lambda: "3/3" in term.text(), "the finished bar of rounds", timeout=10)
        assert "━" in term.text() and "rounds" in term.text()
    assert [line.split(",")[0] for line in lines] == ["round 1/3 done", "round 2/3 done", "round 3/3 done"]
    assert not any(ESC.search(line) for line in lines)  # the replies went to the bar, not to the lines


def test_a_long_round_with_no_replies_is_never_silent() -> None:
    lines: list[str] = []
    with RunProgress(3, lines.append, heartbeat_s=0.2) as run:
        run.round_started(1, expected=2)
        wait_until(lambda: any("still waiting" in line for line in lines), "a heartbeat line", timeout=10)
    assert lines[0].startswith("round 1: 0/2 nodes replied, still waiting after ")


def test_plain_progress_writes_periodic_lines_and_the_final_one(tmp_path: Path) -> None:
    out = io.StringIO()
    with Progress(50, "round 2", stream=out, every_s=0.0) as p:
        for _ in range(50):
            p.advance()
    lines = out.getvalue().splitlines()
    assert [re.match(r"round 2: steps (\d+)/50", line)[1] for line in lines] == [  # type: ignore[index]
        str(k) for k in range(5, 50, 5)
    ] + ["50"]
    assert lines[-1].startswith("round 2: steps 50/50 (100%) in ")
    assert not ESC.search(out.getvalue())
    quiet = io.StringIO()  # whichever is rarer: 10% of the work, but not within 5 s of the last line
    with Progress(50, "round 3", stream=quiet) as p:
        for _ in range(50):
            p.advance()
    assert len(quiet.getvalue().splitlines()) == 1


def test_json_mode_on_a_terminal_writes_plain_lines() -> None:
    with terminal() as term:
        with Progress(10, "local training", stream=term.stream, plain=True, every_s=0.0) as p:
            for _ in range(10):
                p.advance()
        wait_until(lambda: "10/10" in term.text(), "the final line on the terminal", timeout=10)
        assert "local training: steps 5/10 (50%)" in term.text()
        assert not ESC.search(term.text())


def test_the_terminal_gets_a_bar_while_the_log_file_stays_plain(tmp_path: Path) -> None:
    log = node_logger(tmp_path / "node")
    with terminal() as term:
        with Progress(20, "round 1", log=log, stream=term.stream, every_s=0.0) as p:
            for _ in range(20):
                p.advance()
        log.info("\x1b[32mcoloured by a library\x1b[0m")
        wait_until(lambda: "20/20" in term.text(), "the finished bar", timeout=10)
        shown = term.text()
    assert "━" in shown and ESC.search(shown)  # rich's bar, drawn with cursor and colour codes
    written = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "round 1: steps 20/20 (100%)" in written and "coloured by a library" in written
    assert not ESC.search(written)


def test_a_bar_on_another_terminal_leaves_the_processs_own_output_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """The executor's stdout is its log file: a bar on the owner's terminal must not swallow what it prints."""
    with terminal() as term:
        with Progress(4, "round 1", stream=term.stream) as p:
            p.advance()
            print("DP plan: written to the executor's log")
            p.advance(3)
        wait_until(lambda: "4/4" in term.text(), "the finished bar", timeout=10)
        assert "DP plan" not in term.text()
    assert "DP plan: written to the executor's log" in capsys.readouterr().out


# --------------------------------------------------------------------------- the node


def _small_round(tmp_path: Path, **train: object) -> tuple[logging.Logger, int, training.LocalResult]:
    cfg = tabular_config(train={**tabular_config().train.model_dump(), **train})
    data = encode(make_tabular(400), cfg.data.schema_)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    plan = plan_dp(len(data), cfg.dp, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs, rounds=2)
    log = node_logger(tmp_path / "node")
    result = training.train_local(model, data, cfg, plan, torch.device("cpu"), log=log, label="round 1")
    return log, plan.steps_per_round, result


def test_train_local_reports_steps_done_of_the_planned_total_in_the_node_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)  # a line every 10% of the round
    _, total, result = _small_round(tmp_path, local_epochs=2)
    written = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    steps = [(int(k), int(n)) for k, n in re.findall(r"round 1: steps (\d+)/(\d+)", written)]
    assert result.steps == total > 10
    assert {n for _, n in steps} == {total}
    done = [0] + [k for k, _ in steps]
    assert all(0 < b - a <= math.ceil(total / 10) for a, b in zip(done, done[1:], strict=False)), steps  # every 10%
    assert steps[-1] == (total, total)
    assert not ESC.search(written)


def test_train_local_draws_a_bar_on_the_nodes_terminal(tmp_path: Path) -> None:
    """``fedguard client start`` in the foreground: the executor's terminal shows the bar; node.log stays plain."""
    with terminal() as term:
        progress.attach_terminal(term.stream)
        try:
            _, total, _ = _small_round(tmp_path)
        finally:
            progress.attach_terminal(None)
        wait_until(lambda: f"{total}/{total}" in term.text(), "the finished bar", timeout=10)
        assert "━" in term.text()
    written = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert re.search(rf"round 1: steps {total}/{total} \(100%\) in \d+s", written)
    assert not ESC.search(written)


def test_the_executor_names_the_task_and_says_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    assert task_label(5, 7, "train", "3", "1a2b3c4d5e6f") == "run 7 round 3: train message 1a2b3c4d"
    assert task_label(5, 7, "", "", "") == "run 7: task task 5"
    record = TaskRecord(5, 7, "train", "3", "completed", None, 0.0, 0.1, 41.9, 0.2, 42.2, "1a2b3c4d5e6f")
    with terminal() as term:
        progress.attach_terminal(term.stream)
        try:
            with caplog.at_level(logging.INFO, logger="fedguard.executor"):
                _announce(f"{record.what} started")
        finally:
            progress.attach_terminal(None)
        wait_until(lambda: "started" in term.text(), "the task line on the terminal", timeout=10)
        assert "run 7 round 3: train message 1a2b3c4d started" in term.text()
    assert "run 7 round 3: train message 1a2b3c4d started" in caplog.text


def test_only_a_real_terminal_is_handed_to_the_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, ca = tmp_path / "node.key", tmp_path / "ca.pem"

    def command(stream: TextIO | None) -> list[str]:
        node = SuperNode(
            tmp_path, superlink="127.0.0.1:1", root_certificates=ca, private_key=key, node_config={},
            progress_terminal=stream,
        )  # fmt: skip
        return node.executor_command()

    monkeypatch.setenv("TERM", "xterm-256color")
    assert "--progress-fd" not in command(None) and "--progress-fd" not in command(io.StringIO())
    with terminal() as term:
        cmd = command(term.stream)
        assert cmd[cmd.index("--progress-fd") + 1] == str(term.stream.fileno())
        monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot redraw a bar in place
        assert "--progress-fd" not in command(term.stream)


def test_output_redirected_to_a_log_file_carries_no_colour_codes(tmp_path: Path) -> None:
    """Flower's coloured console handler and a relayed worker's coloured line, with stdout and stderr in a file."""
    script = (
        "import logging, sys\n"
        "from flwr.common.logger import log\n"
        "from common.progress import no_colour_codes\n"
        "no_colour_codes()\n"
        "log(logging.WARNING, 'flower says hello')\n"
        "print('\\x1b[36m(ClientAppActor pid=42)\\x1b[0m trained', flush=True)\n"
        "print('\\x1b[31mred on stderr\\x1b[0m', file=sys.stderr, flush=True)\n"
        "import os; print('RAY_COLOR_PREFIX=' + os.environ['RAY_COLOR_PREFIX'], flush=True)\n"
    )
    out = tmp_path / "run.log"
    with out.open("w") as f:
        subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=120
        )
    written = out.read_text(encoding="utf-8")
    for text in ("flower says hello", "(ClientAppActor pid=42) trained", "red on stderr", "RAY_COLOR_PREFIX=0"):
        assert text in written, written
    assert not ESC.search(written), repr(written)


def test_a_progress_line_reaches_a_log_file_while_the_run_goes_on(tmp_path: Path) -> None:
    """``tail -f`` of a run's log: each line is in the file as soon as it is printed, not in bursts at exit."""
    out, marker = tmp_path / "run.log", tmp_path / "printed"
    script = (
        "import pathlib, sys, time\n"
        "from common.progress import no_colour_codes\n"
        "no_colour_codes()\n"
        "print('round 1/3: training on 3 node(s)')\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    with out.open("w") as f:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # Python's default: buffered
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert marker.exists(), out.read_text(encoding="utf-8")
            assert proc.poll() is None  # still running: nothing was flushed by an exit
            assert "round 1/3: training on 3 node(s)" in out.read_text(encoding="utf-8")
        finally:
            proc.kill()
            proc.wait(timeout=30)
