"""Submit, watch and stop FedGuard runs on a real SuperLink, through Flower's ``flwr`` CLI.

The CLI is Flower's documented control surface (its Python internals change between
releases). It exits 0 even when it fails, so every call uses ``--format json`` and the JSON
is checked. ``FLWR_HOME`` always points at a FedGuard-owned folder, so nothing reads or
writes ``~/.flwr``; the SuperLink connection (address + federation CA) is written there.

**What the server ships.** ``flwr run DIR`` bundles every ``*.py/*.toml/*.md/*.yaml/*.json/
*.jsonl`` under DIR (minus ``.gitignore``) and sends it to every node. So a run is built from a
*staged* folder holding only a ``pyproject.toml`` and the app packages' modules (``common``,
``server``, ``client``): a small, deterministic bundle. By default both come from the
*installed* FedGuard (the packages' own folders and the ``server/app_bundle.toml`` package
data), so ``run start`` works from a wheel, from any directory; a source folder can still be
staged explicitly (tests, benchmarks). FedGuard nodes never execute the bundle
(``client/executor.py`` runs the installed ClientApp); the ServerApp runs from it under the SuperLink.

**Who may drive the SuperLink.** Its Control API accepts only the secret in
``<server workdir>/secrets/superlink-control.secret`` (0600, created by ``server start``); every
FedGuard call writes it next to the connection, in ``FLWR_HOME/credentials.yaml`` (0600), where the
stock ``flwr`` CLI reads it. **Where the ServerApp writes** is the server's decision, not the run
config's: ``<server workdir>/runs.db`` (``FEDGUARD_SERVER_WORKDIR`` in the SuperLink's environment);
the run config carries the config itself (JSON, covered by the run signature), never a path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import FedGuardError
from common.files import atomic_write
from common.flower_internals import CLI_AUTH_FAILED, CLI_CREDENTIALS_FILE, cli_credentials
from common.processes import bin_path, flwr_env
from server.store import RunStore

#: Top-level packages that make up the FedGuard app bundle.
APP_PACKAGES = ("common", "server", "client")
#: The distribution whose version the bundle declares (nodes accept only their installed version).
DISTRIBUTION = "fedguard"
#: Package data: the bundle's pyproject.toml ([tool.flwr.app]: components and run-config keys).
APP_BUNDLE_TEMPLATE = "app_bundle.toml"
CONNECTION = "fedguard"
#: Set by ``server start`` in the SuperLink's environment (inherited by SuperExec and the ServerApp).
SERVER_WORKDIR_ENV = "FEDGUARD_SERVER_WORKDIR"
#: The run store's file in the server workdir (``fedguard runs``, the control service read it there).
STORE_NAME = "runs.db"
#: Set next to SERVER_WORKDIR_ENV when the server keeps its store elsewhere (the deployed demo).
RUN_STORE_ENV = "FEDGUARD_RUN_STORE"
#: In the server workdir: the absolute path of the store its ServerApp records in (written at start).
RUN_STORE_RECORD = "run-store"
#: Private files of the server workdir (0700 folder, 0600 files).
SECRETS_DIR = "secrets"
CONTROL_SECRET_NAME = "superlink-control.secret"
#: Run-config keys that once named server-side paths; a run config carrying one is refused.
FORBIDDEN_RUN_CONFIG_KEYS = ("store-path", "config-path")
_CLI_TIMEOUT = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunError(FedGuardError):
    """A run could not be submitted, found or stopped."""

    code = "run-error"


@dataclass(frozen=True)
class RunStatus:
    """A Flower run as the SuperLink reports it (``flwr ls``)."""

    run_id: int
    status: str  # pending | starting | running | finished:completed | finished:failed | finished:stopped
    details: str
    elapsed: float
    raw: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


def server_store(workdir: Path) -> Path:
    """Where the ServerApp of the server with this workdir records its runs: ``<workdir>/runs.db``, or
    the store the server was started with (``SuperLink(run_store=...)``, recorded in ``<workdir>/run-store``)."""
    workdir = Path(workdir).resolve()
    try:
        recorded = (workdir / RUN_STORE_RECORD).read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    return Path(recorded) if recorded else workdir / STORE_NAME


def control_secret_path(flwr_home: Path) -> Path:
    """The SuperLink's Control API secret, in the server workdir (``FLWR_HOME`` is ``<workdir>/flwr-home``)."""
    return Path(flwr_home).resolve().parent / SECRETS_DIR / CONTROL_SECRET_NAME


