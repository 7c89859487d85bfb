"""Group thresholds (post-processing at the evaluator): fitting, applying, the policy file, ``fedguard evaluate``.

The planted bias: one group's scores are shifted down while its labels follow the same latent
signal, so at the model's own threshold that group is selected far less often (and recognised
less often) than the other. Thresholds fitted on a calibration part are measured on the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.codec import load_numpy_state
from common.config import load_config
from common.data import load_encoded
from common.errors import ConfigError, FedGuardError
from common.evaluation import predict, threshold_policy
from common.fairness.thresholds import (
    DEFAULT_THRESHOLD,
    ThresholdPolicy,
    apply_thresholds,
    calibration_split,
    fit_and_measure,
    fit_thresholds,
    load_policy,
)
from common.models import build_model, text_encoding
from common.schema import load_schema
from fedguard.cli import main
from fedguard.evaluate import FitRequest, run_evaluation
from server.checkpoint import load
from tests.helpers import central_case, evaluate_args

pytestmark = pytest.mark.timeout(300)


def _planted(n: int = 4000, seed: int = 0, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of a model biased against group "b": same labels given the latent signal, scores shifted down."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b"], n)
    z = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * z))).astype(np.int64)
    logit = 2 * z + rng.normal(scale=0.5, size=n) - shift * (groups == "b")
    return 1 / (1 + np.exp(-logit)), y, groups


def _small_policy() -> ThresholdPolicy:
    scores, y, groups = _planted(n=400)
    return fit_thresholds(scores, y, {"grp": groups}, attribute="grp")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demographic_parity_thresholds_close_the_selection_gap(seed: int) -> None:
    scores, y, groups = _planted(seed=seed)
    policy = fit_and_measure(scores, y, {"grp": groups}, attribute="grp", seed=seed)
    before, after = policy.before, policy.after
    assert before is not None and after is not None
    assert before.demographic_parity_ratio is not None and after.demographic_parity_ratio is not None
    assert before.demographic_parity_ratio < 0.6  # the planted bias, at the model's own threshold
    assert after.demographic_parity_ratio > 0.9  # on rows the thresholds were not fitted on
    assert after.accuracy >= before.accuracy - 0.02  # the bias was pure score shift: accuracy does not suffer
    assert policy.thresholds["b"] < policy.thresholds["a"]  # the disadvantaged group gets the lower bar
    assert policy.calibration_rows + after.rows == len(y)
    assert "prediction time" in policy.note and "'grp'" in policy.note


def test_strength_moves_the_gap_partway_and_zero_is_one_global_threshold() -> None:
    scores, y, groups = _planted()
    ratios = []
    for strength in (0.0, 0.5, 1.0):
        policy = fit_and_measure(scores, y, {"grp": groups}, attribute="grp", strength=strength)
        assert policy.after is not None and policy.after.demographic_parity_ratio is not None
        ratios.append(policy.after.demographic_parity_ratio)
        if strength == 0.0:
            assert policy.thresholds == {"a": DEFAULT_THRESHOLD, "b": DEFAULT_THRESHOLD}
            probs = np.stack([1 - scores, scores], axis=1)
            assert np.array_equal(apply_thresholds(policy, probs, {"grp": groups}), probs.argmax(-1))
            assert policy.after == policy.before
    assert ratios[0] < ratios[1] - 0.1 and ratios[1] < ratios[2] - 0.1


def test_equalized_odds_thresholds_reduce_the_eo_difference() -> None:
    scores, y, groups = _planted(seed=4)
    policy = fit_and_measure(scores, y, {"grp": groups}, attribute="grp", constraint="equalized_odds", seed=4)
    before, after = policy.before, policy.after
    assert before is not None and after is not None
    assert before.equalized_odds_difference is not None and after.equalized_odds_difference is not None
    assert before.equalized_odds_difference > 0.2
    assert after.equalized_odds_difference < before.equalized_odds_difference / 3
    assert after.accuracy >= before.accuracy - 0.02
    assert after.groups["a"] is not None and after.groups["b"] is not None
    assert abs(after.groups["a"].tpr - after.groups["b"].tpr) < 0.1  # type: ignore[operator]


def test_demographic_parity_matches_fairlearn_threshold_optimizer() -> None:
    postprocessing = pytest.importorskip("fairlearn.postprocessing")
    from fairlearn.metrics import demographic_parity_difference
    from sklearn.base import BaseEstimator, ClassifierMixin

    class FixedScores(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
        """A 'prefit' estimator whose probability for a row is the row's only feature (our model's score)."""

        def fit(self, X: np.ndarray, y: np.ndarray) -> FixedScores:
            return self

        def __sklearn_is_fitted__(self) -> bool:
            return True

        def predict_proba(self, X: np.ndarray) -> np.ndarray:
            s = np.asarray(X, dtype=np.float64)[:, 0]
            return np.stack([1 - s, s], axis=1)

    scores, y, groups = _planted(n=6000, seed=7)
    policy = fit_and_measure(scores, y, {"grp": groups}, attribute="grp", seed=7)
    calib = calibration_split(groups, 0.5, 7)  # the same calibration rows fit_and_measure used
    test = ~calib
    theirs = postprocessing.ThresholdOptimizer(
        estimator=FixedScores(), constraints="demographic_parity", prefit=True, predict_method="predict_proba"
    )
    theirs.fit(scores[calib, None], y[calib], sensitive_features=groups[calib])
    their_pred = theirs.predict(scores[test, None], sensitive_features=groups[test], random_state=0)
    their_gap = demographic_parity_difference(y[test], their_pred, sensitive_features=groups[test])
    their_acc = float(np.mean(their_pred == y[test]))
    ours = policy.after
    assert ours is not None and ours.demographic_parity_difference is not None
    ours_pred = apply_thresholds(policy, scores[test], {"grp": groups[test]})
    assert ours.demographic_parity_difference == pytest.approx(
        demographic_parity_difference(y[test], ours_pred, sensitive_features=groups[test]), abs=1e-12
    )
    assert ours.demographic_parity_difference <= their_gap + 0.03
    assert ours.accuracy >= their_acc - 0.02


def test_small_and_unseen_groups_get_the_default_threshold() -> None:
    scores, y, groups = _planted(n=2000, seed=3)
    groups = groups.astype("<U10")  # room for longer group names
    groups[:30] = "tiny"  # 30 rows: about 15 in the calibration part, below the minimum of 20
    for constraint in ("demographic_parity", "equalized_odds"):
        policy = fit_and_measure(scores, y, {"grp": groups}, attribute="grp", constraint=constraint)  # type: ignore[arg-type]
        assert "tiny" not in policy.thresholds and policy.suppressed == ["tiny"]
        assert policy.after is not None and policy.after.groups["tiny"] is None  # suppressed in the summary too
        keys = np.array(["tiny", "never-seen", "a"])
        s = np.array([0.45, 0.55, 0.45])
        got = apply_thresholds(policy, s, {"grp": keys})
        assert got.tolist() == [0, 1, int(0.45 > policy.thresholds["a"])]

    # Every group too small, or only one group: nothing to equalize, the model's own decisions, no crash.
    few = fit_thresholds(scores[:15], y[:15], {"grp": groups[:15]}, attribute="grp")
    assert few.thresholds == {} and few.suppressed == ["tiny"]
    one = fit_thresholds(scores, y, {"grp": np.full(len(y), "a")}, attribute="grp", constraint="equalized_odds")
    assert one.thresholds == {"a": DEFAULT_THRESHOLD}


def test_bad_policy_files_and_missing_attribute_give_clear_errors(tmp_path: Path) -> None:
    good = _small_policy().model_dump(mode="json")
    cases = {
        "garbage.json": ("{not json", "not a JSON file"),
        "other.json": (json.dumps({"format": "fedguard-fairness-report/1"}), "not a threshold policy"),
        "unknown.json": (json.dumps(good | {"surprise": 1}), "surprise"),
        "range.json": (json.dumps(good | {"default_threshold": 1.5}), "default_threshold"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_policy(tmp_path / name)
        assert expected in str(err.value) and name in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path / "absent.json")
    policy = ThresholdPolicy.model_validate(good)
    with pytest.raises(FedGuardError, match="'grp'.*does not have"):
        apply_thresholds(policy, np.array([0.3]), {"gender": np.array(["f"])})


# -- the policy file through `fedguard evaluate`, with a real checkpoint -----------------------------------------


def _biased_table(n: int, seed: int) -> pd.DataFrame:
    """The label follows the true signal; the feature the model reads is measured lower for g2 (planted bias)."""
    rng = np.random.default_rng(seed)
    group = rng.choice(["g1", "g2"], n)
    signal = rng.normal(size=n)
    y = (signal + rng.normal(scale=0.4, size=n) > 0).astype(int)
    a = np.clip(signal - 1.2 * (group == "g2"), -3, 3)
    return pd.DataFrame(
        {"a": a, "b": rng.exponential(size=n), "c": rng.choice(["x", "y", "z"], n), "group": group, "y": y}
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model trained centrally on biased data, saved with the run's own checkpoint writer."""
    return central_case(
        tmp_path_factory.mktemp("thresholds"),
        _biased_table(1500, 0),
        _biased_table(1200, 1),
        round_=3,
        mitigation={"method": "thresholds", "calibration_fraction": 0.5},
    )


