"""Schema-driven fuzzing of the control API: Hypothesis draws inputs from the service's own OpenAPI description.

For every operation in ``/openapi.json``: path and query parameters of the declared type *and* of
every other type (huge and negative integers, arbitrary Unicode, separators), JSON bodies that
follow the declared properties or break them (wrong types, missing fields, extra keys, garbage
TOML). The service must answer every one with a 2xx or a clear 4xx, never a 500. The log-in form
is fuzzed the same way. Bounded to about 12 s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.control.app import create_app
from tests.test_control_api import BASE, bearer, demo_toml, make_service

pytestmark = pytest.mark.timeout(180)

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.just("fg_000000000000_" + "A" * 43),
)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner))


def _value(schema: dict[str, Any], spec: dict[str, Any], toml: str) -> st.SearchStrategy[Any]:
    """A value for ``schema``: usually well-typed (edge values included), sometimes anything at all."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return st.one_of([_value(s, spec, toml) for s in schema["anyOf"]])
    kind = schema.get("type")
    if "enum" in schema:
        typed: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
    elif kind == "integer":
        typed = st.integers() | st.sampled_from([0, 1, 2, -1, 2**53, 2**63, 2**64 + 1])
    elif kind == "boolean":
        typed = st.booleans()
    elif kind == "string":
        typed = st.text(max_size=60) | st.sampled_from([toml, toml.replace("rounds = 3", "rounds = -1"), "[[", "a=1"])
    elif kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        typed = st.fixed_dictionaries(
            {k: _value(v, spec, toml) for k, v in props.items() if k in required},
            optional={k: _value(v, spec, toml) for k, v in props.items() if k not in required} | {"extra": _SCALARS},
        )
    else:
        typed = _JSON
    return st.one_of(typed, typed, typed, _JSON)


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()]


@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp: Path = tmp_path_factory.mktemp("control-fuzz")
    svc, _ = make_service(tmp)
    client = TestClient(create_app(svc), base_url=BASE, raise_server_exceptions=False)
    _, token = svc.users.add("fuzzer", "admin")
    spec = client.get("/openapi.json", headers=bearer(token)).json()
    return {
        "client": client,
        "token": token,
        "spec": spec,
        "toml": demo_toml(tmp),
        "deadline": time.monotonic() + 10,
    }


