"""The one-run privacy audit bound of Steinke, Nasr and Jagielski (NeurIPS 2023, arXiv:2305.08846).

m canaries are each included in training independently with probability ½. After training an
auditor scores every canary, guesses IN for the k₊ highest and OUT for the k₋ lowest scores and
abstains on the rest: r = k₊ + k₋ guesses, v of them correct. If training is (ε, δ)-DP, the
number of correct guesses is stochastically dominated by Binomial(r, e^ε/(1+e^ε)) up to a δ term
(the paper's Theorem 5.2 / Proposition 5.7); its Algorithm 2 turns that into a p-value, and the
largest ε whose p-value is still below β = 1 − confidence is the lower bound: with probability
at least 1 − β over the canary coins and the training randomness, the run is NOT (ε, δ)-DP for
any smaller ε. A bound above the accountant's ε (the upper bound) means the claimed guarantee
is false for this run — a broken implementation, not bad luck, at the stated confidence.

Written here (not imported) because the maintained implementation, ``jax_privacy.auditing``,
installs only with JAX (``jax_privacy/__init__`` imports jax; jaxlib alone is hundreds of MB).
The formula below follows the paper's Algorithm 2 and matches ``jax_privacy.auditing._one_run_p_value``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

from common.errors import ConfigError


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ConfigError(
            f"audit counts must satisfy 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})",
            fix="guess at most once per canary and count only the guesses made",
        )
    if not 0.0 <= delta <= 1.0:
        raise ConfigError(f"δ must be in [0, 1], got {delta}", fix="use the run's δ (e.g. 1e-5)")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under the null hypothesis that training is (eps, delta)-DP.

    β = P[Binomial(r, q) ≥ v] with q = e^ε/(1+e^ε) (ε-DP's best per-guess accuracy, randomized
    response); α = max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v]/i charges δ: p = β + 2·m·δ·α.
    """
    _check(m, r, v, delta)
    if eps < 0:
        raise ConfigError(f"ε must be ≥ 0, got {eps}")
    q = 1.0 / (1.0 + math.exp(-eps)) if eps < 700 else 1.0
    beta = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - beta  # P[v − i ≤ X ≤ v − 1]
    alpha = float(np.max(window / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε the audit refutes at ``confidence``: p_value(ε) < 1 − confidence (0 if none).

    p_value is increasing in ε, so a doubling search then bisection (to 1e-6) finds the crossing.
    """
    _check(m, r, v, delta)
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}", fix="use e.g. 0.95")
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:  # v = r with tiny δ: the bound grows like log of the tail; cap to stay finite
            return lo
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_from_scores(scores: np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """Guesses per canary: +1 (IN) for the ``k_in`` highest scores, −1 (OUT) for the ``k_out``
    lowest, 0 (abstain) otherwise. Ties are broken by canary order (deterministic)."""
    n = len(scores)
    if k_in < 0 or k_out < 0 or k_in + k_out > n:
        raise ConfigError(
            f"cannot make {k_in} IN and {k_out} OUT guesses among {n} canaries",
            fix="make k_in + k_out at most the number of canaries",
        )
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    guesses = np.zeros(n, dtype=int)
    guesses[order[:k_in]] = 1
    if k_out:
        guesses[order[n - k_out :]] = -1
    return guesses


@dataclass(frozen=True)
class AuditBound:
    """One audit's counts and the bound they give; ``as_dict`` is what reports store."""

    canaries: int
    included: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower: float

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int, delta: float, confidence: float = 0.95
    ) -> AuditBound:
        """Guess from ``scores`` (higher = more likely trained on), count against ``included``."""
        inc = np.asarray(included, dtype=bool)
        g = guess_from_scores(scores, k_in, k_out)
        made = g != 0
        correct = int(np.sum((g == 1) & inc) + np.sum((g == -1) & ~inc))
        m, r = len(inc), int(made.sum())
        eps = epsilon_lower_bound(m, r, correct, delta, confidence)
        return cls(m, int(inc.sum()), r, correct, delta, confidence, eps)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)
