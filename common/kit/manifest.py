"""The signed kit manifest: each file's SHA-256, who the kit is for and its validity, signed by the CA.

The admin's tools write it (``fedguard.provisioning``); every participant checks it
(:mod:`common.kit.verify`). Both sides use these models and this file walk, so they cannot
disagree about which files a kit holds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.kit.names import MANIFEST, MANIFEST_SIG

__all__ = ["Manifest", "Participant", "kit_files", "manifest_body", "sha256_file"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Participant(_Strict):
    name: str
    role: Literal["server", "client", "evaluator"]
    organisation: str | None = None


class Manifest(_Strict):
    format: Literal["fedguard-kit/1"]
    federation: str
    participant: Participant
    ca_fingerprint: str
    issued_at: dt.datetime
    #: Registration (node kits) or server certificate (server kit) validity.
    not_before: dt.datetime
    not_after: dt.datetime
    #: Relative POSIX path → SHA-256 hex of every file in the kit except the manifest and its signature.
    files: dict[str, str]
    private_files: list[str]


def manifest_body(manifest: Manifest) -> bytes:
    """The exact bytes the CA signs (stable key order, trailing newline)."""
    return (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def kit_files(kit: Path) -> tuple[list[str], list[str]]:
    """(regular files, symlinks or other non-regular entries) as relative POSIX paths, manifest excluded."""
    files: list[str] = []
    odd: list[str] = []
    for root, dirs, names in os.walk(kit):
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                odd.append((Path(root) / d).relative_to(kit).as_posix())
                dirs.remove(d)
        for n in names:
            p = Path(root) / n
            rel = p.relative_to(kit).as_posix()
            if rel in (MANIFEST, MANIFEST_SIG):
                continue
            if p.is_symlink() or not stat.S_ISREG(p.lstat().st_mode):
                odd.append(rel)
            else:
                files.append(rel)
    return sorted(files), sorted(odd)
