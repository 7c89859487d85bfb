"""The data owner's node policy (``policy.toml``): which runs this node takes part in.

The run config comes from the server; the policy comes from the owner and never leaves the node.
A run that breaks the policy is refused before any data is read (docs/privacy.md: what may leave a node).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.config import RunConfig
from common.errors import FedGuardError

if TYPE_CHECKING:
    from common.privacy import DPPlan

Purpose = Literal["train", "evaluate", "plan", "fairness-counts"]


class PolicyError(FedGuardError):
    """The node policy file is malformed."""

    code = "policy-invalid"


class NodePolicy(BaseModel):
    """What a data owner allows runs to do with this node's data. Strict types: ``"yes"`` is not ``true``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: Built-in model names this node trains; None = any. Limits what architecture sees the records.
    allowed_models: list[str] | None = None
    #: Refuse runs with ``dp.enabled = false``: without DP-SGD an update can reveal individual records.
    require_dp: bool = True
    #: Refuse a run whose planned σ for this node is lower: the owner's floor on per-step noise.
    min_noise_multiplier: float | None = Field(None, gt=0)
    #: Refuse a run whose planned ε on this node's records is higher: caps what one run may spend.
    max_epsilon_per_run: float | None = Field(None, gt=0)
    #: Most rounds per run: every round is another release of an update.
    max_rounds: int | None = Field(100, ge=1)
    #: Most local epochs per round: bounds compute and the steps each release composes.
    max_local_epochs: int | None = Field(10, ge=1)
    #: Refuse runs whose ``secure_aggregation`` is not ``homomorphic``: the server then sees no single update.
    require_homomorphic: bool = False
    #: Values beyond DP-protected, declared-public and accounting ones that may leave (none by default).
    allow_values: list[Literal["evaluation-metrics", "resource-figures"]] = Field(default_factory=list)
    #: Sensitive columns this node lets be used for (noisy) federated fairness counts; [] = none.
    fairness_columns: list[str] = Field(default_factory=list)
    #: No group count below this ever leaves the node: small groups identify people.
    min_group_size: int = Field(20, ge=1)
    #: SHA-256 certificate fingerprints of servers this node talks to; [] = any federation-CA server.
    allowed_servers: list[str] = Field(default_factory=list)

    @field_validator("allowed_models")
    @classmethod
    def _known_models(cls, names: list[str] | None) -> list[str] | None:
        from common.models import MODELS  # lazy: importing the models imports torch

        unknown = [n for n in names or [] if n not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; built-in models: {', '.join(sorted(MODELS))}")
        return names

    @field_validator("allowed_servers")
    @classmethod
    def _fingerprints(cls, values: list[str]) -> list[str]:
        out = []
        for v in values:
            hexdigits = re.sub(r"[\s:]", "", v).upper()
            if not re.fullmatch(r"[0-9A-F]{64}", hexdigits):
                raise ValueError(f"{v!r} is not a SHA-256 fingerprint (64 hex digits, colons optional)")
            out.append(":".join(hexdigits[i : i + 2] for i in range(0, 64, 2)))  # as kit.fingerprint_cert
        return list(dict.fromkeys(out))

    @classmethod
    def default_for(cls, role: str) -> NodePolicy:
        """The policy of a node whose owner wrote none: an evaluator exists to send held-out metrics."""
        if role == "client":
            return cls()
        if role == "evaluator":
            return cls(allow_values=["evaluation-metrics"])
        raise ValueError(f"unknown node role {role!r}: expected 'client' or 'evaluator'")


def sends_resource_figures(policy: NodePolicy | None) -> bool:
    """Whether coarsened resource figures (time, memory, examples, energy) may leave with a training reply.

    They track the dataset's size, so a node's policy must allow ``"resource-figures"``; the built-in
    default does not. Without a policy (simulation: every node in one trust domain) they are sent.
    """
    return policy is None or "resource-figures" in policy.allow_values


def load_policy(path: str | Path) -> NodePolicy:
    """Read and validate a ``policy.toml``; every problem is a ``PolicyError`` naming the file and field."""
    p = Path(path)
    fix = "see 'node policy' in docs/privacy.md (`fedguard client inspect` prints an example)"
    if not p.is_file():
        raise PolicyError("policy file not found", where=str(p), fix="pass the path of an existing policy.toml")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the policy file as UTF-8 text: {exc}", where=str(p)) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}", where=str(p), fix=fix) from None
    try:
        return NodePolicy.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown field; the policy fields are: {', '.join(NodePolicy.model_fields)}"
            lines.append(f"{field}: {msg}")
        raise PolicyError("invalid node policy:\n" + "\n".join(lines), where=str(p), fix=fix) from None


@dataclass(frozen=True)
class Violation:
    """Why a run is refused: the policy field broken, and what the run asked vs what the policy allows."""

    rule: str
    message: str


def _refuse(rule: str, asks: str, allows: str) -> Violation:
    return Violation(rule, f"{asks}; this node's policy {allows} ({rule})")


