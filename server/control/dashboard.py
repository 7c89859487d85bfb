"""The dashboard: server-rendered pages (Jinja2, autoescaped), inline SVG charts, no scripts.

Pages read the same views as the API and post forms to the same ``ControlService`` actions, so
a button and an API call are audited alike. Every form carries the session's CSRF token; the
login form a double-submit token bound to a short-lived pre-login cookie.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape

from common.errors import StoreError
from server.control import views
from server.control.api import RunId, Svc, current, get_service
from server.control.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Principal,
    check_csrf,
    client_key,
    has_role,
    user_key,
)
from server.control.charts import line_chart
from server.control.service import ControlService
from server.cost_report import fmt_bytes

_BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{% block title %}FedGuard{% endblock %} · FedGuard control</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#17324d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
header a{color:#fff;text-decoration:none}header .who{margin-left:auto;font-size:.9em}
main{max-width:1150px;margin:1em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0;background:#fff}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#eef2f6;text-align:left}.charts{display:flex;flex-wrap:wrap;gap:1em}
.chart{background:#fff;border:1px solid #ddd}.st-accepted{color:#176b2c}
.st-refused,.st-rejected,.st-failed{color:#b00020}
.st-dropped{color:#8a6d00}.critical{color:#b00020;font-weight:bold}.warning{color:#8a6d00}
.btn,button{background:#17324d;color:#fff;border:0;padding:.4em .9em;border-radius:3px;text-decoration:none;
cursor:pointer;display:inline-block;margin:.2em}.error{color:#b00020;white-space:pre-wrap}
textarea{width:100%;font-family:monospace}.ok{color:#176b2c}form.inline{display:inline}
table.cost td,table.cost th{font-size:.85em;padding:.2em .4em}
</style></head><body>
<header><strong>FedGuard</strong>
{% if p %}<a href="/">Runs</a>{% if operator %}<a href="/runs/new">Start run</a><a href="/nodes">Nodes</a>{% endif %}
{% if admin %}<a href="/users">Users</a><a href="/audit">Audit log</a>{% endif %}
<span class="who">{{ p.user.name }} ({{ p.user.role }})
<form class="inline" method="post" action="/logout"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<button type="submit">Log out</button></form></span>{% endif %}
</header><main>{% block body %}{% endblock %}</main></body></html>"""

_LOGIN = """{% extends "base" %}{% block title %}Log in{% endblock %}{% block body %}
<h1>Log in</h1>
{% if error %}<p class="error" id="login-error">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<p><label>Token <input type="password" name="token" id="token" size="70" autocomplete="off" required></label></p>
<p><button type="submit" id="login">Log in</button></p>
<p>Tokens come from your administrator (<code>fedguard user add NAME --role reviewer</code>).</p>
</form>{% endblock %}"""

_RUNS = """{% extends "base" %}{% block title %}Runs{% endblock %}{% block body %}
<h1>Runs</h1>
{% if not runs %}<p>No runs recorded yet.</p>{% else %}
<table id="runs"><thead><tr><th>run</th><th>name</th><th>status</th><th>rounds</th><th>started</th>
<th>finished</th><th>Flower run</th></tr></thead><tbody>
{% for r in runs %}<tr><td><a href="/runs/{{ r.run_id }}">{{ r.run_id }}</a></td><td>{{ r.name }}</td>
<td class="status">{{ r.status }}</td><td>{{ r.rounds_done }}</td><td>{{ fmt_time(r.started_at) }}</td>
<td>{{ fmt_time(r.finished_at) }}</td><td>{{ r.flower_run_id or "–" }}</td></tr>{% endfor %}
</tbody></table>{% endif %}{% endblock %}"""