def test_policy_round_trips_through_fedguard_evaluate(
    checkpoint: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = checkpoint
    policy_path, plain, fitted_report = tmp_path / "thresholds.json", tmp_path / "plain.json", tmp_path / "fit.md"
    assert main(evaluate_args(c, "--format", "json", "--out", plain)) == 0
    assert main(evaluate_args(c, "--fit-thresholds", policy_path, "--out", fitted_report)) == 0
    out = capsys.readouterr().out
    assert f"threshold policy written to {policy_path}" in out and "prediction time" in out
    assert "## Group thresholds fitted" in fitted_report.read_text(encoding="utf-8")

    # The file holds exactly the policy fitted in memory (same seed, same calibration rows).
    ev = run_evaluation(c["ckpt"], c["data"], c["schema"], c["config"], progress=lambda s: None, fit=FitRequest())
    assert ev.fitted is not None and ev.fitted.round == 3
    assert json.loads(policy_path.read_text(encoding="utf-8")) == ev.fitted.model_dump(mode="json")
    assert ev.fitted.before is not None and ev.fitted.after is not None
    assert ev.fitted.before.demographic_parity_ratio < 0.7  # type: ignore[operator]  # the model learned the bias
    assert ev.fitted.after.demographic_parity_ratio > 0.85  # type: ignore[operator]

    # Applying the file gives the in-memory predictions, row for row, and the report is after the thresholds.
    preds, applied = tmp_path / "preds.csv", tmp_path / "applied.json"
    args = evaluate_args(c, "--thresholds", policy_path, "--predictions", preds, "--format", "json", "--out", applied)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "after the group thresholds" in out and "prediction time" in out
    decisions = json.loads(applied.read_text(encoding="utf-8"))["decisions"]
    assert decisions == "after the group thresholds (see Post-processing)"
    cfg = load_config(c["config"])
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    load_numpy_state(model, load(c["ckpt"]).state)
    data = load_encoded(c["data"], load_schema(c["schema"]), **text_encoding(cfg.model.name, cfg.model.params))
    probs = predict(model, data)[0]
    want = apply_thresholds(ev.fitted, probs, data.groups)
    table = pd.read_csv(preds, dtype={"prediction": str})
    assert (table["prediction"] == np.array(["0", "1"])[want]).all()
    assert (table["prediction"] != np.array(["0", "1"])[probs.argmax(-1)]).sum() > 20  # the thresholds changed rows
    assert set(table["threshold"]) == set(ev.fitted.thresholds.values())

    before, after = json.loads(plain.read_text()), json.loads(applied.read_text())
    assert after["post_processing"]["applied"]["attribute"] == "group"

    def dp_ratio(doc: dict) -> float:
        group = next(a for a in doc["rounds"][0]["audit"]["attributes"] if a["name"] == "group")
        return group["disparities"]["demographic_parity_ratio"]["value"]

    assert dp_ratio(before) < 0.7 and dp_ratio(after) > 0.85

    # The same policy, as the evaluator fits it in a run (the run's seed and calibration fraction).
    run_policy = threshold_policy(model, data, cfg, 3)
    assert run_policy is not None and run_policy.thresholds == ev.fitted.thresholds


def test_evaluate_refuses_a_policy_the_data_cannot_use(
    checkpoint: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = checkpoint
    policy = _small_policy().model_dump_json()
    path = tmp_path / "other-attribute.json"
    path.write_text(policy, encoding="utf-8")
    assert main(evaluate_args(c, "--thresholds", path)) == 2
    err = capsys.readouterr().err
    assert "'grp'" in err and "sensitive" in err and "prediction time" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    assert main(evaluate_args(c, "--thresholds", bad)) == 2
    assert "not a threshold policy" in capsys.readouterr().err
    assert main(evaluate_args(c, "--thresholds", bad, "--fit-thresholds", tmp_path / "x.json")) == 2
    assert "do not go together" in capsys.readouterr().err
    assert main(evaluate_args(c, "--strength", "0.5")) == 2
    assert "--fit-thresholds" in capsys.readouterr().err


def test_server_side_scoring_fits_the_policy_and_reads_the_evaluators(checkpoint: dict[str, Path]) -> None:
    """Without an evaluator node the server fits the policy itself; an evaluator's reply is parsed and checked."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common import records as R
    from server.scoring import Scorer, score_from_reply

    c = checkpoint
    cfg = load_config(c["config"])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"evaluation_path": str(c["data"])})})
    state = load(c["ckpt"]).state
    score = Scorer(cfg, evaluator=None).score(None, 3, state, {}, None, None)
    assert score is not None and score.threshold_policy_json is not None
    policy = ThresholdPolicy.model_validate_json(score.threshold_policy_json)
    assert policy.round == 3 and policy.attribute == "group" and set(policy.thresholds) == {"g1", "g2"}
    assert policy.after is not None and policy.after.demographic_parity_ratio > 0.85  # type: ignore[operator]

    def reply(policy_json: str) -> RecordDict:
        audit = ConfigRecord({R.AUDIT_JSON: "", R.PROVENANCE_JSON: "{}", R.THRESHOLD_POLICY_JSON: policy_json})
        return RecordDict({R.EVALUATION: MetricRecord({"accuracy": 0.9}), R.AUDIT: audit})

    assert score_from_reply(reply(score.threshold_policy_json), 7).threshold_policy_json == score.threshold_policy_json
    assert score_from_reply(reply('{"format": "something else"}'), 7).threshold_policy_json is None
    assert score_from_reply(reply(""), 7).threshold_policy_json is None

    # No mitigation: no policy. The attribute missing from the held-out data: a clear error.
    plain = cfg.model_copy(update={"mitigation": cfg.mitigation.model_copy(update={"method": "none"})})
    assert Scorer(plain, evaluator=None).score(None, 3, state, {}, None, None).threshold_policy_json is None  # type: ignore[union-attr]
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    load_numpy_state(model, state)
    data = load_encoded(c["data"], load_schema(c["schema"]), **text_encoding(cfg.model.name, cfg.model.params))
    data.groups = {}
    with pytest.raises(ConfigError, match="'group'.*does not\\s+declare"):
        threshold_policy(model, data, cfg, 3)
