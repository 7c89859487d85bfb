"""A run that degrades says so: nodes by name with their refusal reasons, model findings that never go silent,
and one ε per node in every output (issues 19 and 27).

The unit tests drive the real finding rules, the real round line and a real run store; the two slow tests
run ``fedguard simulate`` as a user would and read what the user reads: the round lines, ``fedguard runs``,
the privacy report, ``fedguard client budget`` and the dashboard.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import records as R
from common.fairness import FairnessConfig, constant_streak, model_findings, prediction_summary
from common.privacy import counts_release, epsilon_spent
from server.store import RunStore
from server.validation import Outcome
from tests.helpers import ONE_ACTOR, ROOT, TABULAR_SCHEMA, make_tabular, small_sim_toml, tabular_config

pytestmark = pytest.mark.timeout(120)


# -- the model findings: on every evaluation, sensitive columns or not ------------------------------------------------
def _binary(pos_rate: float, base_rate: float, n: int = 1000) -> dict[str, float]:
    """Metrics of a model that predicts class 1 for ``pos_rate`` of ``n`` rows whose base rate is ``base_rate``,
    as accurately as those rates allow (its predicted positives are the first rows, as its true positives)."""
    y_true = (np.arange(n) < round(base_rate * n)).astype(int)
    y_pred = (np.arange(n) < round(pos_rate * n)).astype(int)
    return {"accuracy": float(np.mean(y_true == y_pred))} | prediction_summary(y_true, y_pred, 2)


@pytest.mark.parametrize(
    ("pos_rate", "base_rate", "flagged"),
    [
        (0.29, 0.20, False),  # 1.45× the base rate: inside the default 1.5×
        (0.31, 0.20, True),  # 1.55×: above
        (0.14, 0.20, False),  # 0.70× (1/1.43): inside
        (0.13, 0.20, True),  # 0.65× (1/1.54): below
    ],
)
def test_skewed_prediction_rate_on_both_sides_of_the_factor(pos_rate: float, base_rate: float, flagged: bool) -> None:
    found = model_findings(_binary(pos_rate, base_rate), FairnessConfig(), 4, ["no", "yes"])
    assert [f.kind for f in found] == (["skewed_prediction_rate"] if flagged else [])
    if flagged:
        f = found[0]
        assert f.severity == "warning" and f.value == pytest.approx(pos_rate) and f.last_seen_round == 4
        assert f"base rate of {100 * base_rate:.1f}%" in f.message and "'yes'" in f.message


@pytest.mark.parametrize(
    ("pos_rate", "base_rate", "flagged"),
    [
        (0.995, 0.80, True),  # "no" for 0.5% of rows against 20%: 0.03×, although "yes" is only 1.24× its rate
        (0.86, 0.80, False),  # "no" at 14% against 20%: 0.70×, inside
        (0.88, 0.80, True),  # "no" at 12% against 20%: 0.60×, below 1/1.5
    ],
)
def test_a_majority_positive_class_over_predicted_is_caught_on_the_other_class(
    pos_rate: float, base_rate: float, flagged: bool
) -> None:
    # With "yes" the positive class at 80% (a drafted schema sorts classes, so this is common), its predicted
    # share cannot exceed 1.5× its base rate: the skew shows only on "no".
    found = model_findings(_binary(pos_rate, base_rate), FairnessConfig(), 10, ["no", "yes"])
    assert [f.kind for f in found] == (["skewed_prediction_rate"] if flagged else [])
    if flagged:
        f = found[0]
        assert f.value == pytest.approx(1 - pos_rate) and f.threshold == pytest.approx((1 - base_rate) / 1.5)
        assert f"predicts 'no' for {100 * (1 - pos_rate):.1f}% of held-out rows" in f.message
        assert "base rate of 20.0%" in f.message and "below 1/1.5 = 0.67×" in f.message


def test_the_skew_factor_comes_from_the_config() -> None:
    metrics = _binary(0.31, 0.20)
    assert model_findings(metrics, FairnessConfig(prediction_skew_factor=1.6)) == []
    assert [f.kind for f in model_findings(metrics, FairnessConfig(prediction_skew_factor=1.5))] == [
        "skewed_prediction_rate"
    ]
    with pytest.raises(ValueError, match="greater than 1"):
        FairnessConfig(prediction_skew_factor=1.0)


def _scored(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, **extra: float) -> dict[str, float]:
    acc = float(np.mean(y_true == y_pred))
    return {"accuracy": acc, "macro_f1": 0.4, **extra} | prediction_summary(y_true, y_pred, num_classes)


def test_a_model_no_better_than_the_majority_class_is_a_finding_even_when_not_constant() -> None:
    """Prior calibration spreads a useless model's decisions over the classes, so it is neither constant nor (within
    1.5×) skewed; its accuracy at or below the majority class's share is what gives it away (Titanic, IID, ε = 8:
    0.579 against 0.589, and the run said "finished")."""
    y = (np.arange(1000) < 411).astype(int)  # 41.1% 'yes': always 'no' scores 0.589
    rows = np.arange(1000)
    useless = ((rows >= 300) & (rows < 650)).astype(int)  # 'yes' for 35%: 111 right, 239 wrong → 0.461
    metrics = _scored(y, useless, 2, uncalibrated_accuracy=0.589)
    assert metrics["accuracy"] == pytest.approx(0.461)
    (f,) = model_findings(metrics, FairnessConfig(), 10, ["no", "yes"])
    assert f.kind == "no_better_than_majority" and f.severity == "warning"
    assert f.value == pytest.approx(0.461) and f.threshold == pytest.approx(0.589)
    assert "accuracy (0.461; the model's own decisions 0.589; macro-F1 0.400)" in f.message
    assert "not above 0.589, what predicting the most common class ('no') for every row scores" in f.message
    assert "nor answering at random at the rate it predicts each class (0.527): it has learned nothing" in f.message
    assert "[dp] enabled = false" in f.message and "more training rows" in f.message  # what to try
    # a rare class (ISLR's Default: 3.4% 'yes'): decisions that find some of it can still lose to 'no' on accuracy
    rare = (rows < 34).astype(int)
    some = ((rows >= 20) & (rows < 80)).astype(int)  # 14 of 34 found, 46 false alarms: 0.934 < 0.966
    (r,) = [g for g in model_findings(_scored(rare, some, 2), None, 10, ["no", "yes"]) if g.kind.startswith("no_")]
    assert (
        "not above 0.966" in r.message
        and "it beats answering at random at the rate it predicts each class" in r.message
    )
    assert model_findings(metrics, FairnessConfig(), 0, ["no", "yes"]) == []  # round 0: the untrained model
    # the boundary: the majority's own accuracy is not above it, one more right row is
    at = ((rows < 10) | ((rows >= 411) & (rows < 421))).astype(int)  # 10 right, 10 wrong 'yes' → 0.589
    above = ((rows < 11) | ((rows >= 411) & (rows < 421))).astype(int)  # 11 right → 0.590
    kinds = [[g.kind for g in model_findings(_scored(y, d, 2), None, 3)] for d in (at, above)]
    assert kinds == [["skewed_prediction_rate", "no_better_than_majority"], ["skewed_prediction_rate"]]
    # multiclass: the most common class's share, that class named
    y3 = np.repeat([0, 1, 2], [500, 300, 200])
    shuffled = np.repeat([1, 0, 2], [500, 300, 200])  # only class 2 right: 0.2
    (g,) = model_findings(_scored(y3, shuffled, 3), None, 4, ["a", "b", "c"])
    assert g.kind == "no_better_than_majority" and "not above 0.500" in g.message and "('a')" in g.message
    assert model_findings(_scored(y3, y3, 3), None, 4, ["a", "b", "c"]) == []
    # an evaluation stored before majority_share: a binary one's base rate says it
    old = {k: v for k, v in metrics.items() if k not in ("majority_class", "majority_share")}
    assert [g.kind for g in model_findings(old, None, 5)] == ["no_better_than_majority"]


def test_a_constant_model_is_critical_for_binary_and_multiclass_tasks() -> None:
    binary = _binary(0.0, 0.3)
    (f,) = model_findings(binary, None, 2, ["neg", "pos"])
    assert f.kind == "constant_model" and f.severity == "critical"
    assert "one class ('neg') for every held-out row" in f.message and "0.700" in f.message
    assert "train.learning_rate" in f.message and "label balance" in f.message  # what to try
    assert "raise dp.max_grad_norm" in f.message  # clipping's pull towards the majority class
    y_true = np.array([0, 1, 2, 2, 1, 2])
    multi = {"accuracy": 0.5} | prediction_summary(y_true, np.full(6, 2), 3)
    assert [g.kind for g in model_findings(multi, None, 1, ["a", "b", "c"])] == ["constant_model"]
    varied = prediction_summary(y_true, np.array([0, 1, 2, 2, 2, 2]), 3)
    assert model_findings(varied) == [] and varied["predicted_classes"] == 3
    assert model_findings({"accuracy": 0.9, "loss": 0.2}) == []  # an evaluation from before the summary


def test_constant_streak_counts_the_latest_rounds_only() -> None:
    const, varied = _binary(1.0, 0.6), _binary(0.5, 0.6)
    assert constant_streak({0: const, 1: varied, 2: const, 3: const}) == 2
    assert constant_streak({0: const, 1: const, 2: varied}) == 0
    assert constant_streak({0: const}) == 0  # the initial model is not a round of training


def _round_lines(tmp_path: Path, scores: list[dict[str, float]], **fairness: object) -> list[str]:
    """The round lines a run's Federation prints while it records ``scores`` for rounds 0, 1, ..."""
    from server.rounds.base import Federation
    from server.scoring import Score

    cfg = tabular_config(fairness={"federated_counts": False, **fairness})
    lines: list[str] = []
    with RunStore(tmp_path / "runs.db") as store:
        run = store.create_run(cfg.name, cfg.to_json(), cfg.digest(), None)
        fed = Federation(
            None, cfg, store, run, 0, {}, signed=False, evaluator_key="", meter=None,  # type: ignore[arg-type]
            progress=lines.append, rng=np.random.default_rng(0),
        )  # fmt: skip
        for rnd, metrics in enumerate(scores):
            fed.record_score(rnd, Score(metrics, None, None, "server"))
    return lines