_RUN = """{% extends "base" %}{% block title %}Run {{ run.run_id }}{% endblock %}{% block body %}
<h1>Run {{ run.run_id }}: {{ run.name }} <small class="status">({{ run.status }})</small></h1>
<p>Config {{ run.config_hash[:16] }}…{% if run.config %}: {{ run.config.rounds }} rounds,
{{ run.config.clients_per_round }} clients per round, model {{ run.config.model }},
{% if run.config.dp_enabled %}DP-SGD target ε={{ run.config.target_epsilon }}, δ={{ run.config.delta }}{% else %}
<strong>DP disabled</strong>{% endif %}, aggregation {{ run.config.secure_aggregation }}{% endif %}.
{% if run.error %}<span class="error">{{ run.error }}</span>{% endif %}</p>
<p id="downloads">Reports:
<a class="btn" id="dl-privacy-html" href="/api/runs/{{ run.run_id }}/privacy?format=html">Privacy report (HTML)</a>
<a class="btn" id="dl-privacy-json" href="/api/runs/{{ run.run_id }}/privacy?format=json&amp;download=true">Privacy
report (JSON)</a>
<a class="btn" id="dl-fairness-html" href="/api/runs/{{ run.run_id }}/fairness?format=html">Fairness report (HTML)</a>
<a class="btn" id="dl-fairness-json" href="/api/runs/{{ run.run_id }}/fairness?format=json&amp;download=true">Fairness
report (JSON)</a>
<a class="btn" id="dl-cost-html" href="/api/runs/{{ run.run_id }}/cost?format=html">Cost report (HTML)</a>
<a class="btn" id="dl-cost-json" href="/api/runs/{{ run.run_id }}/cost?format=json&amp;download=true">Cost report
(JSON)</a></p>
{% if operator and run.status == "running" and run.flower_run_id %}
<form method="post" action="/runs/{{ run.run_id }}/stop"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<button type="submit" id="stop-run">Stop this run</button></form>{% endif %}
<h2>Global model</h2><div class="charts">{{ charts.metrics|safe }}{{ charts.loss|safe }}</div>
<h2>Privacy: ε per client per round</h2><div class="charts">{{ charts.epsilon|safe }}</div>
<h2>Fairness: disparities per round</h2><div class="charts">{{ charts.dp|safe }}{{ charts.eo|safe }}</div>
<table id="findings"><thead><tr><th>round</th><th>severity</th><th>attribute</th><th>finding</th></tr></thead><tbody>
{% for r in rounds if r.fairness %}{% for f in r.fairness.findings %}<tr><td>{{ r.round }}</td>
<td class="{{ f.severity }}">{{ f.severity }}</td><td>{{ f.attribute }}</td><td>{{ f.message }}</td></tr>
{% endfor %}{% else %}<tr><td colspan="4">no fairness audits recorded</td></tr>{% endfor %}
</tbody></table>
<h2>Participation</h2>
<table id="participation"><thead><tr><th>node</th>{% for r in rounds %}<th>round {{ r.round }}</th>{% endfor %}
</tr></thead><tbody>{% for node in nodes %}<tr><td>{{ node }}</td>{% for r in rounds %}
{% set c = cell(r, node) %}<td class="st-{{ c.status if c else 'none' }}"
title="{{ c.reason or '' if c else '' }}">{% if c %}{{ c.status }}{% if c.epsilon is not none %}
(ε {{ '%.3f'|format(c.epsilon) }}){% endif %}{% else %}–{% endif %}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
<h2>Time and bytes per round</h2>
<table id="round-costs"><thead><tr><th>round</th><th>sampled</th><th>accepted</th><th>aggregated</th><th>seconds</th>
<th>ciphertext bytes sent by nodes</th></tr></thead><tbody>{% for r in rounds %}<tr><td>{{ r.round }}</td>
<td>{{ r.sampled if r.sampled is not none else "–" }}</td><td>{{ r.accepted if r.accepted is not none else "–" }}</td>
<td>{{ "yes" if r.aggregated else "no" }}</td>
<td>{{ '%.1f'|format(r.seconds) if r.seconds is not none else "–" }}</td>
<td>{{ "{:,}".format(r.bytes_sent) if r.bytes_sent else ("– (see Cost)" if cost else "not recorded") }}</td></tr>
{% endfor %}</tbody></table>
<h2 id="cost">Cost: time, bytes, energy and emissions</h2>
{% if not cost %}<p id="cost-not-recorded">Cost not recorded: this run was recorded before FedGuard kept resource
accounts (no time, byte or energy figures in the run store).</p>{% else %}{% set t = cost.totals %}
<p id="cost-totals">Total: <strong>{{ num(t.energy_wh) }} Wh</strong> ({{ t.energy_label }}),
{{ num(t.emissions_g) }} gCO2e; {{ nbytes(t.bytes_sent) }} sent to nodes, {{ nbytes(t.bytes_received) }} received;
{{ num(t.wall_seconds, ".1f") }} s on the server (aggregation {{ num(t.aggregation_seconds, ".2f") }} s).
Server {{ num(t.server_energy_wh) }} Wh, clients {{ num(t.client_energy_wh) }} Wh.
{% if t.clients_not_reporting %}<span class="warning">{{ t.clients_not_reporting }} client(s) kept their resource
figures local: bytes only, their energy is not in the totals.</span>{% endif %}</p>
<p id="cost-per-point">Cost per accuracy point gained{% if cost.accuracy_gain_points is not none %}
({{ num(cost.accuracy_start, ".3f") }} → {{ num(cost.accuracy_end, ".3f") }},
{{ num(cost.accuracy_gain_points, "+.1f") }} points){% endif %}:
{% if cost.wh_per_point is not none %}<strong>{{ num(cost.wh_per_point) }} Wh</strong>,
{{ num(cost.emissions_g_per_point) }} gCO2e, {{ nbytes(cost.bytes_per_point) }},
{{ num(cost.seconds_per_point, ".1f") }} s per point{% else %}n/a (held-out accuracy did not improve, or no
evaluation){% endif %}</p>
<div class="charts">{{ charts.energy|safe }}</div>
<table id="cost-rounds" class="cost"><thead><tr><th>round</th>
<th>time s</th><th>aggregation s</th><th>sent</th><th>received</th>
<th>energy Wh</th><th>gCO2e</th><th>energy is</th><th>clients reporting</th><th>cum. energy Wh</th><th>cum. gCO2e</th>
<th>cum. bytes</th><th>cum. time s</th><th>accuracy gain (points)</th></tr></thead><tbody>
{% for r in cost.rounds %}<tr><td>{{ "setup" if r.round == 0 else r.round }}</td>
<td>{{ num(r.wall_seconds, ".1f") }}</td><td>{{ num(r.aggregation_seconds, ".3f") }}</td>
<td>{{ nbytes(r.bytes_sent) }}</td><td>{{ nbytes(r.bytes_received) }}</td>
<td>{{ num(r.energy_wh) }}</td><td>{{ num(r.emissions_g) }}</td>
<td class="energy-label">{{ r.energy_label or "not recorded" }}</td>
<td>{{ r.clients_reporting }}/{{ r.clients_trained }}</td><td>{{ num(r.cumulative_energy_wh) }}</td>
<td>{{ num(r.cumulative_emissions_g) }}</td><td>{{ nbytes(r.cumulative_bytes) }}</td>
<td>{{ num(r.cumulative_seconds, ".1f") }}</td><td>{{ num(r.accuracy_gain_points, "+.1f") }}</td></tr>{% endfor %}
</tbody></table>
<table id="cost-nodes" class="cost"><thead><tr><th>node</th>
<th>role</th><th>rounds trained</th><th>bytes (both ways)</th>
<th>share of bytes</th><th>CPU s</th><th>energy Wh</th><th>gCO2e</th><th>share of energy</th><th>energy is</th></tr>
</thead><tbody>{% for c in cost.clients %}<tr><td>{{ c.node_id }}</td><td>{{ c.role }}</td>
<td>{{ c.rounds_trained }}</td>
<td>{{ nbytes(c.bytes_sent + c.bytes_received) }}</td><td>{{ pct(c.bytes_share) }}</td><td>{{ num(c.cpu_seconds) }}</td>
<td>{{ num(c.energy_wh) }}</td><td>{{ num(c.emissions_g) }}</td><td>{{ pct(c.energy_share) }}</td>
<td class="energy-label">{{ c.energy_label or ("not sent" if c.role == "client" else "–") }}</td></tr>{% endfor %}
</tbody></table>
<p>Bytes are the server's exact figures (Flower wire format); a client's time and energy appear only where its owner's
policy lets coarsened figures leave. Details and method: the cost report.</p>{% endif %}
{% endblock %}"""

