"""The control service's API over a real run store, real users and a real HMAC audit log.

Every role against every endpoint class, 401 without or with a bad token, immediate revocation,
audit entries for actions, denials and downloads (with the chain head in the export), the login
rate limit, CSRF and the session cookie's flags. The federation door is a recorder that checks
each submitted run's signature with the real run-signing key (no SuperLink in these tests).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi.testclient import TestClient

from common.config import load_config
from common.fairness import FairnessConfig, audit
from common.run_signing import fedguard_version, load_verify_key, sign_run, verify_run
from server.control.app import create_app
from server.control.audit import AuditLog
from server.control.auth import SESSION_COOKIE, RateLimiter
from server.control.federation import NodeView
from server.control.service import ControlService
from server.store import RunStore

pytestmark = pytest.mark.timeout(120)

BASE = "https://testserver"  # the session cookie is Secure: clients must speak https to get it back


# -- fixtures shared with test_control_browser.py and test_control_fuzz.py ---------------------------------------------
def demo_toml(tmp: Path) -> str:
    from fedguard.demo import demo_config

    return demo_config(tmp / "data" / "gss_wages.csv", rounds=3, clients=3).to_toml()


# resource figures nodes 101 and 202 let leave each round they trained (303 keeps its own: bytes only)
FIGURES = {"energy-wh": 0.5, "emissions-g": 0.1, "energy-measured": 0, "cpu-seconds": 12.0, "wall-seconds": 9.0}


def fill_store(store_path: Path, tmp: Path) -> None:
    """A finished 3-round run with ε per node, metrics, fairness audits and costs, and a running deployed run.

    Costs (``RunStore.record_costs``): setup round 0 at 0.1 Wh, rounds 1-3 at 0.2 Wh on the server
    plus 0.5 Wh from each of nodes 101 and 202: 3.7 Wh in all, for +10 accuracy points.
    """
    cfg_path = tmp / "recorded.toml"
    cfg_path.write_text(demo_toml(tmp), encoding="utf-8")
    cfg = load_config(cfg_path)
    rng = np.random.default_rng(0)
    n = 600
    gender = rng.choice(["female", "male"], n)
    marital = rng.choice(["married", "single"], n)
    y = rng.integers(0, 2, n)
    with RunStore(store_path) as store:
        run = store.create_run(cfg.name, cfg.to_json(), cfg.digest(), 11, {"engine": "deployment"})
        for rnd in (1, 2, 3):
            outcomes = [
                {
                    "node_id": node,
                    "status": "accepted" if not (node == 303 and rnd == 2) else "refused",
                    "reason": "budget exhausted" if node == 303 and rnd == 2 else None,
                    "weight": 100.0,
                    "values": {
                        "epsilon": 0.9 * rnd + node / 1000,
                        "epsilon-total": 0.9 * rnd + node / 1000,
                        "delta": 1e-5,
                        "noise-multiplier": 1.1,
                        "sample-rate": 0.05,
                        "steps": 20,
                        "budget-epsilon": 10.0,
                        **(FIGURES if node != 303 else {}),
                    },
                    "received": ["arrays.model", "metrics.epsilon"],
                }
                for node in (101, 202, 303)
            ]
            store.record_round(run, rnd, 1_700_000_000.0 + 30 * rnd, outcomes, True)
            yhat = np.where((gender == "male") & (rng.random(n) < 0.2 + 0.15 * rnd), 1, y)
            a = audit(y, yhat, None, {"gender": gender, "maritalcat": marital}, FairnessConfig(bootstrap_n=20))
            store.record_evaluation(
                run,
                rnd,
                {"accuracy": 0.6 + 0.05 * rnd, "loss": 0.7 - 0.05 * rnd, "macro_f1": 0.55 + 0.05 * rnd},
                a.model_dump_json(),
                {"evaluation_size": n, "sha256": "ab" * 32},
                "evaluator node 404",
            )
        roles = {101: "client", 202: "client", 303: "client", 404: "evaluator"}
        for rnd in (0, 1, 2, 3):
            traffic = {
                node: {"sent": 100, "received": 50, "messages": 1}
                if rnd == 0
                else {"sent": 40_000, "received": 200 if node == 404 else 40_000, "messages": 1}
                for node in roles
            }
            server = {"energy_wh": 0.1 if rnd == 0 else 0.2, "emissions_g": 0.02 if rnd == 0 else 0.04}
            server |= {"energy_label": "estimated", "energy_source": "CPU time x 10 W per core"}
            store.record_costs(run, rnd, traffic, roles, server=server, wall_seconds=10.0, aggregation_seconds=0.5)
        store.finish_run(run, "finished")
        store.create_run("second", cfg.to_json(), cfg.digest(), 77, {"engine": "deployment"})


class RecordingFederation:
    """The federation door, recorded: checks each run's signature with the pinned run-signing key."""

    def __init__(self, verify_key_path: Path) -> None:
        self.verify_key_path = verify_key_path
        self.started: list[dict[str, Any]] = []
        self.stopped: list[int] = []
        self.revoked: list[str] = []

    def nodes(self) -> list[NodeView]:
        return [
            NodeView("org-0", "client", "Org 0", "SHA256:aa", 101, "online", "2026-01-01 10:00:00Z"),
            NodeView("evaluator", "evaluator", "Board", "SHA256:bb", 404, "offline"),
        ]

    def revoke_node(self, name: str) -> NodeView:
        self.revoked.append(name)
        return NodeView(name, "client", "Org 0", "SHA256:aa", 101, "unregistered")

    def start_run(self, config_path: Path, token: str) -> int:
        cfg = load_config(config_path)  # what the ServerApp will read
        request = verify_run(token, cfg.to_json(), load_verify_key(self.verify_key_path), version=fedguard_version())
        self.started.append({"name": cfg.name, "request": request, "path": config_path})
        return 9000 + len(self.started)

    def stop_run(self, flower_run_id: int) -> None:
        self.stopped.append(flower_run_id)


