"""The nginx gateway in front of a real SuperLink: fleet and health pass, control and runtime do not.

"Passes" means the SuperLink itself answered: an nginx error page (502 when the upstream is down or
the proxy's TLS to it fails) must not count, so every pass-through check compares the gateway's
answer with the SuperLink's own answer to the same request on its loopback port.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from common.processes import free_port
from server.gateway import Gateway, GatewaySettings
from server.superlink import SuperLink, TlsFiles
from tests.helpers import need
from tests.tls_material import TlsMaterial, make_tls_material

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: What Flower 1.42's SuperLink says to a fleet call without SuperNode authentication.
SUPERLINK_REFUSAL = b"Invalid SuperNode authentication"


class Lab(NamedTuple):
    port: int  # the gateway's
    ca: Path
    superlink_port: int
    tls: TlsMaterial


def _nginx_installed() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # CI installs nginx (.ci/run); only a developer machine without it may skip, never CI.
    need(_nginx_installed(), "nginx is not installed (apt-get install nginx-light)")
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
        yield Lab(port, tls.ca_cert, superlink.port, tls)
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


def test_health_and_fleet_pass_through(gateway: Lab) -> None:
    # /health: the SuperLink's own 200 (empty body), not something nginx made up.
    direct = request(gateway.superlink_port, gateway.ca, "GET", "/health")
    assert direct == (200, b"")
    assert request(gateway.port, gateway.ca, "GET", "/health") == direct
    # An unauthenticated fleet call reaches the SuperLink, which refuses it itself (401 with its own
    # detail), byte for byte what it answers on its loopback port; not a gateway 403 or an nginx 502.
    direct = request(gateway.superlink_port, gateway.ca, "POST", "/v1/fleet/register-node")
    assert direct[0] == 401 and SUPERLINK_REFUSAL in direct[1], direct
    via_gateway = request(gateway.port, gateway.ca, "POST", "/v1/fleet/register-node")
    assert via_gateway == direct, f"the gateway answered itself: {via_gateway}"


@pytest.mark.parametrize("path", ["/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/get-nodes", "/"])
def test_control_and_runtime_are_refused(gateway: Lab, path: str) -> None:
    status, body = request(gateway.port, gateway.ca, "POST", path, b"")
    assert status == 403 and b"only /v1/fleet/* and /health" in body


def test_the_gateway_needs_the_federation_ca(gateway: Lab, tmp_path: Path) -> None:
    other = make_tls_material(tmp_path / "other", ["x"], federation="other").ca_cert
    with pytest.raises(ssl.SSLCertVerificationError):
        request(gateway.port, other, "GET", "/health")


def test_a_gateway_without_its_superlink_is_not_healthy(gateway: Lab, tmp_path: Path) -> None:
    """The control for the checks above: with nothing behind it, the same gateway config answers 502."""
    tls, port = gateway.tls, free_port()
    nothing_there = free_port()
    lonely = Gateway(
        GatewaySettings("127.0.0.1", port, tls.server_cert, tls.server_key, tls.ca_cert, nothing_there),
        tmp_path / "gateway",
    )
    lonely.start()
    try:
        status, _ = request(port, gateway.ca, "GET", "/health")
        assert status == 502
        status, body = request(port, gateway.ca, "POST", "/v1/fleet/register-node")
        assert status == 502 and SUPERLINK_REFUSAL not in body
    finally:
        lonely.stop()
