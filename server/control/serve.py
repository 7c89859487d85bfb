"""Serve the control service over HTTPS (uvicorn) in a thread of the ``server start`` process.

TLS uses the server kit's certificate and key, so operators trust it through the federation CA
they already pin. The listening socket is bound here (port 0 picks a free one), which makes the
real port known before the first request and avoids a bind race with a second server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import threading
import time
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import FedGuardError


class ControlServiceError(FedGuardError):
    code = "control-service-error"


class ControlServer:
    """uvicorn serving ``app`` with TLS on ``host:port`` from a background thread; ``stop()`` shuts it down."""

    def __init__(
        self, app: object, certfile: Path, keyfile: Path, host: str = "127.0.0.1", port: int = 8443, name: str = ""
    ) -> None:
        self.host = host
        self.name = name or host  # the name the certificate carries (URLs use it)
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError as exc:
            raise ControlServiceError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                where="--control-host/--control-port",
                fix="pick a free port (or 0 for any free port) and an address of this host",
            ) from None
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="fedguard-control", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.name}]" if ":" in self.name else self.name
        return f"https://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by start()
            self._error = exc

    def start(self, timeout: float = 20.0) -> ControlServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ControlServiceError(
                    f"the control service did not start: {self._error or 'timed out'}",
                    fix="check the certificate and key files of the server kit",
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throw-away loopback certificate for a dashboard that has no server kit (``demo --simulate --serve``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedGuard demo dashboard")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "dashboard.crt", directory / "dashboard.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
