"""``fedguard evaluate``: a real round checkpoint from a simulated federation, scored and audited ad hoc.

One simulation (1 round, 2 clients, DP off so one round learns the task) runs once for the module
in its own process (Ray); every test evaluates its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from common.codec import load_numpy_state
from common.config import config_from_json
from common.data import load_encoded
from common.evaluation import evaluate_and_audit
from common.models import build_model, text_encoding
from common.schema import load_schema
from fedguard.cli import main
from fedguard.evaluate import evaluate_checkpoint
from server.checkpoint import load
from server.fairness_report import FairnessReport
from server.store import RunStore
from tests.helpers import ROOT, TABULAR_SCHEMA, make_tabular, simulate_in_subprocess, tabular_config, write_run_toml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _write_schema(path: Path, **changes: object) -> Path:
    path.write_bytes(tomli_w.dumps({**TABULAR_SCHEMA, **changes}).encode())
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    data = tmp / "data.csv"
    make_tabular(600).to_csv(data, index=False)
    cfg = tabular_config(
        data,
        rounds=1,
        dp={"enabled": False},
        # 6 local epochs without DP: the model learns the task on every run (training shuffles from os.urandom)
        train={"local_epochs": 6, "batch_size": 32, "learning_rate": 0.02, "optimizer": "adam"},
        # the model's own decisions: these tests compare with a direct, uncalibrated evaluation
        # (prior calibration through `fedguard evaluate`: tests/test_calibration.py)
        evaluation={"calibration": "none"},
    )
    run_id, store, progress = simulate_in_subprocess(cfg, tmp / "work")
    assert run_id == 1
    (tmp / "progress.txt").write_text(progress, encoding="utf-8")
    evaluation = tmp / "eval.csv"
    make_tabular(400, seed=11).to_csv(evaluation, index=False)
    return {
        "tmp": tmp,
        "store": store,
        "ckpt": tmp / "work" / "checkpoints" / "run-1" / "round-00001.ckpt",
        "data": evaluation,
        "schema": _write_schema(tmp / "schema.toml"),
        "toml": write_run_toml(cfg, tmp / "run.toml"),
        "progress": tmp / "progress.txt",
    }


def test_a_run_without_dp_says_so_before_its_first_round(trained: dict[str, Path]) -> None:
    """A user who turned DP off is told before any update leaves a node, not only in the summary."""
    out = trained["progress"].read_text(encoding="utf-8")
    lines = out.splitlines()
    warning = lines.index(
        "WARNING: DP is disabled (dp.enabled = false): the model updates are not differentially private"
    )
    assert warning < lines.index("round 1/1: training on 2 node(s)"), out[-3000:]


def _direct(trained: dict[str, Path], data: Path) -> tuple[dict[str, float], object]:
    """The same checkpoint scored with the evaluation helpers, no evaluate command involved."""
    with RunStore(trained["store"]) as store:
        cfg = config_from_json(store.run(1)["config_json"])
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    load_numpy_state(model, load(trained["ckpt"]).model)
    enc = load_encoded(data, load_schema(trained["schema"]), **text_encoding(cfg.model.name, cfg.model.params))
    return evaluate_and_audit(model, enc, cfg.fairness)


def _args(trained: dict[str, Path], **over: object) -> list[str]:
    opts = {"model": trained["ckpt"], "data": trained["data"], "schema": trained["schema"], **over}
    return ["evaluate", *[x for k, v in opts.items() if v is not None for x in (f"--{k}", str(v))]]


def test_metrics_equal_direct_evaluation_and_json_report_is_written(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    assert main(_args(trained, format="json", out=out)) == 0
    stdout = capsys.readouterr().out
    assert "accuracy" in stdout and "macro-F1" in stdout and f"written to {out}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind

    want, audit = _direct(trained, trained["data"])
    metrics, report = evaluate_checkpoint(trained["ckpt"], trained["data"], trained["schema"], progress=lambda s: None)
    assert metrics.keys() == want.keys()
    for key in want:
        assert metrics[key] == pytest.approx(want[key], abs=1e-6)
    assert want["accuracy"] > 0.75  # the fixture's model learned the task (the bias test relies on it)
    assert report is not None and audit is not None

    doc = json.loads(out.read_text(encoding="utf-8"))
    parsed = FairnessReport.model_validate(doc)
    assert parsed.run_id == 1 and [r.round for r in parsed.rounds] == [1]
    assert isinstance(doc["findings"], list)
    groups = {g.group for a in parsed.rounds[0].audit.attributes for g in a.groups}
    assert groups == {"g1", "g2"}
    assert parsed.rounds[0].audit.overall.accuracy == pytest.approx(audit.overall.accuracy, abs=1e-6)  # type: ignore[attr-defined]
    assert parsed.provenance.evaluation_size == 400 and parsed.provenance.source == "eval.csv"

    # Without --out the report alone goes to stdout (progress and summary go to stderr).
    assert main(_args(trained, format="json")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run_id"] == 1
    assert "evaluating on 400 rows" in captured.err


def test_planted_bias_yields_a_finding(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The label follows the sensitive attribute (and so do the features the model reads)."""
    df = make_tabular(400, seed=5)
    g1 = df["group"] == "g1"
    rng = np.random.default_rng(5)
    df["a"] = np.where(g1, rng.uniform(1.0, 3.0, len(df)), rng.uniform(-3.0, -1.0, len(df)))
    df["y"] = g1.astype(int)
    biased = tmp_path / "biased.csv"
    df.to_csv(biased, index=False)
    out = tmp_path / "report.md"
    assert main(_args(trained, data=biased, out=out)) == 0
    stdout = capsys.readouterr().out
    _, report = evaluate_checkpoint(trained["ckpt"], biased, trained["schema"], progress=lambda s: None)
    assert report is not None
    kinds = {f.kind for f in report.findings if f.attribute == "group"}
    assert "demographic_parity_ratio" in kinds
    assert "[critical]" in stdout or "[warning]" in stdout
    assert "## Findings" in out.read_text(encoding="utf-8") and "demographic parity ratio" in out.read_text()