def write_cli_credentials(flwr_home: Path, superlink_address: str) -> None:
    """Put the Control API secret where the ``flwr`` CLI sends it to ``superlink_address`` (0600).

    Rewritten when the address or the secret changed (a restart creates a new secret). Without a
    readable secret nothing is written: the SuperLink then refuses the CLI and ``flwr_json`` says why.
    """
    try:
        secret = control_secret_path(flwr_home).read_text(encoding="utf-8").strip()
    except OSError:
        return
    path = Path(flwr_home) / CLI_CREDENTIALS_FILE
    data = json.dumps(cli_credentials(superlink_address, secret), indent=1).encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, data, private=True)


def ensure_connection(flwr_home: Path, superlink_address: str, ca: Path, name: str = CONNECTION) -> None:
    """Write the SuperLink connection (address, federation CA) as the default in ``FLWR_HOME/config.toml``,
    and the Control API credentials for it (``write_cli_credentials``)."""
    try:
        _write_connection(Path(flwr_home), superlink_address, ca, name)
    except PermissionError as exc:
        raise RunError(
            f"cannot write the SuperLink connection: {exc.strerror}",
            where=str(exc.filename or flwr_home),
            fix="run FedGuard's server commands as the user that started `fedguard server start`: only it "
            "may drive the SuperLink",
        ) from None


def _write_connection(flwr_home: Path, superlink_address: str, ca: Path, name: str) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(flwr_home, 0o700)  # credentials.yaml lives here
    path = flwr_home / "config.toml"
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise RunError(
                f"not valid TOML: {exc}", where=str(path), fix="delete the file; FedGuard rewrites it"
            ) from None
    links = config.setdefault("superlink", {})
    links["default"] = name
    links[name] = {"address": superlink_address, "root-certificates": str(Path(ca).resolve())}
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=flwr_home)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tomli_w.dumps(config))
    os.replace(tmp, path)
    write_cli_credentials(flwr_home, superlink_address)


def flwr_json(args: list[str], flwr_home: Path, *, timeout: float = _CLI_TIMEOUT, what: str = "flwr") -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON; any failure becomes a ``RunError``."""
    cmd = [bin_path("flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(
            cmd, env=flwr_env(flwr_home), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise RunError(f"{what}: `flwr {' '.join(args)}` did not answer within {timeout:g}s") from exc
    out = _ANSI.sub("", proc.stdout)
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        detail = _ANSI.sub("", (proc.stderr or proc.stdout).strip())[-1500:]
        raise RunError(f"{what} failed (flwr exit {proc.returncode}): {detail or 'no output'}")
    if not data.get("success", False):
        message = str(data.get("error-message", "unknown error")).strip()
        message = re.sub(r"^Using SuperLink: .*\n+", "", message)
        fix = _fix_for(message)
        if any(phrase in message.lower() for phrase in CLI_AUTH_FAILED):
            message = "the SuperLink refused FedGuard's control credentials (missing, or from an earlier start)"
        raise RunError(f"{what} failed: {message}", fix=fix)
    return data


def _fix_for(message: str) -> str | None:
    lowered = message.lower()
    if any(phrase in lowered for phrase in CLI_AUTH_FAILED):
        return (
            "the SuperLink accepts only FedGuard's own control secret (<server workdir>/secrets/"
            f"{CONTROL_SECRET_NAME}): run this as the user that started `fedguard server start`, with "
            "--server-workdir pointing at its workdir; the plain `flwr` CLI is refused on purpose"
        )
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return "use the federation's CA certificate (the one that signed the SuperLink's certificate)"
    if "connect" in lowered and ("refused" in lowered or "error" in lowered):
        return "start the SuperLink first (fedguard server start) and check the address"
    if "already in use" in lowered:
        return "this public key is already registered; unregister the old node first to replace it"
    return None


def bundle_project() -> dict[str, Any]:
    """The bundle's ``pyproject.toml`` as a dict: the shipped template with the installed version.

    It declares every run-config key the ServerApp reads (Flower refuses ``-c`` overrides of
    undeclared keys) and the identity nodes check against their own installed FedGuard.
    """
    template = importlib.resources.files("server") / APP_BUNDLE_TEMPLATE
    try:
        config = tomllib.loads(template.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunError(
            f"the app bundle template is missing or broken ({exc})", where=str(template), fix="reinstall FedGuard"
        ) from exc
    try:
        config["project"]["version"] = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RunError(
            f"the {DISTRIBUTION!r} distribution is not installed: the app bundle has no version to declare",
            fix="install FedGuard (pip install fedguard, or pip install -e . in a checkout)",
        ) from exc
    return config


def installed_package_dir(package: str) -> Path:
    """The folder an app package is imported from (site-packages, or the checkout of an editable install)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / "__init__.py").is_file():
        raise RunError(f"package {package!r} is not installed", fix="install FedGuard (pip install fedguard)")
    return Path(locations[0]).resolve()


