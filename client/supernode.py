"""Start and stop one FedGuard node: Flower's SuperNode plus FedGuard's executor.

The SuperNode (``flower-supernode --isolation process``, run through ``python -m
client.supernode`` for FedGuard's patches of Flower internals: see ``run_supernode``) keeps the
authenticated TLS link to the SuperLink, reconnecting for as long as the SuperLink is away, and
serves a local Runtime API on a free loopback port; it starts no app code itself.
FedGuard's executor (``client/executor.py``) is the only process that takes tasks from that API
(every AcquireTask is HMAC-signed with a per-node secret the SuperNode checks), and it runs the
ClientApp installed on this node, never the bundle the server sent.

The executor is a companion *process*, not a thread in this launcher: it imports torch and
the node's training code once and keeps them across rounds (the point of the exercise),
while a crash or a runaway training step cannot take down the launcher or the SuperNode;
each node gets its own interpreter (torch thread settings, GIL, memory) exactly as it would
on its own host; and it watches the launcher's PID so it never outlives it.

Files in the node's ``workdir``: ``supernode.log``, ``executor.log``, ``executor-events.jsonl``
(one line per task: status, pull/app/push seconds), ``node-config.toml`` (what the ClientApp
sees as ``context.node_config``), ``superexec.secret`` (0600) and, while the node is connected,
``supernode.session`` (left behind by a crash, it lets the restarted node take its place at once).
Log files are plain text: the processes writing them turn colour codes off (``common.progress``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TextIO

import tomli_w

from common import progress
from common.errors import FedGuardError
from common.kit.keys import load_node_private_key
from common.processes import flwr_env, free_port, log_tail, stop_child

_READY_SUPERNODE = re.compile(r"SuperNode ID: (\d+)")
_READY_EXECUTOR = "FEDGUARD-EXECUTOR-READY"


class SuperNodeError(FedGuardError):
    """The node could not join the federation (unreachable server, wrong CA, unregistered key, ...)."""

    code = "supernode-error"


def check_private_key(path: Path) -> None:
    """The node key must exist, be private to its owner (like ssh) and be an EC P-384 key in OpenSSH format."""
    load_node_private_key(Path(path), error=SuperNodeError, private_file=True)


def diagnose(log: str, superlink: str) -> tuple[str, str] | None:
    """Map a SuperNode log to (what went wrong, how to fix it), or None when nothing is recognised."""
    lowered = log.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return (
            f"TLS handshake with the SuperLink at {superlink} failed: its certificate is not signed by the "
            "CA this node trusts (CERTIFICATE_VERIFY_FAILED)",
            "use the federation CA certificate from your kit (check its fingerprint with the operator out of band)",
        )
    if "failed to activate supernode" in lowered or "no supernode found with the given public key" in lowered:
        return (
            f"the SuperLink at {superlink} refused this node: its public key is not registered, or a node "
            "with this key is still connected (another instance)",
            "send the node's .pub file to the operator to register it (or stop the other instance), then start again",
        )
    if "unable to parse the private key" in lowered:
        return ("the SuperNode could not parse the node private key", "use an EC P-384 key in OpenSSH format")
    if "address already in use" in lowered:
        return ("the local Runtime API port is already in use", "start the node again (a free port is picked)")
    unreachable = ("connection attempt failed", "connection refused", "connecterror", "name or service not known")
    if any(term in lowered for term in unreachable):
        return (
            f"cannot reach the SuperLink at {superlink}",
            "check the address and that the server is running and reachable from this host",
        )
    return None


def node_config_file(workdir: Path, node_config: dict[str, Any]) -> Path:
    """Write the node config as TOML (Flower's --node-config accepts a .toml path; no quoting pitfalls)."""
    path = workdir / "node-config.toml"
    path.write_text(tomli_w.dumps(node_config), encoding="utf-8")
    return path


class SuperNode:
    """One node: ``flower-supernode --isolation process`` and the FedGuard executor next to it."""

    def __init__(
        self,
        workdir: Path,
        *,
        superlink: str,
        root_certificates: Path,
        private_key: Path,
        node_config: dict[str, Any],
        runtime_port: int | None = None,
        executor: bool = True,
        isolation: str = "process",
        poll_interval: float = 0.2,
        fleet_poll_interval: float | None = 1.0,
        progress_terminal: TextIO | None = None,
    ) -> None:
        """``node_config`` is what the ClientApp reads (``data-path``, ``workdir``, ...); ``auth-key-path``
        is added so replies are signed with the node key. ``executor=False`` starts the SuperNode
        alone (nothing takes its tasks: handshake tests). ``isolation="subprocess"`` (with
        ``executor=False``) is Flower's default, which installs and runs the server's app bundle:
        for baseline benchmarks only, never for a FedGuard node. ``fleet_poll_interval``
        (1 s; ``None`` keeps Flower's) shortens the SuperNode's fixed 3 s idle wait between pulls
        from the SuperLink and its object-retry backoff (a patch of Flower internals): with the model
        packed as one Array (``common.codec``) that wait was most of a round's overhead —
        bench/round_overhead.py, 3 nodes: 4.2 s → 2.5 s, for ~2 points more idle CPU. For 5 s after
        the node handled a message the wait is 0.25 s (``flower_internals.BUSY_POLL_S``): the next
        round's message is due then.
        ``progress_terminal`` (the owner's terminal, ``fedguard client start`` in the foreground): the
        executor prints each task's start and end there and draws local training's bar; a stream that
        is not a terminal (or a ``TERM=dumb`` one) is ignored: the executor's log has the same lines."""
        self.workdir = Path(workdir).resolve()
        self.superlink = superlink
        self.root_certificates = Path(root_certificates).resolve()
        self.private_key = Path(private_key).resolve()
        # The ClientApp signs every reply with the node's authentication key (docs/security.md).
        self.node_config = {"auth-key-path": str(self.private_key), **node_config}
        self.runtime_port = runtime_port or free_port()
        if isolation not in ("process", "subprocess") or (executor and isolation != "process"):
            raise SuperNodeError(
                f"unsupported combination executor={executor}, isolation={isolation!r}",
                fix="FedGuard's executor needs isolation='process'",
            )
        self.with_executor = executor
        self.isolation = isolation
        self.poll_interval = poll_interval
        self.fleet_poll_interval = fleet_poll_interval
        handed = progress_terminal if progress.capable_terminal(progress_terminal) else None
        self._progress_fd = handed.fileno() if handed is not None else None
        self.node_id: int | None = None
        self._take_over: int | None = None  # node id of a crashed session of this workdir to take over
        self._sn: subprocess.Popen[bytes] | None = None
        self._ex: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []

    @property
    def runtime_address(self) -> str:
        return f"127.0.0.1:{self.runtime_port}"

    @property
    def supernode_log(self) -> Path:
        return self.workdir / "supernode.log"

    @property
    def executor_log(self) -> Path:
        return self.workdir / "executor.log"

    @property
    def events_path(self) -> Path:
        return self.workdir / "executor-events.jsonl"

    @property
    def session_path(self) -> Path:
        """Present from when the node joins until it signs off: left behind, it means a crash."""
        return self.workdir / "supernode.session"

    def _crashed_session(self) -> int | None:
        """The node id of this workdir's previous SuperNode if it crashed (never signed off), else None."""
        try:
            session = json.loads(self.session_path.read_text(encoding="utf-8"))
            node_id, pid = int(session["node_id"]), int(session["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:  # still running (not a crash): leave its session alone
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"client.supernode" in cmdline and str(self.workdir).encode() in cmdline:
                return None
        except OSError:
            pass
        return node_id

    @property
    def secret_path(self) -> Path:
        return self.workdir / "superexec.secret"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._sn, self._ex) if p is not None]

    def _secret(self) -> Path:
        if not self.secret_path.is_file():
            fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return self.secret_path

    def supernode_command(self) -> list[str]:
        args = [
            "--superlink",
            self.superlink,
            "--root-certificates",
            str(self.root_certificates),
            "--auth-supernode-private-key",
            str(self.private_key),
            "--node-config",
            str(node_config_file(self.workdir, self.node_config)),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.runtime_port),
        ]
        args += ["--isolation", self.isolation]
        if self.with_executor:
            args += ["--superexec-auth-secret-file", str(self._secret())]
        # Flower's SuperNode, run through this module for FedGuard's patches (see run_supernode).
        ours = [] if self.fleet_poll_interval is None else ["--fleet-poll-interval", str(self.fleet_poll_interval)]
        if self._take_over is not None:
            ours += ["--take-over-session", str(self._take_over)]
        # -P: nothing in the node's workdir can shadow installed code.
        return [sys.executable, "-P", "-m", "client.supernode", *ours, *args]

    def executor_command(self) -> list[str]:
        return [
            sys.executable,
            "-P",  # never put the working directory on sys.path: only installed code is importable
            "-m",
            "client.executor",
            "--runtime-api-address",
            self.runtime_address,
            "--superexec-auth-secret-file",
            str(self._secret()),
            "--poll-interval",
            str(self.poll_interval),
            "--parent-pid",
            str(os.getpid()),
            "--events",
            str(self.events_path),
            *(["--progress-fd", str(self._progress_fd)] if self._progress_fd is not None else []),
        ]

    def _spawn(
        self, cmd: list[str], log: Path, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        f = log.open("ab")
        self._logs.append(f)
        return subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=flwr_env(self.workdir / "flwr-home", env),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )

    def start(self, timeout: float = 90.0) -> SuperNode:
        """Start both processes; return once the node is connected and the executor is serving."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the processes without waiting (start several nodes, then ``wait_ready`` each)."""
        check_private_key(self.private_key)
        if not self.root_certificates.is_file():
            raise SuperNodeError("federation CA certificate not found", where=str(self.root_certificates))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for log in (self.supernode_log, self.executor_log):
            log.write_bytes(b"")
        # A node of this workdir that crashed is still online at the SuperLink for up to a minute.
        self._take_over = self._crashed_session()
        self._sn = self._spawn(self.supernode_command(), self.supernode_log)
        if self.with_executor:
            terminal: tuple[int, ...] = ()
            env: dict[str, str] | None = None
            if self._progress_fd is not None:  # the terminal's own type, not the TERM=dumb of Flower's processes
                terminal, env = (self._progress_fd,), {"TERM": os.environ.get("TERM", "")}
            self._ex = self._spawn(self.executor_command(), self.executor_log, pass_fds=terminal, env=env)

    def wait_ready(self, timeout: float = 90.0) -> SuperNode:
        """Wait for "SuperNode ID" in its log and the executor's ready line; a diagnosed error otherwise."""
        if self._sn is None:
            raise SuperNodeError("the node was not started", fix="call start() or spawn() first")
        deadline = time.monotonic() + timeout
        try:
            while True:
                sn_log = self.supernode_log.read_text(encoding="utf-8", errors="replace")
                if self.node_id is None and (m := _READY_SUPERNODE.search(sn_log)):
                    self.node_id = int(m.group(1))  # activated: online at the SuperLink from now on
                    session = {"node_id": self.node_id, "pid": self._sn.pid, "superlink": self.superlink}
                    self.session_path.write_text(json.dumps(session), encoding="utf-8")
                ex_ready = not self.with_executor or _READY_EXECUTOR in self.executor_log.read_text(
                    encoding="utf-8", errors="replace"
                )
                if self.node_id is not None and ex_ready:
                    return self
                if self._sn.poll() is not None:
                    self._fail(f"the SuperNode exited (code {self._sn.returncode})", self.supernode_log)
                if self._ex is not None and self._ex.poll() is not None:
                    self._fail(f"the FedGuard executor exited (code {self._ex.returncode})", self.executor_log)
                if time.monotonic() > deadline:
                    self._fail(f"the node did not connect within {timeout:g}s", self.supernode_log)
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def _fail(self, what: str, log: Path) -> None:
        tail = log_tail(log)
        known = diagnose(tail, self.superlink)
        if known:
            raise SuperNodeError(f"{known[0]} ({what})", where=str(log), fix=known[1])
        raise SuperNodeError(f"{what}; last log lines:\n{tail}", where=str(log))

    def running(self) -> bool:
        procs = [self._sn, self._ex] if self.with_executor else [self._sn]
        return all(p is not None and p.poll() is None for p in procs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the executor, then the SuperNode (it deactivates itself at the SuperLink on SIGTERM)."""
        sn = self._sn
        signs_off = self.node_id is not None and sn is not None and sn.poll() is None
        stop_child(self._ex, timeout)
        stop_child(self._sn, timeout)
        if signs_off and sn is not None and sn.returncode != -signal.SIGKILL:
            self.session_path.unlink(missing_ok=True)
        self._ex = self._sn = None
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- Flower's SuperNode, with FedGuard's patches of its internals (common/flower_internals.py) ---------


def run_supernode(argv: list[str]) -> None:
    """Run ``flower-supernode`` in this process with FedGuard's patches of its internals.

    ``argv``: FedGuard's options first (``--fleet-poll-interval SECONDS``, 1 s from ``SuperNode``;
    ``--take-over-session NODE_ID``, set by the launcher after a crash), then flower-supernode's.
    Flower is imported only here: the launcher process never needs it.
    """
    from common import flower_internals

    if not sys.stdout.isatty():  # the launcher's supernode.log: plain text
        progress.no_colour_codes()
    flower_internals.clean_up_receives_of_stopped_runs()
    while argv[:1] in (["--fleet-poll-interval"], ["--take-over-session"]) and len(argv) > 1:
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--fleet-poll-interval":
            flower_internals.shorten_fleet_poll(float(value))
        else:
            flower_internals.take_over_crashed_session(int(value))
    flower_internals.run_flower_supernode(argv)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(
            "usage: python -m client.supernode [--fleet-poll-interval SECONDS] [--take-over-session NODE_ID] "
            "<flower-supernode args>",
            file=sys.stderr,
        )
        raise SystemExit(2)
    run_supernode(sys.argv[1:])