def signing_keys(tmp: Path) -> tuple[ed25519.Ed25519PrivateKey, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    pub = tmp / "run-signing.pub"
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return key, pub


def make_service(tmp: Path, *, service_signs: bool = True, **kw: Any) -> tuple[ControlService, RecordingFederation]:
    key, pub = signing_keys(tmp)
    fed = RecordingFederation(pub)
    store = tmp / "runs.db"
    if not store.exists():
        fill_store(store, tmp)
    svc = ControlService(tmp, store, fed, key if service_signs else None, **kw)
    svc.admin_key = key  # type: ignore[attr-defined]  # the tests sign "offline" with it
    return svc, fed


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("control")
    svc, fed = make_service(tmp)
    client = TestClient(create_app(svc), base_url=BASE)
    tokens = {role: svc.users.add(f"the-{role}", role)[1] for role in ("reviewer", "operator", "admin")}
    return {"svc": svc, "fed": fed, "client": client, "tokens": tokens, "tmp": tmp}


# -- role × endpoint -------------------------------------------------------------------------------------------------
_n = iter(range(10_000))


def _calls(w: dict[str, Any]) -> dict[str, list[tuple[str, str, Any]]]:
    toml = demo_toml(w["tmp"])

    def victim() -> str:
        name = f"victim-{next(_n)}"
        w["svc"].users.add(name, "reviewer")
        return name

    return {
        "reviewer": [
            ("GET", "/api/runs", None),
            ("GET", "/api/runs/1", None),
            ("GET", "/api/runs/1/rounds", None),
            ("GET", "/api/runs/1/privacy", None),
            ("GET", "/api/runs/1/fairness?format=html", None),
            ("GET", "/api/runs/1/cost", None),
            ("GET", "/api/me", None),
            ("GET", "/openapi.json", None),
        ],
        "operator": [
            ("GET", "/api/nodes", None),
            ("POST", "/api/runs/plan", lambda: {"config_toml": toml}),
            ("POST", "/api/runs", lambda: {"config_toml": toml}),
            ("POST", "/api/runs/2/stop", None),
        ],
        "admin": [
            ("GET", "/api/users", None),
            ("POST", "/api/users", lambda: {"name": f"new-{next(_n)}", "role": "reviewer"}),
            ("POST", "/api/users/{victim}/revoke", None),
            ("POST", "/api/nodes/org-0/revoke", None),
            ("GET", "/api/audit", None),
        ],
    }


@pytest.mark.parametrize("role", ["reviewer", "operator", "admin"])
def test_every_role_against_every_endpoint_class(world: dict[str, Any], role: str) -> None:
    order = ("reviewer", "operator", "admin")
    client, token = world["client"], world["tokens"][role]
    for needed, calls in _calls(world).items():
        allowed = order.index(role) >= order.index(needed)
        for method, path, body in calls:
            if "{victim}" in path:
                name = f"victim-{next(_n)}"
                world["svc"].users.add(name, "reviewer")
                path = path.format(victim=name)
            r = client.request(method, path, json=body() if body else None, headers=bearer(token))
            if allowed:
                assert 200 <= r.status_code < 300, (role, method, path, r.status_code, r.text[:300])
            else:
                assert r.status_code == 403, (role, method, path, r.status_code, r.text[:300])
                assert "needs" in r.json()["detail"]


def test_no_token_or_bad_token_is_401_and_health_is_open(world: dict[str, Any]) -> None:
    client = world["client"]
    assert client.get("/health").json() == {"status": "ok"}
    for path in ("/api/runs", "/api/runs/1/privacy", "/api/nodes", "/api/audit", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    assert client.get("/api/runs", headers=bearer("fg_000000000000_" + "x" * 43)).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.post("/api/runs/plan", json={"config_toml": ""}).status_code == 401
    # the dashboard sends a browser without a session to the log-in page instead
    r = client.get("/runs/1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_revoked_token_stops_working_immediately(world: dict[str, Any]) -> None:
    svc, client = world["svc"], world["client"]
    _, token = svc.users.add("short-lived", "operator")
    assert client.get("/api/nodes", headers=bearer(token)).status_code == 200
    r = client.post("/api/users/short-lived/revoke", headers=bearer(world["tokens"]["admin"]))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert client.get("/api/nodes", headers=bearer(token)).status_code == 401
    assert client.get("/api/runs", headers=bearer(token)).status_code == 401


def test_run_data_endpoints(world: dict[str, Any]) -> None:
    client, h = world["client"], bearer(world["tokens"]["reviewer"])
    runs = client.get("/api/runs", headers=h).json()
    assert [r["run_id"] for r in runs] == [2, 1] and runs[1]["status"] == "finished" and runs[1]["rounds_done"] == 3
    rounds = client.get("/api/runs/1/rounds", headers=h).json()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[2]["metrics"]["accuracy"] == pytest.approx(0.75)
    r2 = {c["node_id"]: c for c in rounds[1]["clients"]}
    assert r2[303]["status"] == "refused" and r2[303]["reason"] == "budget exhausted"
    assert r2[101]["epsilon"] == pytest.approx(1.901)
    fair = rounds[2]["fairness"]
    assert set(fair["disparities"]) >= {"gender", "maritalcat"}
    assert fair["findings"] and all(f["severity"] in ("warning", "critical") for f in fair["findings"])
    assert rounds[0]["seconds"] is not None and rounds[0]["seconds"] >= 0


def test_bad_input_gives_clear_4xx(world: dict[str, Any]) -> None:
    client, op = world["client"], bearer(world["tokens"]["operator"])
    r = client.get("/api/runs/999", headers=op)
    assert r.status_code == 404 and "no run 999" in r.json()["detail"]
    assert client.get("/api/runs/abc", headers=op).status_code == 422
    r = client.post("/api/runs", json={"config_toml": "name = [unclosed"}, headers=op)
    assert r.status_code == 422 and "not valid TOML" in r.json()["detail"]
    r = client.post("/api/runs", json={"config_toml": 'name = "x"\nrounds = -3\n'}, headers=op)
    assert r.status_code == 422 and "rounds" in r.json()["detail"]
    r = client.post("/api/runs", json={"config_toml": demo_toml(world["tmp"]), "signature": "garbage"}, headers=op)
    assert r.status_code == 422 and "signature" in r.json()["detail"].lower()
    # a submitted config never makes the server read a file it names as its schema (a real schema file here)
    schema_file = world["tmp"] / "server-side-schema.toml"
    schema_file.write_text('task = "tabular"\nlabel = "y"\nclasses = ["0", "1"]\nfeatures = [{name = "a"}]\n')
    raw = tomllib.loads(demo_toml(world["tmp"]))
    by_name = tomli_w.dumps({**raw, "data": {**raw["data"], "schema": str(schema_file)}})
    for path in ("/api/runs/plan", "/api/runs"):
        r = client.post(path, json={"config_toml": by_name}, headers=op)
        assert r.status_code == 422 and "must hold the schema itself" in r.json()["detail"], (path, r.text[:300])
    # nor a run whose ServerApp would read a server file as its held-out set (its errors quote the file's rows)
    started = len(world["fed"].started)
    reads = tomli_w.dumps({**raw, "data": {**raw["data"], "evaluation_path": "/etc/passwd"}})
    r = client.post("/api/runs", json={"config_toml": reads}, headers=op)
    assert r.status_code == 422 and "names a file on the server host" in r.json()["detail"], r.text[:300]
    assert len(world["fed"].started) == started
    assert client.post("/api/runs/1/stop", headers=op).status_code == 409  # finished
    r = client.post("/api/users", json={"name": "the-admin", "role": "admin"}, headers=bearer(world["tokens"]["admin"]))
    assert r.status_code == 409
    r = client.post("/api/users", json={"name": "x", "role": "root"}, headers=bearer(world["tokens"]["admin"]))
    assert r.status_code == 422


def test_run_start_signatures_are_checked_and_audited(world: dict[str, Any]) -> None:
    svc, fed, client = world["svc"], world["fed"], world["client"]
    op = bearer(world["tokens"]["operator"])
    toml = demo_toml(world["tmp"])
    r = client.post("/api/runs", json={"config_toml": toml}, headers=op)
    assert r.status_code == 201 and r.json()["signed_by"] == "signed by the control service"
    assert fed.started[-1]["name"] == "fedguard-demo"
    # the admin signs offline (`fedguard run sign`) over the config as the server will load it
    path = world["tmp"] / "offline.toml"
    path.write_text(toml, encoding="utf-8")
    token = sign_run(load_config(path).to_json(), svc.admin_key)
    r = client.post("/api/runs", json={"config_toml": toml, "signature": token}, headers=op)
    assert r.status_code == 201 and r.json()["signed_by"].startswith("admin signature")
    outcomes = [e.outcome for e in svc.audit.entries(limit=5) if e.action == "run.start"]
    assert outcomes[0] == "ok (admin signature (fedguard run sign))"
    assert outcomes[1] == "ok (signed by the control service)"


def test_service_without_signing_key_requires_a_signature(tmp_path: Path) -> None:
    svc, fed = make_service(tmp_path, service_signs=False)
    client = TestClient(create_app(svc), base_url=BASE)
    _, token = svc.users.add("op", "operator")
    r = client.post("/api/runs", json={"config_toml": demo_toml(tmp_path)}, headers=bearer(token))
    assert r.status_code == 422 and "fedguard run sign" in r.json()["detail"]
    assert fed.started == []
    assert svc.audit.entries(limit=1)[0].outcome == "rejected: unsigned"


def test_actions_denials_and_downloads_are_audited_with_head_in_exports(world: dict[str, Any]) -> None:
    svc, client = world["svc"], world["client"]
    rev, op = bearer(world["tokens"]["reviewer"]), bearer(world["tokens"]["operator"])
    assert client.post("/api/runs/2/stop", headers=rev).status_code == 403
    e = svc.audit.entries(limit=1)[0]
    assert (e.actor, e.role, e.action, e.outcome) == ("the-reviewer", "reviewer", "run.stop", "denied: needs operator")
    assert client.post("/api/runs/2/stop", headers=op).status_code == 200
    assert world["fed"].stopped[-1] == 77
    e = svc.audit.entries(limit=1)[0]
    assert (e.actor, e.action, e.outcome) == ("the-operator", "run.stop", "ok")
    # a JSON download: the report embeds the head of the chain including its own download entry
    doc = client.get("/api/runs/1/privacy", headers=rev).json()
    e = svc.audit.entries(limit=1)[0]
    assert (e.action, e.target, e.outcome) == ("report.privacy", "run 1 (json)", "ok")
    assert doc["audit_chain"]["head"] == e.mac == svc.audit.head()
    assert doc["run_id"] == 1 and doc["clients"]
    r = client.get("/api/runs/1/fairness?format=html", headers=rev)
    assert r.headers["content-disposition"] == 'attachment; filename="fairness-report-run-1.html"'
    head = re.search(r"fedguard-audit-head: ([0-9a-f]{64})", r.text).group(1)  # type: ignore[union-attr]
    assert head == svc.audit.head()
    assert svc.audit.verify(expect_head=head).ok
    assert svc.audit.verify(expect_head=doc["audit_chain"]["head"]).ok
    # admins read the log through the API
    log = client.get("/api/audit?limit=3", headers=bearer(world["tokens"]["admin"])).json()
    assert log["verified"] and log["entries"][0]["action"] == "report.fairness"


def test_cost_report_download_is_audited_and_the_run_page_shows_the_cost(world: dict[str, Any]) -> None:
    svc, client = world["svc"], world["client"]
    rev = bearer(world["tokens"]["reviewer"])
    doc = client.get("/api/runs/1/cost", headers=rev).json()
    e = svc.audit.entries(limit=1)[0]
    assert (e.actor, e.action, e.target, e.outcome) == ("the-reviewer", "report.cost", "run 1 (json)", "ok")
    assert doc["audit_chain"]["head"] == e.mac and svc.audit.verify(expect_head=e.mac).ok
    t = doc["totals"]
    assert t["energy_wh"] == pytest.approx(3.7) and t["energy_label"] == "estimated"
    assert t["clients_not_reporting"] == 1  # node 303: bytes only
    assert doc["accuracy_gain_points"] == pytest.approx(10.0) and doc["wh_per_point"] == pytest.approx(0.37)
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3]
    assert doc["rounds"][-1]["cumulative_energy_wh"] == pytest.approx(3.7)
    nodes = {c["node_id"]: c for c in doc["clients"]}
    assert nodes["101"]["energy_share"] == pytest.approx(1.5 / 3.7) and nodes["303"]["energy_wh"] is None
    assert sum(c["bytes_share"] for c in nodes.values()) == pytest.approx(1.0)
    r = client.get("/api/runs/1/cost?format=html", headers=rev)
    assert r.headers["content-disposition"] == 'attachment; filename="cost-report-run-1.html"'
    assert re.search(r"fedguard-audit-head: ([0-9a-f]{64})", r.text).group(1) == svc.audit.head()  # type: ignore[union-attr]
    assert svc.audit.entries(limit=1)[0].target == "run 1 (html)"
    assert client.get("/api/runs/999/cost", headers=rev).status_code == 404
    assert svc.audit.entries(limit=1)[0].outcome.startswith("failed")

    browser, _ = _browser_session(svc, world["tokens"]["reviewer"])
    page = browser.get("/runs/1").text
    cost = page[page.index('id="cost"') :]
    assert 'id="chart-energy"' in cost and 'data-series="cumulative Wh"' in cost and "round 3: 3.7<" in cost
    assert "3.7 Wh</strong> (estimated)" in cost and "0.37 Wh</strong>" in cost  # total, per accuracy point
    assert "s per point, over +10.0 points" in cost  # the points the figures divide by, as the summary says
    rows = re.findall(r"<tr><td>(setup|\d)</td>.*?</tr>", cost[: cost.index('id="cost-nodes"')], re.S)
    assert rows == ["setup", "1", "2", "3"]
    assert cost.count('<td class="energy-label">estimated</td>') == 4 + 2  # every round; nodes 101, 202
    assert '<td class="energy-label">not sent</td>' in cost and "40.5%" in cost  # 303; 101's share of energy
    assert 'href="/api/runs/1/cost?format=html"' in page and 'id="dl-cost-json"' in page
    assert "Cost not recorded" not in page
    old = browser.get("/runs/2").text  # a run with no cost rows (as before resource accounting)
    assert 'id="cost-not-recorded"' in old and 'id="chart-energy"' not in old
    assert client.get("/api/runs/2/cost", headers=rev).json()["rounds"] == []


def _login_page(client: TestClient) -> str:
    r = client.get("/login")
    return re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]


def test_login_sets_a_strict_secure_httponly_session_cookie(world: dict[str, Any]) -> None:
    client = TestClient(create_app(world["svc"]), base_url=BASE)
    csrf = _login_page(client)
    r = client.post("/login", data={"token": world["tokens"]["reviewer"], "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    page = client.get("/runs/1")
    assert page.status_code == 200 and 'id="chart-epsilon"' in page.text
    # the session reads API data (GET) but cannot change anything without its CSRF token
    assert client.get("/api/runs").status_code == 200
    assert client.post("/api/runs/plan", json={"config_toml": ""}).status_code == 403  # reviewer: role first
    assert world["svc"].audit.entries(limit=1)[0].action == "run.plan"


def test_csrf_is_required_on_forms(world: dict[str, Any]) -> None:
    svc = world["svc"]
    client = TestClient(create_app(svc), base_url=BASE)
    # log-in form: the posted token must match the pre-login cookie
    _login_page(client)
    r = client.post("/login", data={"token": world["tokens"]["operator"], "csrf_token": "forged"})
    assert r.status_code == 403 and SESSION_COOKIE not in client.cookies
    csrf = _login_page(client)
    client.post("/login", data={"token": world["tokens"]["operator"], "csrf_token": csrf})
    page = client.get("/runs/new")
    session_csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    started = len(world["fed"].started)
    toml = demo_toml(world["tmp"])
    r = client.post("/runs/new", data={"config_toml": toml, "csrf_token": "wrong"})
    assert r.status_code == 403 and len(world["fed"].started) == started
    r = client.post("/runs/new", data={"config_toml": toml})
    assert r.status_code == 403 and len(world["fed"].started) == started
    # a session POST to the API needs the header
    assert client.post("/api/runs/plan", json={"config_toml": toml}).status_code == 403
    ok = client.post("/api/runs/plan", json={"config_toml": toml}, headers={"X-CSRF-Token": session_csrf})
    assert ok.status_code == 200 and ok.json()["rounds"] == 3
    r = client.post("/runs/new", data={"config_toml": toml, "csrf_token": session_csrf})
    assert r.status_code == 201 and "Submitted as Flower run" in r.text
    assert len(world["fed"].started) == started + 1


def test_failed_logins_are_rate_limited_per_address_and_per_user(tmp_path: Path) -> None:
    svc, _ = make_service(tmp_path, login_limit=RateLimiter(max_failures=3, window=60.0))
    client = TestClient(create_app(svc), base_url=BASE)
    user, token = svc.users.add("alice", "reviewer")
    wrong = f"fg_{user.id}_" + "A" * 43  # alice's id, wrong secret
    csrf = _login_page(client)
    codes = [client.post("/login", data={"token": wrong, "csrf_token": csrf}).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    r = client.post("/login", data={"token": token, "csrf_token": csrf})  # even the right token, from here
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    # per user: the same user id from another address is refused too
    other = TestClient(create_app(svc), base_url=BASE, client=("10.9.8.7", 5000))
    csrf2 = _login_page(other)
    assert other.post("/login", data={"token": wrong, "csrf_token": csrf2}).status_code == 429
    failures = [e for e in svc.audit.entries() if e.action == "login" and e.outcome.startswith("denied")]
    assert len(failures) == 3 and failures[0].target == f"user:{user.id}"  # the blocked attempts add nothing
    # someone else from that other address still gets in
    _, bob = svc.users.add("bob", "reviewer")
    r = other.post("/login", data={"token": bob, "csrf_token": csrf2}, follow_redirects=False)
    assert r.status_code == 303


def test_session_ends_when_the_user_is_revoked_or_logs_out(world: dict[str, Any]) -> None:
    svc = world["svc"]
    client = TestClient(create_app(svc), base_url=BASE)
    _, token = svc.users.add("temp-browser", "reviewer")
    csrf = _login_page(client)
    client.post("/login", data={"token": token, "csrf_token": csrf})
    assert client.get("/").status_code == 200
    svc.users.revoke("temp-browser")
    assert client.get("/api/runs").status_code == 401
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def _browser_session(svc: ControlService, token: str) -> tuple[TestClient, str]:
    client = TestClient(create_app(svc), base_url=BASE)
    client.post("/login", data={"token": token, "csrf_token": _login_page(client)})
    page = client.get("/")
    return client, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def test_dashboard_pages_follow_the_roles(world: dict[str, Any]) -> None:
    svc = world["svc"]
    reviewer, _ = _browser_session(svc, world["tokens"]["reviewer"])
    for path in ("/nodes", "/users", "/audit", "/runs/new"):
        assert reviewer.get(path).status_code == 403, path
    assert 'href="/nodes"' not in reviewer.get("/").text
    operator, _ = _browser_session(svc, world["tokens"]["operator"])
    nodes = operator.get("/nodes")
    assert nodes.status_code == 200 and "online" in nodes.text and "Revoke" not in nodes.text
    assert operator.get("/audit").status_code == 403
    admin, csrf = _browser_session(svc, world["tokens"]["admin"])
    assert "Chain verified" in admin.get("/audit").text
    r = admin.post("/users", data={"name": "from-form", "role": "operator", "csrf_token": csrf})
    token = re.search(r'id="new-token">(fg_[^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    assert svc.users.authenticate(token).role == "operator"  # type: ignore[union-attr]
    admin.post("/users/from-form/revoke", data={"csrf_token": csrf})
    assert svc.users.authenticate(token) is None
    admin.post("/nodes/org-0/revoke", data={"csrf_token": csrf})
    assert world["fed"].revoked[-1] == "org-0"
    assert [e.action for e in svc.audit.entries(limit=3)] == ["node.revoke", "user.revoke", "user.add"]


def test_openapi_lists_every_endpoint(world: dict[str, Any]) -> None:
    spec = world["client"].get("/openapi.json", headers=bearer(world["tokens"]["reviewer"])).json()
    paths = set(spec["paths"])
    assert {
        "/health",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/rounds",
        "/api/runs/{run_id}/privacy",
        "/api/runs/{run_id}/fairness",
        "/api/runs/{run_id}/cost",
        "/api/runs/plan",
        "/api/runs/{run_id}/stop",
        "/api/nodes",
        "/api/nodes/{name}/revoke",
        "/api/users",
        "/api/users/{name}/revoke",
        "/api/audit",
    } <= paths
    assert not any(p.startswith(("/v1", "/login", "/runs")) for p in paths)  # no Flower API, no HTML pages
    assert json.dumps(spec)  # serialisable


# -- the real thing: `fedguard server start` serving the control service over a live SuperLink -----------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_server_start_serves_the_control_service_over_a_real_superlink(tmp_path: Path) -> None:
    """CLI wiring, TLS with the kit's certificate, node listing and run start/stop through Flower's real SuperLink."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from common.kit import Federation, NodeSpec
    from fedguard.provisioning import init_federation
    from server.control.users import UserStore
    from server.runs import run_status

    fed = init_federation(
        Federation(
            name="ctl-test",
            nodes=[NodeSpec(name="org-a", organisation="A"), NodeSpec(name="ev", organisation="E", role="evaluator")],
        ),
        tmp_path / "kits",
        generate_node_keys=True,
    )
    workdir = tmp_path / "server"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cmd = [sys.executable, "-m", "fedguard.cli", "server", "start", "--kit", str(fed.server_kit)]
    cmd += ["--ca-fingerprint", fed.ca_fingerprint]
    cmd += [
        "--workdir",
        str(workdir),
        "--control-port",
        "0",
        "--run-signing-key",
        str(fed.admin_dir / "run-signing.key"),
    ]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    try:
        state_file = workdir / "server.json"
        deadline = time.monotonic() + 120
        while not state_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        state = json.loads(state_file.read_text())
        url = state["control_url"]
        assert url.startswith("https://") and f"control service (API + dashboard): {url}" in log.read_text()
        _, token = UserStore(workdir).add("ops", "admin")
        with httpx.Client(base_url=url, verify=str(fed.server_kit / "ca.crt"), timeout=60) as client:
            assert client.get("/health").json() == {"status": "ok"}  # TLS verified against the federation CA
            assert client.get("/api/nodes").status_code == 401
            h = bearer(token)
            nodes = {n["name"]: n for n in client.get("/api/nodes", headers=h).json()}
            assert set(nodes) == {"org-a", "ev"} and nodes["org-a"]["status"] == "registered"
            assert nodes["ev"]["role"] == "evaluator" and nodes["ev"]["node_id"]
            r = client.post("/api/runs", json={"config_toml": demo_toml(tmp_path)}, headers=h)
            assert r.status_code == 201, r.text
            flower_run = r.json()["flower_run_id"]
            where = (state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
            assert not run_status(flower_run, *where).finished  # the SuperLink has the signed run
            deadline = time.monotonic() + 90  # the ServerApp records the run in the store once it starts
            while not (runs := client.get("/api/runs", headers=h).json()):
                assert time.monotonic() < deadline, "the ServerApp never recorded the run"
                time.sleep(1)
            assert runs[0]["flower_run_id"] == str(flower_run) and runs[0]["status"] == "running"
            r = client.post(f"/api/runs/{runs[0]['run_id']}/stop", headers=h)
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while not (status := run_status(flower_run, *where)).finished:
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert status.status == "finished:stopped"
            actions = [(e.action, e.outcome) for e in AuditLog(workdir).entries(limit=2)]
            assert actions == [("run.stop", "ok"), ("run.start", "ok (signed by the control service)")]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "server stopped" in log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", verify=False, timeout=5)


@pytest.mark.timeout(120)
def test_demo_serve_keeps_the_dashboard_up_with_a_reviewer_token(tmp_path: Path) -> None:
    """What `fedguard demo --serve` does after the demo: HTTPS over the store, a new reviewer token, Ctrl-C stops."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    fill_store(tmp_path / "runs.db", tmp_path)
    code = (
        "import sys; from pathlib import Path; from fedguard.cli import serve_dashboard; "
        f"serve_dashboard(Path({str(tmp_path)!r}), Path({str(tmp_path / 'runs.db')!r}), 0)"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).parents[1],
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops the dashboard" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())  # type: ignore[union-attr]
        out = "".join(lines)
        url = re.search(r"dashboard: (https://\S+?)/ ", out).group(1)  # type: ignore[union-attr]
        token = re.search(r"reviewer token \(shown once\): (fg_\S+)", out).group(1)  # type: ignore[union-attr]
        cert = tmp_path / "dashboard-tls" / "dashboard.crt"
        with httpx.Client(base_url=url, verify=str(cert)) as client:
            runs = client.get("/api/runs", headers=bearer(token)).json()
            assert [r["run_id"] for r in runs] == [2, 1]
            assert client.get("/api/nodes", headers=bearer(token)).status_code == 403  # a reviewer
            assert client.get("/api/runs").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "dashboard stopped" in rest