def stage_app(app_dir: Path | None, dest: Path) -> Path:
    """Stage the app bundle in ``dest/fedguard``: a ``pyproject.toml`` and the app packages' ``*.py``; return it.

    ``app_dir=None`` (what the CLI, the demo and the control service use): the installed packages
    and the shipped ``app_bundle.toml``. A folder: its packages, and its own ``pyproject.toml`` when
    that declares a Flower app (a staged bundle someone edited), else the shipped template.
    """
    sources = {p: installed_package_dir(p) for p in APP_PACKAGES} if app_dir is None else {}
    config: dict[str, Any] | None = None
    if app_dir is not None:
        app_dir = Path(app_dir).resolve()
        for package in APP_PACKAGES:
            sources[package] = app_dir / package
            if not (sources[package] / "__init__.py").is_file():
                raise RunError(
                    f"package {package!r} missing", where=str(sources[package]), fix="pass a FedGuard source folder"
                )
        project = app_dir / "pyproject.toml"
        if project.is_file():
            try:
                own = tomllib.loads(project.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise RunError(f"not valid TOML: {exc}", where=str(project)) from None
            if own.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("serverapp"):
                config = own
    shipped = bundle_project()
    if config is None:
        config = shipped
    app_config = config["tool"]["flwr"]["app"].setdefault("config", {})
    for key in FORBIDDEN_RUN_CONFIG_KEYS:  # an older staged bundle: the ServerApp would refuse the run
        app_config.pop(key, None)
    for key, default in shipped["tool"]["flwr"]["app"]["config"].items():
        app_config.setdefault(key, default)
    out = Path(dest) / "fedguard"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "pyproject.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    for package, src in sources.items():
        for file in sorted(src.rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            target = out / package / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return out


def start_run(
    superlink_address: str,
    ca: Path,
    app_dir: Path | None,
    config_path: Path | None,
    store_path: Path | None,
    flwr_home: Path,
    resume_run_id: int = 0,
    evaluator_key: str = "",
    run_signature: str = "",
) -> int:
    """Submit a FedGuard run to the SuperLink; return Flower's run id.

    ``app_dir`` None ships the installed FedGuard (see ``stage_app``); the config at ``config_path``
    travels as JSON (what the run signature covers), so the ServerApp reads no file named by the run;
    ``resume_run_id`` > 0 continues that FedGuard run from its last checkpoint instead;
    ``evaluator_key`` is the enrolled evaluator's key fingerprint (the only node trusted in that role);
    ``run_signature`` the admin's token approving the config (``common.run_signing``).
    The ServerApp records the run in the server's own store (``server_store``): ``store_path``, if
    given, must be that file (a run cannot move where the server writes).
    """
    from common.config import load_config

    workdir = Path(flwr_home).resolve().parent
    if store_path is not None and Path(store_path).resolve() != server_store(workdir):
        raise RunError(
            f"the server records runs in {server_store(workdir)}; a run cannot choose another store",
            where=str(store_path),
            fix=f"leave out --store, or pass {server_store(workdir)}",
        )
    config_json = ""
    if resume_run_id <= 0:
        if config_path is None or not Path(config_path).is_file():
            raise RunError("run config not found", where=str(config_path), fix="pass an existing run TOML")
        config_json = load_config(config_path).to_json()
    ensure_connection(Path(flwr_home), superlink_address, Path(ca))
    with tempfile.TemporaryDirectory(prefix="fedguard-app-") as tmp:
        staged = stage_app(app_dir, Path(tmp))
        overrides = Path(tmp) / "run-overrides.toml"
        overrides.write_text(
            tomli_w.dumps(
                {
                    "config-json": config_json,
                    "resume-run-id": resume_run_id,
                    "evaluator-key": evaluator_key,
                    "run-signature": run_signature,
                }
            ),
            encoding="utf-8",
        )
        data = flwr_json(
            ["run", str(staged), CONNECTION, "--run-config", str(overrides)], Path(flwr_home), what="starting the run"
        )
    run_id = data.get("run-id")
    if not run_id:
        raise RunError(f"the SuperLink did not return a run id: {data}")
    return int(run_id)


def run_status(run_id: int, superlink_address: str, ca: Path, flwr_home: Path) -> RunStatus:
    """The run's current status at the SuperLink."""
    ensure_connection(Path(flwr_home), superlink_address, Path(ca))
    data = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], Path(flwr_home), what=f"reading run {run_id}")
    runs = data.get("runs") or []
    if not runs:
        raise RunError(f"run {run_id} not found at {superlink_address}")
    raw = runs[0]
    elapsed = raw.get("elapsed")
    return RunStatus(
        run_id=int(raw["run-id"]),
        status=str(raw.get("status", "unknown")),
        details=str(raw.get("status-details", "")),
        elapsed=float(elapsed) if isinstance(elapsed, int | float) else 0.0,
        raw=raw,
    )


