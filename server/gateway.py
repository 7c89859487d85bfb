"""The TLS gateway in front of the SuperLink: renders ``server/gateway_templates/*.conf`` and runs nginx.

Across hosts, nodes reach the federation only through this gateway, which forwards
``/v1/fleet/*`` and ``/health`` to the SuperLink on 127.0.0.1 and refuses everything else
(the Control and Runtime APIs share the SuperLink's port). The templates are package data, so
an installed FedGuard renders them from anywhere; ``deploy/gateway/`` links to the same files.
"""

from __future__ import annotations

import importlib.resources
import shutil
import socket
import string
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedGuardError
from common.processes import stop_child

#: The nginx config templates, shipped inside the ``server`` package (package data).
TEMPLATES = importlib.resources.files("server") / "gateway_templates"
TEMPLATE_NAMES = ("nginx.conf", "proxy_tls.conf")


class GatewayError(FedGuardError):
    code = "gateway-error"


@dataclass(frozen=True)
class GatewaySettings:
    listen_host: str
    listen_port: int
    server_cert: Path
    server_key: Path
    ca_cert: Path
    upstream_port: int
    upstream_name: str = "localhost"  # a name the SuperLink's certificate carries


def render(settings: GatewaySettings, prefix: Path) -> Path:
    """Write ``nginx.conf`` (and its include) into ``prefix``; return the config path."""
    missing = [name for name in TEMPLATE_NAMES if not (TEMPLATES / name).is_file()]
    if missing:
        raise GatewayError(
            f"gateway templates not found: {', '.join(missing)}", where=str(TEMPLATES), fix="reinstall FedGuard"
        )
    prefix = prefix.resolve()
    prefix.mkdir(parents=True, exist_ok=True)
    values = {
        "PREFIX": str(prefix),
        "LISTEN_HOST": settings.listen_host,
        "LISTEN_PORT": str(settings.listen_port),
        "SERVER_CERT": str(Path(settings.server_cert).resolve()),
        "SERVER_KEY": str(Path(settings.server_key).resolve()),
        "CA_CERT": str(Path(settings.ca_cert).resolve()),
        "UPSTREAM_PORT": str(settings.upstream_port),
        "UPSTREAM_NAME": settings.upstream_name,
    }
    for name in TEMPLATE_NAMES:
        text = string.Template((TEMPLATES / name).read_text(encoding="utf-8")).substitute(values)
        (prefix / name).write_text(text, encoding="utf-8")
    return prefix / "nginx.conf"


class Gateway:
    """nginx in the foreground as a child process (tests, single-host demos); operators use their own."""

    def __init__(self, settings: GatewaySettings, prefix: Path) -> None:
        self.settings = settings
        self.prefix = prefix.resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Gateway:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise GatewayError("nginx is not installed", fix="install it (Debian: apt-get install nginx-light)")
        conf = render(self.settings, self.prefix)
        check = subprocess.run([nginx, "-t", "-q", "-c", str(conf), "-p", str(self.prefix)], capture_output=True)
        if check.returncode != 0:
            raise GatewayError(f"nginx rejected the config: {check.stderr.decode()[-500:]}", where=str(conf))
        self._proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(self.prefix / "nginx.stderr").open("ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise GatewayError("nginx exited at start", where=str(self.prefix / "error.log"))
            try:
                with socket.create_connection((self.settings.listen_host, self.settings.listen_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise GatewayError(f"nginx did not listen on port {self.settings.listen_port} within {timeout:g}s")

    def stop(self) -> None:
        stop_child(self._proc)  # nginx's master reaps its worker on SIGTERM
        self._proc = None
