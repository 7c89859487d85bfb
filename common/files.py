"""Crash-safe file writes and private-file checks, shared by keys, kits, checkpoints and reports."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import FedGuardError


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, *, private: bool = False, replace: bool = True) -> None:
    """Temp file + fsync + rename: a crash leaves the old file or the new one, never half of either.

    Private files are created 0600 (mkstemp), so a key is never readable by others, not even
    briefly. ``replace=False`` links the temp file into place instead, which raises
    ``FileExistsError`` if the target appeared meanwhile: a key is never overwritten by a race.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def group_or_world_readable(path: Path) -> str | None:
    """The file's mode as ``0644`` when others may read it (POSIX), else None."""
    if os.name != "posix":
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    return f"{mode:04o}" if mode & 0o077 else None


@contextlib.contextmanager
def only_one(lock_path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` while the block runs; a second holder gets
    ``FedGuardError(what, fix=fix)`` at once. An flock: the OS drops it when the process ends, killed too,
    so a crash never leaves a folder locked."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedGuardError(what, where=str(lock_path.parent), fix=fix) from None
        yield
