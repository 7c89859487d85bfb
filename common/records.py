"""Record key names shared by the ServerApp and the ClientApp, and the reply allow-list.

Every key a node may put in a reply is listed here with its privacy class (docs/privacy.md, "The privacy model"):
``dp`` values are outputs of a mechanism charged to the node's budget, ``public`` values the
owner declares, ``accounting`` values describe the DP mechanism itself, ``resource`` values are
coarsened compute/energy figures the owner's policy lets leave. Anything else is blocked on the
node before it is sent.
"""

from __future__ import annotations

from typing import Literal

# Record names inside a RecordDict.
ARRAYS = "arrays"  # global model (server → node) or DP-SGD result (node → server)
CONFIG = "config"  # train instructions (server → node)
METRICS = "metrics"  # per-reply values (node → server)
REFUSAL = "refusal"  # explicit refusal or failure, with a code and a node-local log id
PLAN = "plan"  # a node's answer to a privacy-planning query
SIGNATURE = "signature"  # the node's signature over the reply (common.reply_signing)
ROLE = "role"  # a node's answer to the role query: client or evaluator
EVALUATION = "evaluation"  # the evaluator's metrics of the global model on its held-out set
AUDIT = "audit"  # the evaluator's fairness audit of the global model (JSON) and the set's provenance
FAIRNESS_COUNTS = "fairness-counts"  # a client's noised per-group confusion counts of the final model
MITIGATION_COUNTS = "mitigation-counts"  # [mitigation]: noised group × label counts, or per-round model counts
HE = "he"  # homomorphic mode: the evaluator's signature over a global model, and timings

# Keys of the CONFIG record.
ROUND = "round"
RUN_CONFIG = "run-config"  # the validated RunConfig as JSON (never holds secrets)
RUN_ID = "fedguard-run-id"
RUN_UID = "fedguard-run-uid"  # random per run: the node ledger's run key
SIM_DATA_DIR = "sim-data-dir"  # simulation only: folder of per-partition data files
RUN_SIGNATURE = "run-signature"  # the admin's signed approval of this run (common.run_signing)
# Homomorphic mode (server → node): the evaluator's signature over the encrypted global model, its
# public key (checked against the signed config's pin), and this node's sealed HE context.
HE_GLOBAL_SIGNATURE = "he-global-signature"
HE_EVALUATOR_KEY = "he-evaluator-key"
HE_SEALED_CONTEXT = "he-sealed-context"

# Keys of the METRICS record.
NUM_EXAMPLES = "num-examples"  # declared public size, the FedAvg weight (Flower's key name)
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
MAX_GRAD_NORM = "max-grad-norm"
EPSILON_TOTAL = "epsilon-total"  # the dataset's ε over all runs, from the node's ledger (at the budget δ)
BUDGET_EPSILON = "budget-epsilon"
BUDGET_DELTA = "budget-delta"
UNIT_CAP = "unit-cap"  # records kept per privacy unit (schema privacy_unit)
UNIT_EPSILON = "unit-epsilon"  # group-privacy ε for one unit, from epsilon-total
UNIT_DELTA = "unit-delta"
# Resource figures of a training round (common.resources), coarsened to 2 significant digits (rounded
# up) and sent only when the owner's policy allows "resource-figures": they track the dataset's size.
WALL_SECONDS = "wall-seconds"
CPU_SECONDS = "cpu-seconds"
PEAK_RAM_MB = "peak-ram-mb"
GPU_SECONDS = "gpu-seconds"
GPU_PEAK_MB = "gpu-peak-mb"
EXAMPLES_PROCESSED = "examples-processed"
ENERGY_WH = "energy-wh"
ENERGY_MEASURED = "energy-measured"  # 1: read from RAPL/NVML; 0: estimated (CPU time × W per core)
EMISSIONS_G = "emissions-g"  # gCO2e = energy × the node's declared grid carbon intensity
CARBON_INTENSITY = "carbon-intensity"  # gCO2e/kWh the owner declared for the node's grid
RESOURCE_KEYS = (
    WALL_SECONDS,
    CPU_SECONDS,
    PEAK_RAM_MB,
    GPU_SECONDS,
    GPU_PEAK_MB,
    EXAMPLES_PROCESSED,
    ENERGY_WH,
    ENERGY_MEASURED,
    EMISSIONS_G,
    CARBON_INTENSITY,
)

