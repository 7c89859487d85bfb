"""What a fairness audit computes and which of its results become findings (``[fairness]`` in a run config)."""

from __future__ import annotations

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
        description="skewed model (every evaluation, sensitive columns or not): the predicted positive rate is "
        "above factor × the held-out base rate or below it ÷ factor (binary tasks)",
    )
    constant_rounds: int = Field(
        3,
        ge=1,
        description="a model that predicts one class for this many consecutive rounds is called out in the "
        "round line, with what to try",
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
