"""The JSON API, one router per resource; authentication and roles are FastAPI dependencies.

Roles (each includes the previous): reviewer reads runs and reports; operator also starts,
stops and plans runs and lists nodes; admin also manages users, revokes nodes and reads the
audit log. No token: 401. A role lacking permission: 403 (audited when the action would have
changed something or exported a report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from common.errors import StoreError
from server.control import views
from server.control.auth import CSRF_HEADER, Principal, authenticate, check_csrf, has_role
from server.control.service import ControlService, http_error, user_dict

RunId = Annotated[int, PathParam(ge=1, le=2**53, description="FedGuard run id (runs.run_id in the run store)")]
Name = Annotated[str, PathParam(min_length=1, max_length=64)]


def get_service(request: Request) -> ControlService:
    return request.app.state.control  # type: ignore[no-any-return]


def current(request: Request, svc: Annotated[ControlService, Depends(get_service)]) -> Principal:
    """Any authenticated user (401 otherwise)."""
    return authenticate(request, svc.users, svc.sessions, svc.bearer_limit)


def need(role: str, action: str | None = None) -> Callable[..., Principal]:
    """A dependency admitting ``role`` and above; ``action`` names the audit entry a denial writes."""

    def dep(
        request: Request,
        p: Annotated[Principal, Depends(current)],
        svc: Annotated[ControlService, Depends(get_service)],
    ) -> Principal:
        if not has_role(p, role):
            if action:
                svc.record(p, action, request.url.path, f"denied: needs {role}")
            raise HTTPException(403, f"the {p.user.role} role may not do this: it needs {role} or above")
        if request.method not in ("GET", "HEAD"):
            check_csrf(p, request.headers.get(CSRF_HEADER))
        return p

    return dep


Svc = Annotated[ControlService, Depends(get_service)]
Reviewer = Annotated[Principal, Depends(need("reviewer"))]
Operator = Annotated[Principal, Depends(need("operator"))]
Admin = Annotated[Principal, Depends(need("admin"))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartRun(_Body):
    config_toml: str = Field(max_length=256_000, description="the run config (TOML text)")
    signature: str | None = Field(
        None, max_length=8_000, description="token from `fedguard run sign`; omit if the service holds the signing key"
    )


class PlanRun(_Body):
    config_toml: str = Field(max_length=256_000)


class AddUser(_Body):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["reviewer", "operator", "admin"]


def _store_404(exc: StoreError) -> HTTPException:
    return http_error(exc, 404)


# -- runs ------------------------------------------------------------------------------------------------------------
runs = APIRouter(prefix="/api/runs", tags=["runs"])


@runs.get("", summary="all runs, newest first (reviewer)")
def list_runs(p: Reviewer, svc: Svc) -> list[dict[str, Any]]:
    return views.list_runs(svc.store_path)


@runs.get("/{run_id}", summary="one run (reviewer)")
def get_run(run_id: RunId, p: Reviewer, svc: Svc) -> dict[str, Any]:
    try:
        return views.run_detail(svc.store_path, run_id)
    except StoreError as exc:
        raise _store_404(exc) from None


@runs.get("/{run_id}/rounds", summary="per-round metrics, ε per node, fairness, participation, time, bytes")
def get_rounds(run_id: RunId, p: Reviewer, svc: Svc) -> dict[str, Any]:
    try:
        return views.run_rounds(svc.store_path, run_id)
    except StoreError as exc:
        raise _store_404(exc) from None


def _report(svc: ControlService, p: Principal, kind: str, run_id: int, fmt: str, download: bool) -> Response:
    text, media = svc.report(p, kind, run_id, fmt)
    headers = {}
    if download or fmt == "html":
        headers["Content-Disposition"] = f'attachment; filename="{kind}-report-run-{run_id}.{fmt}"'
    return Response(text, media_type=media, headers=headers)


Fmt = Annotated[Literal["json", "html"], Query(description="json (default) or html")]
Download = Annotated[bool, Query(description="send as a file download (always for html)")]


@runs.get("/{run_id}/privacy", summary="the privacy report (reviewer; audited; embeds the audit chain head)")
def privacy(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "privacy", run_id, format, download)


@runs.get("/{run_id}/fairness", summary="the fairness report (reviewer; audited; embeds the audit chain head)")
def fairness(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "fairness", run_id, format, download)


@runs.get(
    "/{run_id}/cost",
    summary="the cost report: time, bytes, energy and emissions per round and node, cost per accuracy point "
    "(reviewer; audited; embeds the audit chain head)",
)
def cost(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "cost", run_id, format, download)


@runs.post(
    "",
    status_code=201,
    summary="start a run (operator): signed by the admin's token, or by the service's run-signing key",
    dependencies=[],
)
def start_run(body: StartRun, p: Annotated[Principal, Depends(need("operator", "run.start"))], svc: Svc) -> Any:
    return svc.start_run(p, body.config_toml, body.signature)


@runs.post("/plan", summary="validate a run config and show its privacy plan (operator)")
def plan_run(body: PlanRun, p: Annotated[Principal, Depends(need("operator", "run.plan"))], svc: Svc) -> Any:
    return svc.plan_run(p, body.config_toml)


@runs.post("/{run_id}/stop", summary="stop a running deployed run (operator)")
def stop_run(run_id: RunId, p: Annotated[Principal, Depends(need("operator", "run.stop"))], svc: Svc) -> Any:
    return svc.stop_run(p, run_id)


# -- nodes -----------------------------------------------------------------------------------------------------------
nodes = APIRouter(prefix="/api/nodes", tags=["nodes"])


@nodes.get("", summary="enrolled nodes and whether they are online (operator)")
def list_nodes(p: Operator, svc: Svc) -> list[dict[str, Any]]:
    return svc.nodes()


@nodes.post("/{name}/revoke", summary="unregister a node: it can no longer join (admin)")
def revoke_node(name: Name, p: Annotated[Principal, Depends(need("admin", "node.revoke"))], svc: Svc) -> Any:
    return svc.revoke_node(p, name)


# -- users -----------------------------------------------------------------------------------------------------------
users = APIRouter(prefix="/api/users", tags=["users"])


@users.get("", summary="every user, active and revoked (admin)")
def list_users(p: Admin, svc: Svc) -> list[dict[str, Any]]:
    return [user_dict(u) for u in svc.users.list()]


@users.post("", status_code=201, summary="add a user; the token is in this response only (admin)")
def add_user(body: AddUser, p: Annotated[Principal, Depends(need("admin", "user.add"))], svc: Svc) -> Any:
    user, token = svc.add_user(p, body.name, body.role)
    return {**user_dict(user), "token": token}


@users.post("/{name}/revoke", summary="revoke a user's token at once (admin)")
def revoke_user(name: Name, p: Annotated[Principal, Depends(need("admin", "user.revoke"))], svc: Svc) -> Any:
    return user_dict(svc.revoke_user(p, name))


# -- audit and self --------------------------------------------------------------------------------------------------
audit = APIRouter(prefix="/api", tags=["audit"])


@audit.get("/audit", summary="the audit log, newest first, and whether its chain verifies (admin)")
def read_audit(
    p: Admin,
    svc: Svc,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> dict[str, Any]:
    check = svc.audit.verify()
    return {
        "verified": check.ok,
        "entries_total": check.entries,
        "head": check.head,
        "problem": check.problem,
        "entries": [e.__dict__ for e in svc.audit.entries(limit=limit, offset=offset)],
    }


@audit.get("/me", summary="who this token belongs to (any role)")
def me(p: Annotated[Principal, Depends(current)]) -> dict[str, Any]:
    return {"name": p.user.name, "role": p.user.role, "via": p.via}


router = APIRouter()
for r in (runs, nodes, users, audit):
    router.include_router(r)

openapi_router = APIRouter()


@openapi_router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, p: Annotated[Principal, Depends(current)]) -> JSONResponse:
    return JSONResponse(request.app.openapi())
