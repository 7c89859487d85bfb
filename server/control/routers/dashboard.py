"""The dashboard: server-rendered pages (Jinja2 templates in ``templates/``, autoescaped), SVG charts, no scripts.

Pages read the same views as the API and post forms to the same ``ControlService`` actions, with
the same role dependencies (``server.control.deps``), so a button and an API call are allowed,
denied and audited alike. Every form carries the session's CSRF token (checked by the role
dependency); the login form a double-submit token bound to a short-lived pre-login cookie. Errors
the service raises become pages in the app's one exception handler; only forms that re-show
themselves with the problem named catch them here.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.errors import FedGuardError
from common.fairness.model_findings import SUMMARY_KEYS
from server.charts import line_chart
from server.control import pages, views
from server.control.auth import LOGIN_COOKIE, SESSION_COOKIE, Principal, check_login
from server.control.deps import Reviewer as Viewer
from server.control.deps import Svc, require_role
from server.control.errors import http_status, public_detail
from server.control.params import Name, RunId
from server.control.service import ControlService
from server.run_health import natural_key


def page(name: str, p: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
    return HTMLResponse(pages.render_page(name, p, **ctx), status_code=status)


def _secure_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict")


router = APIRouter(include_in_schema=False)

# Pages: GET needs only the role; forms: the role (audited under the action) and the form's CSRF token.
OperatorPage = Annotated[Principal, Depends(require_role("operator"))]
AdminPage = Annotated[Principal, Depends(require_role("admin"))]
SessionForm = Annotated[Principal, Depends(require_role("reviewer", csrf="form"))]
StartForm = Annotated[Principal, Depends(require_role("operator", "run.start", csrf="form"))]
StopForm = Annotated[Principal, Depends(require_role("operator", "run.stop", csrf="form"))]
NodeRevokeForm = Annotated[Principal, Depends(require_role("admin", "node.revoke", csrf="form"))]
UserAddForm = Annotated[Principal, Depends(require_role("admin", "user.add", csrf="form"))]
UserRevokeForm = Annotated[Principal, Depends(require_role("admin", "user.revoke", csrf="form"))]


# -- login / logout ----------------------------------------------------------------------------------------------
@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    csrf = secrets.token_urlsafe(32)
    response = page("login", None, csrf=csrf, error=None)
    _secure_cookie(response, LOGIN_COOKIE, csrf, max_age=900)
    return response


@router.post("/login")
def login(
    request: Request,
    svc: Svc,
    token: Annotated[str, Form(max_length=200)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie or not csrf_token or not hmac.compare_digest(cookie.encode(), csrf_token.encode()):
        return page("message", None, 403, title="Log-in refused", message="missing or wrong CSRF token: reload")
    token = token.strip()
    attempt = check_login(svc.login_limit, request, token, svc.users)
    wait, user = attempt.retry_after, attempt.user
    if wait:  # not audited: the failures that caused the block were, and a flood must not grow the log
        blocked = page("login", None, 429, csrf=cookie, error=f"Too many failed log-ins: try again in {wait}s.")
        blocked.headers["Retry-After"] = str(wait)
        return blocked
    if user is None:
        svc.record(None, "login", attempt.target, "denied: invalid or revoked token")
        return page("login", None, 401, csrf=cookie, error="Invalid or revoked token.")
    sid, _ = svc.sessions.create(token)
    svc.record(user, "login", "dashboard", "ok")
    response: Response = RedirectResponse("/", status_code=303)
    _secure_cookie(response, SESSION_COOKIE, sid)
    response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(p: SessionForm, svc: Svc) -> Response:
    if p.session_id:
        svc.sessions.drop(p.session_id)
    svc.record(p, "logout", "dashboard", "ok")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


# -- runs --------------------------------------------------------------------------------------------------------
@router.get("/")
def runs_page(p: Viewer, svc: Svc) -> HTMLResponse:
    return page("runs", p, runs=views.list_runs(svc.store_path))


def _run_charts(detail: dict[str, Any], rounds: list[dict[str, Any]], svc: ControlService) -> dict[str, str]:
    metrics: dict[str, list[tuple[int, float]]] = {}
    loss: dict[str, list[tuple[int, float]]] = {}
    eps: dict[str, list[tuple[int, float]]] = {}
    dp: dict[str, list[tuple[int, float]]] = {}
    eo: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for k, v in r["metrics"].items():
            # n, and what the model predicted (model findings' inputs), are not scores to chart
            if not isinstance(v, int | float) or k == "n" or k in SUMMARY_KEYS:
                continue
            if "loss" in k:
                loss.setdefault(k, []).append((r["round"], float(v)))
            elif 0.0 <= v <= 1.0:
                metrics.setdefault(k, []).append((r["round"], float(v)))
        for c in r["clients"]:
            if c["epsilon"] is not None:
                eps.setdefault(c.get("name") or f"node {c['node_id']}", []).append((r["round"], float(c["epsilon"])))
        for att, d in ((r["fairness"] or {}).get("disparities") or {}).items():
            if d.get("demographic_parity_difference") is not None:
                dp.setdefault(att, []).append((r["round"], float(d["demographic_parity_difference"])))
            if d.get("equalized_odds_difference") is not None:
                eo.setdefault(att, []).append((r["round"], float(d["equalized_odds_difference"])))
    config = detail.get("config") or {}
    target = config.get("target_epsilon")
    return {
        "metrics": line_chart("chart-metrics", "Held-out metrics per round", metrics, ylabel="score"),
        "loss": line_chart("chart-loss", "Loss per round", loss, ylabel="loss"),
        "epsilon": line_chart(
            "chart-epsilon", "ε spent per client (this run)", eps, ylabel="ε", y_min=0.0, threshold=target
        ),
        "dp": line_chart(
            "chart-fairness-dp",
            "Demographic parity difference",
            dp,
            ylabel="difference",
            y_min=0.0,
            threshold=config.get("dp_diff_max"),
        ),
        "eo": line_chart(
            "chart-fairness-eo",
            "Equalized odds difference",
            eo,
            ylabel="difference",
            y_min=0.0,
            threshold=config.get("eo_diff_max"),
        ),
    }


def _energy_chart(cost: dict[str, Any] | None) -> str:
    """Energy per round and its running total (round 0: setup), in Wh."""
    rounds = (cost or {}).get("rounds") or []
    series = {
        "cumulative Wh": [(r["round"], float(r["cumulative_energy_wh"])) for r in rounds],
        "Wh this round": [(r["round"], float(r["energy_wh"])) for r in rounds],
    }
    return line_chart("chart-energy", "Energy per round and cumulative", series, ylabel="Wh", y_min=0.0)


@router.get("/runs/new")
def start_form(p: OperatorPage, svc: Svc) -> HTMLResponse:
    return page("start", p, config_toml="", can_sign=svc.signing_key is not None, error=None, started=None)


@router.post("/runs/new")
def start_submit(
    p: StartForm,
    svc: Svc,
    config_toml: Annotated[str, Form(max_length=256_000)] = "",
    signature: Annotated[str, Form(max_length=8_000)] = "",
) -> HTMLResponse:
    can_sign = svc.signing_key is not None
    try:
        started = svc.start_run(p, config_toml, signature or None)
    except FedGuardError as exc:  # the form comes back with the problem named and the config kept
        error = public_detail(exc)
        return page("start", p, http_status(exc), config_toml=config_toml, can_sign=can_sign, error=error, started=None)
    return page("start", p, 201, config_toml="", can_sign=can_sign, error=None, started=started)


@router.get("/runs/{run_id}")
def run_page(run_id: RunId, p: Viewer, svc: Svc) -> HTMLResponse:
    detail = views.run_detail(svc.store_path, run_id)  # StoreError (no such run): the handler's 404 page
    rounds = views.run_rounds(svc.store_path, run_id)["rounds"]
    names = {c["node_id"]: c.get("name") or f"node {c['node_id']}" for r in rounds for c in r["clients"]}
    nodes = sorted(names, key=lambda n: (natural_key(names[n]), n))

    def cell(r: dict[str, Any], node: int) -> dict[str, Any] | None:
        return next((c for c in r["clients"] if c["node_id"] == node), None)

    cost = views.run_costs(svc.store_path, run_id)
    charts = _run_charts(detail, rounds, svc) | {"energy": _energy_chart(cost)}
    alarms = svc.alarms(run_id)
    return page(
        "run",
        p,
        run=detail,
        rounds=rounds,
        nodes=nodes,
        names=names,
        cell=cell,
        charts=charts,
        cost=cost,
        alarms=alarms,
    )


@router.post("/runs/{run_id}/stop")
def stop_submit(run_id: RunId, p: StopForm, svc: Svc) -> Response:
    svc.stop_run(p, run_id)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


# -- nodes, users, audit -----------------------------------------------------------------------------------------
@router.get("/nodes")
def nodes_page(p: OperatorPage, svc: Svc) -> HTMLResponse:
    try:
        return page("nodes", p, nodes=svc.nodes(), error=None)
    except FedGuardError as exc:  # no SuperLink attached, or it failed: the page says so
        return page("nodes", p, http_status(exc), nodes=[], error=public_detail(exc))


@router.post("/nodes/{name}/revoke")
def node_revoke_submit(name: Name, p: NodeRevokeForm, svc: Svc) -> Response:
    svc.revoke_node(p, name)
    return RedirectResponse("/nodes", status_code=303)


def _users_page(p: Principal, svc: ControlService, status: int = 200, **ctx: Any) -> HTMLResponse:
    ctx = {"token": None, "new_user": None, "error": None, **ctx}
    return page("users", p, status, users=svc.users.list(), **ctx)


@router.get("/users")
def users_page(p: AdminPage, svc: Svc) -> HTMLResponse:
    return _users_page(p, svc)


@router.post("/users")
def users_add(
    p: UserAddForm,
    svc: Svc,
    name: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=16)] = "reviewer",
) -> HTMLResponse:
    try:
        user, token = svc.add_user(p, name, role)
    except FedGuardError as exc:
        return _users_page(p, svc, http_status(exc), error=public_detail(exc))
    return _users_page(p, svc, 201, token=token, new_user=user.name)


@router.post("/users/{name}/revoke")
def users_revoke(name: Name, p: UserRevokeForm, svc: Svc) -> Response:
    try:
        svc.revoke_user(p, name)
    except FedGuardError as exc:
        return _users_page(p, svc, http_status(exc), error=public_detail(exc))
    return RedirectResponse("/users", status_code=303)


@router.get("/audit")
def audit_page(p: AdminPage, svc: Svc, offset: int = 0) -> HTMLResponse:
    offset = max(0, min(offset, 2**31))
    entries = svc.audit.entries(limit=201, offset=offset)
    return page("audit", p, check=svc.audit.verify(), entries=entries[:200], more=len(entries) > 200, offset=offset)
