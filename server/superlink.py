"""Start, check and stop Flower's SuperLink for FedGuard, and manage which nodes may join.

In Flower 1.42 one HTTPS server (FastAPI/uvicorn) serves the Fleet, Control and Runtime APIs
on a single ``--host/--port``; ``--fleet-api-address`` and ``--control-api-address`` are
deprecated no-ops for binding, so the APIs cannot be split across addresses. Anyone who can
reach that port could register node keys and start or stop runs. FedGuard therefore binds
the SuperLink to loopback only; across hosts a gateway forwards ``/v1/fleet/*`` and
``/health`` (DESIGN §5). The SuperLink always runs with TLS, SuperNode authentication, a
persistent state database and runtime dependency installation off (it would run ``uv sync``
and pull packages from the network). The ServerApp runs in a ``flwr-serverapp`` subprocess
(started through ``flower-superexec``) from the run's app bundle, with this environment's
Python, so FedGuard's dependencies come from the virtualenv the SuperLink was started from.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

from common.errors import FedGuardError
from common.kit import fingerprint_public_key, parse_node_public_key
from common.processes import bin_path, descendants, flwr_env, free_port, log_tail
from server.runs import CONNECTION, RunError, ensure_connection, flwr_json


class SuperLinkError(FedGuardError):
    """The SuperLink could not be started, reached or stopped, or a node key was refused."""

    code = "superlink-error"


@dataclass(frozen=True)
class TlsFiles:
    """The federation CA certificate and the SuperLink's own certificate and key (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tls_files(tls: TlsFiles) -> None:
    """Fail early, naming the file, if a certificate or key is missing, unreadable or mismatched."""
    for label, path in (("CA certificate", tls.ca_cert), ("certificate", tls.server_cert), ("key", tls.server_key)):
        p = Path(path)
        if not p.is_file():
            raise SuperLinkError(
                f"SuperLink TLS {label} not found", where=str(p), fix="provision the server's TLS files"
            )
        try:
            p.read_bytes()
        except OSError as exc:
            raise SuperLinkError(
                f"SuperLink TLS {label} is not readable: {exc.strerror}",
                where=str(p),
                fix="run the server as the user that owns the key, or fix its permissions (0600, owned by that user)",
            ) from exc
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    except ssl.SSLError as exc:
        raise SuperLinkError(
            f"the SuperLink certificate and key do not load together ({exc.reason or exc})",
            where=f"{tls.server_cert}, {tls.server_key}",
            fix="pass the key that belongs to this certificate (both PEM)",
        ) from exc
    try:
        ssl.create_default_context(cafile=str(tls.ca_cert))
    except ssl.SSLError as exc:
        raise SuperLinkError(f"not a PEM CA certificate ({exc.reason or exc})", where=str(tls.ca_cert)) from exc


def local_name(server_cert: Path, host: str) -> str:
    """The name local clients (CLI, health check, same-host nodes) must use to reach ``host`` over TLS.

    The certificate must name the bound loopback address (or ``localhost``), or every local
    connection fails hostname verification.
    """
    cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        ips, names = set(), set()
    if host in ips or host in names:
        return host
    if "localhost" in names:
        return "localhost"
    raise SuperLinkError(
        f"the SuperLink certificate does not name {host} or localhost (it names {sorted(ips | names)})",
        where=str(server_cert),
        fix="add 127.0.0.1 and localhost to [server] addresses in the federation file and rotate the server "
        "certificate (fedguard provision rotate server): the SuperLink binds loopback only",
    )


