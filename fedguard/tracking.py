"""Experiment tracking: a finished run, logged to an MLflow tracking store where users already look.

``--mlflow-uri`` on ``fedguard simulate`` and ``fedguard run start`` (``pip install 'fedguard[mlflow]'``).
After the run ends, :func:`log_run` reads the run store (nothing is recomputed) and logs one MLflow
run: the run config flattened into parameters (``model.params.d_model``; lists as JSON) with the
config itself as ``config.json``; every round's held-out metrics (``heldout/accuracy``, step = round);
each node's ε as the privacy report states it (``epsilon/<node>``, from
:func:`server.privacy_report.build_privacy_report`, the fairness-counts release included) and after
every round (``epsilon_by_round/<node>``); and the privacy, fairness and cost reports (HTML and
JSON) under ``reports/``. MLflow's UI then compares runs, plots metrics and serves the reports.

Everything logged is what the server already holds and the reports already show: no raw record,
key or exact dataset size. MLflow's own telemetry is turned off (FedGuard runs offline). A
``file:`` store (MLflow's file backend, which MLflow keeps in maintenance mode) is allowed for the
duration of the logging when the user names one; ``sqlite:///F.db`` uses MLflow's database backend
(its SQLAlchemy and Alembic come with Flower); ``http(s)://`` reaches a tracking server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common.errors import ConfigError, FedGuardError

INSTALL_HINT = "pip install 'fedguard[mlflow]'"
DEFAULT_EXPERIMENT = "fedguard"
_BATCH = 100  # MLflow's most params (and tags) per log_batch call
_UNSAFE = re.compile(r"[^\w\-. /]")  # MLflow names allow alphanumerics, _ - . space and /


@dataclass(frozen=True)
class TrackedRun:
    """Where a FedGuard run went in MLflow."""

    tracking_uri: str
    experiment_id: str
    mlflow_run_id: str
    params: int
    metrics: int
    artifacts: list[str]


def add_mlflow_argument(parser: argparse.ArgumentParser) -> None:
    """``--mlflow-uri`` and ``--mlflow-experiment`` for a command that runs a federation."""
    parser.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="when the run ends, log its config, per-round held-out metrics, per-node ε and the privacy, fairness "
        f"and cost reports to this MLflow tracking store (file:FOLDER, sqlite:///FILE.db, http(s)://HOST:PORT); "
        f"needs {INSTALL_HINT}",
    )
    parser.add_argument(
        "--mlflow-experiment",
        metavar="NAME",
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment to log into, created if missing (default: {DEFAULT_EXPERIMENT})",
    )


def check_tracking_uri(uri: str) -> str:
    """The tracking URI to log to, checked before the run starts: MLflow installed, URI usable.

    A plain path means a local file store and becomes a ``file:`` URI.
    """
    _import_mlflow()
    if not uri.strip():
        raise ConfigError("the MLflow tracking URI is empty", where="--mlflow-uri", fix="pass file:PATH or http://HOST")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ConfigError(
                "the MLflow file store must be a folder, and this is a file",
                where=f"--mlflow-uri {uri}",
                fix="pass file:FOLDER (created if missing)",
            )
        return path.as_uri()
    if scheme in ("http", "https"):
        return uri
    if scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):  # postgresql+psycopg2: a driver
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"a {scheme}: tracking store needs MLflow's database backend (SQLAlchemy, Alembic), which is missing",
                where=f"--mlflow-uri {uri}",
                fix="pip install sqlalchemy alembic, or pass file:FOLDER or an http(s):// tracking server",
            ) from None
        return uri
    raise ConfigError(
        f"unsupported MLflow tracking URI scheme {scheme!r}",
        where=f"--mlflow-uri {uri}",
        fix="pass file:FOLDER, http(s)://HOST:PORT or sqlite:///FILE.db",
    )


def checked_args(args: argparse.Namespace) -> str | None:
    """For the CLI, before the run: the checked ``--mlflow-uri``, or None when not asked for.

    ``run start`` logs the run when it ends, so it must wait for it (``--follow``).
    """
    uri = getattr(args, "mlflow_uri", None)
    if uri is None:
        return None
    if getattr(args, "follow", True) is False:
        raise ConfigError(
            "--mlflow-uri logs the run when it ends, and without --follow `run start` returns at once",
            where="--mlflow-uri",
            fix="add --follow",
        )
    return check_tracking_uri(uri)


def store_run_id(store_path: Path, flower_run_id: int) -> int:
    """The FedGuard run id the ServerApp recorded for a Flower run (``run start`` knows only the latter)."""
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run_by_flower_id(flower_run_id)
    if run is None:
        raise FedGuardError(
            f"Flower run {flower_run_id} is not recorded in the run store, so there is nothing to log to MLflow",
            where=str(store_path),
            fix="check `fedguard run logs` for why the ServerApp did not start the run",
        )
    return int(run["run_id"])


def log_after_run(
    args: argparse.Namespace, store_path: Path, run_id: int, progress: Callable[[str], None] = print
) -> TrackedRun | None:
    """For the CLI, after the run: log it if ``--mlflow-uri`` was given and say where it went."""
    uri = checked_args(args)
    if uri is None:
        return None
    experiment = getattr(args, "mlflow_experiment", DEFAULT_EXPERIMENT) or DEFAULT_EXPERIMENT
    tracked = log_run(store_path, run_id, uri, experiment=experiment)
    progress(
        f"logged run {run_id} to MLflow ({uri}): experiment {experiment!r}, MLflow run {tracked.mlflow_run_id} "
        f"({tracked.params} params, {tracked.metrics} metric values, {len(tracked.artifacts)} artifacts)"
    )
    return tracked


# -- what is logged ----------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"a.b.c": "value"}``: strings as they are, everything else as JSON (lists, null, true)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{_UNSAFE.sub('_', str(k))}."))
        return out
    return {prefix.rstrip("."): value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}


def _heldout_metrics(store_path: Path, run_id: int) -> list[tuple[str, float, int]]:
    from server.store import RunStore

    with RunStore(store_path) as store:
        evals = store.evaluations(run_id)
    return [
        (f"heldout/{_UNSAFE.sub('_', name)}", float(v), rnd)
        for rnd, metrics in sorted(evals.items())
        for name, v in metrics.items()
        if name != "n" and isinstance(v, int | float) and math.isfinite(v)  # n: the set's size, not a score
    ]


def _epsilon_metrics(report: Any) -> list[tuple[str, float, int]]:
    """Per node: ``epsilon/<node>``, the run's ε as the privacy report states it (every release, the fairness
    counts included), at the last round; ``epsilon_by_round/<node>``, its ε after each round."""
    out: list[tuple[str, float, int]] = []
    last_round = max((r.round for c in report.clients for r in c.rounds), default=0)
    for c in report.clients:
        name = _UNSAFE.sub("_", getattr(c, "name", None) or f"node {c.node_id}")  # the operator's name, if known
        out += [(f"epsilon_by_round/{name}", r.epsilon_run, r.round) for r in c.rounds if r.epsilon_run is not None]
        if c.epsilon_run is not None:
            out.append((f"epsilon/{name}", c.epsilon_run, last_round))
    return out


def _write_reports(store_path: Path, run_id: int, folder: Path) -> tuple[Any, dict[str, str]]:
    """The three reports as HTML and JSON files in ``folder``; the privacy report, and why any report is missing."""
    from server import cost_report, fairness_report, privacy_report

    missing: dict[str, str] = {}
    privacy = privacy_report.build_privacy_report(store_path, run_id)
    built: dict[str, tuple[Callable[[Any, str], str], Any]] = {"privacy": (privacy_report.render, privacy)}
    try:
        built["fairness"] = (fairness_report.render, fairness_report.fairness_report_from_store(store_path, run_id))
    except FedGuardError as exc:  # no audits: not a binary task, no sensitive columns or no held-out set
        missing["fairness"] = exc.what
    try:
        built["cost"] = (cost_report.render, cost_report.build_cost_report(store_path, run_id))
    except FedGuardError as exc:
        missing["cost"] = exc.what
    for name, (render, report) in built.items():
        for fmt in ("html", "json"):
            (folder / f"{name}-report.{fmt}").write_text(render(report, fmt), encoding="utf-8")
    return privacy, missing


def log_run(store_path: Path, run_id: int, tracking_uri: str, *, experiment: str = DEFAULT_EXPERIMENT) -> TrackedRun:
    """Log one finished FedGuard run from its run store to MLflow; see the module docstring."""
    from mlflow.exceptions import MlflowException

    from common.config import config_from_json
    from server.store import RunStore

    uri = check_tracking_uri(tracking_uri)
    store_path = Path(store_path)
    with RunStore(store_path) as store:
        run = store.run(run_id)
    config = json.loads(config_from_json(run["config_json"]).to_json())
    with tempfile.TemporaryDirectory(prefix="fedguard-mlflow-") as tmp:
        folder = Path(tmp)
        (folder / "reports").mkdir()
        privacy, missing = _write_reports(store_path, run_id, folder / "reports")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tags = {
            "mlflow.runName": f"{config['name']} (run {run_id})",
            "fedguard.run_id": str(run_id),
            "fedguard.run_store": str(store_path.resolve()),
            "fedguard.status": str(run["status"]),
            "fedguard.config_hash": str(run["config_hash"]),
            **{f"fedguard.no_{name}_report": why for name, why in missing.items()},
        }
        values = _heldout_metrics(store_path, run_id) + _epsilon_metrics(privacy)
        try:
            with _file_store_allowed(uri):
                return _log(uri, experiment, flatten(config), tags, values, folder, run["status"] == "finished")
        except (MlflowException, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FedGuardError(
                f"the run finished (run {run_id} in {store_path}) but logging it to MLflow failed: {first}",
                where=f"--mlflow-uri {uri}",
                fix="check the tracking store (a file: folder must be writable, a server reachable), then log the "
                "recorded run again with fedguard.tracking.log_run",
            ) from None


def _log(
    uri: str,
    experiment: str,
    params: dict[str, str],
    tags: dict[str, str],
    values: list[tuple[str, float, int]],
    folder: Path,
    finished: bool,
) -> TrackedRun:
    """One MLflow run: params and tags in batches of MLflow's limit, metrics, the files in ``folder``."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment, _artifact_root(uri))
    rid = client.create_run(exp_id, run_name=tags["mlflow.runName"]).info.run_id
    param_items, tag_items = list(params.items()), list(tags.items())
    for i in range(0, max(len(param_items), len(tag_items)), _BATCH):
        client.log_batch(
            rid,
            params=[Param(k, v) for k, v in param_items[i : i + _BATCH]],
            tags=[RunTag(k, v) for k, v in tag_items[i : i + _BATCH]],
        )
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v, step in values]
    for i in range(0, len(metrics), 1000):  # MLflow's most metrics per batch
        client.log_batch(rid, metrics=metrics[i : i + 1000])
    client.log_artifacts(rid, str(folder))
    client.set_terminated(rid, "FINISHED" if finished else "FAILED")
    artifacts = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return TrackedRun(uri, exp_id, rid, len(params), len(metrics), artifacts)


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its files: next to an SQLite store (MLflow's default is ./mlruns in the
    current directory, wherever the command happens to run); MLflow's own choice for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


# -- MLflow, offline --------------------------------------------------------------------------------------


def _import_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home: FedGuard runs offline
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--mlflow-uri needs MLflow, which is not installed",
            where="--mlflow-uri",
            fix=f"{INSTALL_HINT} (installs mlflow-skinny), or leave out --mlflow-uri",
        ) from None


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow ≥3.7 refuses its file backend unless ``MLFLOW_ALLOW_FILE_STORE`` is set: the user named one."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
