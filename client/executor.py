"""FedGuard's node executor: run only the ClientApp installed on this node, never the server's code.

Flower nodes normally install the app bundle (FAB) the server sends and import the ClientApp
from it (``flwr-clientapp`` → ``install_from_fab``): whoever runs the server decides what code
touches the node's private data. With ``flower-supernode --isolation process`` the SuperNode
starts nothing itself; this long-lived process takes that role. For each task it

1. acquires the task from the SuperNode's local Runtime API (HMAC-signed with the node's
   SuperExec secret, so no other local process can take tasks),
2. pulls the task input: message, context, run and FAB (bytes only — nothing is installed),
3. checks that the FAB declares the same app (publisher/name/version and ClientApp reference)
   as the FedGuard distribution installed here, and refuses the task otherwise,
4. runs the *installed* ``client.app:app`` in this process (torch and the model code stay
   imported across rounds: no process start or import per message), and
5. pushes the reply and the updated context (``context.state`` carries DP history).

Each task gets a line when it starts (run, round, message) and when it ends (status, elapsed
seconds), in the executor's log and, when ``fedguard client start`` runs in the foreground, on the
owner's terminal (``--progress-fd``), where local training also draws its bar (``common.progress``).

The FAB's own code is never written to disk, put on ``sys.path`` or imported. Refusals leave as
a Flower ``Error`` reply (``INVALID_FAB``) whose reason carries no node data; crashes leave as a
code plus a local log id (exception text can quote private data and stays in the local log).

Flower's Runtime API client and the pull/push helpers are Flower internals: they live in
``common.flower_internals`` (``RuntimeApi``), pinned to the Flower release they were written for.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import traceback
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from common import progress
from common.errors import FedGuardError
from common.flower_internals import ErrorCode, RuntimeApi, RuntimeApiRejected

log = logging.getLogger("fedguard.executor")

#: The distribution whose installed code the node runs, and the app id it must match.
DISTRIBUTION = "fedguard"
PUBLISHER = "fedguard"
CLIENTAPP_REF = "client.app:app"

_HEARTBEAT_SECONDS = 10.0  # Flower expires a task token 30 s after claim / 60 s after a heartbeat


class ExecutorError(FedGuardError):
    """The executor cannot serve its SuperNode (wrong secret, app not installed, ...)."""

    code = "executor-error"


class FabRefused(FedGuardError):
    """The server asked this node to run an app bundle that is not the installed FedGuard ClientApp."""

    code = "app-bundle-refused"


@dataclass(frozen=True)
class AppIdentity:
    """What an app bundle claims to be: ``publisher/name==version`` and its ClientApp reference."""

    publisher: str
    name: str
    version: str
    clientapp: str

    @property
    def fab_id(self) -> str:
        return f"{self.publisher}/{self.name}"

    def __str__(self) -> str:
        return f"{self.fab_id}=={self.version} ({self.clientapp})"


def installed_identity() -> AppIdentity:
    """The identity of the FedGuard ClientApp installed on this node (from package metadata)."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FedGuardError(
            f"the {DISTRIBUTION!r} distribution is not installed in {sys.prefix}",
            fix="install FedGuard on the node (pip install fedguard) and start the executor from that environment",
        ) from exc
    return AppIdentity(PUBLISHER, DISTRIBUTION, version, CLIENTAPP_REF)


def fab_identity(fab_content: bytes) -> AppIdentity:
    """Read a FAB's declared identity from its ``pyproject.toml`` — parsing only, never installing."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
            config = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
        project, flwr_app = config["project"], config["tool"]["flwr"]["app"]
        return AppIdentity(
            publisher=str(flwr_app["publisher"]),
            name=str(project["name"]),
            version=str(project["version"]),
            clientapp=str(flwr_app["components"]["clientapp"]),
        )
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FabRefused(f"the app bundle is unreadable ({type(exc).__name__}: {exc})") from exc


def check_fab(
    fab_content: bytes, expected: AppIdentity, run_fab_id: str = "", run_fab_version: str = ""
) -> AppIdentity:
    """Accept a FAB only if it names exactly the installed app; raise ``FabRefused`` otherwise.

    The run's own ``fab_id``/``fab_version`` (what the SuperLink recorded) must agree with the
    bundle too, so the log and the server see one consistent identity.
    """
    got = fab_identity(fab_content)
    if got != expected:
        raise FabRefused(
            f"the server's app bundle is {got}, but this node runs only the installed {expected}",
            fix="run the FedGuard release installed on the nodes, or upgrade the nodes to the run's version",
        )
    if (run_fab_id and run_fab_id != expected.fab_id) or (run_fab_version and run_fab_version != expected.version):
        raise FabRefused(f"the run declares {run_fab_id}=={run_fab_version}, but this node runs only {expected}")
    return got


@dataclass
class TaskRecord:
    """One task as the executor saw it; appended to the events file (JSON lines) for audits and benches."""

    task_id: int
    run_id: int
    message_type: str
    group_id: str  # FedGuard's server sets it to the round
    status: str  # completed | refused | failed
    reason: str | None
    acquired_at: float
    pull_seconds: float
    app_seconds: float
    push_seconds: float
    total_seconds: float
    message_id: str = ""

    @property
    def what(self) -> str:
        return task_label(self.task_id, self.run_id, self.message_type, self.group_id, self.message_id)


def task_label(task_id: int, run_id: int, message_type: str, group_id: str, message_id: str) -> str:
    """``run 7 round 3: train message 1a2b3c4d``: which work a task is, for the owner's eyes."""
    where = f"run {run_id}" + (f" round {group_id}" if group_id.isdigit() else "")
    return f"{where}: {message_type or 'task'} " + (f"message {message_id[:8]}" if message_id else f"task {task_id}")


