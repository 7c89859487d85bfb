"""What a fairness audit computes and which of its results become findings (``[fairness]`` in a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Configuration


class FairnessConfig(_Model):
    """What an audit computes and which results become findings."""

    min_group_size: int = Field(20, ge=1, description="groups with fewer rows are suppressed")
    dp_ratio_min: float = Field(0.8, gt=0.0, le=1.0, description="demographic-parity ratio below this → finding")
    dp_diff_max: float | None = Field(None, ge=0.0, le=1.0, description="optional: DP difference above this → finding")
    eo_diff_max: float = Field(0.1, ge=0.0, le=1.0, description="equalized-odds difference above this → finding")
    eopp_diff_max: float = Field(0.1, ge=0.0, le=1.0, description="equal-opportunity difference above this → finding")
    critical_factor: float = Field(
        2.0,
        gt=1.0,
        description="critical when a difference exceeds factor × its maximum, or a ratio falls below "
        "1 − factor × (1 − its minimum); warning otherwise",
    )
    degenerate_rate_ratio: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="degenerate model: selection rate below this fraction of the base rate, or rejection "
        "rate below this fraction of the negative rate",
    )
    degenerate_tpr_max: float = Field(0.1, ge=0.0, lt=1.0, description="degenerate model: TPR below this everywhere")
    prediction_skew_factor: float = Field(
        1.5,
        gt=1.0,
        description="skewed model (every evaluation, sensitive columns or not): the share of rows predicted as "
        "either class is above factor × that class's held-out base rate or below it ÷ factor (binary tasks)",
    )
    constant_rounds: int = Field(
        3,
        ge=1,
        description="a model that predicts one class for this many consecutive rounds is called out in the "
        "round line, with what to try",
    )
    regression_margin: float = Field(
        0.03,
        ge=0.0,
        lt=1.0,
        description="a final model whose held-out accuracy is more than this below an earlier round's (and more "
        "than two standard errors of the hold-out) is called out in the run's warnings; 0 checks the standard "
        "errors alone",
    )
    bootstrap_n: int = Field(200, ge=0, le=100_000, description="bootstrap replicates for disparity CIs; 0: none")
    bootstrap_seed: int = Field(0, ge=0, description="fixed so a report is reproducible (not a privacy seed)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    ece_bins: int = Field(15, ge=1, le=1000)
    intersections: list[tuple[str, str]] | None = Field(
        None, description="attribute pairs to intersect; None: all pairs of sensitive columns; []: none"
    )
    federated_counts: bool = Field(
        True,
        description="after the last round, each client sends noised per-group confusion counts of the final "
        "model on its validation split (charged to its privacy ledger) for the federated view",
    )
    count_noise_multiplier: float = Field(
        5.0, gt=0.0, description="z of the counts' Gaussian mechanism: σ = z·√(tables) per cell"
    )
    count_selection_delta: float = Field(
        1e-7, gt=0.0, lt=1e-3, description="δ added by releasing only groups whose noisy size clears a threshold"
    )

    @model_validator(mode="after")
    def _distinct_pairs(self) -> FairnessConfig:
        for a, b in self.intersections or []:
            if a == b:
                raise ValueError(f"intersection ({a!r}, {b!r}) needs two different attributes")
        return self


#: What each mitigation method does with ``strength`` (the knob ``fedguard fairness sweep`` varies).
MITIGATION_STRENGTH: dict[str, str] = {
    "reweighing": "exponent on the reweighing weights (0: none, 1: full P(a)·P(y)/P(a, y))",
    "fairfed": "β, the step of the per-round aggregation-weight update (0: plain FedAvg)",
    "qfedavg": "q, the exponent on each node's noised error rate (0: plain FedAvg)",
    "thresholds": "fraction of the gap between groups the thresholds close (0: one threshold, 1: equal)",
}


class MitigationConfig(_Model):
    """Group-fairness mitigation for one sensitive attribute (``[mitigation]`` in a run config).

    Every node release a method needs is a Gaussian release charged to the node's ledger and planned
    with its DP-SGD rounds (one ε per node covers all of them); ``thresholds`` uses only the
    evaluator's held-out data and costs the nodes nothing.
    """

    method: Literal["none", "reweighing", "fairfed", "qfedavg", "thresholds"] = "none"
    attribute: str | None = Field(None, description="the sensitive column to mitigate for; None: the schema's first")
    strength: float = Field(1.0, ge=0.0, description="the method's knob (MITIGATION_STRENGTH)")
    constraint: Literal["demographic_parity", "equalized_odds"] = Field(
        "demographic_parity", description="the gap fairfed and thresholds target"
    )
    noise_multiplier: float = Field(
        5.0, gt=0.0, description="z of the nodes' mitigation releases (group × label counts, per-round counts)"
    )
    priors: dict[str, float] | None = Field(
        None,
        description='reweighing from public priors instead of a node release: "group|label" → P(group, label)',
    )
    calibration_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="thresholds: share of the evaluator's held-out rows used to fit them"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MitigationConfig:
        if self.priors is not None and self.method != "reweighing":
            raise ValueError('mitigation.priors is only used by method = "reweighing"')
        if self.method == "thresholds" and self.strength > 1.0:
            raise ValueError("mitigation.strength for thresholds is the fraction of the gap closed: at most 1")
        for key, p in (self.priors or {}).items():
            if key.count("|") != 1 or not 0.0 < p <= 1.0:
                raise ValueError(f'mitigation.priors[{key!r}] = {p}: keys are "group|label", values in (0, 1]')
        return self

    @property
    def node_releases_per_round(self) -> bool:
        """fairfed and qfedavg: each train reply carries noised counts of the global model it received."""
        return self.method in ("fairfed", "qfedavg")

    @property
    def label_counts_release(self) -> bool:
        """reweighing without public priors: one release of group × label counts before round 1."""
        return self.method == "reweighing" and self.priors is None