_NODES = """{% extends "base" %}{% block title %}Nodes{% endblock %}{% block body %}
<h1>Nodes</h1>{% if error %}<p class="error">{{ error }}</p>{% else %}
<table id="nodes"><thead><tr><th>name</th><th>role</th><th>organisation</th><th>node id</th><th>state</th>
<th>online since</th><th>key</th>{% if admin %}<th></th>{% endif %}</tr></thead><tbody>
{% for n in nodes %}<tr><td>{{ n.name }}</td><td>{{ n.role }}</td><td>{{ n.organisation }}</td>
<td>{{ n.node_id or "–" }}</td><td class="node-state">{{ n.status }}</td><td>{{ n.online_at or "–" }}</td>
<td><code>{{ n.fingerprint[:23] }}…</code></td>{% if admin %}<td>{% if n.status != "unregistered" %}
<form method="post" action="/nodes/{{ n.name }}/revoke"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<button type="submit">Revoke</button></form>{% endif %}</td>{% endif %}</tr>{% endfor %}</tbody></table>{% endif %}
{% endblock %}"""

_START = """{% extends "base" %}{% block title %}Start a run{% endblock %}{% block body %}
<h1>Start a run</h1>
{% if error %}<p class="error" id="start-error">{{ error }}</p>{% endif %}
{% if started %}<p class="ok" id="start-ok">Submitted as Flower run {{ started.flower_run_id }}
({{ started.signed_by }}; config {{ started.config_hash[:16] }}…). It appears under Runs once its first round
is recorded.</p>{% endif %}
<form method="post" action="/runs/new"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<p><label>Run config (TOML)<br><textarea name="config_toml" id="config_toml" rows="18" required>{{ config_toml }}
</textarea></label></p>
<p><label>Signature from <code>fedguard run sign</code> ({% if can_sign %}optional: the service holds the run-signing
key{% else %}required{% endif %})<br><textarea name="signature" id="signature" rows="3"></textarea></label></p>
<p><button type="submit" id="submit-run">Start run</button></p></form>{% endblock %}"""

