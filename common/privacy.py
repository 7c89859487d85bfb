"""Where σ is computed, and how ε is accounted: the one module for FedGuard's noise.

Every Gaussian mechanism FedGuard runs takes its noise scale from here:

- DP-SGD on a node (:func:`plan_dp`, :func:`calibrate_sigma`): σ planned before any training from
  the target ε, δ, the node's own size, batch size, local epochs and planned rounds;
- the federated-fairness counts release (:func:`counts_mechanism`): σ = z·√T per cell for T tables;
- central (user-level) DP on the server (:func:`central_dp_stdv`): σ·C/m on the mean of m updates.

ε is always recomputed from the full history of releases (σ, q, steps) with Opacus's accountants,
never estimated. Opacus (and torch) load on first use, so config and report code that only needs
the σ formulas stays light.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.errors import PrivacyPlanError

if TYPE_CHECKING:
    from common.config import DPConfig

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


# --------------------------------------------------------------------------------------------
# Gaussian mechanisms other than DP-SGD: their σ, in one place


@dataclass(frozen=True)
class GaussianMechanism:
    """One Gaussian release: noise multiplier z, L2 sensitivity Δ, and the per-coordinate σ = z·Δ."""

    noise_multiplier: float
    sensitivity: float

    @property
    def sigma(self) -> float:
        return self.noise_multiplier * self.sensitivity

    def history(self) -> History:
        """As the ledger charges it: one release with multiplier z and no subsampling (q = 1)."""
        return [(self.noise_multiplier, 1.0, 1)]


def counts_mechanism(noise_multiplier: float, tables: int) -> GaussianMechanism:
    """The federated-fairness counts release over ``tables`` confusion tables.

    Under add/remove-one-record adjacency a record falls in exactly one cell of each table, so
    the L2 sensitivity of all T tables together is √T and every cell gets N(0, (z·√T)²) noise.
    """
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
    return GaussianMechanism(float(noise_multiplier), math.sqrt(max(1, tables)))


def counts_release(noise_multiplier: float) -> History:
    """The ledger entry of one counts release (z, q = 1, 1 step); its ε does not depend on T."""
    return GaussianMechanism(float(noise_multiplier), 1.0).history()


def central_dp_stdv(noise_multiplier: float, clipping_norm: float, updates: int) -> float:
    """σ of central DP's noise on the mean of ``updates`` updates, each clipped to ``clipping_norm``.

    The mean's sensitivity to one user is C/m, so σ = z·C/m (McMahan et al. 2018, as Flower's
    ``compute_stdv``); ``m`` is the number of updates actually averaged, so a dropout never
    leaves the mean under-noised.
    """
    if updates < 1:
        raise ValueError("central DP needs at least one update to noise")
    return float(noise_multiplier * clipping_norm / updates)


# --------------------------------------------------------------------------------------------
# DP-SGD: planning σ and accounting ε


@dataclass(frozen=True)
class DPPlan:
    n_train: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    target_epsilon: float
    delta: float  # the accountant's: the run's δ less ``outside_delta``
    max_grad_norm: float
    accountant: str
    outside_delta: float = 0.0  # the run's count releases' group selection

    def describe(self) -> str:
        outside = f", {self.outside_delta:g} of it by group selection" if self.outside_delta else ""
        return (
            f"DP plan: n={self.n_train}, q={self.sample_rate:.4f}, {self.steps_per_round} steps/round × "
            f"{self.rounds} rounds, σ={self.noise_multiplier:.3f}, C={self.max_grad_norm}, "
            f"target (ε={self.target_epsilon}, δ={self.delta + self.outside_delta:g}{outside}) [{self.accountant}]"
        )


def poisson_schedule(n_train: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch) exactly as Opacus's DPDataLoader derives them from a DataLoader.

    ``DPDataLoader.from_data_loader`` uses q = 1/len(loader) = 1/ceil(n/B) and yields 1/q
    batches per epoch; planning with B/n instead would under-count ε.
    """
    q = 1.0 / math.ceil(n_train / batch_size)
    # Opacus's sampler takes int(1/q) steps, which float rounding makes one fewer than ceil(n/B) for
    # 141 batch counts below 2,000 (93, 99, 105, ...): plan exactly the steps it takes.
    return q, int(1.0 / q)


def eps_text(epsilon: float) -> str:
    """ε as every output prints it (three decimals): a round line, the run's summary, the plan, a node's ledger
    and the reports show one figure for one node (7.995 everywhere, never 8.00 in one place and 7.995 in another)."""
    return f"{epsilon:.3f}"


def max_delta(n_train: int) -> float:
    """The largest δ a node accepts for ``n_train`` training records: 1/(10·n). At δ near 1/n a mechanism may
    publish a whole record with probability δ and still claim (ε, δ)-DP."""
    return 1 / (10 * n_train)


def delta_within(limit: float) -> float:
    """A round δ at or below ``limit``, one significant digit, rounded down (8.6e-06 → 8e-06, never 9e-06)."""
    scale = 10.0 ** math.floor(math.log10(limit))
    return math.floor(limit / scale + 1e-9) * scale


