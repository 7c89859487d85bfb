"""Local DP-SGD on the real ClientApp, in process: noise, accounting, refusals, allow-list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from common import records as R
from common.codec import record_to_numpy
from common.privacy import epsilon_spent
from tests.helpers import global_state, node_context, tabular_config, train_message

pytestmark = pytest.mark.usefixtures("server_identity")


def test_dp_training_changes_model_and_stays_within_target(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    state = global_state(cfg)
    ctx = node_context(tabular_csv, tmp_path / "node")
    eps = []
    for rnd in (1, 2):
        reply = client_app(train_message(cfg, state, rnd), ctx)
        assert set(reply.content.keys()) == {R.ARRAYS, R.METRICS}
        new = record_to_numpy(reply.content[R.ARRAYS])
        assert any(not np.allclose(new[k], state[k]) for k in state), "DP training left the model unchanged"
        metrics = reply.content[R.METRICS]
        eps.append(metrics[R.EPSILON])
        state = new
    assert 0 < eps[0] < eps[1] <= cfg.dp.target_epsilon
    # The reported ε is what Opacus's accountant gives for the recorded history.
    # It is accounted at the run's δ less what the planned fairness counts' group selection takes.
    sigma, q = metrics[R.NOISE_MULTIPLIER], metrics[R.SAMPLE_RATE]
    assert metrics[R.DELTA] == pytest.approx(cfg.dp.delta - cfg.fairness.count_selection_delta)
    assert eps[1] == pytest.approx(epsilon_spent([(sigma, q, 2 * int(metrics[R.STEPS]))], metrics[R.DELTA]))
    # The exact training-set size never leaves: the weight is rounded to 100.
    assert metrics[R.NUM_EXAMPLES] % 100 == 0
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "DP plan" in log and "round 2" in log


def test_same_seed_draws_different_noise(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    state = global_state(cfg)
    updates = []
    for i in range(2):
        reply = client_app(train_message(cfg, state), node_context(tabular_csv, tmp_path / f"n{i}"))
        updates.append(record_to_numpy(reply.content[R.ARRAYS]))
    assert any(not np.allclose(updates[0][k], updates[1][k]) for k in state)


def test_infeasible_plan_is_refused_without_sending_a_model(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config(dp={"target_epsilon": 4.0, "delta": 0.05})  # δ > 1/(10·n)
    reply = client_app(train_message(cfg, global_state(cfg)), node_context(tabular_csv, tmp_path / "node"))
    assert set(reply.content.keys()) == {R.REFUSAL}
    refusal = reply.content[R.REFUSAL]
    assert refusal[R.REFUSAL_CODE] == "privacy-plan-infeasible"
    # The reason stays in the node's log, found by the log id that was sent.
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert str(refusal[R.REFUSAL_LOG_ID]) in log and "larger than 1/(10·n)" in log


def test_bad_data_is_refused_with_a_code_not_its_text(tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b,c,group,y\n1,2,x,g1,0\nsecret-value,2,x,g1,1\n", encoding="utf-8")
    cfg = tabular_config()
    reply = client_app(train_message(cfg, global_state(cfg)), node_context(csv, tmp_path / "node"))
    refusal = reply.content[R.REFUSAL]
    assert refusal[R.REFUSAL_CODE] == "data-invalid"
    assert "secret-value" not in repr(dict(refusal))


def test_allow_list_blocks_unexpected_keys() -> None:
    R.check_reply_keys({R.METRICS: [R.NUM_EXAMPLES, R.EPSILON], R.ARRAYS: ["w"]})
    with pytest.raises(R.BlockedReplyError, match="train-loss"):
        R.check_reply_keys({R.METRICS: [R.NUM_EXAMPLES, "train-loss"]})
    with pytest.raises(R.BlockedReplyError, match="raw-rows"):
        R.check_reply_keys({"raw-rows": []})


@pytest.mark.parametrize(("n", "batch"), [(8924, 256), (1057, 64), (480, 32)])
def test_plan_matches_opacus_sampling_so_epsilon_stays_within_target(n: int, batch: int) -> None:
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from common.config import DPConfig
    from common.privacy import plan_dp

    dp = DPConfig(target_epsilon=8.0, delta=1e-5)
    plan = plan_dp(n, dp, batch_size=batch, local_epochs=2, rounds=3)
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
    assert loader.sample_rate == pytest.approx(plan.sample_rate) and 2 * len(loader) == plan.steps_per_round
    eps = epsilon_spent([(plan.noise_multiplier, loader.sample_rate, 3 * 2 * len(loader))], dp.delta)
    assert eps <= dp.target_epsilon


def test_remembered_accounting_equals_opacus_exactly() -> None:
    """The cached RDP curves and σ search give Opacus's own numbers, bit for bit (they are reported as ε)."""
    import random

    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from common.privacy import calibrate_sigma, compact

    rng = random.Random(3)
    for _ in range(10):
        history = [(rng.uniform(0.6, 3.0), rng.choice([0.01, 0.06, 1.0]), rng.randint(1, 40)) for _ in range(3)]
        acc = RDPAccountant()
        acc.history = compact(history)
        assert epsilon_spent(history, 1e-5) == acc.get_epsilon(delta=1e-5)
    expected = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.06, steps=34)
    assert calibrate_sigma(8.0, 1e-5, 0.06, 34, "rdp") == expected
    assert calibrate_sigma(8.0, 1e-5, 0.06, 34, "rdp") == expected  # remembered


def test_a_run_with_fairness_counts_stays_within_its_target_epsilon() -> None:
    """σ is calibrated for the whole run — its DP-SGD rounds and the counts release after them."""
    from common.config import DPConfig
    from common.errors import PrivacyPlanError
    from common.privacy import plan_dp

    dp = DPConfig(target_epsilon=8.0, delta=1e-5)
    counts = [(5.0, 1.0, 1)]  # the demo's counts release: z = 5, once
    alone = plan_dp(3000, dp, batch_size=256, local_epochs=1, rounds=3)
    plan = plan_dp(3000, dp, batch_size=256, local_epochs=1, rounds=3, also=counts)
    run = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)] * 3 + counts
    assert 7.95 <= epsilon_spent(run, dp.delta) <= 8.0  # spent up to the target, never above it
    training_only = [(alone.noise_multiplier, alone.sample_rate, alone.steps_per_round)] * 3
    assert epsilon_spent(training_only + counts, dp.delta) > 8.0  # what calibrating without the counts did
    assert plan.noise_multiplier > alone.noise_multiplier
    with pytest.raises(PrivacyPlanError, match="alone spend") as err:
        plan_dp(
            3000,
            DPConfig(target_epsilon=1.0, delta=1e-5),
            batch_size=256,
            local_epochs=1,
            rounds=3,
            also=[(1.0, 1.0, 1)],
        )
    assert "fairness.count_noise_multiplier" in err.value.fix
