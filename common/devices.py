"""Where a node trains and evaluates: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

The run config's ``train.device`` is the federation's default; a node owner can override it for
their own hardware with the node config key :data:`NODE_DEVICE_KEY` (``fedguard client start
--device cuda:1``), since only the owner knows which GPU is free. A request the machine cannot
serve is a clear error, never a silent fall-back to CPU (a 20× slower round is a surprise).

Precision: training stays float32 on every device under DP. Opacus 1.6 handles autocast only in
its ``functorch`` grad-sample mode; the ``hooks`` and ``ghost`` samplers compute per-sample
gradients and norms in whatever dtype the activations have, and float16 per-sample norms can
overflow to inf, turning a clipping factor into 0 or NaN for that record. On CUDA, loaders pin
host memory and copies are non-blocking.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from common.errors import ModelError

__all__ = ["NODE_DEVICE_KEY", "DeviceError", "loader_options", "node_device", "resolve_device", "usable_cpus"]

#: Node config key (``flower-supernode --node-config "device='cuda:1'"``) that overrides ``train.device``.
NODE_DEVICE_KEY = "device"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ModelError):
    """The requested compute device does not exist on this machine (a ModelError: the model cannot be placed)."""

    code = "device-unavailable"


def resolve_device(requested: str = "auto", *, where: str = "train.device") -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; ``cuda``/``cuda:N`` must exist here."""
    req = str(requested).strip().lower()
    if not _DEVICE_RE.match(req):
        raise DeviceError(f"unknown device {requested!r}", where=where, fix="use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if req == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {requested!r} requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, {'no CUDA build' if torch.version.cuda is None else 'no visible GPU'})",
            where=where,
            fix="use 'auto' or 'cpu', or install a CUDA build of torch on a machine with a GPU",
        )
    index = int(req.split(":")[1]) if ":" in req else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {requested!r} requested but this machine has {count} CUDA device(s) (cuda:0…cuda:{count - 1})",
            where=where,
            fix="pick an existing index, or 'auto'",
        )
    return torch.device(f"cuda:{index}")


def node_device(node_config: Mapping[str, Any], run_device: str = "auto") -> torch.device:
    """The node owner's ``device`` (node config) wins over the run config's ``train.device``."""
    own = node_config.get(NODE_DEVICE_KEY)
    if own is not None and str(own).strip():
        return resolve_device(str(own), where=f"node config {NODE_DEVICE_KEY!r}")
    return resolve_device(run_device)


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments for ``device``: pinned host memory when copying to a GPU."""
    return {"pin_memory": device.type == "cuda"}


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as in a container)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
