"""Fairness metrics, findings, federated counts and the fairness report.

Every group metric and disparity is checked against fairlearn (a test-only dependency) on the
same predictions, including intersections of two sensitive features.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score
from sklearn.metrics import log_loss as sk_log_loss

from common.data import Encoded
from common.evaluation import evaluate_and_audit
from common.fairness import (
    OVERALL,
    SEP,
    Audit,
    FairnessConfig,
    audit,
    client_spread,
    dataset_fingerprint,
    expected_calibration_error,
    findings,
    group_confusion_counts,
    merge_counts,
    metrics_from_counts,
    model_findings,
    noisy_counts,
    prediction_summary,
    release_threshold,
    track_findings,
)
from server.fairness_report import FairnessReport, Provenance, build_fairness_report, render
from server.federated_fairness import summed_noise_sd

pytestmark = pytest.mark.timeout(60)

EXACT = FairnessConfig(min_group_size=1, bootstrap_n=0)  # nothing suppressed: compare every group with fairlearn


# -- data ------------------------------------------------------------------------------------


def _random(seed: int = 0, n: int = 2000) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    groups = {"sex": rng.choice(["f", "m"], n, p=[0.35, 0.65]), "race": rng.choice(["a", "b", "c"], n)}
    y = rng.integers(0, 2, n)
    score = rng.random(n)
    return {"y": y, "pred": (score >= 0.5).astype(int), "score": score, "groups": groups}


def _skewed(seed: int = 1, n: int = 2000) -> dict[str, object]:
    """Group-dependent base rates and a model that favours one group; one small intersection."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["f", "m"], n, p=[0.3, 0.7])
    race = rng.choice(["a", "b", "c"], n, p=[0.6, 0.37, 0.03])
    y = (rng.random(n) < np.where(sex == "m", 0.6, 0.25)).astype(int)
    p = np.clip(0.5 * y + 0.25 + 0.15 * (sex == "m") + rng.normal(0, 0.2, n), 0.0, 1.0)
    return {"y": y, "pred": (p >= 0.5).astype(int), "score": p, "groups": {"sex": sex, "race": race}}


