"""Progress on long work: a bar on a terminal, plain periodic lines everywhere else, never colour in logs.

One facility for the whole product. ``Progress`` follows work of known size (a node's local
steps); ``RunProgress`` follows a run's rounds for the operator ("round 3/10 done, 1m12s elapsed,
~2m40s left") and, inside a round, which nodes have replied. On a terminal they draw a ``rich``
bar (``rich`` comes with Flower); when output is not a terminal, or in ``--json`` mode
(``plain=True``), they write plain lines, at most one every ``every_s`` seconds and every
``every_fraction`` of the work (whichever is rarer), plus the final one. Plain lines carry no
escape codes, and ``PlainFormatter`` strips the ones other libraries (Ray, Flower) put in log
records, so log files stay readable text.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

#: ANSI/VT100 escape sequences: CSI (colours, cursor moves), OSC (titles, links) and two-byte escapes.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")

Say = Callable[[str], None]


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colour codes, cursor moves)."""
    return ANSI_ESCAPE.sub("", text)


class PlainFormatter(logging.Formatter):
    """A log formatter whose output never holds escape codes: for every handler that writes a file."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


class PlainStream:
    """A text stream that writes through to ``stream`` with escape codes stripped (everything else delegates).

    For a process's stdout and stderr when they go to a file: Ray's driver prints every worker line
    to ``sys.stdout``/``sys.stderr``, escape codes included, whatever the worker's own settings.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(strip_ansi(text))
        return len(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def no_colour_codes() -> None:
    """Stop this process writing colour codes to its stdout, stderr and logs: for output that goes to a file.

    Ray wraps every worker line's prefix in colour codes unless ``RAY_COLOR_PREFIX=0``; Flower's
    console handler colours the level name whatever its stream is; anything else that reaches a
    non-terminal stdout or stderr (a worker's own coloured output, relayed by Ray) is stripped there,
    and each line is written through as it ends (progress lines reach a log file as they happen).
    """
    os.environ["RAY_COLOR_PREFIX"] = "0"
    if "flwr" in sys.modules:
        from common.flower_internals import plain_flower_console

        plain_flower_console()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if is_terminal(stream) or isinstance(stream, PlainStream):
            continue
        # a file is block-buffered: without this, `tail -f` of a run's log shows rounds in bursts
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(line_buffering=True)
        setattr(sys, name, PlainStream(stream))


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``1m12s``, ``2h03m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# --- the terminal a process draws bars on ------------------------------------------------------

_terminal: TextIO | None = None


def attach_terminal(stream: TextIO | None) -> None:
    """Make ``stream`` this process's terminal: ``Progress`` draws bars there unless given a stream.

    A node's executor writes its logs to a file; ``fedguard client start`` in the foreground hands it
    its terminal so the owner sees the bar. Only a real terminal is kept.
    """
    global _terminal
    _terminal = stream if is_terminal(stream) else None


def capable_terminal(stream: TextIO | None) -> bool:
    """A terminal that redraws a bar in place: a TTY whose ``TERM`` is not ``dumb``."""
    return is_terminal(stream) and os.environ.get("TERM", "") not in ("dumb", "unknown")


def terminal() -> TextIO | None:
    return _terminal


def say_on_terminal(line: str) -> None:
    """Print ``line`` on this process's terminal, if it has one; a terminal that went away is dropped."""
    global _terminal
    if _terminal is not None:
        try:
            print(line, file=_terminal, flush=True)
        except (OSError, ValueError):
            _terminal = None


class _Bar:
    """One ``rich`` bar on a terminal. A terminal that goes away (closed, hung up) only ends the bar:
    the work goes on and the plain lines keep going to the log."""

    def __init__(self, stream: TextIO, description: str, *, total: int | None, completed: int = 0, unit: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress
        from rich.table import Column

        own = stream is sys.stdout or stream is sys.stderr
        self._rich: RichProgress | None = RichProgress(
            TextColumn("{task.description}", table_column=Column(max_width=36, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("~"),
            TimeRemainingColumn(compact=True),
            TextColumn("left"),
            console=Console(file=stream, force_terminal=True),
            refresh_per_second=4,
            # On this process's own terminal, its other output is printed above the bar; on another
            # one (the executor's, handed over by the launcher) stdout and stderr stay the log's.
            redirect_stdout=own and is_terminal(sys.stdout),
            redirect_stderr=own and is_terminal(sys.stderr),
        )
        self._task = self._rich.add_task(description, total=total, completed=completed)
        self._guarded(self._rich.start)

    def update(self, *, completed: int | None = None, description: str | None = None) -> None:
        if self._rich is not None:
            rich, task = self._rich, self._task
            self._guarded(lambda: rich.update(task, completed=completed, description=description))

    def stop(self) -> None:
        if self._rich is not None:
            self._guarded(self._rich.stop)
            self._rich = None

    def _guarded(self, action: Callable[[], object]) -> None:
        try:
            action()
        except (OSError, ValueError):  # EIO on a hung-up terminal, or a closed file
            self._rich = None


class Progress:
    """Work of ``total`` units: a bar on a terminal, plain throttled lines to a log and a non-terminal stream.

    ``log`` always gets plain lines (``label: steps k/N (p%), 12s elapsed, ~30s left``); ``stream``
    (default: the process's attached terminal, if any) gets a bar when it is a terminal and
    ``plain`` is off, plain lines otherwise. ``advance`` costs a counter and a clock read: cheap
    enough to call every step.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        log: logging.Logger | None = None,
        stream: TextIO | None = None,
        plain: bool = False,
        unit: str = "steps",
        every_s: float = 5.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.label, self.unit, self.log = max(0, total), label, unit, log
        self.every_s, self.every_fraction, self._clock = every_s, every_fraction, clock
        self.done, self.note = 0, ""
        self._started = self._last_at = clock()
        self._last_done = 0
        self._closed = False
        stream = stream if stream is not None else _terminal
        self._bar: _Bar | None = None
        self._stream: TextIO | None = None
        if stream is not None and is_terminal(stream) and not plain:
            self._bar = _Bar(stream, label, total=self.total or None, unit=unit)
        else:
            self._stream = stream

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if note:
            self.note = note
        if self._bar is not None:
            self._bar.update(completed=done, description=self._description())
        if done >= self.total:
            return  # close() writes the final line
        now = self._clock()
        # Whichever is rarer: enough time *and* enough work since the last line.
        if now - self._last_at >= self.every_s and done - self._last_done >= self.every_fraction * self.total:
            self._emit(self.line(now))
            self._last_at, self._last_done = now, done

    def close(self, *, failed: bool = False) -> None:
        """The final line, always written: ``k/N`` where the work stopped, and how long it took."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.update(completed=self.done, description=self._description())
            self._bar.stop()
        self._emit(self.line(self._clock(), final=True, failed=failed))

    def line(self, now: float, *, final: bool = False, failed: bool = False) -> str:
        elapsed = now - self._started
        text = f"{self.label}: {self.unit} {self.done}/{self.total}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        if final:
            text += f" in {duration(elapsed)}" + (", stopped" if failed else "")
        else:
            text += f", {duration(elapsed)} elapsed"
            if 0 < self.done < self.total:
                text += f", ~{duration(elapsed / self.done * (self.total - self.done))} left"
        return text + (f" ({self.note})" if self.note else "")

    def _description(self) -> str:
        return f"{self.label} ({self.note})" if self.note else self.label

    def _emit(self, line: str) -> None:
        if self.log is not None:
            self.log.info("%s", line)
        if self._stream is not None:
            print(line, file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)


#: Above this many nodes a replies line names only the first ones.
_NAME_NODES = 10


class RunProgress:
    """A run's rounds as the operator reads them: rounds done of ``rounds`` with elapsed time and an
    estimate of what remains (the mean round time so far), and inside a round which nodes replied.

    Lines go to ``say`` (the server's progress printer). With a terminal ``stream`` (and not
    ``plain``) a bar of rounds is drawn there too, its label showing the replies, and the replies
    lines are left to the bar. Otherwise a round with no news for ``heartbeat_s`` seconds gets a
    "still waiting" line, so a long round is never silent.
    """

    def __init__(
        self,
        rounds: int,
        say: Say = print,
        *,
        first_round: int = 1,
        stream: TextIO | None = None,
        plain: bool = False,
        every_s: float = 5.0,
        heartbeat_s: float | None = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rounds, self.say, self._clock = rounds, say, clock
        self.every_s, self.heartbeat_s = every_s, heartbeat_s
        self._started = clock()
        self._done_before = first_round - 1  # rounds a resumed run already has
        self._durations: list[float] = []
        self._lock = threading.Lock()
        self._round: int | None = None
        self._round_started = self._last_line = 0.0
        self._expected = 0
        self._replied: list[str] = []
        self._stop = threading.Event()
        self._bar: _Bar | None = None
        if stream is not None and is_terminal(stream) and not plain:
            self._bar = _Bar(stream, "rounds", total=rounds, completed=self._done_before, unit="rounds")
        elif heartbeat_s:
            threading.Thread(target=self._heartbeat, name="fedguard-run-progress", daemon=True).start()

    def round_started(self, rnd: int, expected: int) -> None:
        """Round ``rnd`` sent work to ``expected`` nodes (a retry of the same round starts it again)."""
        with self._lock:
            self._round, self._expected, self._replied = rnd, expected, []
            self._round_started = self._last_line = self._clock()
            line = self.replies_line()
        self._describe(line)

    def replied(self, rnd: int, node: str) -> None:
        """A node's reply to round ``rnd`` arrived; a line at most every ``every_s`` s, and when all are in."""
        with self._lock:
            if rnd != self._round:
                return
            self._replied.append(node)
            line, now = self.replies_line(), self._clock()
            due = self._bar is None and (len(self._replied) >= self._expected or now - self._last_line >= self.every_s)
            if due:
                self._last_line = now
        if self._bar is not None:
            self._describe(line)
        elif due:
            self.say(line)

    def replies_line(self) -> str:
        names = self._replied[:_NAME_NODES]
        more = len(self._replied) - len(names)
        listed = ", ".join(names) + (f" and {more} more" if more else "")
        return f"round {self._round}: {len(self._replied)}/{self._expected} nodes replied" + (
            f" ({listed})" if listed else ""
        )

    def round_done(self, rnd: int) -> str:
        """Round ``rnd`` is finished: says and returns "round 3/10 done, 1m12s elapsed, ~2m40s left"."""
        now = self._clock()
        with self._lock:
            if self._round == rnd:
                self._durations.append(now - self._round_started)
            self._round = None
        line = f"round {rnd}/{self.rounds} done, {duration(now - self._started)} elapsed"
        left = self.rounds - rnd
        if left > 0 and self._durations:
            line += f", ~{duration(sum(self._durations) / len(self._durations) * left)} left"
        if self._bar is not None:
            self._bar.update(completed=rnd, description=f"round {rnd}/{self.rounds} done")
        self.say(line)
        return line

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.stop()

    def _describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(description=text)

    def _heartbeat(self) -> None:
        assert self.heartbeat_s is not None
        while not self._stop.wait(min(self.heartbeat_s, 1.0)):
            with self._lock:
                now = self._clock()
                if self._round is None or now - self._last_line < self.heartbeat_s:
                    continue
                self._last_line = now
                line = f"{self.replies_line()}, still waiting after {duration(now - self._round_started)}"
            self.say(line)

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
