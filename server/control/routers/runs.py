"""``/api/runs``: read runs, their rounds and reports (reviewer); plan, start and stop runs (operator).

Report downloads are audited and embed the audit chain head; starting, planning and stopping are
audited whether allowed or denied (a denial under the action's name, by ``require_role``). A signed
run token starts one run: a replayed one is a 409 (the service records each token's request id).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from server.control import views
from server.control.auth import Principal
from server.control.deps import Reviewer, Svc, require_role
from server.control.params import RunId
from server.control.service import ControlService

AsRunStart = Annotated[Principal, Depends(require_role("operator", "run.start"))]
AsRunPlan = Annotated[Principal, Depends(require_role("operator", "run.plan"))]
AsRunStop = Annotated[Principal, Depends(require_role("operator", "run.stop"))]


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_toml: str = Field(max_length=256_000, description="the run config (TOML text)")
    signature: str | None = Field(
        None, max_length=8_000, description="token from `fedguard run sign`; omit if the service holds the signing key"
    )


class PlanRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config_toml: str = Field(max_length=256_000)


router = APIRouter(prefix="/api/runs", tags=["runs"])


@router.get("", summary="all runs, newest first (reviewer)")
def list_runs(p: Reviewer, svc: Svc) -> list[dict[str, Any]]:
    return views.list_runs(svc.store_path)


@router.get("/{run_id}", summary="one run (reviewer)")
def get_run(run_id: RunId, p: Reviewer, svc: Svc) -> dict[str, Any]:
    return views.run_detail(svc.store_path, run_id)


@router.get("/{run_id}/rounds", summary="per-round metrics, ε per node, fairness, participation, time, bytes")
def get_rounds(run_id: RunId, p: Reviewer, svc: Svc) -> dict[str, Any]:
    return views.run_rounds(svc.store_path, run_id)


def _report(svc: ControlService, p: Principal, kind: str, run_id: int, fmt: str, download: bool) -> Response:
    text, media = svc.report(p, kind, run_id, fmt)
    headers = {}
    if download or fmt == "html":
        headers["Content-Disposition"] = f'attachment; filename="{kind}-report-run-{run_id}.{fmt}"'
    return Response(text, media_type=media, headers=headers)


Fmt = Annotated[Literal["json", "html"], Query(description="json (default) or html")]
Download = Annotated[bool, Query(description="send as a file download (always for html)")]


@router.get("/{run_id}/privacy", summary="the privacy report (reviewer; audited; embeds the audit chain head)")
def privacy(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "privacy", run_id, format, download)


@router.get("/{run_id}/fairness", summary="the fairness report (reviewer; audited; embeds the audit chain head)")
def fairness(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "fairness", run_id, format, download)


@router.get(
    "/{run_id}/cost",
    summary="the cost report: time, bytes, energy and emissions per round and node, cost per accuracy point "
    "(reviewer; audited; embeds the audit chain head)",
)
def cost(run_id: RunId, p: Reviewer, svc: Svc, format: Fmt = "json", download: Download = False) -> Response:
    return _report(svc, p, "cost", run_id, format, download)


@router.post(
    "",
    status_code=201,
    summary="start a run (operator): signed by the admin's token (each token starts one run; a replay is 409), "
    "or by the service's run-signing key",
)
def start_run(body: StartRun, p: AsRunStart, svc: Svc) -> Any:
    return svc.start_run(p, body.config_toml, body.signature)


@router.post("/plan", summary="validate a run config and show its privacy plan (operator)")
def plan_run(body: PlanRun, p: AsRunPlan, svc: Svc) -> Any:
    return svc.plan_run(p, body.config_toml)


@router.post("/{run_id}/stop", summary="stop a running deployed run (operator)")
def stop_run(run_id: RunId, p: AsRunStop, svc: Svc) -> Any:
    return svc.stop_run(p, run_id)
