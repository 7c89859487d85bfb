"""Membership inference by loss threshold (Yeom et al. 2018): the simplest attack, reported as
TPR at fixed low FPR and AUC (Carlini et al. 2022: averages hide the attack that matters, the one
that is confident about a few records)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

from common.errors import DataError


@dataclass(frozen=True)
class MIAResult:
    members: int
    non_members: int
    auc: float
    tpr_at_fpr_0_1: float  # TPR at FPR ≤ 0.1%
    tpr_at_fpr_1: float  # TPR at FPR ≤ 1%
    #: The smallest nonzero FPR the non-member count can resolve (1/non_members): a target FPR below it
    #: is met only by a threshold above every non-member's score.
    fpr_resolution: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds t (predict member when score > t) whose FPR is ≤ ``fpr``."""
    out = np.sort(np.asarray(non_member_scores, dtype=float))[::-1]
    allowed = int(np.floor(fpr * len(out) + 1e-9))  # non-members allowed above the threshold
    t = out[allowed] if allowed < len(out) else -np.inf
    return float(np.mean(np.asarray(member_scores, dtype=float) > t))


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P[member score > non-member score] (+½ for ties): the ROC area, by ranks."""
    a, b = np.asarray(member_scores, dtype=float), np.asarray(non_member_scores, dtype=float)
    ranks = rankdata(np.concatenate([a, b]))  # average ranks for ties
    r_a = ranks[: len(a)].sum()
    return float((r_a - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def mia_metrics(member_losses: np.ndarray, non_member_losses: np.ndarray) -> MIAResult:
    """Loss-threshold attack: lower loss ⇒ member. Losses are per record (cross-entropy)."""
    if len(member_losses) == 0 or len(non_member_losses) == 0:
        raise DataError(
            "membership inference needs both training records and held-out records",
            fix="keep simulation.holdout_fraction > 0 so the simulation has a held-out split",
        )
    a, b = -np.asarray(member_losses, dtype=float), -np.asarray(non_member_losses, dtype=float)
    return MIAResult(
        members=len(a),
        non_members=len(b),
        auc=auc(a, b),
        tpr_at_fpr_0_1=tpr_at_fpr(a, b, 0.001),
        tpr_at_fpr_1=tpr_at_fpr(a, b, 0.01),
        fpr_resolution=1.0 / len(b),
    )