def test_no_operation_answers_500(fuzz_world: dict[str, Any]) -> None:
    client, spec, toml = fuzz_world["client"], fuzz_world["spec"], fuzz_world["toml"]
    ops = _operations(spec)
    assert len(ops) >= 14
    seen: dict[str, set[int]] = {}

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any], Any, dict[str, str]]:
        method, path, op = draw(st.sampled_from(ops))
        query: dict[str, Any] = {}
        for param in op.get("parameters", []):
            value = draw(_value(param.get("schema", {}), spec, toml))
            if param["in"] == "path":
                text = "x" if value is None or value == "" else str(value)
                path = path.replace("{" + param["name"] + "}", quote(text, safe=""))
            elif draw(st.booleans()):
                query[param["name"]] = str(value)
        body = None
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            body = draw(_value(schema, spec, toml))
        auth = draw(st.sampled_from(["admin", "admin", "admin", "none", "garbage"]))
        headers = (
            bearer(fuzz_world["token"]) if auth == "admin" else {} if auth == "none" else {"Authorization": "Bearer x"}
        )
        return method, path, query, body, headers

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests())
    def check(req: tuple[str, str, dict[str, Any], Any, dict[str, str]]) -> None:
        if time.monotonic() > fuzz_world["deadline"]:
            return
        method, path, query, body, headers = req
        r = client.request(method, path, params=query, json=body, headers=headers)
        assert r.status_code < 500, (method, path, query, body, r.status_code, r.text[:500])
        if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 400:
            assert "detail" in r.json()
        seen.setdefault(method, set()).add(r.status_code)

    check()
    codes = set().union(*seen.values())
    assert any(200 <= c < 300 for c in codes) and 422 in codes  # the fuzzer reached both sides


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(token=st.text(max_size=80), csrf=st.text(max_size=40), same=st.booleans())
def test_login_form_never_answers_500(fuzz_world: dict[str, Any], token: str, csrf: str, same: bool) -> None:
    client = fuzz_world["client"]
    if same:
        client.cookies.set("__Host-fedguard_login", quote(csrf, safe="") or "x")
        csrf = quote(csrf, safe="") or "x"
    r = client.post("/login", data={"token": token, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code in (303, 401, 403, 422, 429), r.text[:300]


# -- hostile bodies on every POST route (issue 20, item 7) -----------------------------------------------------------


def _post_routes() -> list[str]:
    """Every POST path the app serves (API and dashboard forms), path parameters filled in."""
    from server.control.routers import audit, dashboard, nodes, runs, users

    paths = []
    for router in (runs.router, nodes.router, users.router, audit.router, audit.openapi_router, dashboard.router):
        for route in router.routes:
            if "POST" in (getattr(route, "methods", None) or ()):
                path = route.path  # type: ignore[attr-defined]
                paths.append(path.replace("{run_id}", "1").replace("{name}", "org-0"))
    return sorted(set(paths))


_JSON_ROUTES = {"/api/runs", "/api/runs/plan", "/api/users"}
_FORM_ROUTES = {"/login", "/runs/new", "/users"}
"""Routes that read a JSON or form body (the others never read one: only a declared Content-Length stops them)."""


def _deep_json(depth: int) -> bytes:
    return b'{"config_toml": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


def test_every_post_route_refuses_deep_and_oversized_bodies(fuzz_world: dict[str, Any]) -> None:
    client, headers = fuzz_world["client"], bearer(fuzz_world["token"])
    routes = _post_routes()
    assert _JSON_ROUTES | _FORM_ROUTES <= set(routes) and len(routes) >= 8
    as_json = {**headers, "content-type": "application/json"}
    as_form = {**headers, "content-type": "application/x-www-form-urlencoded"}
    big = b'{"config_toml": "' + b"a" * 18_000_000 + b'"}'  # the 18 MB body
    form = b"token=" + b"A" * 2_000_000 + b"&csrf_token=x"

    def chunks() -> Any:
        yield b'{"config_toml": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    for path in routes:
        for kind, body in (
            ("deep array", b"[" * 200_000 + b"]" * 200_000),
            ("deep object", _deep_json(50_000)),
            ("deep and big", b"[" * 900_000 + b"]" * 900_000),
        ):
            r = client.post(path, content=body, headers=as_json)
            assert r.status_code < 500, (path, kind, r.status_code, r.text[:300])  # 2xx: a route without a body
            if path in _JSON_ROUTES:
                assert 400 <= r.status_code < 500 and "detail" in r.json(), (path, kind, r.status_code)
        # a declared size over the limit: refused unread, on every route
        r = client.post(path, content=big, headers=as_json)
        assert r.status_code == 413 and "larger than" in r.json()["detail"], (path, r.status_code)
        r = client.post(path, content=form, headers=as_form)
        assert r.status_code == 413, (path, "form", r.status_code)
        r = client.post(path, content=b"{}", headers={**as_json, "content-length": "x"})
        assert r.status_code == 400, (path, "malformed Content-Length", r.status_code)
        # no Content-Length to trust (chunked): counted as it arrives, wherever a body is read
        r = client.post(path, content=chunks(), headers=as_json)
        assert r.status_code == 413 or (r.status_code < 500 and path not in _JSON_ROUTES), (path, r.status_code)
        r = client.post(path, content=iter([form]), headers=as_form)
        assert r.status_code == 413 or (r.status_code < 500 and path not in _FORM_ROUTES), (path, r.status_code)


@pytest.mark.parametrize(
    "config_toml",
    [
        "a = " + "[" * 20_000 + "]" * 20_000,
        "a = " + "{b = " * 20_000 + "1" + "}" * 20_000,
        "[" + ".".join(["a"] * 10_000) + "]\nx = 1",
        "[[" + ".".join(["a"] * 10_000) + "]]\nx = 1",
    ],
    ids=["arrays", "inline-tables", "tables", "array-of-tables"],
)
def test_deeply_nested_toml_is_a_clear_422(fuzz_world: dict[str, Any], config_toml: str) -> None:
    client, headers = fuzz_world["client"], bearer(fuzz_world["token"])
    for path in ("/api/runs/plan", "/api/runs"):
        r = client.post(path, json={"config_toml": config_toml}, headers=headers)
        assert r.status_code == 422 and "nested" in r.json()["detail"], (path, r.status_code, r.text[:300])


def test_body_limit_is_configurable(tmp_path: Path) -> None:
    svc, _ = make_service(tmp_path)
    client = TestClient(create_app(svc, max_body_bytes=2_000), base_url=BASE, raise_server_exceptions=False)
    _, token = svc.users.add("small", "admin")
    r = client.post("/api/users", json={"name": "x" * 3_000, "role": "reviewer"}, headers=bearer(token))
    assert r.status_code == 413
    r = client.post("/api/users", json={"name": "bob", "role": "reviewer"}, headers=bearer(token))
    assert r.status_code == 201


def test_body_limit_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import FedGuardError

    svc, _ = make_service(tmp_path)
    monkeypatch.setenv("FEDGUARD_CONTROL_MAX_BODY", "5000")
    client = TestClient(create_app(svc), base_url=BASE, raise_server_exceptions=False)
    assert client.post("/login", content=b"x" * 6_000).status_code == 413
    monkeypatch.setenv("FEDGUARD_CONTROL_MAX_BODY", "lots")
    with pytest.raises(FedGuardError, match="FEDGUARD_CONTROL_MAX_BODY"):
        create_app(svc)
