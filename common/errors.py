"""The FedGuard error family: every user mistake says what, where and how to fix it.

The CLI prints these without a stack trace; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FedGuardError(Exception):
    """A problem the user can fix. ``where`` names the file/field/row, ``fix`` the remedy."""

    code = "fedguard-error"

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.what if self.where is None else f"{self.where}: {self.what}"]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return "\n".join(parts)


class ConfigError(FedGuardError):
    """The run configuration (or a schema file) is invalid."""

    code = "config-invalid"


class DataError(FedGuardError):
    """A data file does not match its schema or cannot be read."""

    code = "data-invalid"


class ModelError(FedGuardError):
    """A model name or model parameter is unknown or unusable."""

    code = "model-invalid"


class PrivacyPlanError(FedGuardError):
    """The differential-privacy plan is infeasible for this node's data."""

    code = "privacy-plan-infeasible"


class BudgetExceeded(FedGuardError):
    """This release would take a dataset past its owner's budget: nothing is trained or sent (the node's
    ledger raises it; its code is the refusal the server reads)."""

    code = "budget-exhausted"


class StoreError(FedGuardError):
    """The run store cannot be opened or does not hold what was asked for."""

    code = "store-error"


def closest_name(name: str, names: Iterable[str]) -> str | None:
    """The name in ``names`` that a mistyped ``name`` most likely meant, for a "did you mean" (the same
    letters in another case first, then the closest spelling), or None."""
    candidates = list(names)
    same = [n for n in candidates if n.lower() == name.lower()]
    close = same or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else None
