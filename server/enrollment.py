"""The enrolled set the ServerApp trusts: which node keys may take part, written by ``fedguard server start``.

The SuperLink accepts any key registered with it, and anyone who reaches its Control API can
register one. The kit is the only authority on who is enrolled, so ``server start`` writes the
kit's enrolled, unrevoked nodes to ``<server workdir>/enrolled.json`` (0600, atomic) and the
ServerApp, which finds that directory through ``FEDGUARD_SERVER_WORKDIR`` (inherited from the
SuperLink process), intersects every round's registered keys with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import FedGuardError
from common.files import atomic_write

#: Set on the SuperLink process by ``fedguard server start``; the ServerApp inherits it.
WORKDIR_ENV = "FEDGUARD_SERVER_WORKDIR"
ENROLLED_FILE = "enrolled.json"


class EnrollmentError(FedGuardError):
    """The enrolled set cannot be read, so no node can be trusted (deployment fails closed)."""

    code = "enrollment-error"


@dataclass(frozen=True)
class Enrolled:
    """One enrolled, unrevoked node: its kit name, role and key fingerprint (``SHA256:...``)."""

    name: str
    role: str
    fingerprint: str


def enrolled_path(workdir: str | Path) -> Path:
    return Path(workdir) / ENROLLED_FILE


def write_enrolled(workdir: str | Path, nodes: list[Enrolled]) -> Path:
    """Replace the enrolled set atomically (0600): a reader sees the old file or the new one, never half."""
    path = enrolled_path(workdir)
    doc = {"version": 1, "nodes": [asdict(n) for n in nodes]}
    atomic_write(path, json.dumps(doc, indent=1).encode(), private=True)
    return path


def read_enrolled(workdir: str | Path) -> dict[str, Enrolled]:
    """Fingerprint → enrolled node; EnrollmentError if the file is missing or unreadable (fail closed)."""
    path = enrolled_path(workdir)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        nodes = [Enrolled(str(n["name"]), str(n["role"]), str(n["fingerprint"])) for n in doc["nodes"]]
    except FileNotFoundError:
        raise EnrollmentError(
            "the enrolled-node list is missing: no node can be trusted",
            where=str(path),
            fix="start the server with `fedguard server start`, which writes it from the kit",
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError(
            f"the enrolled-node list is unreadable ({type(exc).__name__}): no node can be trusted",
            where=str(path),
            fix="restart the server with `fedguard server start`, which rewrites it from the kit",
        ) from None
    return {n.fingerprint: n for n in nodes}


def add_enrolled(workdir: str | Path, node: Enrolled) -> None:
    """Add (or replace) one key in the enrolled set: FedGuard registering a key is enrolling it."""
    current = read_enrolled(workdir) if enrolled_path(workdir).is_file() else {}
    current[node.fingerprint] = node
    write_enrolled(workdir, list(current.values()))


def drop_enrolled(workdir: str | Path, fingerprint: str) -> None:
    """Remove one key from the enrolled set (a revocation takes effect at the next round of a live run)."""
    path = enrolled_path(workdir)
    if not path.is_file():
        return
    current = read_enrolled(workdir)
    if fingerprint in current:
        write_enrolled(workdir, [n for fp, n in current.items() if fp != fingerprint])


def server_workdir() -> Path | None:
    """The server workdir named by the environment, or None (simulation, or a test driving the engine)."""
    value = os.environ.get(WORKDIR_ENV, "").strip()
    return Path(value) if value else None
