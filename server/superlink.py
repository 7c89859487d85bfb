"""Start, check and stop Flower's SuperLink for FedGuard, and manage which nodes may join.

In Flower 1.42 one HTTPS server (FastAPI/uvicorn) serves the Fleet, Control and Runtime APIs
on a single ``--host/--port``; ``--fleet-api-address`` and ``--control-api-address`` are
deprecated no-ops for binding, so the APIs cannot be split across addresses. FedGuard binds
the SuperLink to loopback only (across hosts a gateway forwards ``/v1/fleet/*`` and
``/health``, docs/security.md), and loopback is no boundary against other local users or containers
sharing the network namespace, so only FedGuard's server process may use the other two APIs:

- **Control API** (register nodes, start/stop runs): a shared-secret authn plugin
  (``server/superlink_launch.py``) accepts only the secret in ``secrets/superlink-control.secret``
  (0600, new at every start), which FedGuard's own ``flwr`` calls send (``server.runs``);
- **Runtime API** (ServerApp tasks): process isolation with a SuperExec HMAC secret
  (``secrets/superexec.secret``); FedGuard starts ``flower-superexec`` itself, and it hands each
  ServerApp its task token in a 0600 file (``secrets/tasks/``), never on a command line;
- a start-up self-check: unauthenticated calls to both APIs must be refused (401), or the
  server does not start.

The SuperLink always runs with TLS, SuperNode authentication, a persistent state database and
runtime dependency installation off (it would run ``uv sync`` and pull packages from the
network). The ServerApp runs in a ``flwr-serverapp`` subprocess of that SuperExec, from the
run's app bundle, with this environment's Python; ``FEDGUARD_SERVER_WORKDIR`` tells it where the
server's run store is (a run config cannot choose it).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from common.errors import FedGuardError
from common.files import atomic_write
from common.flower_internals import forget_unregistered_node, read_node_table
from common.kit import fingerprint_public_key, parse_node_public_key
from common.processes import descendants, flwr_env, free_port, log_tail
from common.reply_signing import key_fingerprint as flower_key_fingerprint
from server.enrollment import Enrolled, add_enrolled, drop_enrolled, write_enrolled
from server.runs import (
    CONNECTION,
    CONTROL_SECRET_NAME,
    RUN_STORE_ENV,
    RUN_STORE_RECORD,
    SECRETS_DIR,
    SERVER_WORKDIR_ENV,
    RunError,
    ensure_connection,
    flwr_json,
)
from server.superlink_launch import CONTROL_SECRET_ENV, TOKEN_DIR_ENV, superexec_command

#: Calls that must be refused without FedGuard's secrets (the start-up self-check).
GUARDED_PROBES = ("/v1/control/list-runs", "/v1/runtime/acquire-task")


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


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


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
    """A ``flower-superlink`` child process with TLS, node authentication and a persistent database,
    and the ``flower-superexec`` that runs its ServerApps, both behind FedGuard's secrets.

    Files in ``workdir``: ``superlink.db`` (Flower state: nodes, runs), ``superlink.log`` (both
    processes and the ServerApps), ``flwr-home/`` (0700; FLWR_HOME: the CLI connection and
    credentials, installed app bundles), ``secrets/`` (0700: the Control API and SuperExec secrets,
    task tokens), ``nodes.json`` (node key fingerprints → node ids), ``runs.db`` (the run store).
    """

    def __init__(
        self,
        workdir: Path,
        tls: TlsFiles,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_level: str | None = None,
        run_store: Path | None = None,
    ) -> None:
        """``run_store``: where the ServerApp records runs (default ``<workdir>/runs.db``); the server's
        choice, passed to the ServerApp in its environment: a run config cannot move it."""
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
        self.run_store = Path(run_store).resolve() if run_store else self.workdir / "runs.db"
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
    def secrets_dir(self) -> Path:
        return self.workdir / SECRETS_DIR

    @property
    def control_secret(self) -> Path:
        """The Control API secret (0600): whoever reads it can drive the SuperLink."""
        return self.secrets_dir / CONTROL_SECRET_NAME

    @property
    def superexec_secret(self) -> Path:
        """The SuperExec HMAC secret (0600): whoever reads it can take ServerApp tasks."""
        return self.secrets_dir / "superexec.secret"

    @property
    def token_dir(self) -> Path:
        """Where SuperExec puts each ServerApp's task token (0700 folder, 0600 files)."""
        return self.secrets_dir / "tasks"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        # Flower's flower-superlink, run through FedGuard's launcher for the Control API plugin; the
        # launcher starts the SuperExec as the SuperLink's child. -P: nothing in the workdir can
        # shadow installed code.
        return [
            sys.executable,
            "-P",
            "-m",
            "server.superlink_launch",
            "superlink",
            "--superexec-address",
            self.address,
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
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(self.superexec_secret),
        ]

    def superexec_command(self, parent_pid: int) -> list[str]:
        """The SuperExec the launcher starts for this SuperLink (task tokens in files; exits with it)."""
        return superexec_command(self.address, str(self.tls.ca_cert), str(self.superexec_secret), parent_pid)

    def _write_secrets(self) -> None:
        """Fresh secrets for this start, created 0600 (O_EXCL temp file + rename) in a 0700 folder.

        A restart invalidates whatever an earlier start handed out; nothing is ever on a command line.
        """
        for folder in (self.secrets_dir, self.token_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        for stale in self.token_dir.iterdir():  # tokens of ServerApps of an earlier start
            if stale.is_file():
                stale.unlink(missing_ok=True)
        atomic_write(self.control_secret, secrets.token_hex(32).encode("ascii"), private=True)
        atomic_write(self.superexec_secret, secrets.token_hex(32).encode("ascii"), private=True)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        base = {"FLWR_LOG_LEVEL": self.log_level} if self.log_level else {}
        # Inherited by flwr-serverapp: the ServerApp records runs in the server's store only.
        where = {SERVER_WORKDIR_ENV: str(self.workdir), RUN_STORE_ENV: str(self.run_store)}
        return flwr_env(self.flwr_home, base | where | extra)

    def start(self, timeout: float = 60.0) -> SuperLink:
        """Start the SuperLink (and, through it, its SuperExec), wait until ``GET /health`` answers over
        TLS, then check that unauthenticated Control and Runtime API calls are refused; a clear error otherwise."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.stop()  # a crashed SuperLink's log handle
        check_tls_files(self.tls)
        self.local_host = local_name(self.tls.server_cert, self.host)
        if listener_on(self.host, self.port):
            raise SuperLinkError(
                f"port {self.port} on {self.host} is already in use",
                fix="stop whatever listens there, or start the server on another port",
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_secrets()
        atomic_write(self.workdir / RUN_STORE_RECORD, f"{self.run_store}\n".encode())  # for `run start`
        ensure_connection(self.flwr_home, self.address, self.tls.ca_cert, CONNECTION)
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self._env({CONTROL_SECRET_ENV: str(self.control_secret), TOKEN_DIR_ENV: str(self.token_dir)}),
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
                break
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.stop()
                raise SuperLinkError(
                    f"the SuperLink did not answer /health within {timeout:g}s; last log lines:\n{tail}",
                    where=str(self.log_path),
                )
            time.sleep(0.25)
        try:
            self.check_boundary()
        except SuperLinkError:
            self.stop()
            raise
        return self

    def probe(self, path: str, timeout: float = 10.0) -> int:
        """HTTP status of an unauthenticated, empty POST to ``path`` (what any local process can send)."""
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        conn = http.client.HTTPSConnection(self.local_host, self.port, context=ctx, timeout=timeout)
        try:
            conn.request(
                "POST",
                path,
                body=b"",
                headers={"Content-Type": "application/protobuf", "Accept": "application/protobuf"},
            )
            return conn.getresponse().status
        finally:
            conn.close()

    def check_boundary(self) -> None:
        """Fail closed unless the Control and Runtime APIs refuse callers without FedGuard's secrets."""
        for path in GUARDED_PROBES:
            try:
                status = self.probe(path)
            except (OSError, http.client.HTTPException) as exc:
                raise SuperLinkError(f"the self-check could not call {path}: {exc}", where=str(self.log_path)) from exc
            if status != 401:
                raise SuperLinkError(
                    f"an unauthenticated call to {path} answered HTTP {status}, not 401: any local process "
                    "could drive this SuperLink, so the server refuses to start",
                    where=str(self.log_path),
                    fix="install FedGuard's pinned Flower (flwr==1.42.*) and start the server with "
                    "`fedguard server start`; never start flower-superlink by hand",
                )
        children = descendants(self._proc.pid) if self._proc is not None else []
        if not any("server.superlink_launch superexec" in _cmdline(pid) for pid in children):
            raise SuperLinkError(
                "the SuperLink's SuperExec is not running: no ServerApp could start; last log lines:\n"
                + log_tail(self.log_path),
                where=str(self.log_path),
            )

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
        if "no module named" in lowered:
            return "install FedGuard and flwr==1.42.* in this environment (pip install -e .)"
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
        """SIGTERM, SIGKILL after ``timeout``; reap it and the SuperExec and ServerApps it left behind."""
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
    #
    # nodes.json (fingerprint → node id, name, key file; ``revoked_at`` once FedGuard revoked it) is
    # FedGuard's own record: a key revoked through FedGuard stays out at every later start, while a
    # key someone unregistered behind FedGuard's back (``flwr supernode unregister``) is put back.

    def _registry(self) -> dict[str, dict[str, Any]]:
        path = self.workdir / "nodes.json"
        if not path.is_file():
            return {}
        return dict(json.loads(path.read_text(encoding="utf-8")))

    def _save_registry(self, registry: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.workdir / "nodes.json", json.dumps(registry, indent=2).encode(), private=True)

    def revoked_fingerprints(self) -> set[str]:
        """Keys revoked through FedGuard on this server (``node revoke``): never registered again."""
        return {fp for fp, v in self._registry().items() if v.get("revoked_at")}

    def flower_keys(self) -> dict[str, tuple[int, str]]:
        """Fingerprint → (node id, status) of every key in the SuperLink's database, unregistered ones too.

        Read from Flower's state database (read-only): ``flwr supernode ls`` shows neither keys nor
        nodes another account registered. Keys that are not EC P-384 show as ``unreadable:<node id>``.
        """
        if not self.database.is_file():
            return {}
        try:
            rows = read_node_table(self.database)
        except sqlite3.Error as exc:
            raise SuperLinkError(
                f"cannot read the SuperLink's node table: {exc}",
                where=str(self.database),
                fix="check the SuperLink database is Flower 1.42's and readable by this user",
            ) from None
        out: dict[str, tuple[int, str]] = {}
        for uid, status, public_key in rows:
            try:
                fp = flower_key_fingerprint(public_key)
            except (FedGuardError, ValueError, TypeError, UnsupportedAlgorithm):
                fp = f"unreadable:{uid}"
            out[fp] = (uid, str(status))
        return out

    def _release_unregistered(self, fingerprint: str) -> bool:
        """Forget an unregistered key in Flower's database so it can be registered again; True if one was.

        Flower keeps unregistered keys forever (``public_key`` is UNIQUE), so a key unregistered
        behind FedGuard's back could never come back through the Control API.
        """
        known = self.flower_keys().get(fingerprint)
        if known is None or known[1] != "unregistered":
            return False
        try:
            forget_unregistered_node(self.database, known[0])
        except sqlite3.Error as exc:
            raise SuperLinkError(
                f"cannot release unregistered key {fingerprint} in the SuperLink database: {exc}",
                where=str(self.database),
            ) from None
        return True

    def register_node(self, public_key: Path, name: str | None = None, role: str = "client") -> int:
        """Allow the node holding this EC (P-384) OpenSSH public key to connect; return its node id.

        Registering a key the SuperLink already holds returns its id; a key unregistered behind
        FedGuard's back is registered again; a key FedGuard revoked is refused. The key joins the
        enrolled set the ServerApp trusts (``enrolled.json``): keys registered any other way do not.
        """
        public_key = Path(public_key).resolve()
        try:
            parse_node_public_key(public_key, f"node public key {public_key}")  # EC P-384 OpenSSH, or a clear error
        except FedGuardError as exc:
            raise SuperLinkError(exc.what, where=str(public_key), fix=exc.fix or "send the node's node.pub") from exc
        fingerprint = key_fingerprint(public_key)
        if fingerprint in self.revoked_fingerprints():
            raise SuperLinkError(
                f"node key {fingerprint} ({name or public_key.name}) was revoked on this server",
                where=str(self.workdir / "nodes.json"),
                fix="the node needs a new key: rotate it with `fedguard provision` and restart the server",
            )
        args = ["supernode", "register", str(public_key), CONNECTION] + (["--name", name] if name else [])
        for attempt in range(2):
            try:
                data = flwr_json(args, self.flwr_home, what=f"registering node key {public_key.name}")
                node_id = int(data["node-id"])
                break
            except RunError as exc:
                if "already in use" not in str(exc):
                    raise SuperLinkError(exc.what, where=str(public_key), fix=exc.fix) from exc
                known = self.flower_keys().get(fingerprint)
                if known is not None and known[1] != "unregistered":
                    node_id = known[0]  # registered already (by an earlier start)
                    break
                if attempt or not self._release_unregistered(fingerprint):
                    raise SuperLinkError(
                        f"the SuperLink refuses node key {fingerprint} ({name or public_key.name}): {exc.what}",
                        where=str(self.database),
                        fix=exc.fix or "check the SuperLink database; the node may need a new key",
                    ) from exc
        registry = self._registry()
        registry[fingerprint] = {"node_id": node_id, "name": name, "public_key": str(public_key)}
        self._save_registry(registry)
        add_enrolled(self.workdir, Enrolled(name or public_key.stem, role, fingerprint))
        return node_id

    def unregister_node(self, node: int | Path, *, revoke: bool = True) -> None:
        """Remove a node (by node id or by its public key file): it can no longer connect.

        With ``revoke`` (FedGuard's ``node revoke``) the key is remembered as revoked, so no later
        ``server start`` registers it again, and it leaves the enrolled set a live run reads.
        """
        registry = self._registry()
        fingerprint: str | None = None
        if isinstance(node, int):
            node_id = node
            fingerprint = next((fp for fp, v in registry.items() if int(v["node_id"]) == node_id), None)
        else:
            fingerprint = key_fingerprint(Path(node))
            if fingerprint in registry:
                node_id = int(registry[fingerprint]["node_id"])
            elif (live := self.flower_keys().get(fingerprint)) is not None:
                node_id = live[0]
            else:
                raise SuperLinkError(
                    "this public key was never registered here", where=str(node), fix="pass the node id instead"
                )
        status = next((s for i, s in self.flower_keys().values() if i == node_id), None)
        if status != "unregistered":  # unregistering twice is an error in Flower; revoking twice is not
            try:
                flwr_json(["supernode", "unregister", str(node_id), CONNECTION], self.flwr_home, what="unregistering")
            except RunError as exc:
                raise SuperLinkError(f"{exc.what} (node {node_id})", fix=exc.fix) from exc
        if fingerprint is None:
            return
        if revoke:
            entry = registry.get(fingerprint, {"node_id": node_id, "name": None, "public_key": str(node)})
            registry[fingerprint] = {**entry, "revoked_at": time.time()}
            drop_enrolled(self.workdir, fingerprint)
        else:
            registry.pop(fingerprint, None)
        self._save_registry(registry)

    def reconcile(self, enrolled: Sequence[Any], revoked: Sequence[str] = ()) -> Reconciliation:
        """Make the SuperLink's registry the kit's: exactly the enrolled, unrevoked keys, nothing else.

        ``enrolled``: the kit's nodes (``name``, ``fingerprint``, ``public_key_file``); ``revoked``:
        fingerprints the kit revokes. Keys revoked with ``node revoke`` stay out too. Strangers and
        revoked keys are unregistered, enrolled keys (re-)registered; a SuperLinkError names the first
        node that could not be put right.
        """
        out = Reconciliation()
        write_enrolled(self.workdir, [])  # from nothing: only what is registered below is trusted
        blocked = set(revoked) | self.revoked_fingerprints()
        wanted = {n.fingerprint: n for n in enrolled if n.fingerprint not in blocked}
        out.revoked = [n for n in enrolled if n.fingerprint in blocked]
        for fp, (node_id, status) in sorted(self.flower_keys().items()):
            if fp in wanted or status == "unregistered":
                continue
            try:
                self.unregister_node(node_id, revoke=fp in blocked)
            except SuperLinkError as exc:
                what = "revoked key" if fp in blocked else "unenrolled key"
                raise SuperLinkError(
                    f"cannot remove {what} {fp} (node {node_id}) from the SuperLink: {exc.what}",
                    where=str(self.database),
                    fix="stop the server, remove the key with the SuperLink's owner account, and start again",
                ) from exc
            (out.unregistered if fp in blocked else out.strangers).append((fp, node_id))
        for fp, node in wanted.items():
            before = self.flower_keys().get(fp)
            try:
                node_id = self.register_node(node.public_key_file, node.name, node.role)
            except SuperLinkError as exc:
                raise SuperLinkError(
                    f"cannot register enrolled node {node.name} (key {fp}): {exc.what}", where=exc.where, fix=exc.fix
                ) from exc
            restored = before is not None and before[1] == "unregistered"
            out.registered.append((node, node_id, restored))
        return out

    def list_nodes(self) -> list[dict[str, Any]]:
        """Registered nodes as Flower reports them (id, status, online-at, ...)."""
        try:
            data = flwr_json(["supernode", "ls", CONNECTION], self.flwr_home, what="listing nodes")
        except RunError as exc:
            raise SuperLinkError(exc.what, fix=exc.fix) from exc
        return list(data.get("nodes", []))


@dataclass
class Reconciliation:
    """What ``SuperLink.reconcile`` changed: (node, id, re-registered?) per enrolled node, and what it removed."""

    registered: list[tuple[Any, int, bool]] = field(default_factory=list)
    strangers: list[tuple[str, int]] = field(default_factory=list)  # (fingerprint, node id) not in the kit
    unregistered: list[tuple[str, int]] = field(default_factory=list)  # revoked keys taken out
    revoked: list[Any] = field(default_factory=list)  # enrolled in the kit but revoked here: left out
