"""The node's privacy facade (``client.privacy.NodePrivacy``) and σ's one home (``common.privacy``).

The facade's order is the guarantee: plan → owner policy → ledger reserve → release → confirm. A
refusal (budget or policy) happens before any training or noise and leaves the ledger exactly as
it was; a failure after the reserve leaves the release pending, still counted.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

import client.privacy as facade
from client.admission import PolicyViolation
from client.ledger import BudgetExceeded, Ledger
from client.node import NodeSettings
from client.privacy import NodePrivacy
from client.training import LocalResult
from common import records as R
from common.config import RunConfig
from common.fairness import group_confusion_counts, noisy_counts
from common.policy import NodePolicy
from common.privacy import DPPlan, central_dp_stdv, counts_mechanism, counts_release, epsilon_spent
from server.aggregation import CentralDPMean
from tests.helpers import tabular_config

pytestmark = pytest.mark.timeout(120)

N_TRAIN = 480  # δ = 1e-4 ≤ 1/(10·n)


class Rows:
    """Stands in for the training split: the facade only needs its size (training is stubbed)."""

    def __len__(self) -> int:
        return N_TRAIN


def settings(tmp_path: Path, budget_epsilon: float, policy: NodePolicy | None = None) -> NodeSettings:
    cfg = tabular_config()
    return NodeSettings(
        data_path=tmp_path / "data.csv",
        workdir=tmp_path / "node",
        schema=cfg.data.schema_,
        declared_size=None,
        dataset_id="ds",
        ledger_path=tmp_path / "ledger.db",
        budget_epsilon=budget_epsilon,
        budget_delta=1e-5,
        policy=policy,
    )


def releases(s: NodeSettings) -> list[dict[str, object]]:
    with Ledger(s.ledger_path, s.marker_dir) as ledger:
        return ledger.releases()


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[DPPlan | None]:
    """Replace DP-SGD with a recorder: the plans it was called with (the facade's order is under test)."""
    calls: list[DPPlan | None] = []

    def fake_train(
        model: object, data: object, cfg: RunConfig, plan: DPPlan | None, device: object, **_: object
    ) -> LocalResult:
        calls.append(plan)
        if plan is None:
            return LocalResult(history=[], steps=1)
        return LocalResult([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], plan.steps_per_round)

    monkeypatch.setattr(facade, "train_local", fake_train)
    return calls


def train(privacy: NodePrivacy, round_: int, message_id: str) -> dict[str, float | int]:
    _, metrics = privacy.train(torch.nn.Linear(1, 1), Rows(), torch.device("cpu"), round_=round_, message_id=message_id)  # type: ignore[arg-type]
    return metrics


def test_overspend_is_refused_before_training_and_leaves_the_ledger_unchanged(
    tmp_path: Path, trained: list[DPPlan | None]
) -> None:
    cfg = tabular_config()
    rich = settings(tmp_path, budget_epsilon=100.0)
    metrics = train(NodePrivacy(cfg, rich, RecordDict(), "run-a"), 1, "m1")
    assert len(trained) == 1 and trained[0] is not None
    before = releases(rich)
    assert [r["status"] for r in before] == ["confirmed"]
    spent = float(metrics[R.EPSILON_TOTAL])

    # The same dataset with a budget that the next round would pass: refused, nothing trained or written.
    poor = settings(tmp_path, budget_epsilon=spent * 1.01)
    with pytest.raises(BudgetExceeded):
        train(NodePrivacy(cfg, poor, RecordDict(), "run-b"), 1, "m2")
    assert len(trained) == 1
    assert releases(poor) == before


def test_policy_refusal_comes_before_the_ledger(tmp_path: Path, trained: list[DPPlan | None]) -> None:
    s = settings(tmp_path, budget_epsilon=100.0, policy=NodePolicy(max_epsilon_per_run=0.01))
    with pytest.raises(PolicyViolation) as err:
        train(NodePrivacy(tabular_config(), s, RecordDict(), "run"), 1, "m1")
    assert err.value.rule == "max_epsilon_per_run"
    assert trained == [] and releases(s) == []


def test_a_failed_release_stays_pending_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_: object, **__: object) -> LocalResult:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(facade, "train_local", crash)
    s = settings(tmp_path, budget_epsilon=100.0)
    with pytest.raises(RuntimeError):
        train(NodePrivacy(tabular_config(), s, RecordDict(), "run"), 1, "m1")
    rows = releases(s)
    assert [r["status"] for r in rows] == ["pending"]
    with Ledger(s.ledger_path, s.marker_dir) as ledger:
        assert ledger.would_spend("ds", [], s.budget_delta, "rdp") > 0  # over-counts, never under-counts


def test_without_dp_nothing_is_planned_or_reserved(tmp_path: Path, trained: list[DPPlan | None]) -> None:
    s = settings(tmp_path, budget_epsilon=100.0)
    metrics = train(NodePrivacy(tabular_config(dp__enabled=False), s, RecordDict(), "run"), 1, "m1")
    assert trained == [None] and metrics == {} and releases(s) == []