def _planted(seed: int = 2, n: int = 6000, bias: bool = True, accuracy: float = 0.85) -> dict[str, object]:
    """Labels depend on ``sex`` when ``bias`` (P(y=1) 0.2 vs 0.6); the model is right with prob. ``accuracy``."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["f", "m"], n)
    region = rng.choice(["north", "south"], n)
    rate = np.where(sex == "m", 0.6, 0.2) if bias else np.full(n, 0.4)
    y = (rng.random(n) < rate).astype(int)
    right = rng.random(n) < accuracy
    pred = np.where(right, y, 1 - y)
    score = np.clip(np.where(pred == 1, 0.8, 0.2) + rng.normal(0, 0.05, n), 0, 1)
    return {"y": y, "pred": pred, "score": score, "groups": {"sex": sex, "region": region}}


def _run(d: dict[str, object], cfg: FairnessConfig = EXACT) -> Audit:
    return audit(d["y"], d["pred"], d["score"], d["groups"], cfg)  # type: ignore[arg-type]


# -- equality with fairlearn -----------------------------------------------------------------


def _fairlearn_frame(d: dict[str, object], attrs: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    sf = pd.DataFrame({a: d["groups"][a] for a in attrs})  # type: ignore[index]
    mf = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "precision": lambda yt, yp: precision_score(yt, yp, zero_division=0),
        },
        y_true=d["y"],
        y_pred=d["pred"],
        sensitive_features=sf,
    )
    return mf.by_group.assign(size=sf.groupby(attrs).size()), sf


@pytest.mark.parametrize("make", [_random, _skewed], ids=["random", "skewed"])
def test_group_metrics_and_disparities_equal_fairlearn(make) -> None:
    d = make()
    result = _run(d)
    names = [a.name for a in result.attributes]
    assert names == ["sex", "race", f"sex{SEP}race"]  # every attribute and the default pair
    for att in result.attributes:
        by_group, sf = _fairlearn_frame(d, att.attributes)
        expected = {SEP.join(k) if isinstance(k, tuple) else str(k): row for k, row in by_group.iterrows()}
        assert sorted(expected) == [g.group for g in att.groups]
        for g in att.groups:
            row = expected[g.group]
            assert g.size == row["size"]
            for metric in ("accuracy", "selection_rate", "tpr", "fpr", "precision"):
                assert getattr(g, metric) == pytest.approx(row[metric], abs=1e-12), (att.name, g.group, metric)
        disp = att.disparities
        assert disp is not None
        kw = {"y_true": d["y"], "y_pred": d["pred"], "sensitive_features": sf}
        assert disp.demographic_parity_difference.value == pytest.approx(demographic_parity_difference(**kw))
        assert disp.demographic_parity_ratio.value == pytest.approx(demographic_parity_ratio(**kw))
        assert disp.equalized_odds_difference.value == pytest.approx(equalized_odds_difference(**kw))
        assert disp.equal_opportunity_difference.value == pytest.approx(equal_opportunity_difference(**kw))
        tpr = {k: row["tpr"] for k, row in expected.items()}
        assert disp.equal_opportunity_difference.value == pytest.approx(max(tpr.values()) - min(tpr.values()))
        # the named groups are the ones that set the value
        hi, lo = disp.demographic_parity_difference.groups
        assert expected[hi]["selection_rate"] - expected[lo]["selection_rate"] == pytest.approx(
            disp.demographic_parity_difference.value
        )


def test_overall_metrics_match_reference_definitions() -> None:
    d = _skewed()
    y, pred = d["y"], d["pred"]
    score = np.round(d["score"], 1)  # many ties: AUC must count them as ½
    o = audit(y, pred, score, d["groups"], EXACT).overall
    assert o.accuracy == pytest.approx(accuracy_score(y, pred))
    assert o.f1 == pytest.approx(f1_score(y, pred))
    assert o.roc_auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    inner = np.clip(score, 0.01, 0.99)
    assert audit(y, pred, inner, d["groups"], EXACT).overall.log_loss == pytest.approx(sk_log_loss(y, inner))
    assert o.base_rate == pytest.approx(np.mean(y)) and o.selection_rate == pytest.approx(np.mean(pred))
    # ECE against a direct loop over (k/B, (k+1)/B] bins of the predicted label's confidence
    conf = np.where(pred == 1, score, 1 - score)
    ece = 0.0
    for k in range(15):
        m = (conf > k / 15) & (conf <= (k + 1) / 15) if k else (conf <= 1 / 15)
        if m.any():
            ece += m.mean() * abs(np.mean(y[m] == pred[m]) - conf[m].mean())
    assert o.ece == pytest.approx(ece, abs=1e-12)
    perfect = np.where(y == 1, 1.0, 0.0)
    assert expected_calibration_error(y, y, perfect) == pytest.approx(0.0)
    assert audit(y, pred, None, d["groups"], EXACT).overall.roc_auc is None
    with pytest.raises(ValueError, match="binary"):
        audit(np.array([0, 1, 2]), np.array([0, 1, 1]), None, {}, EXACT)


# -- suppression -----------------------------------------------------------------------------


def test_small_groups_are_suppressed_not_dropped() -> None:
    d = _skewed()  # race "c" has ~60 rows, and its intersections ~18 / ~42
    cfg = FairnessConfig(min_group_size=50, bootstrap_n=0)
    result = _run(d, cfg)
    sizes = {g: int(np.sum(d["groups"]["race"] == g)) for g in ("a", "b", "c")}
    race = next(a for a in result.attributes if a.name == "race")
    assert [g.group for g in race.groups] == ["a", "b", "c"]  # listed, not dropped
    assert [g.suppressed for g in race.groups] == [sizes[g] < 50 for g in ("a", "b", "c")]
    inter = next(a for a in result.attributes if a.name == f"sex{SEP}race")
    small = [g for g in inter.groups if g.suppressed]
    assert small and all(g.size is None and g.selection_rate is None and g.tpr is None for g in small)
    assert len(inter.groups) == 6
    # disparities are over the remaining groups only: equal to fairlearn on those rows
    keep_labels = {g.group for g in inter.groups if not g.suppressed}
    labels = np.char.add(np.char.add(d["groups"]["sex"].astype(str), SEP), d["groups"]["race"].astype(str))
    rows = np.isin(labels, list(keep_labels))
    assert inter.disparities is not None
    assert inter.disparities.demographic_parity_difference.value == pytest.approx(
        demographic_parity_difference(d["y"][rows], d["pred"][rows], sensitive_features=labels[rows])
    )
    assert inter.disparities.equalized_odds_difference.value == pytest.approx(
        equalized_odds_difference(d["y"][rows], d["pred"][rows], sensitive_features=labels[rows])
    )
    # one group left: listed, no disparities, a note says why
    lone = audit(d["y"], d["pred"], None, {"race": d["groups"]["race"]}, FairnessConfig(min_group_size=1000))
    assert lone.attributes[0].disparities is None and "fewer than two groups" in (lone.attributes[0].note or "")


# -- findings --------------------------------------------------------------------------------


def test_planted_bias_produces_a_finding() -> None:
    result = _run(_planted(bias=True), FairnessConfig(bootstrap_n=100))
    found = findings(result, FairnessConfig(), round=3)
    dp = [f for f in found if f.kind == "demographic_parity_ratio" and f.attribute == "sex"]
    assert len(dp) == 1
    f = dp[0]
    assert f.severity == "critical"  # ratio ≈ 0.43, far below 0.8
    assert set(f.groups) == {"f", "m"} and f.groups[0] == "m"  # highest selection rate first
    assert f.value < 0.6 and f.threshold == 0.8 and f.significant is True
    assert f.first_seen_round == 3 and f.last_seen_round == 3
    assert not any(f.attribute == "region" for f in found)  # region is not biased
    assert not any(f.kind.startswith("degenerate") for f in found)


def test_balanced_data_produces_no_finding() -> None:
    result = _run(_planted(bias=False), FairnessConfig(bootstrap_n=50))
    assert findings(result, FairnessConfig(), round=1) == []


def test_degenerate_model_gets_its_own_finding() -> None:
    d = _planted(bias=False)
    none = np.zeros_like(d["y"])
    result = audit(d["y"], none, None, d["groups"], FairnessConfig(bootstrap_n=20))
    # equal (zero) rates everywhere: no disparity finding could catch this model
    for att in result.attributes:
        assert att.disparities is not None
        assert att.disparities.equalized_odds_difference.value == 0.0
        assert att.disparities.demographic_parity_ratio.value is None  # 0/0
    found = findings(result, FairnessConfig(), round=1)
    kinds = {f.kind: f for f in found}
    assert set(kinds) == {"degenerate_selection_rate", "degenerate_low_tpr"}
    assert kinds["degenerate_selection_rate"].severity == "critical"
    assert "only negatives" in kinds["degenerate_selection_rate"].message
    # almost no positives (1%) against a 40% base rate: a warning, not a constant model
    few = (np.random.default_rng(0).random(d["y"].size) < 0.01).astype(int)
    warn = findings(audit(d["y"], few, None, d["groups"], FairnessConfig(bootstrap_n=0)), round=1)
    sel = [f for f in warn if f.kind == "degenerate_selection_rate"]
    assert len(sel) == 1 and sel[0].severity == "warning"


def test_findings_remember_the_round_first_seen() -> None:
    cfg = FairnessConfig(bootstrap_n=0)
    fair, biased = _run(_planted(bias=False), cfg), _run(_planted(bias=True), cfg)
    history = track_findings(
        [(3, findings(biased, cfg, 3)), (1, findings(fair, cfg, 1)), (2, findings(biased, cfg, 2))]
    )
    dp = next(f for f in history if f.kind == "demographic_parity_ratio" and f.attribute == "sex")
    assert (dp.first_seen_round, dp.last_seen_round) == (2, 3)


# -- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_and_is_reproducible() -> None:
    d = _planted(bias=True, n=3000)
    cfg = FairnessConfig(bootstrap_n=300, bootstrap_seed=11)
    a1, a2 = _run(d, cfg), _run(d, cfg)
    assert a1 == a2  # same seed, same intervals
    for att in a1.attributes:
        assert att.disparities is not None
        for name in ("demographic_parity_difference", "demographic_parity_ratio"):
            disp = getattr(att.disparities, name)
            assert disp.ci_low is not None and disp.ci_high is not None
            assert disp.ci_low <= disp.value <= disp.ci_high, (att.name, name, disp)
    sex = a1.attributes[0].disparities
    assert sex is not None
    for name in ("equalized_odds_difference", "equal_opportunity_difference"):
        disp = getattr(sex, name)
        assert disp.ci_low <= disp.value <= disp.ci_high
    width = sex.demographic_parity_difference.ci_high - sex.demographic_parity_difference.ci_low
    assert 0.0 < width < 0.1
    other = _run(d, cfg.model_copy(update={"bootstrap_seed": 12}))
    assert other.attributes[0].disparities != sex


# -- federated counts ------------------------------------------------------------------------


def _split(d: dict[str, object], parts: int, seed: int = 5) -> list[dict[str, object]]:
    idx = np.array_split(np.random.default_rng(seed).permutation(len(d["y"])), parts)  # type: ignore[arg-type]
    return [
        {
            "y": d["y"][i],
            "pred": d["pred"][i],
            "groups": {k: v[i] for k, v in d["groups"].items()},  # type: ignore[attr-defined]
        }
        for i in idx
    ]


def test_federated_totals_equal_the_sum_of_client_counts() -> None:
    d = _skewed(n=3000)
    clients = _split(d, 3)
    per_client = [group_confusion_counts(c["y"], c["pred"], c["groups"], 1) for c in clients]
    central = group_confusion_counts(d["y"], d["pred"], d["groups"], 1)
    totals = merge_counts(per_client)
    assert totals == central  # exact without noise
    assert set(totals) == {OVERALL, "sex", "race", f"sex{SEP}race"}
    fed = metrics_from_counts(totals, EXACT, round=2, clients=3, noise="none")
    cen = _run(d)
    for fa, ca in zip(fed.attributes, cen.attributes, strict=True):
        assert fa.name == ca.name
        for fg, cg in zip(fa.groups, ca.groups, strict=True):
            assert fg == cg
        assert fa.disparities is not None and ca.disparities is not None
        assert fa.disparities.equalized_odds_difference.value == pytest.approx(
            ca.disparities.equalized_odds_difference.value
        )
    assert fed.overall is not None and fed.overall.accuracy == pytest.approx(cen.overall.accuracy)


def test_small_groups_never_leave_a_node() -> None:
    d = _skewed(n=600)
    sizes = {g: int(np.sum(d["groups"]["race"] == g)) for g in ("a", "b", "c")}
    cut = sizes["c"] + 1  # race "c" is just below the node's minimum
    counts = group_confusion_counts(d["y"], d["pred"], d["groups"], cut)
    assert "c" not in counts["race"] and {"a", "b"} == set(counts["race"])
    assert not any(g.endswith(f"{SEP}c") for g in counts[f"sex{SEP}race"])
    assert all(sum(cells) >= cut for rows in counts.values() for cells in rows.values())
    tiny = group_confusion_counts(d["y"][:5], d["pred"][:5], {k: v[:5] for k, v in d["groups"].items()}, 20)
    assert tiny == {OVERALL: {}, "sex": {}, "race": {}, f"sex{SEP}race": {}}  # table set fixed, no groups


def test_noisy_counts_sum_within_tolerance_and_state_their_cost() -> None:
    d = _planted(bias=True, n=9000)
    clients = _split(d, 3)
    z, sel = 2.0, 1e-7
    rng = np.random.default_rng(123)  # a test may seed; a node must not (docs/privacy.md)
    releases = []
    for c in clients:
        counts = group_confusion_counts(c["y"], c["pred"], c["groups"], 20)
        releases.append(noisy_counts(counts, z, rng, min_group_size=20, selection_delta=sel))
    r0 = releases[0]
    assert (r0.noise_multiplier, r0.selection_delta, r0.mechanism) == (z, sel, "gaussian")
    assert r0.sensitivity == pytest.approx(2.0)  # √4 tables: sex, region, sex × region, all rows
    assert r0.sigma == pytest.approx(z * 2.0)
    assert r0.threshold == pytest.approx(release_threshold(20, z * 2.0, sel, 4))
    totals = merge_counts(r.counts for r in releases)
    exact = group_confusion_counts(d["y"], d["pred"], d["groups"], 1)
    # each released cell is the sum of 3 N(0, σ²) draws (sd σ·√3); 6 sd is a 1e-9-ish tail per cell
    tol = 6 * r0.sigma * math.sqrt(3)
    for table, rows in exact.items():
        assert set(totals[table]) == set(rows)  # every group here is far above the release threshold
        for group, cells in rows.items():
            assert np.all(np.abs(np.subtract(totals[table][group], cells)) <= tol), (table, group)
    fed = metrics_from_counts(totals, round=1, clients=3, noise=f"Gaussian, z={z} per client")
    cen = _run(d, FairnessConfig(bootstrap_n=0))
    sex_f = next(a for a in fed.attributes if a.name == "sex").disparities
    sex_c = cen.attributes[0].disparities
    assert sex_f is not None and sex_c is not None
    assert sex_f.demographic_parity_ratio.value == pytest.approx(sex_c.demographic_parity_ratio.value, abs=0.03)
    assert any(f.kind == "demographic_parity_ratio" for f in findings(fed, FairnessConfig(), 1, view="federated"))
    # with the noise stated, a real bias on large groups is still critical, and its interval shows it
    sd = summed_noise_sd([r.counts for r in releases], [r.sigma for r in releases], z)
    assert summed_noise_sd([r.counts for r in releases], [math.nan] * 3, z) == sd  # unstated: the run's σ
    assert sd["sex"]["f"] == pytest.approx(r0.sigma * math.sqrt(3))
    fed = metrics_from_counts(totals, FairnessConfig(bootstrap_n=200), round=1, clients=3, noise_sd=sd)
    dp = [f for f in findings(fed, FairnessConfig(), 1, view="federated") if f.kind == "demographic_parity_ratio"]
    sex = next(f for f in dp if f.attribute == "sex")
    assert sex.severity == "critical" and sex.significant is True and "95% CI" in sex.message


def test_the_counts_noise_alone_never_makes_a_critical_finding() -> None:
    """A fair model, a rare positive class (3%) and a group of 200 rows per node: the default counts noise
    (z = 5, σ ≈ 7 per cell) swamps the group's ~25 predicted positives per node, so its demographic-parity ratio
    read off the noised sums swings far below 0.8, down to 0 when a sum is clipped. Its interval must
    say so: no critical finding on any draw, and the true ratio inside the interval on nearly every one."""
    rng = np.random.default_rng(11)
    nodes = []
    for _ in range(3):
        sex = np.array(["a"] * 1500 + ["b"] * 200)
        y = (rng.random(sex.size) < 0.03).astype(int)
        pred = np.where(rng.random(sex.size) < 0.9, y, 1 - y)  # the same error rate in both groups
        nodes.append((y, pred, {"sex": sex}))
    exact = merge_counts(group_confusion_counts(y, p, g, 20) for y, p, g in nodes)
    truth = metrics_from_counts(exact, EXACT).attributes[0].disparities
    assert truth is not None and truth.demographic_parity_ratio.value is not None
    true_ratio = truth.demographic_parity_ratio.value
    cfg = FairnessConfig(bootstrap_n=200)
    point_breaches = severe = covered = 0
    draws = 40
    for seed in range(draws):
        noise = np.random.default_rng(seed)
        rel = [noisy_counts(group_confusion_counts(y, p, g, 20), 5.0, noise, min_group_size=20) for y, p, g in nodes]
        parts = [r.counts for r in rel]
        fed = metrics_from_counts(
            merge_counts(parts), cfg, noise_sd=summed_noise_sd(parts, [r.sigma for r in rel], 5.0)
        )
        ratio = fed.attributes[0].disparities.demographic_parity_ratio  # type: ignore[union-attr]
        point_breaches += ratio.value is not None and ratio.value < 0.8
        covered += ratio.ci_low is not None and ratio.ci_low <= true_ratio <= ratio.ci_high  # type: ignore[operator]
        for f in findings(fed, cfg, 1, view="federated"):
            if f.kind == "demographic_parity_ratio":
                severe += f.severity == "critical"
                assert f.significant is False and "DP noise" in f.message
    assert point_breaches >= draws // 4  # the noise does move the point estimate past the threshold
    assert severe == 0
    assert covered >= 0.85 * draws


def test_threshold_bounds_the_chance_a_group_at_the_cut_leaves() -> None:
    sigma, sel, tables = 4.0, 1e-3, 4
    t = release_threshold(20, sigma, sel, tables)
    draws = np.random.default_rng(5).normal(0.0, 2 * sigma, size=400_000) + 20  # a group of exactly 20 rows
    assert np.mean(draws >= t) <= 1.5 * sel / tables  # per table, the union bound's share of δ_sel


def test_noisy_release_drops_groups_near_the_minimum() -> None:
    y = np.array([1, 0] * 12 + [1, 0] * 300)
    groups = {"g": np.array(["small"] * 24 + ["large"] * 600)}
    counts = group_confusion_counts(y, y, groups, 20)
    assert set(counts["g"]) == {"small", "large"}  # 24 ≥ 20 on the node ...
    rel = noisy_counts(counts, 2.0, np.random.default_rng(0), min_group_size=20)
    assert rel.threshold > 24 + 20  # ... but too close to the cut to leave without leaking it
    assert set(rel.counts["g"]) == {"large"}
    assert all(isinstance(v, int) for cells in rel.counts["g"].values() for v in cells)
    with pytest.raises(ValueError, match="noise_multiplier"):
        noisy_counts(counts, 0.0, min_group_size=20)


def test_client_spread_names_no_one() -> None:
    s = client_spread([0.81, 0.74, 0.9])
    assert s == pytest.approx(
        {"clients": 3, "worst": 0.74, "best": 0.9, "mean": 0.81666667, "spread": 0.16, "std": np.std([0.81, 0.74, 0.9])}
    )
    with pytest.raises(ValueError):
        client_spread([])


# -- the report ------------------------------------------------------------------------------


def _report() -> tuple[FairnessReport, list[tuple[int, Audit]]]:
    cfg = FairnessConfig(bootstrap_n=50, min_group_size=60)
    fair, biased = _planted(bias=False, n=2000), _planted(bias=True, n=2000)
    small = {**biased["groups"], "race": np.array(["x"] * 40 + ["y"] * 1960)}  # "x" is suppressed
    audits = [
        (1, audit(fair["y"], fair["pred"], fair["score"], {**fair["groups"], "race": small["race"]}, cfg)),
        (2, audit(biased["y"], biased["pred"], biased["score"], small, cfg)),
        (3, audit(biased["y"], biased["pred"], biased["score"], small, cfg)),
    ]
    x = np.arange(6000, dtype=np.float32).reshape(2000, 3)
    prov = Provenance(evaluation_size=2000, sha256=dataset_fingerprint(x, biased["y"], small), source="holdout.csv")
    per_client = [group_confusion_counts(c["y"], c["pred"], c["groups"], 20) for c in _split(biased, 2)]
    fed = metrics_from_counts(merge_counts(per_client), cfg, round=3, clients=2, noise="none (homomorphic sum)")
    rep = build_fairness_report(
        7, "wages", audits, prov, federated=fed, client_spread=client_spread([0.8, 0.7]), cfg=cfg
    )
    return rep, audits


def test_report_json_validates_and_tracks_findings() -> None:
    rep, _ = _report()
    data = json.loads(render(rep, "json"))
    again = FairnessReport.model_validate(data)
    assert again.run_id == 7 and [r.round for r in again.rounds] == [1, 2, 3]
    dp = [f for f in again.findings if f.kind == "demographic_parity_ratio" and f.attribute == "sex"]
    assert {(f.view, f.first_seen_round, f.last_seen_round) for f in dp} == {("central", 2, 3), ("federated", 3, 3)}
    assert any(s.attribute == "race" and s.group == "x" and s.rounds == [1, 2, 3] for s in again.suppressed)
    assert again.client_spread is not None and again.client_spread.worst == 0.7
    assert again.provenance.evaluation_size == 2000 and len(again.provenance.sha256) == 64


def test_hundreds_of_tiny_groups_are_summarised_not_listed_row_by_row() -> None:
    """A zip-code column (300 groups of ~7 rows): the report listed a row of "suppressed" per group and
    zip × sex pair in three places (179 kB of Markdown); each place now says how many and names a few.
    The JSON keeps every group."""
    d = _planted(n=2000)
    zips = np.array([f"z{i % 300:03d}" for i in range(2000)])
    cfg = FairnessConfig(bootstrap_n=0, min_group_size=20)
    a = audit(d["y"], d["pred"], d["score"], {"sex": d["groups"]["sex"], "zip": zips}, cfg)  # type: ignore[arg-type,index]
    x = np.zeros((2000, 1), dtype=np.float32)
    prov = Provenance(evaluation_size=2000, sha256=dataset_fingerprint(x, d["y"], {"zip": zips}), source="h.csv")  # type: ignore[arg-type]
    rep = build_fairness_report(1, "zips", [(1, a), (2, a)], prov, cfg=cfg)
    md = render(rep, "md")
    assert md.count("| suppressed |") == 0 and md.count("z0") < 60
    assert "300 groups (z000, z001, z002" in md and "… and 288 more) suppressed: fewer than 20 rows" in md
    assert "- central — zip: 300 groups (z000" in md and ", fewer than 20 rows, rounds 1, 2" in md
    assert "No group with at least 20 rows in any round." in md  # no empty chart or table for zip
    assert "| f |" in md and "| m |" in md  # the groups that are reported still are, row by row
    assert len(json.loads(render(rep, "json"))["suppressed"]) > 300  # zip and zip × sex, every one


def test_report_markdown_and_html_show_the_group_values() -> None:
    rep, audits = _report()
    md, page = render(rep, "md"), render(rep, "html")
    last = audits[-1][1]
    for att in last.attributes:
        for g in att.groups:
            if g.suppressed:
                continue
            for v in (g.selection_rate, g.tpr, g.fpr, g.accuracy, g.precision):
                assert f"{v:.3f}" in md and f"{v:.3f}" in page
    assert "suppressed" in md and "suppressed" in page
    assert rep.provenance.sha256 in md and rep.provenance.sha256 in page
    assert "Central vs federated view" in md and "Client-level fairness" in page
    federated = md.split("Federated disparities", 1)[1]  # the federated table shows its intervals too
    sex = next(a for a in rep.federated.attributes if a.name == "sex").disparities  # type: ignore[union-attr]
    assert "95% CI" in federated and sex is not None and sex.demographic_parity_ratio.ci_low is not None
    assert f"{sex.demographic_parity_ratio.ci_low:.3f} – {sex.demographic_parity_ratio.ci_high:.3f}" in federated
    # one selection-rate and one TPR plot per attribute, one polyline per reported group
    lines = re.findall(r'<polyline class="series" data-series="([^"]+)"', page)
    assert lines.count("m") == 2 and lines.count(f"m{SEP}north") == 2
    assert "x" not in lines and f"f{SEP}x" not in lines  # suppressed groups are not plotted
    assert page.count("<svg") == 2 * len(last.attributes)
    # self-contained: no external resources, no executable script; the embedded data is the report
    assert not re.search(r"(src|href)=|<link|@import|url\(|https?://", page)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 1 and 'type="application/json"' in scripts[0][0]
    assert FairnessReport.model_validate_json(scripts[0][1]) == rep
    with pytest.raises(ValueError, match="format"):
        render(rep, "pdf")


def test_fingerprint_is_stable_and_content_bound() -> None:
    x, y = np.ones((4, 2), dtype=np.float32), np.array([0, 1, 0, 1])
    g = {"sex": np.array(["f", "m", "f", "m"])}
    assert dataset_fingerprint(x, y, g) == dataset_fingerprint(x.copy(), y.copy(), {"sex": g["sex"].copy()})
    assert dataset_fingerprint(x, y, g) != dataset_fingerprint(x, y[::-1].copy(), g)
    assert dataset_fingerprint(x, y, g) != dataset_fingerprint(x, y, {"sex": np.array(["f", "f", "f", "m"])})


def test_the_report_adds_a_skewed_model_finding_unless_the_audit_calls_it_degenerate() -> None:
    """The model findings (common.fairness.model_findings) join the audit's; never twice for one model."""
    from common.fairness import prediction_summary

    cfg = FairnessConfig(bootstrap_n=0)
    d = _planted(bias=False)
    base = float(np.mean(d["y"]))
    rng = np.random.default_rng(1)
    skewed = np.where(rng.random(d["y"].size) < 0.55, 1, d["pred"])  # ~1.9× the base rate, not yet degenerate
    none = np.zeros_like(d["y"])
    audits = [(1, audit(d["y"], skewed, None, d["groups"], cfg)), (2, audit(d["y"], none, None, d["groups"], cfg))]
    metrics = {1: prediction_summary(d["y"], skewed, 2), 2: prediction_summary(d["y"], none, 2)}
    prov = Provenance(evaluation_size=d["y"].size, sha256="0" * 64)
    rep = build_fairness_report(1, "skew", audits, prov, cfg=cfg, metrics_by_round=metrics, classes=["no", "yes"])
    kinds = {f.kind: f for f in rep.findings}
    skew = kinds["skewed_prediction_rate"]
    assert (skew.first_seen_round, skew.last_seen_round) == (1, 1) and skew.value > cfg.prediction_skew_factor * base
    assert "'yes'" in skew.message and "above the 1.5× limit" in skew.message
    # too few positives names the lower bound it crossed (0.54× is not "below the 1.5× limit")
    from common.fairness.model_findings import BASE_RATE, POSITIVE_RATE

    (low,) = model_findings({POSITIVE_RATE: 0.25, BASE_RATE: 0.466}, cfg, 3, ["no", "yes"])
    assert "(0.54×, below 1/1.5 = 0.67×)" in low.message, low.message
    # round 2 predicts no positives: the audit's degenerate finding says so; no constant-model duplicate
    assert "degenerate_selection_rate" in kinds and "constant_model" not in kinds
    assert skew.message in render(rep, "md")


