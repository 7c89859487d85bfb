"""Model state ↔ Flower ArrayRecord, and plain numpy views for validation and aggregation."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord


def state_to_numpy(module: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """The module's state dict as float32/int numpy arrays (CPU copies)."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in module.state_dict().items())


def numpy_to_record(state: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict=OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()))


def record_to_numpy(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Decode an ArrayRecord; raises ValueError/TypeError on non-numpy payloads."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, arr in record.items():
        out[key] = arr.numpy()
    return out


def load_numpy_state(module: torch.nn.Module, state: OrderedDict[str, np.ndarray]) -> None:
    module.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in state.items()))