def test_round_lines_give_what_to_try_once_per_finding_then_only_the_finding(tmp_path: Path) -> None:
    """A 10-round run of a useless model printed the same 600-character advice under every round."""
    y = (np.arange(1000) < 411).astype(int)
    useless = ((np.arange(1000) >= 300) & (np.arange(1000) < 650)).astype(int)  # 0.461 against 0.589
    lines = _round_lines(tmp_path, [_scored(y, useless, 2) | {"n": 1000.0}] * 4)
    said = [line for line in lines if "not above 0.589" in line]
    assert [line.split(":")[0] for line in said] == ["  round 1", "  round 2", "  round 3"]  # not the initial model
    assert "Try: the same config without DP" in said[0]
    ending = "it has learned nothing that holds on these rows."
    assert all("Try:" not in line and line.endswith(ending) for line in said[1:])


def test_k_constant_rounds_say_so_in_the_round_line_with_what_to_try(tmp_path: Path) -> None:
    scores = [_binary(0.4, 0.5), _binary(0.0, 0.5), _binary(0.0, 0.5), _binary(0.0, 0.5)]
    lines = _round_lines(tmp_path, scores, constant_rounds=2)
    warned = [line for line in lines if "consecutive" in line]
    assert [re.match(r"  round (\d+):", w).group(1) for w in warned] == ["2", "3"]  # type: ignore[union-attr]
    assert "for 2 consecutive round(s)" in warned[0] and "for 3 consecutive round(s)" in warned[1]
    assert "one class ('0')" in warned[0] and "train.learning_rate" in warned[0] and "train.batch_size" in warned[0]
    # What to try once per run (a constant 10-round run printed the 600-character advice under 8 rounds).
    assert "Try:" not in warned[1] and warned[1].endswith("for 3 consecutive round(s).")