def wait_for_run(
    run_id: int,
    superlink_address: str,
    ca: Path,
    flwr_home: Path,
    *,
    timeout: float = 600.0,
    poll: float = 2.0,
    on_poll: Callable[[], None] | None = None,
    ended: Callable[[], bool] | None = None,
    check_every: float = 30.0,
) -> RunStatus:
    """Poll until the run finishes; a ``RunError`` after ``timeout`` seconds. ``on_poll`` runs every ``poll``
    seconds (``run start --follow`` prints the ServerApp's new log lines there: progress while the run works).

    Every status read is a ``flwr ls`` process: an interpreter and Flower's imports, ~1.3 CPU-seconds,
    taken from the federation on a small server (with a read every 2 s the 3-node demo's rounds took ~1 s
    longer on 2 cores). With ``ended`` (a cheap local sign that the run has ended: ``recorded_end``) the SuperLink is
    asked when ``ended()`` says so, and otherwise only every ``check_every`` seconds — a ServerApp that dies
    never records its end, and the SuperLink then reports the run failed.
    """
    deadline = time.monotonic() + timeout
    asked = -float("inf")
    status: RunStatus | None = None
    while True:
        if status is None or ended is None or ended() or time.monotonic() - asked >= check_every:
            status, asked = run_status(run_id, superlink_address, ca, flwr_home), time.monotonic()
            if status.finished:
                return status
        if on_poll is not None:
            on_poll()
        if time.monotonic() > deadline:
            raise RunError(
                f"run {run_id} still {status.status} after {timeout:g}s",
                fix="check the ServerApp log (run_logs) and the nodes' logs",
            )
        time.sleep(poll)


def recorded_end(store_path: Path, flower_run: int) -> Callable[[], bool]:
    """``wait_for_run``'s cheap sign for a run whose store is on this host: the ServerApp has recorded its
    end (finished or failed) for this Flower run. A store that cannot be read says "ask the SuperLink"."""

    def ended() -> bool:
        if not Path(store_path).is_file():
            return False
        try:
            with RunStore(store_path) as store:
                run = store.run_by_flower_id(flower_run)
        except (FedGuardError, sqlite3.Error):
            return True
        return run is not None and run["status"] != "running"

    return ended


def stop_run(run_id: int, superlink_address: str, ca: Path, flwr_home: Path) -> None:
    """Ask the SuperLink to stop the run."""
    ensure_connection(Path(flwr_home), superlink_address, Path(ca))
    flwr_json(["stop", str(run_id), CONNECTION], Path(flwr_home), what=f"stopping run {run_id}")


def run_logs(run_id: int, superlink_address: str, ca: Path, flwr_home: Path, *, timeout: float = 60.0) -> str:
    """The ServerApp's log for the run so far (``flwr log --show``; Flower has no JSON form for logs)."""
    ensure_connection(Path(flwr_home), superlink_address, Path(ca))
    cmd = [bin_path("flwr"), "log", str(run_id), CONNECTION, "--show"]
    try:
        proc = subprocess.run(
            cmd,
            env=flwr_env(Path(flwr_home)),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise RunError(f"`flwr log {run_id}` did not answer within {timeout:g}s") from exc
    text = _ANSI.sub("", proc.stdout + proc.stderr)
    if any(phrase in text.lower() for phrase in CLI_AUTH_FAILED):
        raise RunError(
            f"reading the log of run {run_id} failed: the SuperLink refused FedGuard's control credentials",
            fix=_fix_for(CLI_AUTH_FAILED[0]),
        )
    if "error" in text.lower() and "printing logstream" not in text.lower():
        raise RunError(f"reading the log of run {run_id} failed: {text.strip()[-1500:]}")
    return text