_USERS = """{% extends "base" %}{% block title %}Users{% endblock %}{% block body %}
<h1>Users</h1>
{% if token %}<p class="ok">New token for {{ new_user }} (shown once):
<code id="new-token">{{ token }}</code></p>{% endif %}
{% if error %}<p class="error">{{ error }}</p>{% endif %}
<table id="users"><thead><tr><th>name</th><th>role</th><th>created</th><th>revoked</th><th></th></tr></thead><tbody>
{% for u in users %}<tr><td>{{ u.name }}</td><td>{{ u.role }}</td><td>{{ fmt_time(u.created_at) }}</td>
<td>{{ fmt_time(u.revoked_at) }}</td><td>{% if u.revoked_at is none %}<form method="post"
action="/users/{{ u.name }}/revoke"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<button type="submit">Revoke</button></form>{% endif %}</td></tr>{% endfor %}</tbody></table>
<h2>Add a user</h2><form method="post" action="/users"><input type="hidden" name="csrf_token" value="{{ p.csrf }}">
<label>Name <input name="name" required></label> <label>Role <select name="role"><option>reviewer</option>
<option>operator</option><option>admin</option></select></label> <button type="submit">Add</button></form>
{% endblock %}"""

_AUDIT = """{% extends "base" %}{% block title %}Audit log{% endblock %}{% block body %}
<h1>Audit log</h1>
<p id="audit-status" class="{{ 'ok' if check.ok else 'error' }}">{% if check.ok %}Chain verified: {{ check.entries }}
entries, head <code>{{ check.head }}</code>{% else %}CHAIN BROKEN: {{ check.problem }}{% endif %}</p>
<table id="audit"><thead><tr><th>#</th><th>time (UTC)</th><th>actor</th><th>role</th><th>action</th><th>target</th>
<th>outcome</th></tr></thead><tbody>{% for e in entries %}<tr><td>{{ e.seq }}</td><td>{{ fmt_time(e.at) }}</td>
<td>{{ e.actor }}</td><td>{{ e.role }}</td><td>{{ e.action }}</td><td>{{ e.target }}</td><td>{{ e.outcome }}</td>
</tr>{% endfor %}</tbody></table>
{% if more %}<p><a href="/audit?offset={{ offset + 200 }}">older entries</a></p>{% endif %}{% endblock %}"""

_MESSAGE = """{% extends "base" %}{% block title %}{{ title }}{% endblock %}{% block body %}
<h1>{{ title }}</h1><p class="error">{{ message }}</p><p><a href="/">Back to runs</a></p>{% endblock %}"""