def test_damaged_checkpoint_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "checkpoints" / "run-1" / "round-00001.ckpt"
    bad.parent.mkdir(parents=True)
    raw = bytearray(trained["ckpt"].read_bytes())
    raw[-1] ^= 0x01
    bad.write_bytes(bytes(raw))
    assert main(_args(trained, model=bad, config=trained["toml"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:") and "checksum mismatch" in err and str(bad) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("changes", "field", "named"),
    [
        ({"features": [*TABULAR_SCHEMA["features"][:1], {"name": "d", "type": "numeric"}]}, "features", "'d'"),  # type: ignore[index]
        ({"classes": ["no", "yes"]}, "classes", "'no'"),
        ({"label": "outcome"}, "label", "'outcome'"),
    ],
)
def test_schema_that_shapes_another_model_is_refused(
    trained: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    field: str,
    named: str,
) -> None:
    schema = _write_schema(tmp_path / "other.toml", **changes)
    assert main(_args(trained, schema=schema)) == 2
    err = capsys.readouterr().err
    assert f"differs from the run's in {field!r}" in err and named in err and str(schema) in err


def test_other_sensitive_columns_are_allowed_and_none_means_no_report(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = _write_schema(tmp_path / "plain.toml", sensitive=[])
    out = tmp_path / "eval.json"
    assert main(_args(trained, schema=schema, format="json", out=out)) == 0
    assert "no fairness audit: the schema declares no sensitive columns" in capsys.readouterr().out
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["fairness_report"] is None and doc["round"] == 1
    want, _ = _direct(trained, trained["data"])
    assert doc["metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)


def test_config_whose_model_differs_names_the_tensor(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tabular_config(trained["tmp"] / "data.csv", model={"name": "ft-transformer", "params": {"d_model": 8}})
    toml = write_run_toml(cfg, tmp_path / "other-run.toml")
    assert main(_args(trained, config=toml)) == 2
    err = capsys.readouterr().err
    assert "does not fit the ft-transformer model" in err and "shape" in err and "tensor '" in err


def test_without_a_store_the_error_asks_for_config(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = tmp_path / "loose.ckpt"
    shutil.copy(trained["ckpt"], loose)
    assert main(_args(trained, model=loose)) == 2
    assert "pass --config" in capsys.readouterr().err

    # The run-store layout without a store file.
    copied = tmp_path / "server" / "checkpoints" / "run-1" / "round-00001.ckpt"
    copied.parent.mkdir(parents=True)
    shutil.copy(trained["ckpt"], copied)
    assert main(_args(trained, model=copied)) == 2
    err = capsys.readouterr().err
    assert "no run store found" in err and "pass --config" in err
    assert not (tmp_path / "server" / "runs.db").exists()  # looking never creates a store

    # The real exit status and message, in a process of its own.
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *_args(trained, model=copied)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("fedguard: error:") and "--config" in proc.stderr

    # With --config the same checkpoint evaluates to the same numbers.
    metrics, report = evaluate_checkpoint(
        copied, trained["data"], trained["schema"], trained["toml"], progress=lambda s: None
    )
    want, _ = _direct(trained, trained["data"])
    assert metrics == pytest.approx(want, abs=1e-6) and report is not None


def _planted_bias(path: Path) -> Path:
    """Three groups whose feature ``a`` (which the model reads) is shifted: the label follows, so do predictions.

    Every group keeps both labels, so every rate the audit and fairlearn compute is defined.
    """
    df = make_tabular(600, seed=7)
    rng = np.random.default_rng(7)
    df["group"] = rng.choice(["g1", "g2", "g3"], size=len(df))
    df["a"] = df["a"] + df["group"].map({"g1": 1.0, "g2": 0.0, "g3": -1.0})
    logit = 2.0 * df["a"] - 1.0 * df["b"] + (df["c"] == "z") * 1.5
    df["y"] = (logit + rng.normal(scale=0.5, size=len(df)) > 0).astype(int)
    df.to_csv(path, index=False)
    return path


def test_predictions_file_reproduces_the_audit_with_fairlearn(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
    )
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    data = _planted_bias(tmp_path / "biased.csv")
    out, pred_path = tmp_path / "report.json", tmp_path / "predictions.csv"
    assert main(_args(trained, data=data, format="json", out=out, predictions=pred_path)) == 0
    assert f"predictions for 600 rows written to {pred_path}" in capsys.readouterr().out
    report = FairnessReport.model_validate_json(out.read_text(encoding="utf-8"))
    audit = report.rounds[0].audit

    # A reviewer's reading: plain strings for labels and groups, floats for the score.
    pred = pd.read_csv(pred_path, dtype=str, keep_default_na=False)
    assert list(pred.columns) == ["row", "label", "score", "prediction", "group"]
    source = pd.read_csv(data)
    assert pred["row"].astype(int).tolist() == list(range(1, 601))
    assert pred["label"].tolist() == source["y"].astype(str).tolist()  # rows are the file's rows, in order
    assert pred["group"].tolist() == source["group"].tolist()
    y, y_hat = pred["label"].astype(int), pred["prediction"].astype(int)
    score = pred["score"].astype(float)
    assert ((score > 0.5) == (y_hat == 1)).all()  # the prediction is the most probable class

    assert accuracy_score(y, y_hat) == pytest.approx(audit.overall.accuracy, abs=1e-12)
    assert f1_score(y, y_hat) == pytest.approx(audit.overall.f1, abs=1e-12)
    assert roc_auc_score(y, score) == pytest.approx(audit.overall.roc_auc, abs=1e-12)

    group = pred["group"]
    att = next(a for a in audit.attributes if a.name == "group")
    assert att.disparities is not None
    d = att.disparities
    assert demographic_parity_difference(y, y_hat, sensitive_features=group) == pytest.approx(
        d.demographic_parity_difference.value, abs=1e-12
    )
    assert demographic_parity_ratio(y, y_hat, sensitive_features=group) == pytest.approx(
        d.demographic_parity_ratio.value, abs=1e-12
    )
    assert equalized_odds_difference(y, y_hat, sensitive_features=group) == pytest.approx(
        d.equalized_odds_difference.value, abs=1e-12
    )
    by_group = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=y_hat, sensitive_features=group).by_group
    ours = {g.group: g.accuracy for g in att.groups}
    assert ours.keys() == {"g1", "g2", "g3"}
    assert {g: by_group[g] for g in ours} == pytest.approx(ours, abs=1e-12)
    # the planted bias shows: the groups are selected at clearly different rates
    assert d.demographic_parity_difference.value is not None and d.demographic_parity_difference.value > 0.2


def test_predictions_may_not_overwrite_the_data(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = trained["data"].read_bytes()
    assert main(_args(trained, predictions=trained["data"])) == 2
    err = capsys.readouterr().err
    assert "--predictions names the data file itself" in err and "Traceback" not in err
    assert trained["data"].read_bytes() == before
    assert main(_args(trained, predictions=tmp_path / "no-such-folder" / "p.csv")) == 2
    assert "the folder for the predictions does not exist" in capsys.readouterr().err