def listener_on(host: str, port: int) -> bool:
    """True when something listens on ``host:port``.

    Binds with ``SO_REUSEADDR``, as the SuperLink's own server does: connections a killed
    SuperLink left in TIME_WAIT do not block its restart on the same port (a plain bind fails
    for about a minute after a crash), while a live listener still does.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def key_fingerprint(public_key: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key file, as ``ssh-keygen -lf`` prints it."""
    return fingerprint_public_key(Path(public_key).read_text(encoding="utf-8"))


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop_process_tree(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL after ``timeout``; then its leftover descendants.

    Descendants are identified by PID *and* start time before signalling, so a reused PID is never hit.
    """
    if proc.poll() is not None:
        return
    tree = {pid: _start_time(pid) for pid in descendants(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5.0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid, started in tree.items() if started and _start_time(pid) == started]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _start_time(pid) == tree[pid]]
            time.sleep(0.1)
        if not alive:
            return
        deadline = time.monotonic() + 5.0


class SuperLink:
    """A ``flower-superlink`` child process with TLS, node authentication and a persistent database.

    Files in ``workdir``: ``superlink.db`` (Flower state: nodes, runs), ``superlink.log``,
    ``flwr-home/`` (FLWR_HOME: the CLI connection and installed app bundles), ``nodes.json``
    (node key fingerprints → node ids). The ServerApp's relative paths resolve against ``workdir``.
    """

    def __init__(
        self,
        workdir: Path,
        tls: TlsFiles,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_level: str | None = None,
    ) -> None:
        if not is_loopback(host):
            raise SuperLinkError(
                f"refusing to bind the SuperLink to {host}: its Control and Runtime APIs share the Fleet port",
                fix="bind to 127.0.0.1 and expose only /v1/fleet/* and /health through a TLS gateway (see deploy/)",
            )
        self.workdir = Path(workdir).resolve()
        self.tls = TlsFiles(*(Path(p).resolve() for p in (tls.ca_cert, tls.server_cert, tls.server_key)))
        self.host = host
        self.port = port or free_port(host)
        self.local_host = host  # the name local clients use; set from the certificate in start()
        self.log_level = log_level
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- locations -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where local clients (CLI, same-host nodes) connect: a name the server certificate carries."""
        h = self.local_host
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def database(self) -> Path:
        return self.workdir / "superlink.db"

    @property
    def log_path(self) -> Path:
        return self.workdir / "superlink.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        return [
            bin_path("flower-superlink"),
            "--ssl-ca-certfile",
            str(self.tls.ca_cert),
            "--ssl-certfile",
            str(self.tls.server_cert),
            "--ssl-keyfile",
            str(self.tls.server_key),
            "--enable-supernode-auth",
            "--database",
            str(self.database),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]

    def start(self, timeout: float = 60.0) -> SuperLink:
        """Start and wait until ``GET /health`` answers over TLS; a clear error otherwise."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        check_tls_files(self.tls)
        self.local_host = local_name(self.tls.server_cert, self.host)
        if listener_on(self.host, self.port):
            raise SuperLinkError(
                f"port {self.port} on {self.host} is already in use",
                fix="stop whatever listens there, or start the server on another port",
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        ensure_connection(self.flwr_home, self.address, self.tls.ca_cert, CONNECTION)
        self._log_file = self.log_path.open("ab")
        extra = {"FLWR_LOG_LEVEL": self.log_level} if self.log_level else {}
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=flwr_env(self.flwr_home, extra),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_log()
                self._proc = None
                raise SuperLinkError(self._exit_reason(code), where=str(self.log_path), fix=self._exit_fix())
            if self.healthy():
                return self
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise SuperLinkError(
                    f"the SuperLink did not answer /health within {timeout:g}s; last log lines:\n{tail}",
                    where=str(self.log_path),
                )
            time.sleep(0.25)

    def _exit_reason(self, code: int | None) -> str:
        tail = log_tail(self.log_path)
        lowered = tail.lower()
        if "address already in use" in lowered or "errno 98" in lowered:
            what = f"port {self.port} is already in use"
        elif "certificate" in lowered or "ssl" in lowered or "private key" in lowered:
            what = "the TLS certificate or key was refused"
        else:
            what = "the SuperLink exited during start-up"
        return f"{what} (exit code {code}); last log lines:\n{tail}"

    def _exit_fix(self) -> str | None:
        lowered = log_tail(self.log_path).lower()
        if "already in use" in lowered:
            return "stop whatever listens there, or pick another port"
        if "no such file" in lowered and "flower-superexec" in lowered:
            return "install flwr==1.42.* in this environment; its console scripts must be next to python"
        return None

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when ``GET /health`` answers 200 over TLS verified against the federation CA."""
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        conn = http.client.HTTPSConnection(self.local_host, self.port, context=ctx, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``; reap it and any ServerApp/SuperExec it left behind."""
        if self._proc is not None:
            stop_process_tree(self._proc, timeout)
            self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- node allow-list -----------------------------------------------------------------------

    def _registry(self) -> dict[str, dict[str, Any]]:
        path = self.workdir / "nodes.json"
        if not path.is_file():
            return {}
        return dict(json.loads(path.read_text(encoding="utf-8")))

    def _save_registry(self, registry: dict[str, dict[str, Any]]) -> None:
        path = self.workdir / "nodes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(registry, indent=2), encoding="utf-8")
        tmp.replace(path)

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Allow the node holding this EC (P-384) OpenSSH public key to connect; return its node id.

        Registering a key this server registered before returns the same id.
        """
        public_key = Path(public_key).resolve()
        try:
            parse_node_public_key(public_key, f"node public key {public_key}")  # EC P-384 OpenSSH, or a clear error
        except FedGuardError as exc:
            raise SuperLinkError(exc.what, where=str(public_key), fix=exc.fix or "send the node's node.pub") from exc
        fingerprint = key_fingerprint(public_key)
        args = ["supernode", "register", str(public_key), CONNECTION] + (["--name", name] if name else [])
        try:
            data = flwr_json(args, self.flwr_home, what=f"registering node key {public_key.name}")
        except RunError as exc:
            known = self._registry().get(fingerprint)
            if "already in use" in str(exc) and known:
                return int(known["node_id"])
            raise SuperLinkError(exc.what, where=str(public_key), fix=exc.fix) from exc
        node_id = int(data["node-id"])
        registry = self._registry()
        registry[fingerprint] = {"node_id": node_id, "name": name, "public_key": str(public_key)}
        self._save_registry(registry)
        return node_id

    def unregister_node(self, node: int | Path) -> None:
        """Revoke a node (by node id or by its public key file): it can no longer connect."""
        registry = self._registry()
        if isinstance(node, int):
            node_id = node
        else:
            fingerprint = key_fingerprint(Path(node))
            if fingerprint not in registry:
                raise SuperLinkError(
                    "this public key was never registered here", where=str(node), fix="pass the node id instead"
                )
            node_id = int(registry[fingerprint]["node_id"])
        try:
            flwr_json(["supernode", "unregister", str(node_id), CONNECTION], self.flwr_home, what="unregistering")
        except RunError as exc:
            raise SuperLinkError(exc.what, fix=exc.fix) from exc
        self._save_registry({k: v for k, v in registry.items() if int(v["node_id"]) != node_id})

    def list_nodes(self) -> list[dict[str, Any]]:
        """Registered nodes as Flower reports them (id, status, online-at, ...)."""
        try:
            data = flwr_json(["supernode", "ls", CONNECTION], self.flwr_home, what="listing nodes")
        except RunError as exc:
            raise SuperLinkError(exc.what, fix=exc.fix) from exc
        return list(data.get("nodes", []))
