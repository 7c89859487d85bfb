"""Building kits next to the old ones and swapping them in atomically, so a failure changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.files import atomic_write, fsync_dir

__all__ = ["staging", "swap_in", "write_json"]


def write_json(path: Path, obj: Any) -> None:
    """Pretty, sorted JSON written atomically (temp file + rename)."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch directory inside ``out`` (same file system, so renames are atomic), always removed."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(stage: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename each staged directory over its target; old targets go to the stage's trash (removed with it).

    Each rename is atomic; if one fails, the ones already made are rolled back so the old kits stay.
    """
    trash = stage / ".old"
    trash.mkdir(exist_ok=True)
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for i, (src, dst) in enumerate(moves):
            old: Path | None = None
            if dst.exists():
                old = trash / f"{i}-{dst.name}"
                os.rename(dst, old)
            dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(src, dst)
            except BaseException:
                if old is not None:
                    os.rename(old, dst)
                raise
            done.append((src, dst, old))
    except BaseException:
        for src, dst, old in reversed(done):
            with contextlib.suppress(OSError):
                os.rename(dst, src)
                if old is not None:
                    os.rename(old, dst)
        raise
    for _src, dst, _old in done:
        fsync_dir(dst.parent)