def test_preview_writes_nothing_and_matches_what_training_charges(tmp_path: Path, trained: list[DPPlan | None]) -> None:
    cfg = tabular_config()
    s = settings(tmp_path, budget_epsilon=100.0)
    state = RecordDict()
    values = NodePrivacy(cfg, s, state, "run").preview(N_TRAIN)
    assert releases(s) == [] and values[R.PLAN_AFFORDABLE] == 1 and values[R.EPSILON_TOTAL] == 0.0
    metrics = train(NodePrivacy(cfg, s, state, "run"), 1, "m1")  # reuses the calibration kept in state
    assert metrics[R.NOISE_MULTIPLIER] == values[R.NOISE_MULTIPLIER]
    assert metrics[R.SAMPLE_RATE] == values[R.SAMPLE_RATE]
    assert [r["steps"] for r in releases(s)] == [values[R.PLAN_STEPS]]
    tight = settings(tmp_path / "other", budget_epsilon=float(values[R.PLAN_EPSILON_AFTER]) / 2)
    assert NodePrivacy(cfg, tight, RecordDict(), "run").preview(N_TRAIN)[R.PLAN_AFFORDABLE] == 0


def _counts(cfg: RunConfig) -> dict[str, dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    y, yhat = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    return group_confusion_counts(y, yhat, {"group": rng.choice(["g1", "g2"], 400)}, 20, cfg.fairness.intersections)


def test_counts_release_is_reserved_before_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tabular_config()
    counts = _counts(cfg)
    noised: list[int] = []
    real = facade.noisy_counts

    def spy(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        noised.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(facade, "noisy_counts", spy)
    poor = settings(tmp_path, budget_epsilon=1e-3)
    with pytest.raises(BudgetExceeded):
        NodePrivacy(cfg, poor, RecordDict(), "run").release_counts(counts, round_=3, message_id="c1", min_group_size=20)
    assert noised == [] and releases(poor) == []

    rich = settings(tmp_path, budget_epsilon=100.0)
    noisy, spend = NodePrivacy(cfg, rich, RecordDict(), "run").release_counts(
        counts, round_=3, message_id="c2", min_group_size=20
    )
    z = cfg.fairness.count_noise_multiplier
    (row,) = releases(rich)
    assert noised == [1] and row["status"] == "confirmed" and row["mechanism"] == "gaussian-counts"
    assert (row["noise_multiplier"], row["sample_rate"], row["steps"]) == counts_release(z)[0]
    assert row["max_grad_norm"] == pytest.approx(math.sqrt(len(counts)))
    assert noisy.sigma == counts_mechanism(z, len(counts)).sigma == pytest.approx(z * math.sqrt(len(counts)))
    # Composed and reported at the run's δ (dp.delta = 1e-4), not the owner's budget δ (1e-5): one δ per run, of
    # which the group selection takes its share (recorded with the release) and the accountant the rest.
    sel = cfg.fairness.count_selection_delta
    assert row["delta"] == pytest.approx(cfg.dp.delta - sel) and row["extra_delta"] == sel
    assert spend.epsilon_run == pytest.approx(epsilon_spent(counts_release(z), cfg.dp.delta - sel, cfg.dp.accountant))
    total = epsilon_spent(counts_release(z), rich.budget_delta - sel, cfg.dp.accountant)
    assert spend.epsilon_total == pytest.approx(total)


def test_rounds_and_counts_of_a_run_compose_at_one_delta(tmp_path: Path, trained: list[DPPlan | None]) -> None:
    """The counts release after the last round reports the run's ε at the run's δ: never below the last round's
    (it composes every release of the run) and equal to an independent composition of them."""
    cfg = tabular_config()
    s = settings(tmp_path, budget_epsilon=100.0)
    privacy = NodePrivacy(cfg, s, RecordDict(), "run")
    last = [train(privacy, rnd, f"m{rnd}") for rnd in range(1, cfg.rounds + 1)][-1]
    _, spend = privacy.release_counts(_counts(cfg), round_=cfg.rounds, message_id="c", min_group_size=20)
    accounted = cfg.dp.delta - cfg.fairness.count_selection_delta
    assert last[R.DELTA] == pytest.approx(accounted) and spend.epsilon_run > last[R.EPSILON]
    plan = trained[-1]
    assert plan is not None
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)] * cfg.rounds
    history += counts_release(cfg.fairness.count_noise_multiplier)
    assert spend.epsilon_run == pytest.approx(epsilon_spent(history, accounted, cfg.dp.accountant), rel=1e-9)
    with Ledger(s.ledger_path, s.marker_dir) as ledger:
        (run,) = ledger.summaries()[0].runs
    assert run.delta + run.extra_delta == pytest.approx(cfg.dp.delta, rel=1e-12)  # client budget: the run's δ total
    assert run.epsilon == pytest.approx(spend.epsilon_run, rel=1e-9)


def test_sigma_has_one_home() -> None:
    """The counts mechanism and central DP take σ from common.privacy (DP-SGD's plan_dp lives there too)."""
    counts = {"(all)": {"(all)": [10, 10, 10, 10]}, "a": {}, "b": {}, "a × b": {}}
    assert noisy_counts(counts, 2.0, min_group_size=1).sigma == counts_mechanism(2.0, 4).sigma == 4.0
    with pytest.raises(ValueError):
        counts_mechanism(0.0, 4)
    assert central_dp_stdv(1.5, 2.0, 3) == pytest.approx(1.5 * 2.0 / 3)
    ref = OrderedDict(w=np.zeros(4, np.float32))
    mean = CentralDPMean(ref, noise_multiplier=1.5, clipping_norm=2.0)
    for _ in range(3):
        mean.add(OrderedDict(w=np.ones(4, np.float32)))
    mean.result()
    assert mean.stdv == central_dp_stdv(1.5, 2.0, 3)