def check_run(
    policy: NodePolicy,
    cfg: RunConfig,
    *,
    purpose: Purpose,
    plan: DPPlan | None = None,
    epsilon_run: float | None = None,
    sensitive_columns: Sequence[str] = (),
) -> Violation | None:
    """The first rule ``cfg`` breaks for ``purpose``, in a fixed order, or None.

    σ and ε rules are checked only when ``plan`` / ``epsilon_run`` are given (the node computes them from
    its own size), except that a run without DP always breaks them (σ = 0, ε unbounded). For
    ``fairness-counts``, ``sensitive_columns`` defaults to the schema's sensitive columns.
    """
    if purpose == "evaluate":
        if "evaluation-metrics" in policy.allow_values:
            return None
        return _refuse("allow_values", "evaluation sends held-out metrics", 'does not let "evaluation-metrics" leave')
    if purpose == "fairness-counts":
        refused = [c for c in list(sensitive_columns) or cfg.data.schema_.sensitive if c not in policy.fairness_columns]
        if not refused:
            return None
        allowed = ", ".join(policy.fairness_columns) or "none"
        return _refuse(
            "fairness_columns", f"the run asks for group counts over {', '.join(refused)}", f"allows only: {allowed}"
        )
    if purpose not in ("train", "plan"):
        raise ValueError(f"unknown purpose {purpose!r}")  # fail closed: a typo must not mean "allowed"

    if policy.allowed_models is not None and cfg.model.name not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models) or "none"
        return _refuse("allowed_models", f"the run asks for model {cfg.model.name!r}", f"allows only: {allowed}")
    if policy.require_dp and not cfg.dp.enabled:
        return _refuse("require_dp", "the run has dp.enabled = false", "requires DP-SGD")
    if policy.require_homomorphic and cfg.secure_aggregation != "homomorphic":
        asks = f"the run uses secure_aggregation = {cfg.secure_aggregation!r}"
        return _refuse("require_homomorphic", asks, "requires 'homomorphic'")
    if policy.max_rounds is not None and cfg.rounds > policy.max_rounds:
        return _refuse("max_rounds", f"the run asks for {cfg.rounds} rounds", f"allows at most {policy.max_rounds}")
    epochs, max_epochs = cfg.train.local_epochs, policy.max_local_epochs
    if max_epochs is not None and epochs > max_epochs:
        return _refuse(
            "max_local_epochs", f"the run asks for {epochs} local epochs per round", f"allows at most {max_epochs}"
        )
    floor = policy.min_noise_multiplier
    sigma = 0.0 if not cfg.dp.enabled else plan.noise_multiplier if plan is not None else None
    if floor is not None and sigma is not None and sigma < floor:
        asks = f"the run's noise multiplier on this node is σ = {sigma:.3f}"
        return _refuse("min_noise_multiplier", asks, f"requires at least {floor:g}")
    cap = policy.max_epsilon_per_run
    eps = float("inf") if not cfg.dp.enabled else epsilon_run
    if cap is not None and eps is not None and eps > cap:
        return _refuse(
            "max_epsilon_per_run",
            f"the run would spend ε = {eps:.3g} on this node's records",
            f"allows at most {cap:g} per run",
        )
    return None


def describe(policy: NodePolicy) -> list[str]:
    """One line per rule, for ``fedguard client inspect``."""

    def opt(v: object, unset: str = "no limit") -> str:
        return unset if v is None else str(v)

    models = policy.allowed_models
    return [
        "models allowed: " + ("any built-in model" if models is None else ", ".join(models) or "none"),
        f"DP-SGD required: {'yes' if policy.require_dp else 'no'}",
        f"homomorphic secure aggregation required: {'yes' if policy.require_homomorphic else 'no'}",
        f"max rounds per run: {opt(policy.max_rounds)}",
        f"max local epochs per round: {opt(policy.max_local_epochs)}",
        f"min noise multiplier (σ): {opt(policy.min_noise_multiplier, 'none')}",
        f"max ε per run: {opt(policy.max_epsilon_per_run)}",
        "values allowed to leave beyond DP-protected ones: " + (", ".join(policy.allow_values) or "none"),
        "sensitive columns allowed for fairness counts: " + (", ".join(policy.fairness_columns) or "none"),
        f"smallest group count that may leave: {policy.min_group_size}",
        "servers allowed: " + (", ".join(policy.allowed_servers) or "any server with a federation-CA certificate"),
    ]


DEFAULT_POLICY_TOML = """\
# FedGuard node policy: what runs this node takes part in. Stays on this node.
# These values are the defaults; a field left out takes its default.

# Built-in models this node trains; leave out to allow any.
# allowed_models = ["ft-transformer"]

# Refuse runs without DP-SGD.
require_dp = true

# Refuse runs whose planned noise multiplier (sigma) on this node is below this.
# min_noise_multiplier = 0.8

# Refuse runs whose planned epsilon on this node's records is above this.
# max_epsilon_per_run = 8.0

# Most rounds per run and local epochs per round (TOML has no "none": use a large number for no limit).
max_rounds = 100
max_local_epochs = 10

# Refuse runs that do not use homomorphic secure aggregation.
require_homomorphic = false

# Non-private values that may leave: "evaluation-metrics", "resource-figures" (a training round's time,
# memory, examples processed and energy, rounded up to 2 significant digits; exact figures stay in the
# node's resources.jsonl).
allow_values = []

# Sensitive columns that (noisy) federated fairness counts may use.
fairness_columns = []

# No group count below this ever leaves the node.
min_group_size = 20

# SHA-256 fingerprints of the servers this node talks to; [] = any server with a federation-CA certificate.
allowed_servers = []
"""