# Keys of the PLAN record (answers to the "plan" query; no exact sizes).
PLAN_EPSILON_ROUND = "epsilon-round"  # ε of one round's release alone
PLAN_EPSILON_RUN = "epsilon-run"  # ε of the whole planned run alone
PLAN_EPSILON_AFTER = "epsilon-after"  # the dataset's total after the planned run
PLAN_AFFORDABLE = "affordable"  # 1 if the remaining budget covers the planned run
PLAN_STEPS = "steps-per-round"

# Keys of the ROLE and AUDIT records.
ROLE_NAME = "role"
NODE_NAME = "node-name"  # the name the operator knows the node by (its kit name; node-N in simulation)
AUDIT_JSON = "audit-json"
PROVENANCE_JSON = "provenance-json"
THRESHOLD_POLICY_JSON = "threshold-policy-json"  # [mitigation] thresholds: the evaluator's fitted group thresholds
CALIBRATION_JSON = "calibration-json"  # [evaluation] calibration = "prior": the evaluator's per-class offsets

# Keys of the CONFIG record for [mitigation] (server → node).
REWEIGHING_JSON = "reweighing-json"  # group → label → per-record weight (≤ 1), from DP counts or public priors

# Keys of the FAIRNESS_COUNTS record (Gaussian mechanism, charged to the node's ledger).
COUNTS_JSON = "counts-json"  # table → group → noised [tp, fp, fn, tn]
COUNT_SIGMA = "sigma"  # std of each cell's noise
COUNT_THRESHOLD = "threshold"  # noisy size a group needed to leave
COUNT_SELECTION_DELTA = "selection-delta"
SELECTION_DELTA_RUN = "selection-delta-run"  # METRICS: δ the run's count releases on this node added so far

# Keys of the HE record (node → server).
HE_SIGNATURE = "global-signature"  # the evaluator's signature over the next encrypted global model
HE_ENCRYPT_SECONDS = "encrypt-seconds"
HE_VERIFY_SECONDS = "verify-seconds"  # the evaluator's recomputation of the sum and signature checks
HE_DECRYPT_SECONDS = "decrypt-seconds"

# Keys of the SIGNATURE record.
SIGNATURE_VALUE = "ecdsa-p384-sha384"  # base64 signature by the node's authentication key

# Keys of the REFUSAL record.
REFUSAL_CODE = "code"
REFUSAL_LOG_ID = "log-id"
REFUSAL_RULE = "rule"  # the node policy rule a run broke (a policy field name)

PrivacyClass = Literal["dp", "public", "accounting", "evaluation", "resource"]

#: How reports name each class (docs/privacy.md).
CLASS_LABELS: dict[str, str] = {
    "dp": "DP-protected",
    "public": "declared public",
    "accounting": "DP accounting",
    "evaluation": "central evaluation (the evaluator's held-out set, small groups suppressed)",
    "resource": "resource figures (owner-approved, rounded up to 2 significant digits)",
}

_RESOURCE_CLASSES: dict[str, PrivacyClass] = dict.fromkeys(RESOURCE_KEYS, "resource")

SECAGG = "secagg"  # secure aggregation (common.secagg): advertised keys, sealed shares, revealed shares
SECAGG_MASKED = "secagg-masked"  # secure aggregation: the masked, quantized, weighted update

