"""The control service's layers: an acyclic import graph, a service layer free of HTTP, one error mapping.

* every ``server.control`` module imports on its own in a fresh interpreter, and the graph of
  imports among them (lazy, in-function imports included) has no cycle;
* the service layer (service, users, audit, federation, errors, views) imports neither FastAPI
  nor Starlette, and no module builds an ``HTTPException``: domain errors are mapped to responses
  by the one handler in ``server.control.app``;
* pages come from Jinja2 templates and a stylesheet shipped as package data, not from HTML or CSS
  in Python strings;
* the API and the dashboard share the role dependencies: the same denial, the same audit entry.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from common.errors import FedGuardError, StoreError
from server.control import errors
from server.control.app import create_app
from server.control.federation import NodeView
from tests.test_control_api import BASE, _browser_session, bearer, make_service

pytestmark = pytest.mark.timeout(120)

PACKAGE = "server.control"
SERVICE_LAYER = ("service", "users", "audit", "federation", "errors", "views")


def _sources() -> dict[str, Path]:
    """Every module of the package (subpackages included) by its dotted name under ``server.control``."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    out = {}
    for p in sorted(folder.rglob("*.py")):
        parts = p.relative_to(folder).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            out[".".join(parts)] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            if node.module:
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}  # `from server.control import pages`
    return out


