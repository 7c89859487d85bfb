"""The nginx gateway in front of a real SuperLink: fleet and health pass, control and runtime do not."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.processes import free_port
from server.gateway import Gateway, GatewaySettings
from server.superlink import SuperLink, TlsFiles
from tests.tls_material import make_tls_material

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    # CI installs nginx (.ci/run); only a developer machine without it may skip, never CI.
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists() and os.environ.get("CI") != "true",
        reason="nginx is not installed (apt-get install nginx-light)",
    ),
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    base = tmp_path_factory.mktemp("gateway")
    tls = make_tls_material(base / "kits", ["alpha"])
    superlink = SuperLink(base / "server", TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key))
    port = free_port()
    gw = Gateway(
        GatewaySettings("127.0.0.1", port, tls.server_cert, tls.server_key, tls.ca_cert, superlink.port),
        base / "gateway",
    )
    try:
        superlink.start(timeout=90)
        gw.start()
        yield port, tls.ca_cert
    finally:
        gw.stop()
        superlink.stop()


def request(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/protobuf"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_health_and_fleet_pass_through(gateway: tuple[int, Path]) -> None:
    port, ca = gateway
    status, _ = request(port, ca, "GET", "/health")
    assert status == 200
    # An unauthenticated fleet call reaches the SuperLink, which refuses it itself (not the gateway).
    status, body = request(port, ca, "POST", "/v1/fleet/register-node", b"")
    assert status != 403 or b"FedGuard gateway" not in body
    assert b"FedGuard gateway" not in body


@pytest.mark.parametrize("path", ["/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/get-nodes", "/"])
def test_control_and_runtime_are_refused(gateway: tuple[int, Path], path: str) -> None:
    port, ca = gateway
    status, body = request(port, ca, "POST", path, b"")
    assert status == 403 and b"only /v1/fleet/* and /health" in body


def test_the_gateway_needs_the_federation_ca(gateway: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = gateway
    other = make_tls_material(tmp_path / "other", ["x"], federation="other").ca_cert
    with pytest.raises(ssl.SSLCertVerificationError):
        request(port, other, "GET", "/health")
