"""Round checkpoints: the global state after each complete round, written so a crash never corrupts one.

A checkpoint is one file: a JSON header line (run, round, RNG and strategy state, array names,
shapes and dtypes, and the SHA-256 of the payload) followed by the raw array bytes. It is
written to a temp file, fsynced and renamed; the directory is fsynced too. The last two are
kept, so a damaged latest checkpoint (bit flip, truncated disk) falls back to the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import FedGuardError
from common.files import fsync_dir
from common.optimizers import released_state

_MAGIC = "fedguard-checkpoint/1"
KEEP = 2


class CheckpointError(FedGuardError):
    code = "checkpoint-invalid"


@dataclass
class Checkpoint:
    run_id: int
    round: int
    state: OrderedDict[str, np.ndarray]
    rng_state: dict[str, Any]
    #: Server-side state that must survive a restart (central-DP release count, optimizer state...).
    extra: dict[str, Any] = field(default_factory=dict)
    extra_arrays: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    path: Path | None = None

    @property
    def model(self) -> OrderedDict[str, np.ndarray]:
        """The run's model after this round, as it scored it: the server optimizer's model average
        when the run keeps one (``[server.optimizer] ema_decay``), else ``state``, which the nodes train from."""
        return released_state(self.state, self.extra_arrays)


def checkpoint_dir(store_path: Path, run_id: int) -> Path:
    return store_path.parent / "checkpoints" / f"run-{run_id}"


def save(directory: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically as ``round-NNNNN.ckpt``; drop all but the newest ``KEEP``."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = [("state", k, np.ascontiguousarray(v)) for k, v in ckpt.state.items()]
    arrays += [("extra", k, np.ascontiguousarray(v)) for k, v in ckpt.extra_arrays.items()]
    size = sum(a.nbytes for _, _, a in arrays)
    free = shutil.disk_usage(directory).free
    if free < 2 * size + (1 << 20):
        raise CheckpointError(
            f"only {free / 1e6:.1f} MB free for a {size / 1e6:.1f} MB checkpoint",
            where=str(directory),
            fix="free disk space on the server (the run stops rather than lose its progress)",
        )
    digest = hashlib.sha256()
    for _, _, a in arrays:
        digest.update(a.tobytes())
    header = {
        "format": _MAGIC,
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "rng_state": ckpt.rng_state,
        "extra": ckpt.extra,
        "arrays": [{"group": g, "name": k, "dtype": a.dtype.str, "shape": list(a.shape)} for g, k, a in arrays],
        "sha256": digest.hexdigest(),
    }
    final = directory / f"round-{ckpt.round:05d}.ckpt"
    tmp = directory / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        for _, _, a in arrays:
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(directory)
    for old in sorted(directory.glob("round-*.ckpt"))[:-KEEP]:
        old.unlink()
    return final


def load(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; raise CheckpointError on any damage."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            payload = f.read()
        if header.get("format") != _MAGIC:
            raise ValueError("not a FedGuard checkpoint")
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise ValueError("checksum mismatch (the file was modified or damaged)")
        groups: dict[str, OrderedDict[str, np.ndarray]] = {"state": OrderedDict(), "extra": OrderedDict()}
        offset = 0
        for spec in header["arrays"]:
            dtype = np.dtype(spec["dtype"])
            n = int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
            groups[spec["group"]][spec["name"]] = (
                np.frombuffer(payload[offset : offset + n], dtype=dtype).reshape(spec["shape"]).copy()
            )
            offset += n
        if offset != len(payload):
            raise ValueError("payload length does not match its header")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unusable checkpoint: {exc}", where=str(path)) from None
    return Checkpoint(
        run_id=int(header["run_id"]),
        round=int(header["round"]),
        state=groups["state"],
        rng_state=header["rng_state"],
        extra=header["extra"],
        extra_arrays=groups["extra"],
        path=path,
    )


def latest_good(directory: Path, warn: Any = print) -> Checkpoint:
    """The newest checkpoint that verifies; damaged newer ones are reported and skipped."""
    files = sorted(directory.glob("round-*.ckpt"), reverse=True)
    if not files:
        raise CheckpointError(
            "no checkpoint for this run",
            where=str(directory),
            fix="a run can be resumed once it has completed at least one round",
        )
    for path in files:
        try:
            return load(path)
        except CheckpointError as exc:
            warn(f"skipping damaged checkpoint: {exc}")
    raise CheckpointError("every checkpoint of this run is damaged", where=str(directory))
