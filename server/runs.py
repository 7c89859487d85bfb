"""Submit, watch and stop FedGuard runs on a real SuperLink, through Flower's ``flwr`` CLI.

The CLI is Flower's documented control surface (its Python internals change between
releases). It exits 0 even when it fails, so every call uses ``--format json`` and the JSON
is checked. ``FLWR_HOME`` always points at a FedGuard-owned folder, so nothing reads or
writes ``~/.flwr``; the SuperLink connection (address + federation CA) is written there.

**What the server ships.** ``flwr run DIR`` bundles every ``*.py/*.toml/*.md/*.yaml/*.json/
*.jsonl`` under DIR (minus ``.gitignore``) and sends it to every node. The repository root
works (about 160 KB), but a data file that happens to sit there (FedGuard reads JSONL data)
would travel to every node. So a run is built from a *staged* copy holding only
``pyproject.toml`` and the app packages (``common``, ``server``, ``client``): a small,
deterministic bundle. FedGuard nodes never execute it anyway (``client/executor.py`` runs
the installed ClientApp); the ServerApp runs from it under the SuperLink.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import FedGuardError
from common.processes import bin_path, flwr_env

#: Top-level packages that make up the FedGuard app bundle.
APP_PACKAGES = ("common", "server", "client")
#: Run-config keys the FedGuard ServerApp reads; Flower rejects overrides of undeclared keys.
RUN_CONFIG_DEFAULTS: dict[str, str | int] = {
    "config-path": "",
    "store-path": "fedguard-runs.db",
    "resume-run-id": 0,
    "evaluator-key": "",
    "run-signature": "",
}
CONNECTION = "fedguard"
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


def ensure_connection(flwr_home: Path, superlink_address: str, ca: Path, name: str = CONNECTION) -> None:
    """Write the SuperLink connection (address, federation CA) as the default in ``FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
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
        raise RunError(f"{what} failed: {message}", fix=_fix_for(message))
    return data


def _fix_for(message: str) -> str | None:
    lowered = message.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return "use the federation's CA certificate (the one that signed the SuperLink's certificate)"
    if "connect" in lowered and ("refused" in lowered or "error" in lowered):
        return "start the SuperLink first (fedguard server start) and check the address"
    if "already in use" in lowered:
        return "this public key is already registered; unregister the old node first to replace it"
    return None


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy only ``pyproject.toml`` and the app packages' ``*.py`` into ``dest/fedguard``; return it.

    The staged pyproject declares every run-config key the ServerApp reads (Flower refuses
    ``-c`` overrides of undeclared keys).
    """
    app_dir = Path(app_dir).resolve()
    project = app_dir / "pyproject.toml"
    if not project.is_file():
        raise RunError("no pyproject.toml", where=str(app_dir), fix="pass the FedGuard source folder as app_dir")
    config = tomllib.loads(project.read_text(encoding="utf-8"))
    flwr_app = config.get("tool", {}).get("flwr", {}).get("app", {})
    if not flwr_app.get("components", {}).get("serverapp"):
        raise RunError(
            "pyproject.toml has no [tool.flwr.app.components] serverapp", where=str(project), fix="use FedGuard's"
        )
    app_config = flwr_app.setdefault("config", {})
    for key, default in RUN_CONFIG_DEFAULTS.items():
        app_config.setdefault(key, default)
    out = Path(dest) / "fedguard"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "pyproject.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    for package in APP_PACKAGES:
        src = app_dir / package
        if not (src / "__init__.py").is_file():
            raise RunError(f"package {package!r} missing", where=str(src), fix="pass the FedGuard source folder")
        for file in src.rglob("*.py"):
            if "__pycache__" in file.parts:
                continue
            target = out / file.relative_to(app_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    return out


def start_run(
    superlink_address: str,
    ca: Path,
    app_dir: Path,
    config_path: Path | None,
    store_path: Path,
    flwr_home: Path,
    resume_run_id: int = 0,
    evaluator_key: str = "",
    run_signature: str = "",
) -> int:
    """Submit a FedGuard run to the SuperLink; return Flower's run id.

    ``config_path`` and ``store_path`` are paths on the server host (the ServerApp runs there);
    ``resume_run_id`` > 0 continues that FedGuard run from its last checkpoint instead;
    ``evaluator_key`` is the enrolled evaluator's key fingerprint (the only node trusted in that role);
    ``run_signature`` the admin's token approving the config (``common.run_signing``).
    """
    store_path = Path(store_path).resolve()
    if resume_run_id <= 0 and (config_path is None or not Path(config_path).is_file()):
        raise RunError("run config not found", where=str(config_path), fix="pass an existing run TOML")
    config = str(Path(config_path).resolve()) if config_path is not None else ""
    ensure_connection(Path(flwr_home), superlink_address, Path(ca))
    with tempfile.TemporaryDirectory(prefix="fedguard-app-") as tmp:
        staged = stage_app(app_dir, Path(tmp))
        overrides = Path(tmp) / "run-overrides.toml"
        overrides.write_text(
            tomli_w.dumps(
                {
                    "config-path": config,
                    "store-path": str(store_path),
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
    run_id: int, superlink_address: str, ca: Path, flwr_home: Path, *, timeout: float = 600.0, poll: float = 2.0
) -> RunStatus:
    """Poll until the run finishes; a ``RunError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(run_id, superlink_address, ca, flwr_home)
        if status.finished:
            return status
        if time.monotonic() > deadline:
            raise RunError(
                f"run {run_id} still {status.status} after {timeout:g}s",
                fix="check the ServerApp log (run_logs) and the nodes' logs",
            )
        time.sleep(poll)


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
    if "error" in text.lower() and "printing logstream" not in text.lower():
        raise RunError(f"reading the log of run {run_id} failed: {text.strip()[-1500:]}")
    return text
