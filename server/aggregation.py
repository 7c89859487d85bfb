"""FedAvg as a streaming weighted sum: memory stays at one model, however many replies."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class WeightedMean:
    """Accumulate Σ wᵢ·xᵢ and Σ wᵢ; float tensors only (integer buffers keep the global value)."""

    def __init__(self, reference: OrderedDict[str, np.ndarray]) -> None:
        self._ref = reference
        self._sum = OrderedDict(
            (k, np.zeros(v.shape, np.float64)) for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)
        )
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: OrderedDict[str, np.ndarray], weight: float) -> None:
        for k, acc in self._sum.items():
            acc += weight * state[k]
        self.total_weight += weight
        self.count += 1

    def result(self) -> OrderedDict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update to aggregate")
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, ref in self._ref.items():
            out[k] = (self._sum[k] / self.total_weight).astype(ref.dtype) if k in self._sum else ref.copy()
        return out
