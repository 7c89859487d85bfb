"""Record key names shared by the ServerApp and the ClientApp, and the reply allow-list.

Every key a node may put in a reply is listed here with its privacy class (DESIGN §4):
``dp`` values are outputs of a mechanism charged to the node's budget, ``public`` values the
owner declares, ``accounting`` values describe the DP mechanism itself. Anything else is
blocked on the node before it is sent.
"""

from __future__ import annotations

from typing import Literal

# Record names inside a RecordDict.
ARRAYS = "arrays"  # global model (server → node) or DP-SGD result (node → server)
CONFIG = "config"  # train instructions (server → node)
METRICS = "metrics"  # per-reply values (node → server)
REFUSAL = "refusal"  # explicit refusal or failure, with a code and a node-local log id

# Keys of the CONFIG record.
ROUND = "round"
RUN_CONFIG = "run-config"  # the validated RunConfig as JSON (never holds secrets)
RUN_ID = "fedguard-run-id"
SIM_DATA_DIR = "sim-data-dir"  # simulation only: folder of per-partition data files

# Keys of the METRICS record.
NUM_EXAMPLES = "num-examples"  # declared public size, the FedAvg weight (Flower's key name)
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
MAX_GRAD_NORM = "max-grad-norm"

# Keys of the REFUSAL record.
REFUSAL_CODE = "code"
REFUSAL_LOG_ID = "log-id"

PrivacyClass = Literal["dp", "public", "accounting"]

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
    },
    REFUSAL: {REFUSAL_CODE: "public", REFUSAL_LOG_ID: "public"},
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
