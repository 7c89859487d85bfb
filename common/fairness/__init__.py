"""Fairness: disaggregated metrics, audit findings and the federated counts release.

One concept, as in fairlearn's ``MetricFrame``: every group metric is a function of the group's
binary confusion table ``[tp, fp, fn, tn]``. The central audit computes those tables from
predictions on the held-out set; the federated audit sums the (noised) tables that nodes
computed on their validation splits; both then go through the same rates. So a central and a
federated number mean the same thing, and bootstrap replicates are just resampled tables.

- :mod:`common.fairness.config`: ``FairnessConfig``, what an audit computes and reports;
- :mod:`common.fairness.metrics`: group metrics, disparities, the central audit, metrics from counts;
- :mod:`common.fairness.audit_findings`: threshold breaches and degenerate-model findings across rounds;
- :mod:`common.fairness.model_findings`: a constant or skewed model, on every evaluation (no groups needed);
- :mod:`common.fairness.counts`: a node's confusion counts, their Gaussian release, the server's sum.

numpy only (fairlearn is a test dependency that checks these numbers, never a runtime one).

Conventions (the labels are binary, ``1`` is the positive / selected outcome):

- ``accuracy = (tp+tn)/n``, ``selection_rate = (tp+fp)/n``, ``tpr = tp/(tp+fn)``,
  ``fpr = fp/(fp+tn)``, ``precision = tp/(tp+fp)``, ``base_rate = (tp+fn)/n``.
  A rate whose denominator is zero is *undefined* (``None``) and is left out of disparities;
  fairlearn/scikit-learn report 0 there instead, which would make a group with no positives
  look like a group the model never recognises.
- Disparities over the non-suppressed groups of one attribute (fairlearn's ``between_groups``):
  demographic-parity difference ``max - min`` and ratio ``min / max`` of selection rates,
  equal-opportunity difference ``max - min`` of TPR, equalized-odds difference
  ``max(TPR difference, FPR difference)`` (fairlearn's ``agg="worst_case"``).
- Groups with fewer rows than ``min_group_size`` are *suppressed*: listed, with neither metric
  values nor their exact size, and left out of disparities.
"""

from __future__ import annotations

from common.fairness.audit_findings import Finding, FindingKind, Severity, findings, merge_findings, track_findings
from common.fairness.config import FairnessConfig
from common.fairness.counts import NoisyCounts, group_confusion_counts, merge_counts, noisy_counts, release_threshold
from common.fairness.metrics import (
    CELLS,
    OVERALL,
    SEP,
    AttributeAudit,
    Audit,
    Counts,
    Disparities,
    Disparity,
    FederatedAudit,
    GroupMetrics,
    OverallMetrics,
    audit,
    client_spread,
    dataset_fingerprint,
    expected_calibration_error,
    log_loss,
    metrics_from_counts,
    roc_auc,
)
from common.fairness.model_findings import (
    constant_streak,
    is_constant,
    model_findings,
    prediction_summary,
    regression_finding,
)

__all__ = [
    "CELLS",
    "OVERALL",
    "SEP",
    "AttributeAudit",
    "Audit",
    "Counts",
    "Disparities",
    "Disparity",
    "FairnessConfig",
    "FederatedAudit",
    "Finding",
    "FindingKind",
    "GroupMetrics",
    "NoisyCounts",
    "OverallMetrics",
    "Severity",
    "audit",
    "client_spread",
    "constant_streak",
    "dataset_fingerprint",
    "expected_calibration_error",
    "findings",
    "group_confusion_counts",
    "is_constant",
    "log_loss",
    "merge_counts",
    "merge_findings",
    "metrics_from_counts",
    "model_findings",
    "noisy_counts",
    "prediction_summary",
    "regression_finding",
    "release_threshold",
    "roc_auc",
    "track_findings",
]