# -- the constant-model finding: only against held-out labels that vary ---------------------------------------------
class _Fixed(torch.nn.Module):
    """A model that outputs the same logits for every row: the constant model the finding is about."""

    def __init__(self, cls: int, num_classes: int = 2) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(cls), num_classes).float() * 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def _encoded(y: list[int], groups: bool = True) -> Encoded:
    n = len(y)
    g = {"group": np.array(["g1", "g2"] * n)[:n]} if groups else {}
    return Encoded(torch.zeros(n, 3), torch.tensor(y, dtype=torch.long), g)


def test_a_perfect_model_on_a_single_label_held_out_set_is_not_called_constant() -> None:
    metrics, _ = evaluate_and_audit(_Fixed(1), _encoded([1] * 40), FairnessConfig())
    assert metrics["accuracy"] == 1.0 and metrics["predicted_classes"] == 1 and metrics["true_classes"] == 1
    assert model_findings(metrics) == []
    one_row, _ = evaluate_and_audit(_Fixed(1), _encoded([1]), FairnessConfig())  # one row: always one class
    assert model_findings(one_row) == []
    varied, _ = evaluate_and_audit(_Fixed(0), _encoded([0, 1] * 20), FairnessConfig())
    assert [f.kind for f in model_findings(varied)] == ["constant_model"] and varied["true_classes"] == 2


def test_an_empty_held_out_set_gives_no_findings_and_no_error() -> None:
    metrics, audit_ = evaluate_and_audit(_Fixed(0), _encoded([]), FairnessConfig())  # sensitive columns, no rows
    assert audit_ is None and metrics["n"] == 0 and math.isnan(metrics["accuracy"])
    assert model_findings(metrics) == []


def test_true_classes_may_leave_the_evaluator() -> None:
    from common import records as R

    assert set(prediction_summary(np.array([0, 1]), np.array([0, 0]), 2)) <= set(R.REPLY_ALLOWLIST[R.EVALUATION])
