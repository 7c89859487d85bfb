"""The control service's domain errors: what went wrong, in the service's own words, never in HTTP.

The service layer (``service``, ``users``, ``auth``, ``federation``) raises these; one exception
handler in ``server.control.app`` turns each into a response (JSON for the API, a page for the
dashboard) through :data:`HTTP_STATUS`, so a status code is decided in exactly one place and the
CLI can catch the same errors without knowing about HTTP.
"""

from __future__ import annotations

from pathlib import PurePath

from common.errors import ConfigError, FedGuardError, StoreError


class ControlError(FedGuardError):
    """A control-service request (user, role, token, audit log) cannot be carried out as asked."""

    code = "control-error"


class NotAuthenticated(ControlError):
    """No credentials, or credentials that no longer (or never did) belong to an active user."""

    code = "not-authenticated"

    def __init__(self, what: str = "authentication required: send `Authorization: Bearer <token>`") -> None:
        super().__init__(what)


class Forbidden(ControlError):
    """The user is known but may not do this (role too low, or a missing CSRF token)."""

    code = "forbidden"


class NotFound(ControlError):
    """The run, user or node asked for does not exist."""

    code = "not-found"


class Conflict(ControlError):
    """The request is valid but clashes with the current state (a finished run, an existing user)."""

    code = "conflict"


class Invalid(ControlError):
    """The submitted input is malformed (TOML, run config, signature, user name, role)."""

    code = "invalid-request"


class RateLimited(ControlError):
    """Too many failures from this address or for this user; ``retry_after`` seconds until the next try."""

    code = "rate-limited"

    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(what)
        self.retry_after = retry_after


class FederationFailed(ControlError):
    """The SuperLink (through FedGuard's wrappers) failed to carry out a valid request."""

    code = "federation-failed"


class Unavailable(ControlError):
    """The service has no federation attached (it serves only the run store)."""

    code = "unavailable"


class ReportFailed(ControlError):
    """A run exists but its records cannot make the report asked for."""

    code = "report-failed"


#: Domain error → HTTP status; the most specific class in an error's MRO wins (see :func:`http_status`).
HTTP_STATUS: dict[type[FedGuardError], int] = {
    NotAuthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    StoreError: 404,  # the run store's "no run N"
    Conflict: 409,
    ReportFailed: 409,
    Invalid: 422,
    ConfigError: 422,
    RateLimited: 429,
    FederationFailed: 502,
    Unavailable: 503,
}


def http_status(exc: FedGuardError) -> int:
    """The status code for ``exc``: its nearest class in :data:`HTTP_STATUS`, else 422 (a user's mistake)."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 422


def public_detail(exc: FedGuardError) -> str:
    """The message a client sees: server file paths (an absolute ``where``) stay in the server's own logs."""
    if exc.where and PurePath(exc.where).is_absolute():
        return exc.what + (f"\nFix: {exc.fix}" if exc.fix else "")
    return exc.render()
