"""``/api/audit`` (admin), ``/api/me`` (any role) and the OpenAPI description (any role, never anonymous)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.control.deps import Admin, Authenticated, Svc

router = APIRouter(prefix="/api", tags=["audit"])


@router.get("/audit", summary="the audit log, newest first, and whether its chain verifies (admin)")
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


@router.get("/me", summary="who this token belongs to (any role)")
def me(p: Authenticated) -> dict[str, Any]:
    return {"name": p.user.name, "role": p.user.role, "via": p.via}


openapi_router = APIRouter()


@openapi_router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, p: Authenticated) -> JSONResponse:
    return JSONResponse(request.app.openapi())
