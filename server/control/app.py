"""The control service's ASGI app: routers, security headers, and the one handler that turns errors into responses.

``create_app`` mounts ``/health``, the JSON API (``server.control.routers``: one router per
resource; OpenAPI at ``/openapi.json``, token required), the dashboard (``routers.dashboard``) and
its stylesheet. The service layer raises the domain errors of ``server.control.errors`` (and the
run store's ``StoreError``); :func:`error_response` maps every one of them, through
``errors.HTTP_STATUS``, to JSON ``{"detail": ...}`` for the API or to a page for the dashboard (a
browser without a session goes to the log-in page).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from common.errors import FedGuardError
from server.control import pages
from server.control.errors import NotAuthenticated, RateLimited, http_status, public_detail
from server.control.routers import audit, dashboard, nodes, runs, users
from server.control.service import ControlService
from server.control.users import ROLES

#: Security headers on every response: no framing, no sniffing, nothing loaded from elsewhere, no inline styles.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

_TITLES = {401: "Log in again", 403: "Not allowed", 404: "Not found", 409: "Not possible now", 429: "Too many tries"}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api") or request.url.path == "/openapi.json"


def error_response(request: Request, exc: FedGuardError) -> Response:
    """The one mapping from a domain error to a response, for the API and the dashboard alike."""
    status = http_status(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, NotAuthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if _is_api(request):
        return JSONResponse({"detail": public_detail(exc)}, status_code=status, headers=headers)
    if isinstance(exc, NotAuthenticated):
        return RedirectResponse("/login", status_code=303)
    who = getattr(request.state, "principal", None)  # set once authenticated: the page keeps its header
    title = _TITLES.get(status, "Request failed")
    text = pages.render_page("message", who, title=title, message=public_detail(exc))
    return HTMLResponse(text, status_code=status, headers=headers)


def create_app(service: ControlService) -> FastAPI:
    """The ASGI app: ``/health``, the JSON API (OpenAPI at ``/openapi.json``, token required), the dashboard."""
    app = FastAPI(
        title="FedGuard control service",
        version="1",
        description="Operator API and reviewer dashboard of a FedGuard federation. Roles: "
        + " < ".join(ROLES)
        + ". Send `Authorization: Bearer fg_<id>_<secret>` (from `fedguard user add`).",
        docs_url=None,  # the Swagger/ReDoc pages load scripts from a CDN: nothing here loads from the network
        redoc_url=None,
        openapi_url=None,  # served by the API router, behind authentication
    )
    app.state.control = service

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(FedGuardError)
    async def domain_error(request: Request, exc: FedGuardError) -> Response:
        return error_response(request, exc)

    @app.get("/health", tags=["health"], summary="liveness (no authentication)")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(pages.CSS_PATH, include_in_schema=False)
    def stylesheet() -> Response:
        return Response(pages.stylesheet(), media_type="text/css")

    for router in (runs.router, nodes.router, users.router, audit.router, audit.openapi_router, dashboard.router):
        app.include_router(router)
    return app