#: record name → key → class. ``*`` under ARRAYS: every model tensor is DP-protected.
REPLY_ALLOWLIST: dict[str, dict[str, PrivacyClass]] = {
    ARRAYS: {"*": "dp"},
    METRICS: {
        NUM_EXAMPLES: "public",
        EPSILON: "accounting",
        DELTA: "accounting",
        NOISE_MULTIPLIER: "accounting",
        SAMPLE_RATE: "accounting",
        STEPS: "accounting",
        MAX_GRAD_NORM: "accounting",
        EPSILON_TOTAL: "accounting",
        BUDGET_EPSILON: "public",
        BUDGET_DELTA: "public",
        UNIT_CAP: "public",
        UNIT_EPSILON: "accounting",
        UNIT_DELTA: "accounting",
        SELECTION_DELTA_RUN: "accounting",
        **_RESOURCE_CLASSES,
    },
    PLAN: {
        NOISE_MULTIPLIER: "accounting",
        SAMPLE_RATE: "accounting",
        PLAN_STEPS: "accounting",
        DELTA: "accounting",
        PLAN_EPSILON_ROUND: "accounting",
        PLAN_EPSILON_RUN: "accounting",
        EPSILON_TOTAL: "accounting",
        PLAN_EPSILON_AFTER: "accounting",
        BUDGET_EPSILON: "public",
        BUDGET_DELTA: "public",
        PLAN_AFFORDABLE: "accounting",
    },
    REFUSAL: {REFUSAL_CODE: "public", REFUSAL_LOG_ID: "public", REFUSAL_RULE: "public"},
    SIGNATURE: {SIGNATURE_VALUE: "public"},
    ROLE: {ROLE_NAME: "public", NODE_NAME: "public"},
    # Secure aggregation (common.secagg): advertised public keys, shares sealed to one peer (the server
    # cannot open them), revealed shares (fewer than t of a secret reveal nothing about it).
    SECAGG: dict.fromkeys(
        ("pk1", "pk2", "weight", "dsts", "ciphertexts", "share-nodes", "share-kinds", "shares"), "public"
    ),
    SECAGG_MASKED: {"*": "dp"},  # the DP-SGD update, masked: only the sum over >= t nodes is revealed
    EVALUATION: {
        "accuracy": "evaluation",
        "loss": "evaluation",
        "macro_f1": "evaluation",
        "n": "evaluation",
        # What the model predicted over the held-out set (common.fairness.model_findings): aggregates only.
        "predicted_classes": "evaluation",
        "top_class": "evaluation",
        "top_class_share": "evaluation",
        "positive_rate": "evaluation",
        "base_rate": "evaluation",
        "true_classes": "evaluation",  # how many classes the held-out labels hold (a count, not the labels)
        "majority_class": "evaluation",  # the held-out labels' most common class and its share (one count)
        "majority_share": "evaluation",
        # [evaluation] calibration = "prior": the model's own decisions, beside the calibrated ones.
        "uncalibrated_accuracy": "evaluation",
        "uncalibrated_macro_f1": "evaluation",
        "calibrated_loss": "evaluation",  # the loss of the temperature-scaled probabilities, cross-fitted
    },
    AUDIT: {
        AUDIT_JSON: "evaluation",
        PROVENANCE_JSON: "evaluation",
        THRESHOLD_POLICY_JSON: "evaluation",
        CALIBRATION_JSON: "evaluation",  # offsets and class shares of the evaluator's own held-out rows
    },
    HE: {
        HE_SIGNATURE: "public",
        HE_ENCRYPT_SECONDS: "public",
        HE_VERIFY_SECONDS: "public",
        HE_DECRYPT_SECONDS: "public",
    },
    FAIRNESS_COUNTS: {
        COUNTS_JSON: "dp",
        COUNT_SIGMA: "accounting",
        COUNT_THRESHOLD: "accounting",
        COUNT_SELECTION_DELTA: "accounting",
    },
    MITIGATION_COUNTS: {
        COUNTS_JSON: "dp",
        COUNT_SIGMA: "accounting",
        COUNT_THRESHOLD: "accounting",
        COUNT_SELECTION_DELTA: "accounting",
    },
}


class BlockedReplyError(Exception):
    """A reply carried a record or key outside the allow-list; nothing is sent."""


def check_reply_keys(records: dict[str, list[str]]) -> None:
    """Raise if any record name or key is not allow-listed. ``records``: name → its keys."""
    for name, keys in records.items():
        allowed = REPLY_ALLOWLIST.get(name)
        if allowed is None:
            raise BlockedReplyError(f"record {name!r} is not on the reply allow-list")
        if "*" in allowed:
            continue
        extra = sorted(set(keys) - set(allowed))
        if extra:
            raise BlockedReplyError(f"record {name!r} carries keys not on the allow-list: {extra}")


def key_class(record: str, key: str) -> PrivacyClass | None:
    allowed = REPLY_ALLOWLIST.get(record, {})
    return allowed.get(key, allowed.get("*"))