def test_the_round_line_names_nodes_and_counts_each_status() -> None:
    from server.app import _round_line

    names = {11: "node-0", 12: "node-1", 13: "node-2"}
    outcomes = [
        Outcome(11, "accepted", values={R.EPSILON: 1.25}),
        Outcome(12, "refused", "budget-exhausted (node log id abc123)"),
        Outcome(13, "dropped", "no reply within 60s"),
    ]
    line = _round_line(2, 1, outcomes, True, 3.0, lambda n: names[n])
    assert line.splitlines() == [
        "  round 2: 1/3 accepted, 1 dropped, 1 refused in 3.0s; node-0: ε=1.250",
        "  node-1 refused: budget-exhausted (node log id abc123)",
        "  node-2 dropped: no reply within 60s",
    ]


def test_names_from_the_kit_outrank_what_a_node_says(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        run = store.create_run("n", "{}", "h", None)
        store.record_node_names(run, {1: "org-a"}, "kit")
        store.record_node_names(run, {1: "impostor", 2: "node-2"}, "node")
        assert store.node_names(run) == {1: "org-a", 2: "node-2"}
        store.record_node_names(run, {2: "org-b"}, "kit")
        assert store.node_names(run) == {1: "org-a", 2: "org-b"}


# -- real runs ---------------------------------------------------------------------------------------------------------
def _fedguard(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )


def _write_config(tmp: Path, data: Path, schema: str, extra: str) -> Path:
    toml = tmp / "run.toml"
    extra = f"[server]\nround_timeout = 120\nwait_for_nodes = 60\n{extra}"
    toml.write_text(
        small_sim_toml("health", seed=3, rounds=3, clients=3, schema=schema, extra=extra, data=data.name),
        encoding="utf-8",
    )
    return toml


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_simulate_json_prints_its_json_document_alone_on_stdout(tmp_path: Path) -> None:
    """`fedguard simulate --json | jq`: the partition sizes, round lines and the nodes' DP plans (forwarded by Ray
    from its workers) go to stderr, and stdout is the run summary alone; before, all of it came first on stdout."""
    data = tmp_path / "data.csv"
    make_tabular(300).to_csv(data, index=False)
    toml = _write_config(tmp_path, data, 'features = [{name = "a", type = "numeric", range = [-3, 3]}]', "")
    toml.write_text(toml.read_text().replace("rounds = 3", "rounds = 1"), encoding="utf-8")
    proc = _fedguard(["simulate", "--config", str(toml), "--workdir", str(tmp_path / "w"), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["run_id"] == 1 and summary["status"] == "finished" and len(summary["nodes"]) == 3
    assert "split 240 rows into 3 iid partitions" in proc.stderr and "round 1/1" in proc.stderr
    assert "DP plan:" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_that_refuses_every_round_is_named_everywhere_and_one_epsilon_holds(tmp_path: Path) -> None:
    """node-1's owner gave it a budget one round cannot fit: it refuses every round, by name, with the reason;
    the other nodes' ε is the same in `fedguard runs`, the privacy report, `fedguard client budget` and the
    dashboard (the fairness counts release included), and δ is the total of every release."""
    data = tmp_path / "data.csv"
    make_tabular(600).to_csv(data, index=False)
    schema = """sensitive = ["group"]
features = [{name = "a", type = "numeric", range = [-3, 3]}, {name = "b", type = "numeric"},
            {name = "c", type = "categorical", categories = ["x", "y", "z"]}]"""
    toml = _write_config(tmp_path, data, schema, "")
    toml.write_text(toml.read_text() + "budget_epsilon = [10.0, 0.05, 10.0]\n", encoding="utf-8")
    work = tmp_path / "work"
    proc = _fedguard(["simulate", "--config", str(toml), "--workdir", str(work)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for rnd in (1, 2, 3):  # the round line: counts per status, then the refusing node by name with its reason
        assert re.search(rf"  round {rnd}: 2/3 accepted, 1 refused in [\d.]+s; node-0: ε=[\d.]+, node-2: ε=", out), out
    assert re.search(r"  node-1 refused: budget-exhausted \(node log id \w+\)", out)
    assert "WARNING: node-1 refused every round it was asked (3): refused: budget-exhausted (node log ids " in out
    # ... and says where a refusal's details are: the node's own log, which holds the ids the summary names.
    node_log = work.resolve() / "partitions" / "node-1" / "node.log"
    assert f"refusal details (by node log id): {node_log}" in out
    log_id = re.search(r"node-1 refused: budget-exhausted \(node log id (\w+)\)", out).group(1)  # type: ignore[union-attr]
    assert log_id in node_log.read_text(encoding="utf-8")
    # Like the demo, simulate ends with the final model's fairness findings and its three reports, named last.
    assert "fairness findings for the final model (" in out
    for kind in ("fairness", "privacy", "cost"):
        path = work / f"{kind}-report-run-1.html"
        assert f"{kind} report: {path}" in out.splitlines()[-3:], out[-1000:]
        assert "</html>" in path.read_text(encoding="utf-8")
    assert "node-1" in (work / "privacy-report-run-1.html").read_text(encoding="utf-8")
    # ... and the released model's file, by name, for `fedguard evaluate` (round-00003.ckpt, not round-3.ckpt).
    final = re.search(r"final model: (\S+) \(score it on any file: fedguard evaluate --model \1 \.\.\.\)", out)
    assert final and Path(final.group(1)).name == "round-00003.ckpt" and Path(final.group(1)).is_file(), out[-1500:]
    store = work / "runs.db"

    shown = _fedguard(["runs", "1", "--store", str(store)], tmp_path).stdout
    assert re.search(r"run 1 finished WITH \d WARNING\(S\)", shown)  # (this small DP model may also end constant)
    assert re.search(r"round 2: accuracy [\d.]+ .*; 2/3 accepted, 1 refused — node-1 refused: budget-exhausted", shown)
    assert "node-1: ε –; refused 3/3" in shown and "WARNING: node-1 refused every round" in shown
    listed = _fedguard(["runs", "--store", str(store)], tmp_path).stdout
    assert re.search(r"1  finished   health  accuracy [\d.]+  WARNING: .*node-1 never contributed", listed), listed

    privacy = ["report", "privacy", "1", "--store", str(store), "--format"]
    report = json.loads(_fedguard([*privacy, "json"], tmp_path).stdout)
    md = _fedguard([*privacy, "md"], tmp_path).stdout
    assert "WARNING: node-1 refused every round" in md and "node-1, round 3: refused: budget-exhausted" in md
    assert report["warnings"] and {c["name"] for c in report["clients"]} == {"node-0", "node-1", "node-2"}

    # One ε: the summary, the privacy report, each node's ledger and the dashboard.
    summary = json.loads(_fedguard(["runs", "1", "--store", str(store), "--json"], tmp_path).stdout)
    by_summary = {n["name"]: n["epsilon"] for n in summary["nodes"]}
    by_report = {c["name"]: c["epsilon_run"] for c in report["clients"]}
    # ... each node's ledger read as its owner would, with the command the simulation's summary names.
    node_dir = work.resolve() / "partitions" / "node-0"
    assert f"a node's privacy budget: fedguard client budget --workdir {node_dir} (likewise each node)" in out
    assert report["ledger_run_key"] == summary["ledger_run_key"] and f"Ledger key: {report['ledger_run_key']} " in md
    by_ledger: dict[str, float] = {}
    for name in ("node-0", "node-1", "node-2"):
        shown = _fedguard(["client", "budget", "--workdir", str(node_dir.parent / name), "--json"], tmp_path)
        budget = json.loads(shown.stdout) if shown.returncode == 0 else []  # node-1 never spent: no ledger marker
        assert [d["dataset_id"] for d in budget] in ([f"sim-partition-{name[-1]}"], [])
        for r in (r for d in budget for r in d["runs"] if r["run_id"] == summary["ledger_run_key"]):
            by_ledger[name] = r["epsilon"]
    from fastapi.testclient import TestClient

    from server.control.app import create_app
    from server.control.service import ControlService

    svc = ControlService(tmp_path / "control", store)
    _, token = svc.users.add("reviewer", "reviewer")
    api = TestClient(create_app(svc), base_url="https://testserver")
    detail = api.get("/api/runs/1", headers={"Authorization": f"Bearer {token}"}).json()
    by_dashboard = {n["name"]: n["epsilon"] for n in detail["health"]["nodes"]}
    assert by_summary["node-1"] is None and by_report["node-1"] is None and "node-1" not in by_ledger
    for name in ("node-0", "node-2"):
        assert by_summary[name] == pytest.approx(by_report[name], abs=1e-12)
        assert by_ledger[name] == pytest.approx(by_summary[name], rel=1e-9)
        assert by_dashboard[name] == pytest.approx(by_summary[name], abs=1e-12)
    counted = {c["name"]: c["count_release"] for c in report["clients"]}
    assert counted["node-0"]["status"] == "accepted" and counted["node-0"]["epsilon_run"] == by_report["node-0"]
    # δ in total: the run's δ (dp.delta = 1e-4; the owner's budget δ, 1e-5, only checks the budget), of which the
    # counts' group selection takes 1e-7 and the accountant the rest; the one ε is every release composed at
    # the accountant's δ, never below a round's.
    cfg = tabular_config()  # same accountant; σ, q and steps come from what the node reported
    with RunStore(store) as rs:
        rows, count_rows = rs.client_rounds(1), rs.count_releases(1)
    for name in ("node-0", "node-2"):
        node = next(n for n in summary["nodes"] if n["name"] == name)
        mine = [r for r in rows if r["node_id"] == node["node_id"]]
        last = mine[-1]["values"]
        assert last[R.DELTA] == pytest.approx(1e-4 - 1e-7) and last[R.EPSILON] <= node["epsilon"]
        assert next(c for c in count_rows if c["node_id"] == node["node_id"])["values"][R.DELTA] == last[R.DELTA]
        history = [(last[R.NOISE_MULTIPLIER], last[R.SAMPLE_RATE], last[R.STEPS])] * len(mine)
        history += counts_release(FairnessConfig().count_noise_multiplier)
        assert node["epsilon"] == pytest.approx(epsilon_spent(history, 1e-4 - 1e-7, cfg.dp.accountant), rel=1e-6)
        assert node["delta_total"] == pytest.approx(1e-4, rel=1e-9)
    assert summary["delta_total"] == pytest.approx(1e-4, rel=1e-9) == report["delta_total"]
    assert detail["health"]["delta_total"] == pytest.approx(summary["delta_total"])
    assert detail["health"]["warnings"] == summary["warnings"] == report["warnings"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_constant_model_without_sensitive_columns_ends_with_a_warning(tmp_path: Path) -> None:
    """Every row carries the same feature value, so the model can only ever predict one class; no sensitive
    column, so no fairness audit: the model findings still run, in the round lines, the summary,
    `fedguard runs` and the privacy report."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data.csv"
    pd.DataFrame({"a": np.ones(500), "y": (rng.random(500) < 0.3).astype(int)}).to_csv(data, index=False)
    schema = 'features = [{name = "a", type = "numeric", range = [-3, 3]}]'
    toml = _write_config(tmp_path, data, schema, "[fairness]\nconstant_rounds = 2")
    out = _simulate_a_constant_model(toml, tmp_path, "health", "[01]")
    assert "Try: lower train.learning_rate" in out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_constant_text_model_without_sensitive_columns_ends_with_a_warning(tmp_path: Path) -> None:
    """The text run of the review: a text schema, no sensitive column (so no fairness audit), a model that ends
    constant. Every review reads the same, so no model can tell them apart: the summary, `fedguard runs` and
    the privacy report must still say the model predicts one class, never a plain "finished"."""
    rng = np.random.default_rng(1)
    data = tmp_path / "reviews.csv"
    labels = np.where(rng.random(450) < 0.3, "neg", "pos")
    pd.DataFrame({"review": "the film was a film", "sentiment": labels}).to_csv(data, index=False)
    toml = tmp_path / "text.toml"
    toml.write_text(
        f"""name = "text-health"
seed = 3
rounds = 2
[model]
name = "text-transformer"
params = {{ d_model = 16, layers = 1, heads = 2, max_len = 32 }}
[dp]
target_epsilon = 8.0
delta = 1e-4
[data.schema]
task = "text"
text_column = "review"
label = "sentiment"
classes = ["neg", "pos"]
[fairness]
constant_rounds = 2
[server]
round_timeout = 120
wait_for_nodes = 60
[simulation]
num_clients = 3
data_path = "{data.name}"
client_cpus = {ONE_ACTOR["client_cpus"]}
""",
        encoding="utf-8",
    )
    _simulate_a_constant_model(toml, tmp_path, "text-health", "(neg|pos)")


def _simulate_a_constant_model(toml: Path, tmp_path: Path, name: str, classes: str) -> str:
    """Run `fedguard simulate` on a config whose model can only be constant ([fairness] constant_rounds = 2) and
    check every place a user reads: round 2's line (not round 1's), the summary, `fedguard runs` and the privacy
    report. ``classes``: a regex for the class it predicts. Returns the run's output."""
    work = tmp_path / "work"
    proc = _fedguard(["simulate", "--config", str(toml), "--workdir", str(work)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert re.search(rf"  round 2: WARNING the model has predicted one class \('{classes}'\) for every held-out row "
                     r"for 2 consecutive round\(s\)\. Try: ", out), out  # fmt: skip
    assert "round 1: WARNING" not in out  # k = 2: one constant round is not yet a pattern
    assert "run 1 finished WITH 1 WARNING(S)" in out
    assert re.search(
        rf"WARNING: the model predicts one class \('{classes}'\) for every held-out row: its accuracy", out
    )
    store = work / "runs.db"
    listed = _fedguard(["runs", "--store", str(store)], tmp_path).stdout
    assert re.search(rf"1  finished   {name}  accuracy [\d.]+  WARNING: CONSTANT MODEL", listed), listed
    md = _fedguard(["report", "privacy", "1", "--store", str(store), "--format", "md"], tmp_path).stdout
    assert "finished, WITH 1 WARNING(S)" in md and "WARNING: the model predicts one class" in md
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_model_no_better_than_the_majority_class_ends_with_a_warning_everywhere(tmp_path: Path) -> None:
    """The nodes' rows say y = 1 above a = 0.5; the held-out file says y = 1 below a = -0.5. The model learns the
    nodes' rule and predicts both classes on the held-out rows, worse than always saying '0': no constant model, no
    sensitive column, and before this finding a run that said "finished". Without DP, so it learns in 3 rounds."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=900)
    pd.DataFrame({"a": a, "y": (a > 0.5).astype(int)}).to_csv(tmp_path / "data.csv", index=False)
    h = rng.normal(size=300)
    pd.DataFrame({"a": h, "y": (h < -0.5).astype(int)}).to_csv(tmp_path / "holdout.csv", index=False)
    schema = 'features = [{name = "a", type = "numeric", range = [-3, 3]}]'
    toml = _write_config(tmp_path, tmp_path / "data.csv", schema, "")
    text = toml.read_text().replace(
        "validation_fraction = 0.2", 'validation_fraction = 0.2\nevaluation_path = "holdout.csv"'
    )
    toml.write_text(text.replace("target_epsilon = 4.0\ndelta = 1e-4", "enabled = false"), encoding="utf-8")
    work = tmp_path / "work"
    proc = _fedguard(["simulate", "--config", str(toml), "--workdir", str(work)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    # (calibrated accuracy; the model's own, where calibration changed the decisions; macro-F1)
    said = (
        r"the model's held-out accuracy \(0\.[0-4]\d\d(; the model's own decisions 0\.[0-4]\d\d)?; macro-F1 [\d.]+\) "
        r"is not above 0\.\d+, what predicting"
    )
    assert re.search(r"  round 3: WARNING " + said, out), out  # the round line, every evaluation
    assert "round 0: WARNING the model's held-out accuracy" not in out  # not for the untrained model
    assert re.search(r"\nWARNING: " + said + r" the most common class \('0'\) for every row scores", out), out
    assert re.search(r"run 1 finished WITH \d WARNING\(S\)", out)
    store = work / "runs.db"
    listed = _fedguard(["runs", "--store", str(store)], tmp_path).stdout
    assert "no better than majority" in listed, listed
    md = _fedguard(["report", "privacy", "1", "--store", str(store), "--format", "md"], tmp_path).stdout
    assert re.search(r"WARNING: " + said, md), md
    # `fedguard evaluate` on the final checkpoint says it too, with no sensitive column to audit
    (tmp_path / "schema.toml").write_text(f'task = "tabular"\nlabel = "y"\nclasses = ["0", "1"]\n{schema}\n')
    ckpt = work / "checkpoints" / "run-1" / "round-00003.ckpt"
    args = ["evaluate", "--model", str(ckpt), "--data", "holdout.csv", "--schema", "schema.toml"]
    evaluated = _fedguard(args, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # The run's calibration may move the decisions; the finding then names the model's own accuracy too.
    said = said.replace(r"\d\d; macro-F1", r"\d\d(; the model's own decisions 0\.\d+)?; macro-F1")
    assert re.search(r"model finding: \[warning\] " + said, evaluated.stderr), evaluated.stderr  # the summary
    assert re.search(r"Model finding \(warning\): " + said, evaluated.stdout), evaluated.stdout  # the document
    as_json = json.loads(_fedguard([*args, "--format", "json"], tmp_path).stdout)
    assert [f["kind"] for f in as_json["model_findings"]] == ["no_better_than_majority"]


def test_in_deployment_nodes_take_their_kit_names_from_the_enrolled_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.reply_signing import key_fingerprint
    from server.enrollment import WORKDIR_ENV, Enrolled, write_enrolled
    from server.rounds.base import Federation

    def pem() -> bytes:
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    org_a, org_b = pem(), pem()
    write_enrolled(
        tmp_path, [Enrolled(n, "client", key_fingerprint(k)) for n, k in (("org-a", org_a), ("org-b", org_b))]
    )
    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path))
    cfg = tabular_config()
    with RunStore(tmp_path / "runs.db") as store:
        run = store.create_run(cfg.name, cfg.to_json(), cfg.digest(), None)
        fed = Federation(
            None, cfg, store, run, 0, {}, signed=True, evaluator_key="", meter=None,  # type: ignore[arg-type]
            progress=lambda _: None, rng=np.random.default_rng(0),
        )  # fmt: skip
        fed.learn_names({7: "impostor\x1b[31m"}, "node")  # what a node says of itself is ignored in deployment
        assert fed.enrolled_keys({7: org_a, 8: org_b}) == {7: org_a, 8: org_b}
        assert store.node_names(run) == {7: "org-a", 8: "org-b"} and fed.label(8) == "org-b"
        fed.learn_names({9: "org-a"}, "node")  # in deployment a node's own name never counts: "node <id>"
        assert fed.label(9) == "node 9" and fed.label(10) == "node 10" and 9 not in store.node_names(run)


# -- one ε: every authentic reply counts, and a lost one says where to look -------------------------------------------
def _store_run(tmp_path: Path, **overrides: object) -> tuple[Path, int]:
    cfg = tabular_config(**overrides)
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        run = store.create_run(cfg.name, cfg.to_json(), cfg.digest(), None)
    return path, run


@pytest.mark.usefixtures("server_identity")
def test_an_update_rejected_by_the_server_still_counts_in_the_nodes_epsilon(tabular_csv: Path, tmp_path: Path) -> None:
    """The real ClientApp trains round 2 (a real DP release); the server's norm bound rejects it. The node spent
    that budget whatever the server did: its ε is round 2's, not the last accepted round's."""
    from client.app import app as client_app
    from server.run_health import run_health
    from server.validation import classify_reply
    from tests.helpers import global_state, node_context, train_message

    cfg = tabular_config()
    state = global_state(cfg)
    ctx = node_context(tabular_csv, tmp_path / "node")
    path, run = _store_run(tmp_path)
    epsilons = []
    for rnd, bound in ((1, None), (2, 1e-9)):  # round 2: a bound no real update meets
        reply = client_app(train_message(cfg, state, rnd), ctx)
        outcome = classify_reply(reply, state, cfg.server.max_weight, bound)
        epsilons.append(float(reply.content[R.METRICS][R.EPSILON]))
        with RunStore(path) as store:
            store.record_round(run, rnd, 0.0, [outcome.row()], aggregated=outcome.status == "accepted")
    assert outcome.status == "rejected" and "exceeds server.max_update_norm" in (outcome.reason or "")
    accounted = cfg.dp.delta - cfg.fairness.count_selection_delta  # the counts' selection, planned, is the rest
    assert outcome.values[R.EPSILON] == epsilons[1] and outcome.values[R.DELTA] == pytest.approx(accounted)
    (node,) = run_health(path, run).nodes
    assert epsilons[1] > epsilons[0] and node.epsilon == epsilons[1]
    assert node.delta_total == pytest.approx(accounted) and node.tally == "accepted 1/2, rejected 1/2"


def test_one_epsilon_is_one_figure_in_the_round_line_and_the_summary(tmp_path: Path) -> None:
    """A node at ε 7.9954 read "ε=8.00" in its last round line and "ε 7.995" in the summary of the same run."""
    from server.app import _round_line
    from server.run_health import run_health

    path, run = _store_run(tmp_path)
    last = Outcome(5, "accepted", values={R.EPSILON: 7.9954, R.DELTA: 1e-5})
    with RunStore(path) as store:
        store.record_node_names(run, {5: "node-0"}, "node")
        store.record_round(run, 1, 0.0, [last.row()], aggregated=True)
    line = _round_line(1, 1, [last], True, 1.0, lambda _: "node-0")
    (node,) = run_health(path, run).nodes
    assert line.endswith("; node-0: ε=7.995") and node.privacy == "ε 7.995"


def test_a_lost_counts_reply_says_the_ledger_may_hold_more(tmp_path: Path) -> None:
    from server.run_health import LEDGER_NOTE, run_health

    path, run = _store_run(tmp_path)
    with RunStore(path) as store:
        store.record_node_names(run, {5: "node-0", 6: "node-1"}, "node")
        rounds = [Outcome(n, "accepted", values={R.EPSILON: 1.5, R.DELTA: 1e-4}).row() for n in (5, 6)]
        store.record_round(run, 1, 0.0, rounds, aggregated=True)
        store.record_federated(
            run,
            1,
            None,
            None,
            [
                Outcome(5, "accepted", values={R.EPSILON: 1.7, R.DELTA: 1e-4}).row(),
                Outcome(6, "dropped", "no reply within 60s").row(),
            ],
        )
    health = run_health(path, run)
    sent, lost = health.nodes
    assert (sent.name, sent.epsilon, sent.privacy) == ("node-0", 1.7, "ε 1.700")
    assert sent.delta_total == pytest.approx(1e-4 + FairnessConfig().count_selection_delta)
    assert lost.epsilon == 1.5 and lost.delta_total == 1e-4  # its counts never arrived: no selection δ
    assert lost.privacy == f"ε 1.500 ({LEDGER_NOTE})" and "fedguard client budget" in LEDGER_NOTE
    assert f"node-1: a reply was lost after it may have trained; {LEDGER_NOTE}" in health.warnings
    assert not any(w.startswith("node-0") for w in health.warnings)


def test_without_dp_no_epsilon_is_shown_for_the_updates_and_the_counts_stand_apart(tmp_path: Path) -> None:
    from server.privacy_report import build_privacy_report, to_markdown
    from server.run_health import run_health

    path, run = _store_run(tmp_path, dp={"enabled": False})
    with RunStore(path) as store:
        store.record_node_names(run, {5: "node-0"}, "node")
        store.record_round(run, 1, 0.0, [Outcome(5, "accepted", values={}).row()], aggregated=True)
        store.record_federated(run, 1, None, None, [Outcome(5, "accepted", values={R.EPSILON: 0.4}).row()])
    health = run_health(path, run)
    (node,) = health.nodes
    assert node.epsilon is None and node.counts_epsilon == 0.4
    assert node.privacy == "updates not private (DP disabled); fairness counts ε 0.400"
    assert any("not differentially private" in w for w in health.warnings)
    assert health.flags == ["NO DP"]  # what `fedguard runs` shows beside the run
    md = to_markdown(build_privacy_report(path, run))
    assert "updates not private (DP disabled); fairness counts ε 0.400" in md


@pytest.mark.parametrize("scored", [False, True])
def test_a_run_with_a_held_out_set_but_no_scored_round_says_nothing_shows_it_learned(
    tmp_path: Path, scored: bool
) -> None:
    """An evaluator that refused its data every round left a run "finished" with every node's ε spent, no warning."""
    from server.privacy_report import build_privacy_report, to_markdown
    from server.run_health import NOT_EVALUATED, run_health

    path, run = _store_run(tmp_path, data={"schema": TABULAR_SCHEMA, "evaluation_path": str(tmp_path / "h.csv")})
    with RunStore(path) as store:
        store.record_node_names(run, {5: "node-0"}, "node")
        store.record_round(run, 1, 0.0, [Outcome(5, "accepted", values={R.EPSILON: 3.0}).row()], aggregated=True)
        if scored:
            store.record_evaluation(run, 1, _binary(0.45, 0.42) | {"n": 1000.0}, None, None, "server")
    health = run_health(path, run)
    assert (NOT_EVALUATED in health.warnings) is not scored and ("NOT EVALUATED" in health.flags) is not scored
    assert ("nothing shows whether the model learned" in to_markdown(build_privacy_report(path, run))) is not scored


@pytest.mark.parametrize("mode", ["none", "homomorphic", "secagg"])
def test_a_privacy_report_without_dp_claims_no_dp_protection(tmp_path: Path, mode: str) -> None:
    """With dp.enabled = false nothing in the report may say the updates are DP-protected or bounded by DP-SGD:
    not the threat model, not the aggregation mode's trust statement, not the class of the values that left."""
    from server.privacy_report import build_privacy_report, to_markdown

    he = {"homomorphic": {"context_fingerprint": "ab" * 32, "bundle": "/srv/he", "evaluator_key": "SHA256:x"}}
    extra = {"secure_aggregation": mode, **(he if mode == "homomorphic" else {})}
    path, run = _store_run(tmp_path, dp={"enabled": False}, **extra)
    with RunStore(path) as store:
        store.record_node_names(run, {5: "node-0"}, "node")
        store.record_round(run, 1, 0.0, [Outcome(5, "accepted", values={}, received=["arrays.w"]).row()], True)
    md = to_markdown(build_privacy_report(path, run))
    for claim in ("trains with DP-SGD", "DP-protected update", "DP-SGD still bounds", "DP-SGD on the node still bounds",
                  "- node-0: DP-protected"):  # fmt: skip
        assert claim not in md, claim
    assert "DP is disabled in this run" in md and "node-0: model update, NOT DP-protected (DP disabled): arrays.w" in md
    (tmp_path / "dp").mkdir()
    dp_md = to_markdown(build_privacy_report(*_store_run(tmp_path / "dp", **extra)))
    assert "DP is disabled" not in dp_md  # the DP run keeps its own statements


def _curve(accuracies: list[float], n: int = 1500) -> dict[int, dict[str, float]]:
    """Evaluations of rounds 0, 1, … with these held-out accuracies on ``n`` rows."""
    return {r: {"accuracy": a, "n": float(n)} for r, a in enumerate(accuracies)}


def test_a_final_model_below_an_earlier_round_is_called_out_with_its_curve() -> None:
    from common.fairness import regression_finding

    # issue 27's 5-node Dirichlet run, seed 1: 0.720 at round 2, 0.655 at the end
    f = regression_finding(_curve([0.508, 0.596, 0.720, 0.655]))
    assert f is not None and f.kind == "final_model_regressed" and f.severity == "warning"
    assert (f.first_seen_round, f.last_seen_round, f.value) == (2, 3, 0.655)
    assert "round 3" in f.message and "0.065 below round 2's 0.720" in f.message
    assert "0.596, 0.720, 0.655" in f.message and "train.batch_size" in f.message
    # the initial model's score is chance: a final model below it alone is not a regression
    assert regression_finding(_curve([0.815, 0.62, 0.70, 0.75])) is None
    assert regression_finding(_curve([0.5, 0.70, 0.72, 0.70])) is None  # 0.02 below: inside the 0.03 margin
    assert regression_finding(_curve([0.5, 0.72])) is None  # one round: nothing earlier to compare with
    # a constant model's accuracy is a class share, not skill: a later model below it is not a regression
    const = _curve([0.5, 0.70, 0.62]) | {1: _binary(0.0, 0.3) | {"n": 1500.0}}
    assert const[1]["accuracy"] == pytest.approx(0.70) and regression_finding(const) is None


def test_the_regression_margin_comes_from_the_config_and_a_small_hold_out_needs_more() -> None:
    from common.fairness import regression_finding

    curve = _curve([0.5, 0.74, 0.70])
    assert regression_finding(curve) is not None  # 0.04 below, 2 SE of 1,500 rows = 0.023
    assert regression_finding(curve, FairnessConfig(regression_margin=0.05)) is None
    small = _curve([0.5, 0.74, 0.70], n=178)  # 2 SE = 0.066: a 0.04 drop is the hold-out's noise
    assert regression_finding(small, FairnessConfig(regression_margin=0.0)) is None
    assert regression_finding(_curve([0.5, 0.74, 0.66], n=178), FairnessConfig(regression_margin=0.0)) is not None


def test_a_regressed_final_model_is_in_the_warnings_flags_and_privacy_report(tmp_path: Path) -> None:
    from server.privacy_report import build_privacy_report, to_markdown
    from server.run_health import run_health

    path, run = _store_run(tmp_path)
    with RunStore(path) as store:
        for rnd, (pos, acc) in enumerate([(0.5, 0.5), (0.45, 0.78), (0.42, 0.70)]):
            metrics = _binary(pos, 0.42) | {"accuracy": acc, "n": 1000.0}
            store.record_evaluation(run, rnd, metrics, None, None, "server")
    health = run_health(path, run)
    assert [f.kind for f in health.final_findings] == ["final_model_regressed"]
    assert "final model regressed" in health.flags
    assert any("0.080 below round 1's 0.780" in w for w in health.warnings)
    assert "0.080 below round 1's 0.780" in to_markdown(build_privacy_report(path, run))


# -- names: the kit's in deployment, never a node's own; shared names told apart; natural order -----------------------
def test_in_deployment_without_a_server_workdir_a_node_is_named_by_its_id(tmp_path: Path) -> None:
    from server.rounds.base import Federation
    from server.run_health import run_health

    path, run = _store_run(tmp_path)
    with RunStore(path) as store:
        fed = Federation(
            None, tabular_config(), store, run, 0, {}, signed=True, evaluator_key="", meter=None,  # type: ignore[arg-type]
            progress=lambda _: None, rng=np.random.default_rng(0),
        )  # fmt: skip
        fed.learn_names({7: "hospital-a"}, "node")  # what the node's role reply said of itself
        store.record_round(run, 1, 0.0, [Outcome(7, "accepted", values={R.EPSILON: 1.0}).row()], aggregated=True)
        assert fed.label(7) == "node 7" and store.node_names(run) == {}
    assert [n.name for n in run_health(path, run).nodes] == ["node 7"]
    with RunStore(path) as store:  # in simulation (unsigned) the node's own name is all there is
        sim = Federation(
            None, tabular_config(), store, run, 0, {}, signed=False, evaluator_key="", meter=None,  # type: ignore[arg-type]
            progress=lambda _: None, rng=np.random.default_rng(0),
        )  # fmt: skip
        sim.learn_names({7: "node-0"}, "node")
        assert sim.label(7) == "node-0"


def test_two_nodes_with_one_name_are_told_apart_by_id(tmp_path: Path) -> None:
    from server.app import _round_line
    from server.run_health import node_label, run_health

    names = {11: "node-1", 12: "node-1", 13: "node-2"}
    assert [node_label(n, names) for n in (11, 12, 13, 14)] == ["node-1 (11)", "node-1 (12)", "node-2", "node 14"]
    path, run = _store_run(tmp_path)
    with RunStore(path) as store:
        store.record_node_names(run, names, "node")
        store.record_round(run, 1, 0.0, [Outcome(n, "accepted", values={R.EPSILON: 1.0}).row() for n in names], True)
    assert [n.name for n in run_health(path, run).nodes] == ["node-1 (11)", "node-1 (12)", "node-2"]
    line = _round_line(1, 1, [Outcome(n, "accepted", values={R.EPSILON: 1.0}) for n in names], True, 1.0,
                       lambda n: node_label(n, names))  # fmt: skip
    assert "node-1 (11): ε=1.000, node-1 (12): ε=1.000, node-2: ε=1.000" in line


def test_nodes_sort_in_natural_order_everywhere(tmp_path: Path) -> None:
    from server.app import _round_line
    from server.privacy_report import build_privacy_report
    from server.run_health import run_health

    names = {n: f"node-{n}" for n in (10, 2, 1)}
    path, run = _store_run(tmp_path)
    with RunStore(path) as store:
        store.record_node_names(run, names, "node")
        store.record_round(run, 1, 0.0, [Outcome(n, "refused", "x (node log id a)").row() for n in names], False)
    assert [n.name for n in run_health(path, run).nodes] == ["node-1", "node-2", "node-10"]
    assert [c.name for c in build_privacy_report(path, run).clients] == ["node-1", "node-2", "node-10"]
    line = _round_line(1, 1, [Outcome(n, "refused", "x") for n in names], False, 1.0, lambda n: names[n])
    assert [ln.split()[0] for ln in line.splitlines()[1:]] == ["node-1", "node-2", "node-10"]


def test_a_failed_run_says_why_wherever_it_is_listed(tmp_path: Path) -> None:
    """A run that failed (every node out of budget at round 3) showed only "failed" in `fedguard runs`, the run's
    summary and its privacy report; now each gives the ServerApp's reason, and the summary its fix."""
    from server.privacy_report import build_privacy_report, render

    path, run = _store_run(tmp_path)
    error = "round 3: fewer than 1 accepted update(s) in 2 attempt(s)\nFix: start more nodes"
    with RunStore(path) as store:
        store.finish_run(run, "failed", error)
    why = "round 3: fewer than 1 accepted update(s) in 2 attempt(s)"
    listed = _fedguard(["runs", "--store", str(path)], tmp_path).stdout
    assert f"{run}  failed     test  not evaluated  ({why})" in listed
    shown = _fedguard(["runs", str(run), "--store", str(path)], tmp_path).stdout
    assert f"run {run} failed: {why}\n  Fix: start more nodes" in shown
    assert json.loads(_fedguard(["runs", str(run), "--store", str(path), "--json"], tmp_path).stdout)["error"] == error
    report = render(build_privacy_report(path, run), "md")
    assert "- Status: failed (round 3: fewer than 1 accepted update(s) in 2 attempt(s)); " in report


def test_a_round_every_node_refused_for_its_budget_says_so_in_its_fix() -> None:
    """`fedguard demo --epsilon 20` on owners with budgets of 10 failed with "start more nodes"; when every
    node that did not contribute refused for its budget, the fix is about budgets (reasons as nodes send them)."""
    from server.app import round_failed

    out = [Outcome(n, "refused", f"budget-exhausted (node log id {n}a)") for n in (1, 2, 3)]
    err = round_failed(1, 2, 2, out)
    assert str(err).startswith("round 1: fewer than 2 accepted update(s) in 2 attempt(s)")
    assert "3 node(s) refused because their privacy budgets cannot cover this round" in (err.fix or "")
    assert "lower [dp] target_epsilon" in (err.fix or "") and "start more nodes" not in (err.fix or "")
    mixed = round_failed(1, 2, 2, [*out[:2], Outcome(3, "dropped", "no reply")])  # another cause too
    assert "start more nodes" in (mixed.fix or "") and "budgets cannot cover" not in (mixed.fix or "")