def _announce(line: str, level: int = logging.INFO) -> None:
    """To the executor's log and, when the node runs in the foreground, to the owner's terminal."""
    log.log(level, "%s", line)
    progress.say_on_terminal(line)


def load_installed_clientapp(ref: str = CLIENTAPP_REF) -> ClientApp:
    """Import the installed ClientApp (never from a FAB directory: those are never on ``sys.path``)."""
    module_name, _, attr = ref.partition(":")
    app = getattr(importlib.import_module(module_name), attr)
    if not isinstance(app, ClientApp):
        raise FedGuardError(f"{ref} is not a flwr ClientApp", fix="reinstall FedGuard on the node")
    return app


class _Heartbeat:
    """Background heartbeats for one task (Flower's own sender SIGINTs the process on failure)."""

    def __init__(self, api: RuntimeApi) -> None:
        self._api, self._stop = api, threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(_HEARTBEAT_SECONDS):
            try:
                if not self._api.heartbeat():
                    log.warning("the SuperNode no longer knows this task (token expired)")
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the task
                log.warning("task heartbeat failed: %s", exc)


class NodeExecutor:
    """Acquire tasks from one SuperNode and run the installed ClientApp for each, one at a time."""

    def __init__(
        self,
        runtime_api_address: str,
        *,
        auth_secret: bytes | None = None,
        poll_interval: float = 0.2,
        expected: AppIdentity | None = None,
        client_app: ClientApp | None = None,
        events_path: Path | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.expected = expected or installed_identity()
        self.client_app = client_app or load_installed_clientapp()
        self.events_path = events_path
        self._acquirer = RuntimeApi.for_executor(runtime_api_address, auth_secret)

    def close(self) -> None:
        self._acquirer.close()

    def run_forever(self, stop: threading.Event, on_task: Callable[[TaskRecord], None] | None = None) -> None:
        """Serve tasks until ``stop`` is set; a failing SuperNode connection is retried, never fatal."""
        log.info("FedGuard executor serving %s on %s", self.expected, self.address)
        while not stop.is_set():
            try:
                record = self.run_once()
            except ExecutorError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; the SuperNode may be restarting
                log.warning("runtime API unavailable at %s: %s", self.address, exc)
                stop.wait(max(1.0, self.poll_interval))
                continue
            if record is None:
                stop.wait(self.poll_interval)
            elif on_task is not None:
                on_task(record)

    def run_once(self) -> TaskRecord | None:
        """Acquire and execute one pending task; None when there is none."""
        try:
            claimed = self._acquirer.acquire_task()
        except RuntimeApiRejected as exc:
            raise ExecutorError(exc.what, where=exc.where, fix=exc.fix) from None
        if claimed is None:
            return None
        t0 = time.perf_counter()
        api = RuntimeApi.for_task(self.address, claimed.token)
        try:
            with _Heartbeat(api):
                record = self._execute(api, claimed.task_id, claimed.run_id, t0)
        finally:
            api.close()
        record.total_seconds = time.perf_counter() - t0
        self._record(record)
        return record

    def _execute(self, api: RuntimeApi, task_id: int, run_id: int, t0: float) -> TaskRecord:
        acquired_at = time.time()
        message: Message | None = None
        context: Context | None = None
        status: str = "failed"
        reason: str | None = "task input could not be pulled"
        reply: Message | None = None
        pull_s = app_s = push_s = 0.0
        try:
            task = api.pull_task_input()
            message, context = task.message, task.context
            pull_s = time.perf_counter() - t0
            m = message.metadata
            _announce(f"{task_label(task_id, run_id, m.message_type, m.group_id, m.message_id)} started")
            try:
                check_fab(task.fab_content, self.expected, task.fab_id, task.fab_version)
            except FabRefused as exc:
                status, reason = "refused", exc.what
                log.error("task %d of run %d refused: %s", task_id, run_id, exc.render())
                reply = Message(
                    Error(ErrorCode.INVALID_FAB, f"FedGuard node refused the app bundle: {exc.what}"), reply_to=message
                )
            else:
                t1 = time.perf_counter()
                reply, status, reason = self._call_app(message, context)
                app_s = time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001
            log_id = uuid.uuid4().hex[:12]
            log.error("task %d of run %d failed (log-id %s):\n%s", task_id, run_id, log_id, traceback.format_exc())
            reason = f"{type(exc).__name__} (node log id {log_id})"
            if message is not None and reply is None:
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"FedGuard executor: {reason}"), reply_to=message
                )
        t2 = time.perf_counter()
        if reply is not None and context is not None:
            try:
                api.push_reply(reply, context)
            except Exception as exc:  # noqa: BLE001
                status, reason = "failed", f"reply could not be pushed: {type(exc).__name__}"
                log.error("task %d: %s", task_id, exc)
        try:
            api.finish_task(context if status == "completed" else None, status == "completed", reason or "")
        except Exception as exc:  # noqa: BLE001 - the SuperNode expires the task itself
            log.error("task %d: task output could not be pushed: %s", task_id, exc)
        push_s = time.perf_counter() - t2
        md = message.metadata if message is not None else None
        return TaskRecord(
            task_id=task_id,
            run_id=run_id,
            message_type=str(md.message_type) if md else "",
            group_id=str(md.group_id) if md else "",
            status=status,
            reason=reason,
            acquired_at=acquired_at,
            pull_seconds=pull_s,
            app_seconds=app_s,
            push_seconds=push_s,
            total_seconds=0.0,
            message_id=str(md.message_id) if md else "",
        )

    def _call_app(self, message: Message, context: Context) -> tuple[Message, str, str | None]:
        """Run the installed ClientApp; an exception leaves as its type and a local log id only."""
        try:
            return self.client_app(message=message, context=context), "completed", None
        except Exception as exc:  # noqa: BLE001 - the text may quote private data: it stays local
            log_id = uuid.uuid4().hex[:12]
            log.error("ClientApp raised (log-id %s):\n%s", log_id, traceback.format_exc())
            reason = f"ClientApp raised {type(exc).__name__} (node log id {log_id})"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message), "failed", reason

    def _record(self, record: TaskRecord) -> None:
        _announce(
            f"{record.what} {record.status} in {record.total_seconds:.2f}s "
            f"(pull {record.pull_seconds:.2f}s, app {record.app_seconds:.2f}s, push {record.push_seconds:.2f}s)"
            + (f": {record.reason}" if record.reason else ""),
            logging.INFO if record.status == "completed" else logging.WARNING,
        )
        if self.events_path is not None:
            with self.events_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(record)) + "\n")


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the launcher is gone, so an orphaned executor never keeps serving tasks."""

    def watch() -> None:
        while not stop.wait(0.5):
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                log.warning("launcher %d is gone; stopping", parent_pid)
                stop.set()
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FedGuard node executor (serves one SuperNode's Runtime API)")
    parser.add_argument(
        "--runtime-api-address", required=True, help="the SuperNode's --host:--port, e.g. 127.0.0.1:9094"
    )
    parser.add_argument("--superexec-auth-secret-file", type=Path, help="the secret the SuperNode was started with")
    parser.add_argument("--poll-interval", type=float, default=0.2, help="seconds between task polls when idle")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--events", type=Path, help="append one JSON line per task here")
    parser.add_argument(
        "--progress-fd", type=int, help="an inherited file descriptor of the owner's terminal: task lines and bars"
    )
    args = parser.parse_args(argv)
    # The log (stderr) goes to a file: plain text, no colour codes from Flower or anyone else.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(progress.PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    progress.no_colour_codes()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.progress_fd is not None:
        progress.attach_terminal(os.fdopen(args.progress_fd, "w", buffering=1, closefd=False))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.parent_pid:
        _watch_parent(args.parent_pid, stop)
    try:
        secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
        t0 = time.perf_counter()
        executor = NodeExecutor(
            args.runtime_api_address, auth_secret=secret, poll_interval=args.poll_interval, events_path=args.events
        )
        log.info("installed ClientApp loaded in %.1fs", time.perf_counter() - t0)
    except (FedGuardError, OSError) as exc:
        print(f"fedguard executor: {exc}", file=sys.stderr, flush=True)
        return 2
    print("FEDGUARD-EXECUTOR-READY", flush=True)
    try:
        executor.run_forever(stop)
    except ExecutorError as exc:
        print(f"fedguard executor: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