_env = Environment(
    loader=DictLoader(
        {
            "base": _BASE,
            "login": _LOGIN,
            "runs": _RUNS,
            "run": _RUN,
            "nodes": _NODES,
            "start": _START,
            "users": _USERS,
            "audit": _AUDIT,
            "message": _MESSAGE,
        }
    ),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


def _fmt_time(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _num(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


_env.globals.update(fmt_time=_fmt_time, num=_num, pct=_pct, nbytes=fmt_bytes)


def page(name: str, p: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
    operator = bool(p and has_role(p, "operator"))
    admin = bool(p and has_role(p, "admin"))
    text = _env.get_template(name).render(p=p, operator=operator, admin=admin, **ctx)
    return HTMLResponse(text, status_code=status)


def _forbidden(p: Principal, needed: str, svc: ControlService, action: str | None, target: str) -> HTMLResponse:
    if action:
        svc.record(p, action, target, f"denied: needs {needed}")
    msg = f"The {p.user.role} role may not do this: it needs {needed} or above."
    return page("message", p, 403, title="Not allowed", message=msg)


def _secure_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict")


router = APIRouter(include_in_schema=False)
Who = Annotated[Principal, Depends(current)]


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
    keys = [client_key(request)] + ([k] if (k := user_key(token)) else [])
    wait = svc.login_limit.retry_after(keys)
    if wait:  # not audited: the failures that caused the block were, and a flood must not grow the log
        blocked = page("login", None, 429, csrf=cookie, error=f"Too many failed log-ins: try again in {wait}s.")
        blocked.headers["Retry-After"] = str(wait)
        return blocked
    user = svc.users.authenticate(token)
    if user is None:
        svc.login_limit.fail(keys)
        svc.record(None, "login", keys[-1], "denied: invalid or revoked token")
        return page("login", None, 401, csrf=cookie, error="Invalid or revoked token.")
    if k:
        svc.login_limit.clear(k)
    sid, _ = svc.sessions.create(token)
    svc.record(user, "login", "dashboard", "ok")
    response: Response = RedirectResponse("/", status_code=303)
    _secure_cookie(response, SESSION_COOKIE, sid)
    response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(p: Who, svc: Svc, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    check_csrf(p, csrf_token)
    if p.session_id:
        svc.sessions.drop(p.session_id)
    svc.record(p, "logout", "dashboard", "ok")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


# -- runs --------------------------------------------------------------------------------------------------------
@router.get("/")
def runs_page(p: Who, svc: Svc) -> HTMLResponse:
    return page("runs", p, runs=views.list_runs(svc.store_path))


def _run_charts(detail: dict[str, Any], rounds: list[dict[str, Any]], svc: ControlService) -> dict[str, str]:
    metrics: dict[str, list[tuple[int, float]]] = {}
    loss: dict[str, list[tuple[int, float]]] = {}
    eps: dict[str, list[tuple[int, float]]] = {}
    dp: dict[str, list[tuple[int, float]]] = {}
    eo: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for k, v in r["metrics"].items():
            if not isinstance(v, int | float) or k == "n":  # n: the evaluation set's size, not a score
                continue
            if "loss" in k:
                loss.setdefault(k, []).append((r["round"], float(v)))
            elif 0.0 <= v <= 1.0:
                metrics.setdefault(k, []).append((r["round"], float(v)))
        for c in r["clients"]:
            if c["epsilon"] is not None:
                eps.setdefault(f"node {c['node_id']}", []).append((r["round"], float(c["epsilon"])))
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
def start_form(p: Who, svc: Svc) -> HTMLResponse:
    if not has_role(p, "operator"):
        return _forbidden(p, "operator", svc, None, "/runs/new")
    return page("start", p, config_toml="", can_sign=svc.signing_key is not None, error=None, started=None)


@router.post("/runs/new")
def start_submit(
    p: Who,
    svc: Svc,
    config_toml: Annotated[str, Form(max_length=256_000)] = "",
    signature: Annotated[str, Form(max_length=8_000)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> HTMLResponse:
    if not has_role(p, "operator"):
        return _forbidden(p, "operator", svc, "run.start", "/runs/new")
    check_csrf(p, csrf_token)
    can_sign = svc.signing_key is not None
    try:
        started = svc.start_run(p, config_toml, signature or None)
    except HTTPException as exc:
        return page(
            "start", p, exc.status_code, config_toml=config_toml, can_sign=can_sign, error=exc.detail, started=None
        )
    return page("start", p, 201, config_toml="", can_sign=can_sign, error=None, started=started)


@router.get("/runs/{run_id}")
def run_page(run_id: RunId, p: Who, svc: Svc) -> HTMLResponse:
    try:
        detail = views.run_detail(svc.store_path, run_id)
        data = views.run_rounds(svc.store_path, run_id)
    except (StoreError, OverflowError):
        return page("message", p, 404, title="No such run", message=f"There is no run {run_id} in the run store.")
    rounds = data["rounds"]
    nodes = sorted({c["node_id"] for r in rounds for c in r["clients"]})

    def cell(r: dict[str, Any], node: int) -> dict[str, Any] | None:
        return next((c for c in r["clients"] if c["node_id"] == node), None)

    cost = views.run_costs(svc.store_path, run_id)
    charts = _run_charts(detail, rounds, svc) | {"energy": _energy_chart(cost)}
    return page("run", p, run=detail, rounds=rounds, nodes=nodes, cell=cell, charts=charts, cost=cost)


@router.post("/runs/{run_id}/stop")
def stop_submit(run_id: RunId, p: Who, svc: Svc, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    if not has_role(p, "operator"):
        return _forbidden(p, "operator", svc, "run.stop", f"/runs/{run_id}/stop")
    check_csrf(p, csrf_token)
    try:
        svc.stop_run(p, run_id)
    except HTTPException as exc:
        return page("message", p, exc.status_code, title="Run not stopped", message=str(exc.detail))
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


# -- nodes, users, audit -----------------------------------------------------------------------------------------
@router.get("/nodes")
def nodes_page(p: Who, svc: Svc) -> HTMLResponse:
    if not has_role(p, "operator"):
        return _forbidden(p, "operator", svc, None, "/nodes")
    try:
        return page("nodes", p, nodes=svc.nodes(), error=None)
    except HTTPException as exc:
        return page("nodes", p, exc.status_code, nodes=[], error=exc.detail)


@router.post("/nodes/{name}/revoke")
def node_revoke_submit(name: str, p: Who, svc: Svc, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    if not has_role(p, "admin"):
        return _forbidden(p, "admin", svc, "node.revoke", f"/nodes/{name}/revoke")
    check_csrf(p, csrf_token)
    try:
        svc.revoke_node(p, name)
    except HTTPException as exc:
        return page("message", p, exc.status_code, title="Node not revoked", message=str(exc.detail))
    return RedirectResponse("/nodes", status_code=303)


def _users_page(p: Principal, svc: ControlService, status: int = 200, **ctx: Any) -> HTMLResponse:
    ctx = {"token": None, "new_user": None, "error": None, **ctx}
    return page("users", p, status, users=svc.users.list(), **ctx)


@router.get("/users")
def users_page(p: Who, svc: Svc) -> HTMLResponse:
    if not has_role(p, "admin"):
        return _forbidden(p, "admin", svc, None, "/users")
    return _users_page(p, svc)


@router.post("/users")
def users_add(
    p: Who,
    svc: Svc,
    name: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=16)] = "reviewer",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> HTMLResponse:
    if not has_role(p, "admin"):
        return _forbidden(p, "admin", svc, "user.add", "/users")
    check_csrf(p, csrf_token)
    try:
        user, token = svc.add_user(p, name, role)
    except HTTPException as exc:
        return _users_page(p, svc, exc.status_code, error=exc.detail)
    return _users_page(p, svc, 201, token=token, new_user=user.name)


@router.post("/users/{name}/revoke")
def users_revoke(name: str, p: Who, svc: Svc, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    if not has_role(p, "admin"):
        return _forbidden(p, "admin", svc, "user.revoke", f"/users/{name}/revoke")
    check_csrf(p, csrf_token)
    try:
        svc.revoke_user(p, name)
    except HTTPException as exc:
        return _users_page(p, svc, exc.status_code, error=exc.detail)
    return RedirectResponse("/users", status_code=303)


@router.get("/audit")
def audit_page(p: Who, svc: Annotated[ControlService, Depends(get_service)], offset: int = 0) -> HTMLResponse:
    if not has_role(p, "admin"):
        return _forbidden(p, "admin", svc, None, "/audit")
    offset = max(0, min(offset, 2**31))
    entries = svc.audit.entries(limit=201, offset=offset)
    return page("audit", p, check=svc.audit.verify(), entries=entries[:200], more=len(entries) > 200, offset=offset)