def plan_dp(
    n_train: int,
    dp: DPConfig,
    *,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    noise_multiplier: float | None = None,
    also: History | None = None,
    outside_delta: float = 0.0,
) -> DPPlan:
    """Calibrate σ so that ``rounds`` rounds of local DP-SGD reach at most the target ε.

    ``also``: the run's other releases on this node (the fairness counts after the last round);
    σ is calibrated for their composition, so the whole run, not only its training, stays within
    the target. ``noise_multiplier``: σ this node already calibrated for the same run and size;
    it skips the (≈1 s) search on later rounds. The δ and schedule checks still run.
    ``outside_delta``: the part of ``dp.delta`` the run spends outside the accountant (the group selection
    of its count releases); the accountant gets the rest (``DPPlan.delta``), so the run's δ total is
    ``dp.delta``.
    """
    if n_train < 1:  # one record is a dataset too (a tiny clinic): DP-SGD's guarantee holds at any n ≥ 1
        raise PrivacyPlanError(
            "no training records on this node (all rows went to the validation split, or none were valid)",
            fix="add rows, or lower data.validation_fraction",
        )
    if dp.delta > max_delta(n_train):
        raise PrivacyPlanError(
            f"δ={dp.delta:g} is larger than 1/(10·n)={max_delta(n_train):.3g} for n={n_train} training records",
            where="dp.delta",
            fix=f"set dp.delta ≤ {delta_within(max_delta(n_train)):g}",
        )
    delta = dp.delta - outside_delta
    if delta <= 0:
        raise PrivacyPlanError(
            f"the group selection of the run's count releases takes δ={outside_delta:g}, all of dp.delta={dp.delta:g}",
            where="dp.delta",
            fix="raise dp.delta or lower fairness.count_selection_delta",
        )
    q, per_epoch = poisson_schedule(n_train, batch_size)
    steps = per_epoch * local_epochs
    others = tuple(compact(also or []))
    fixed = epsilon_spent(list(others), delta, dp.accountant)
    if fixed >= dp.target_epsilon:
        raise PrivacyPlanError(
            f"the run's other releases {list(others)} (σ, q, steps) alone spend "
            f"ε={fixed:.3f} ≥ the target ε={dp.target_epsilon}, leaving nothing for training",
            where="dp.target_epsilon",
            fix="raise dp.target_epsilon or fairness.count_noise_multiplier, or set fairness.federated_counts = false",
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = (
                noise_multiplier
                if noise_multiplier is not None
                else calibrate_sigma(dp.target_epsilon, delta, q, steps * rounds, dp.accountant, others)
            )
    except ValueError as exc:
        raise PrivacyPlanError(
            f"no noise level reaches ε={dp.target_epsilon} for {rounds} rounds × {steps} steps "
            f"at sampling rate {q:.4f} ({exc})",
            where="dp.target_epsilon",
            fix="raise target_epsilon, or lower rounds, local_epochs or batch_size",
        ) from None
    return DPPlan(
        n_train=n_train,
        sample_rate=q,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=float(sigma),
        target_epsilon=dp.target_epsilon,
        delta=delta,
        max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        outside_delta=outside_delta,
    )


def compact(history: History) -> History:
    """Merge consecutive entries with the same (σ, q); accountants compose them identically."""
    out: History = []
    for sigma, q, steps in history:
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


@functools.lru_cache(maxsize=256)
def calibrate_sigma(
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    others: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """σ reaching ``target_epsilon`` after ``steps`` steps at rate ``q``: Opacus's search, remembered.

    The search is Opacus's ``get_noise_multiplier`` step for step (same σ candidates, same
    tolerance, so the same result), composed with ``others`` (fixed releases of the same run)
    when given; each candidate's ε comes from :func:`epsilon_spent`, whose per-step RDP curves
    are cached. Nodes of equal size plan identical runs, so in a large simulation a worker
    searches once per size instead of once per client call (seconds each at large q: Opacus's
    fractional-order series converge slowly there).
    """
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    if accountant != "rdp" and not others:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )

    def run_epsilon(sigma: float) -> float:
        return epsilon_spent([(sigma, q, steps), *others], delta, accountant)

    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = run_epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > 0.01:
        sigma = (sigma_low + sigma_high) / 2
        eps = run_epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def _rdp_orders() -> list[float]:
    """Opacus's default RDP orders: what the noise is planned and accounted with."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """One step's RDP at Opacus's default orders (compose by multiplying with the steps)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders())
    curve.flags.writeable = False
    return curve


def epsilon_spent(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of every release in ``history`` at ``δ``.

    RDP is Opacus's ``RDPAccountant.get_privacy_spent`` computation (same orders, the same sum
    of per-release curves, the same conversion) with each (σ, q) curve computed once per process.
    """
    if not history:
        return 0.0
    from opacus.accountants import create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in compact(history)])
        with warnings.catch_warnings():
            # RDP's default orders are what the noise was planned with; a tighter bound is not claimed.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = rdp_analysis.get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = compact(history)
    with warnings.catch_warnings():
        # RDP's default orders are what the noise was planned with; a tighter bound is not claimed.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(acc.get_epsilon(delta=delta))


def epsilon_within(history: History, delta: float, extra_delta: float, accountant: str = "rdp") -> float:
    """ε of ``history`` when the releases' total δ is ``delta`` and ``extra_delta`` of it is spent outside
    the accountant (a count release's group selection; the accountant gets the rest); infinite when
    nothing is left for it."""
    if extra_delta >= delta:
        return float("inf")
    return epsilon_spent(history, delta - extra_delta, accountant)


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ) for a unit contributing up to ``k`` records: (kε, k·e^{(k−1)ε}·δ), the group-privacy bound."""
    if k <= 1:
        return epsilon, delta
    return k * epsilon, min(1.0, k * math.exp((k - 1) * epsilon) * delta)
