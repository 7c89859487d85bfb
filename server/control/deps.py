"""Authentication and roles as FastAPI dependencies, shared by the JSON API and the dashboard.

``Depends(require_role("operator", "run.start"))`` admits operators and admins; anyone else gets
the domain error ``Forbidden`` (audited under ``run.start`` when an action is named: a denied
attempt to change something or export a report is part of the record). A state-changing request
from a browser session must also carry its CSRF token: in the ``X-CSRF-Token`` header for the API
(``csrf="header"``), in the form field ``csrf_token`` for dashboard forms (``csrf="form"``). The
role is checked first, so a reviewer's forged POST is recorded as a denial, not as a CSRF miss.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

from fastapi import Depends, Request

from server.control.auth import CSRF_HEADER, Principal, authenticate, check_csrf
from server.control.service import ControlService

_SAFE = ("GET", "HEAD", "OPTIONS")


def get_service(request: Request) -> ControlService:
    """The app's one :class:`ControlService` (``app.state.control``)."""
    return request.app.state.control  # type: ignore[no-any-return]


Svc = Annotated[ControlService, Depends(get_service)]


def current_principal(request: Request, svc: Svc) -> Principal:
    """Any authenticated user (NotAuthenticated otherwise); kept on ``request.state`` for error pages."""
    p = authenticate(request, svc.users, svc.sessions, svc.bearer_limit)
    request.state.principal = p
    return p


Authenticated = Annotated[Principal, Depends(current_principal)]


def require_role(
    role: str, action: str | None = None, *, csrf: Literal["header", "form"] = "header"
) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting ``role`` and above; ``action`` names the audit entry a denial writes."""

    def allowed(request: Request, p: Authenticated, svc: Svc) -> Principal:
        return svc.authorize(p, role, action, request.url.path)

    # a default, not Annotated[...]: the closure's own ``allowed`` is not a module global FastAPI could resolve
    async def dep(request: Request, p: Principal = Depends(allowed)) -> Principal:  # noqa: B008
        if request.method not in _SAFE:
            if csrf == "header":
                supplied = request.headers.get(CSRF_HEADER)
            else:
                value = (await request.form()).get("csrf_token")  # parsed once per request, cached by Starlette
                supplied = value if isinstance(value, str) else None
            check_csrf(p, supplied)
        return p

    return dep


Reviewer = Annotated[Principal, Depends(require_role("reviewer"))]
Operator = Annotated[Principal, Depends(require_role("operator"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
