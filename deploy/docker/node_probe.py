#!/usr/bin/env python3
"""``fedguard-node-probe WORKDIR``: exit 0 while this container's node is joined and working.

A node serves no HTTP (it only dials out to the gateway), so the probe reads what the node
writes: ``supernode.session`` appears in the node's work directory when the SuperNode joined
the federation and names its PID (``client/supernode.py``). The node is healthy when that PID
is a live ``client.supernode`` process for this work directory and FedGuard's executor
(``client.executor``, the only process that runs training; its cwd is the work directory) is
alive too. A SuperNode that lost
the server keeps running and reconnecting, so a network outage does not fail this probe; a
crashed SuperNode or executor does (``fedguard client start`` itself keeps waiting for a signal,
so without the probe a dead node would look running).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROC = Path("/proc")


def _cmdline(pid: int | str) -> bytes:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def check(workdir: Path) -> str | None:
    """None when healthy, else the reason (printed for ``kubectl describe pod``)."""
    session = workdir / "supernode.session"
    try:
        pid = int(json.loads(session.read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{session} missing or unreadable: the node has not joined yet"
    cmd = _cmdline(pid)
    if b"client.supernode" not in cmd or str(workdir).encode() not in cmd:
        return f"SuperNode PID {pid} from {session} is not running"
    if not any(_is_executor(p.name, workdir) for p in PROC.iterdir() if p.name.isdigit()):
        return f"the FedGuard executor (client.executor) of {workdir} is not running"
    return None


def _is_executor(pid: str, workdir: Path) -> bool:
    """The executor runs in the node's work directory (``SuperNode._spawn`` sets its cwd)."""
    if b"client.executor" not in _cmdline(pid):
        return False
    try:
        return Path(PROC / pid / "cwd").resolve() == workdir
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: fedguard-node-probe WORKDIR", file=sys.stderr)
        return 2
    problem = check(Path(argv[0]).resolve())
    if problem:
        print(problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
