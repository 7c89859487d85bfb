"""MLflow tracking: ``fedguard simulate --mlflow-uri file:...`` logs a real run, read back with MLflow's client.

One real simulation (2 clients, 2 rounds, DP on, a sensitive column so every report exists) runs once
for the module through the CLI in its own process; the tests read the local file store it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from fedguard.tracking import add_mlflow_argument, check_tracking_uri, checked_args, flatten, log_run
from server.privacy_report import build_privacy_report
from server.store import RunStore
from tests.helpers import ROOT, make_tabular, need, tabular_config, write_run_toml

pytestmark = pytest.mark.timeout(420)


def _mlflow_or_skip() -> None:
    import importlib.util

    need(importlib.util.find_spec("mlflow") is not None, "pip install 'fedguard[mlflow]' (in the dev extras)")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _mlflow_or_skip()
    tmp = tmp_path_factory.mktemp("tracking")
    data = tmp / "data.csv"
    make_tabular(600).to_csv(data, index=False)
    cfg = tabular_config(data, rounds=2, name="tracked")
    toml = write_run_toml(cfg, tmp / "run.toml")
    store_uri = (tmp / "mlruns").as_uri()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedguard.cli",
            "simulate",
            "--config",
            str(toml),
            "--workdir",
            str(tmp / "work"),
            "--mlflow-uri",
            store_uri,
            "--mlflow-experiment",
            "fedguard-tests",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # reading MLflow's file backend back, as the command did
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri)
    exp = client.get_experiment_by_name("fedguard-tests")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    try:
        yield {"client": client, "run": runs[0], "store": tmp / "work" / "runs.db", "out": proc.stdout, "tmp": tmp}
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def test_parameters_are_the_run_config_flattened(tracked: dict[str, Any]) -> None:
    run = tracked["run"]
    with RunStore(tracked["store"]) as store:
        recorded = json.loads(store.run(1)["config_json"])
    params = run.data.params
    assert params == flatten(json.loads(json.dumps(recorded)))  # every config field, none invented
    assert params["dp.target_epsilon"] == "4.0" and params["model.params.d_model"] == "16"
    assert json.loads(params["data.schema.classes"]) == ["0", "1"]
    assert run.data.tags["fedguard.run_id"] == "1" and run.data.tags["mlflow.runName"] == "tracked (run 1)"
    assert run.info.status == "FINISHED"
    assert "logged run 1 to MLflow" in tracked["out"] and run.info.run_id in tracked["out"]


def test_heldout_metrics_per_round_match_the_run_store(tracked: dict[str, Any]) -> None:
    client, rid = tracked["client"], tracked["run"].info.run_id
    with RunStore(tracked["store"]) as store:
        evals = store.evaluations(1)
    rounds = sorted(evals)
    assert {1, 2} <= set(rounds)  # round 0, where recorded, is the initial model's score
    for name in ("accuracy", "loss", "macro_f1"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(rid, f"heldout/{name}"))
        assert history == [(rnd, pytest.approx(evals[rnd][name], abs=1e-12)) for rnd in rounds]
    assert "heldout/n" not in tracked["run"].data.metrics  # the set's size is not a score


def test_per_node_epsilon_is_the_privacy_reports(tracked: dict[str, Any]) -> None:
    client, run = tracked["client"], tracked["run"]
    report = build_privacy_report(tracked["store"], 1)
    assert len(report.clients) == 2
    for c in report.clients:
        name = getattr(c, "name", None) or f"node {c.node_id}"
        assert c.epsilon_run is not None and c.epsilon_run > 0  # DP-SGD rounds plus the fairness counts release
        assert run.data.metrics[f"epsilon/{name}"] == pytest.approx(c.epsilon_run, abs=1e-12)
        history = sorted(
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"epsilon_by_round/{name}")
        )
        want = [(r.round, r.epsilon_run) for r in c.rounds if r.epsilon_run is not None]
        assert history == [(rnd, pytest.approx(e, abs=1e-12)) for rnd, e in want] and len(want) == 2


def test_the_three_reports_and_the_config_are_artifacts(tracked: dict[str, Any]) -> None:
    client, rid = tracked["client"], tracked["run"].info.run_id
    names = {a.path for a in client.list_artifacts(rid, "reports")}
    assert names == {f"reports/{r}-report.{f}" for r in ("privacy", "fairness", "cost") for f in ("html", "json")}
    assert {a.path for a in client.list_artifacts(rid)} == {"config.json", "reports"}
    folder = Path(client.download_artifacts(rid, "", str(tracked["tmp"] / "downloaded")))
    privacy = json.loads((folder / "reports" / "privacy-report.json").read_text(encoding="utf-8"))
    assert privacy["run_id"] == 1 and len(privacy["clients"]) == 2
    fairness = json.loads((folder / "reports" / "fairness-report.json").read_text(encoding="utf-8"))
    assert fairness["run_id"] == 1 and {1, 2} <= {r["round"] for r in fairness["rounds"]}
    assert "<svg" in (folder / "reports" / "cost-report.html").read_text(encoding="utf-8")
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["name"] == "tracked"


def test_a_recorded_run_logs_again_to_a_database_store(tracked: dict[str, Any]) -> None:
    """After a tracking store failed, ``log_run`` logs the recorded run again; here to MLflow's SQLite backend."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tracked['tmp'] / 'mlflow.db'}"
    again = log_run(tracked["store"], 1, uri, experiment="again")
    run = MlflowClient(tracking_uri=uri).get_run(again.mlflow_run_id)
    first = tracked["run"]
    assert run.data.params == first.data.params and run.data.metrics == first.data.metrics
    assert Path(run.info.artifact_uri.removeprefix("file://")).parent.parent == tracked["tmp"] / "mlartifacts"
    assert again.artifacts == ["config.json"] + [
        f"reports/{r}-report.{f}" for r in ("cost", "fairness", "privacy") for f in ("html", "json")
    ]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--follow", action="store_true")
    add_mlflow_argument(parser)
    return parser.parse_args(list(argv))


def test_without_mlflow_the_option_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedguard.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as on a machine without it
    with pytest.raises(ConfigError, match=r"pip install 'fedguard\[mlflow\]'"):
        check_tracking_uri(tmp_path.as_uri())
    # The CLI refuses before any work: no partitions, no run store.
    data = tmp_path / "data.csv"
    make_tabular(60).to_csv(data, index=False)
    toml = write_run_toml(tabular_config(data), tmp_path / "run.toml")
    work = tmp_path / "work"
    argv = ["simulate", "--config", str(toml), "--workdir", str(work), "--mlflow-uri", tmp_path.as_uri()]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'fedguard[mlflow]'" in err and "Traceback" not in err
    assert not work.exists()


def test_tracking_uris_are_checked_before_the_run(tmp_path: Path) -> None:
    _mlflow_or_skip()
    assert checked_args(_args()) is None  # not asked for: nothing to check, nothing logged
    assert check_tracking_uri(str(tmp_path / "mlruns")) == (tmp_path / "mlruns").as_uri()  # a path is a file store
    assert check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="unsupported MLflow tracking URI scheme 'ftp'"):
        check_tracking_uri("ftp://example.invalid/mlruns")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a folder"):
        check_tracking_uri(a_file.as_uri())
    # `run start` without --follow returns at once: there would be no finished run to log.
    with pytest.raises(ConfigError, match="add --follow"):
        checked_args(_args("--mlflow-uri", tmp_path.as_uri()))
    assert checked_args(_args("--follow", "--mlflow-uri", tmp_path.as_uri())) == tmp_path.as_uri()
