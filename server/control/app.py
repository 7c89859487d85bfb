"""The control service's ASGI app: routers, security headers, and the one handler that turns errors into responses.

``create_app`` mounts ``/health``, the JSON API (``server.control.routers``: one router per
resource; OpenAPI at ``/openapi.json``, token required), the dashboard (``routers.dashboard``) and
its stylesheet. The service layer raises the domain errors of ``server.control.errors`` (and the
run store's ``StoreError``); :func:`error_response` maps every one of them, through
``errors.HTTP_STATUS``, to JSON ``{"detail": ...}`` for the API or to a page for the dashboard (a
browser without a session goes to the log-in page).

Hostile bodies never reach a parser whole: :class:`BodyLimit` counts the bytes of every request
body as they arrive (a lying or missing ``Content-Length`` does not help) and answers 413 past
``max_body_bytes`` (1 MB by default); a body nested too deeply for the JSON parser is a 400 that
says so, never a 500.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import FedGuardError
from server.control import pages
from server.control.errors import ControlError, NotAuthenticated, RateLimited, http_status, public_detail
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

DEFAULT_MAX_BODY = 1_000_000
"""Bytes a request body may have: a run config is a few kB, a signature token under 1 kB."""
MAX_BODY_ENV = "FEDGUARD_CONTROL_MAX_BODY"


def max_body_from_env() -> int:
    """``$FEDGUARD_CONTROL_MAX_BODY`` (bytes) if set, else :data:`DEFAULT_MAX_BODY`."""
    text = os.environ.get(MAX_BODY_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BODY
    if not text.isdigit() or not 1_000 <= int(text) <= 100_000_000:
        raise ControlError(
            f"{MAX_BODY_ENV}={text!r} is not a body size in bytes",
            where=MAX_BODY_ENV,
            fix="give a whole number of bytes between 1000 and 100000000, or unset it for the 1 MB default",
        )
    return int(text)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, counted as it streams in, before anything parses it.

    Past the limit the app is told the client went away (so it stops reading), whatever it answers is dropped,
    and the client gets the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send, status: int = 413, detail: str | None = None) -> None:
        detail = detail or f"request body larger than {self.max_bytes} bytes"
        body = JSONResponse({"detail": detail}, status_code=status)
        for k, v in SECURITY_HEADERS.items():
            body.headers.setdefault(k, v)
        await send({"type": "http.response.start", "status": status, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":  # a declared size over the limit is refused unread
                if not value.strip().isdigit():
                    await self._reject(send, 400, "malformed Content-Length header")
                    return
                if int(value) > self.max_bytes:
                    await self._reject(send)
                    return
        seen = 0
        over = started = False

        async def counted() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if over and not started:  # the app's answer to a body it never got whole
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not over:  # a real fault: the server error handler reports it
                raise
            # else: whoever read past the limit failed on the "disconnect"; the client gets the 413 below
        if over and not started:
            await self._reject(send)


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


def create_app(service: ControlService, *, max_body_bytes: int | None = None) -> FastAPI:
    """The ASGI app: ``/health``, the JSON API (OpenAPI at ``/openapi.json``, token required), the dashboard.

    ``max_body_bytes`` caps every request body (413 beyond it, counted before parsing); default
    ``$FEDGUARD_CONTROL_MAX_BODY`` or 1 MB.
    """
    limit = max_body_bytes if max_body_bytes is not None else max_body_from_env()
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

    @app.exception_handler(400)
    async def bad_request(request: Request, exc: Any) -> Response:
        detail = exc.detail
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's JSON body parsing ran out of stack
            detail = "request body is nested too deeply to parse"
        return JSONResponse({"detail": detail}, status_code=400, headers=getattr(exc, "headers", None))

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> Response:  # a deep value reached validation
        return JSONResponse({"detail": "request is nested too deeply to process"}, status_code=400)

    @app.get("/health", tags=["health"], summary="liveness (no authentication)")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(pages.CSS_PATH, include_in_schema=False)
    def stylesheet() -> Response:
        return Response(pages.stylesheet(), media_type="text/css")

    for router in (runs.router, nodes.router, users.router, audit.router, audit.openapi_router, dashboard.router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=limit)  # outermost of ours: before any body is read
    return app
