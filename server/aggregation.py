"""FedAvg as a streaming weighted sum: memory stays at one model, however many replies.

With central DP the same sum runs over clipped updates with equal weights, then noise is added.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict

import numpy as np

from common.flower_internals import compute_clip_model_update
from common.privacy import central_dp_stdv


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


class HeldWeightedMean:
    """FedAvg whose per-node multipliers are known only when the round ends (fairfed, qfedavg).

    Holds every accepted update until then (memory grows with the round's replies, as for the robust
    options); ``multipliers`` (one per update, in the order added) scale the declared weights.
    """

    def __init__(self, reference: OrderedDict[str, np.ndarray]) -> None:
        self._ref = reference
        self._items: list[tuple[OrderedDict[str, np.ndarray], float]] = []
        self.multipliers: list[float] | None = None

    @property
    def count(self) -> int:
        return len(self._items)

    def add(self, state: OrderedDict[str, np.ndarray], weight: float) -> None:
        self._items.append((state, weight))

    def result(self) -> OrderedDict[str, np.ndarray]:
        multipliers = self.multipliers or [1.0] * len(self._items)
        if sum(w * k for (_, w), k in zip(self._items, multipliers, strict=True)) <= 0:
            multipliers = [1.0] * len(self._items)  # every multiplier at 0: plain FedAvg rather than nothing
        mean = WeightedMean(self._ref)
        for (state, weight), k in zip(self._items, multipliers, strict=True):
            mean.add(state, weight * k)
        return mean.result()


class CentralDPMean:
    """User-level DP FedAvg: clip each update to ``C`` (Flower's FlatClip), equal weights, noise σ·C/m.

    The noise's standard deviation comes from :func:`common.privacy.central_dp_stdv` (σ has one home).

    Flower's DP strategy wrappers draw noise from NumPy's global RNG and size it for the
    configured number of sampled clients; here the generator is seeded from the OS CSPRNG and
    ``m`` is the number of updates actually averaged, so a dropout never leaves the mean under-noised.
    """

    def __init__(self, reference: OrderedDict[str, np.ndarray], noise_multiplier: float, clipping_norm: float) -> None:
        self._ref = reference
        self._keys = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)]
        self._mean = WeightedMean(reference)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.stdv = 0.0

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, state: OrderedDict[str, np.ndarray], weight: float = 1.0) -> None:
        del weight  # equal weights: a declared size must not change a user's sensitivity
        params = [state[k].astype(np.float64) for k in self._keys]
        compute_clip_model_update(params, [self._ref[k].astype(np.float64) for k in self._keys], self.clipping_norm)
        clipped = OrderedDict(state)
        clipped.update(zip(self._keys, params, strict=True))
        self._mean.add(clipped, 1.0)

    def result(self) -> OrderedDict[str, np.ndarray]:
        out = self._mean.result()
        self.stdv = central_dp_stdv(self.noise_multiplier, self.clipping_norm, self._mean.count)
        rng = np.random.default_rng(secrets.randbits(128))
        for k in self._keys:
            out[k] = (out[k] + rng.normal(0.0, self.stdv, out[k].shape)).astype(self._ref[k].dtype)
        return out


class CoordinateRobust:
    """Coordinate-wise median or trimmed mean of the updates, unweighted (weights are ignored).

    Unlike FedAvg this holds every accepted update until the round ends: memory grows with the
    number of replies. Allowed in plaintext mode only, and not with central DP.
    """

    def __init__(self, reference: OrderedDict[str, np.ndarray], method: str, trim_fraction: float = 0.2) -> None:
        self._ref = reference
        self._method = method
        self._trim = trim_fraction
        self._states: list[OrderedDict[str, np.ndarray]] = []

    @property
    def count(self) -> int:
        return len(self._states)

    def add(self, state: OrderedDict[str, np.ndarray], weight: float = 1.0) -> None:
        del weight
        self._states.append(state)

    def result(self) -> OrderedDict[str, np.ndarray]:
        if not self._states:
            raise ValueError("no update to aggregate")
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, ref in self._ref.items():
            if not np.issubdtype(ref.dtype, np.floating):
                out[k] = ref.copy()
                continue
            stack = np.stack([s[k] for s in self._states]).astype(np.float64)
            if self._method == "median":
                agg = np.median(stack, axis=0)
            else:
                n = stack.shape[0]
                cut = int(np.floor(self._trim * n))
                agg = np.sort(stack, axis=0)[cut : n - cut].mean(axis=0)
            out[k] = agg.astype(ref.dtype)
        return out