def _graph() -> dict[str, set[str]]:
    """Which package modules each package module imports (the most specific module an import names)."""
    sources = _sources()
    prefix = PACKAGE + "."
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        edges = set()
        for m in _imports(path):
            if not m.startswith(prefix):
                continue
            parts = m[len(prefix) :].split(".")
            hit = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in sources), None)
            if hit and hit != name:
                edges.add(hit)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_among_control_modules_is_acyclic() -> None:
    graph = _graph()
    assert {"app", "routers.runs", "routers.dashboard", "deps", "service", "errors", "pages"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle among {PACKAGE} modules: {' -> '.join(_cycle(graph) or [])}"
    assert graph["errors"] == set()  # the bottom layer


@pytest.mark.parametrize("module", sorted(_sources()))
def test_each_control_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    r = subprocess.run([sys.executable, "-c", f"import {PACKAGE}.{module}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_service_layer_knows_nothing_of_http() -> None:
    sources = _sources()
    for name in SERVICE_LAYER:
        web = {m for m in _imports(sources[name]) if m.split(".")[0] in ("fastapi", "starlette")}
        assert not web, f"{name}.py imports {sorted(web)}: raise a server.control.errors domain error instead"
    for name, path in sources.items():
        assert "HTTPException" not in path.read_text(encoding="utf-8"), f"{name}.py builds an HTTPException"


def _non_docstring_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_no_html_or_css_in_python_strings() -> None:
    for name, path in _sources().items():
        for text in _non_docstring_strings(path):
            markup = re.search(
                r"<(?:html|head|body|style|table|tr|td|form|input|div|span|p|h[1-6]|footer|link)\b", text
            )
            css = re.search(r"[a-z-]+\s*\{[^}]*:[^}]*;", text)  # a CSS rule
            assert not markup and not css, f"{name}.py holds markup or CSS in a string: {text[:80]!r}"


def test_templates_and_stylesheet_are_package_data() -> None:
    root = resources.files(PACKAGE)
    names = {"base", "login", "runs", "run", "nodes", "start", "users", "audit", "message", "report_footer"}
    for name in names:
        assert root.joinpath("templates", f"{name}.html").is_file(), name
    assert "{" in root.joinpath("static", "control.css").read_text(encoding="utf-8")


def test_every_domain_error_has_one_status() -> None:
    assert errors.http_status(errors.NotAuthenticated()) == 401
    assert errors.http_status(errors.Forbidden("x")) == 403
    assert errors.http_status(StoreError("no run 9")) == 404
    assert errors.http_status(errors.Conflict("x")) == 409
    assert errors.http_status(errors.Invalid("x")) == 422
    assert errors.http_status(errors.RateLimited("x", 3)) == 429
    assert errors.http_status(errors.FederationFailed("x")) == 502
    assert errors.http_status(errors.Unavailable("x")) == 503
    assert errors.http_status(FedGuardError("some user mistake")) == 422
    from server.control.federation import UnknownNode

    assert errors.http_status(UnknownNode("no enrolled node named 'x'")) == 404
    # a server path in `where` stays on the server
    detail = errors.public_detail(errors.Conflict("taken", where="/srv/fedguard/control.db", fix="pick another"))
    assert detail == "taken\nFix: pick another"


class _BrokenFederation:
    """A federation door whose SuperLink fails every call."""

    def __init__(self, verify_key_path: Path) -> None:
        self.verify_key_path = verify_key_path

    def nodes(self) -> list[NodeView]:
        raise FedGuardError("the SuperLink did not answer", where="127.0.0.1:9093")

    def revoke_node(self, name: str) -> NodeView:
        raise FedGuardError("the SuperLink did not answer")

    def start_run(self, config_path: Path, token: str) -> int:
        raise FedGuardError("the SuperLink did not answer")

    def stop_run(self, flower_run_id: int) -> None:
        raise FedGuardError("the SuperLink did not answer")


def test_one_handler_maps_service_errors_for_the_api_and_the_dashboard(tmp_path: Path) -> None:
    svc, fed = make_service(tmp_path)
    svc.federation = _BrokenFederation(fed.verify_key_path)
    client = TestClient(create_app(svc), base_url=BASE)
    _, admin = svc.users.add("boss", "admin")
    r = client.get("/api/nodes", headers=bearer(admin))
    assert r.status_code == 502 and "did not answer" in r.json()["detail"]
    r = client.post("/api/runs/2/stop", headers=bearer(admin))
    assert r.status_code == 502 and svc.audit.entries(limit=1)[0].outcome.startswith("failed")
    browser, csrf = _browser_session(svc, admin)
    page = browser.get("/nodes")
    assert (
        page.status_code == 502
        and "did not answer" in page.text
        and page.headers["content-type"].startswith("text/html")
    )
    r = browser.post("/runs/2/stop", data={"csrf_token": csrf})
    assert r.status_code == 502 and "<h1>" in r.text and "did not answer" in r.text
    # no federation attached at all (the demo's read-only dashboard): 503, said plainly
    svc.federation = None
    r = client.get("/api/nodes", headers=bearer(admin))
    assert r.status_code == 503 and "no SuperLink attached" in r.json()["detail"]
    assert browser.get("/nodes").status_code == 503


def test_api_and_dashboard_deny_and_audit_alike(tmp_path: Path) -> None:
    svc, fed = make_service(tmp_path)
    client = TestClient(create_app(svc), base_url=BASE)
    _, token = svc.users.add("rita", "reviewer")

    def last() -> tuple[Any, ...]:
        e = svc.audit.entries(limit=1)[0]
        return e.actor, e.action, e.outcome

    assert client.post("/api/runs/2/stop", headers=bearer(token)).status_code == 403
    api_entry = last()
    browser, csrf = _browser_session(svc, token)
    r = browser.post("/runs/2/stop", data={"csrf_token": csrf})
    assert r.status_code == 403 and "needs operator" in r.text
    assert last() == api_entry == ("rita", "run.stop", "denied: needs operator")
    # role first, then CSRF: a reviewer's forged form is a recorded denial; an operator's is refused unrecorded
    _, op = svc.users.add("otto", "operator")
    operator, _ = _browser_session(svc, op)
    before = len(svc.audit.entries(limit=1000))
    assert operator.post("/runs/2/stop", data={"csrf_token": "forged"}).status_code == 403
    assert operator.post("/runs/2/stop").status_code == 403
    assert len(svc.audit.entries(limit=1000)) == before and fed.stopped == []
    # the stylesheet is served from the package (CSP allows only same-origin styles, no inline ones)
    css = client.get("/static/control.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "style-src 'self';" in css.headers["content-security-policy"]
    assert 'href="/static/control.css"' in browser.get("/").text
