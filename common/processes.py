"""Child processes and Flower's command-line tools: shared by the server and node launchers.

Ports on 127.0.0.1, log tails for error messages, the environment every Flower process runs in
(offline, quiet, its own FLWR_HOME) and where Flower's console scripts are.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from common.errors import FedGuardError


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks; small race until the child binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


def bin_path(name: str) -> str:
    """A Flower console script from the environment FedGuard runs in (never a different install)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FedGuardError(
            f"{name!r} not found next to {sys.executable} or on PATH",
            fix="install flwr==1.42.* in FedGuard's environment (pip install -e .)",
        )
    return found


def flwr_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: offline, quiet, own FLWR_HOME, this venv first on PATH."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            "TERM": "dumb",
        }
    )
    env.update(extra or {})
    return env


def stop_child(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL after ``timeout``, and reap it (by PID only: we started it)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (from /proc; Flower detaches some into new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
