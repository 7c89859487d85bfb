"""DP noise must be secret: never derived from the run config's seed or any global RNG state.

The config seed drives splits, initialisation and client selection, and it travels to every node
and the server. If a DP release drew its noise from it (or from torch's, NumPy's or Python's global
RNG, which code often seeds from it), the server could replay the noise and subtract it. These tests
run a release twice with *everything* a process can reproduce held equal: same config, same seed,
same global RNG states, same data, same starting model. Only OS randomness may differ, so the
two releases must differ, and by exactly as much as the planned Gaussian noise says.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from common import records as R
from common.codec import record_to_numpy
from tests.helpers import global_state, make_tabular, node_context, tabular_config, train_message

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(300)]

N_ROWS = 600  # 480 training rows after the 20% validation split
LR = 0.5


def _seed_everything(seed: int) -> None:
    """Every global RNG a process has, set to the same state: what a seeded (broken) node would do."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _one_release(data: Path, workdir: Path, cfg, start: OrderedDict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    _seed_everything(cfg.seed)
    reply = client_app(train_message(cfg, start, rnd=1), node_context(data, workdir))
    assert R.ARRAYS in reply.content, f"the node did not train: {dict(reply.content)}"
    return record_to_numpy(reply.content[R.ARRAYS]), reply.content[R.METRICS]


def test_same_seed_same_rng_state_still_draws_fresh_noise(tmp_path: Path) -> None:
    """One full-batch DP-SGD step (q = 1: no sampling randomness), plain SGD, twice from identical state.

    With q = 1 the clipped gradient sum is the same in both runs, so their difference is the
    difference of two noise draws: Δ = lr·(z₁ − z₂)/n with z ~ N(0, σ²C²) per coordinate, i.e. a
    standard deviation of lr·σ·C·√2/n. Seeded noise gives Δ = 0; missing or mis-scaled noise gives
    the wrong spread.
    """
    data = tmp_path / "data.csv"
    make_tabular(N_ROWS, seed=1).to_csv(data, index=False)
    cfg = tabular_config(
        data,
        # batch ≥ the training split: Opacus samples every record with q = 1, one step per epoch
        train={"local_epochs": 1, "batch_size": 4096, "learning_rate": LR, "optimizer": "sgd"},
        dp={"target_epsilon": 4.0, "delta": 1e-4, "max_grad_norm": 1.0},
    )
    start = global_state(cfg)
    (a, metrics), (b, _) = (_one_release(data, tmp_path / f"node-{i}", cfg, start) for i in range(2))

    assert metrics[R.SAMPLE_RATE] == pytest.approx(1.0) and int(metrics[R.STEPS]) == 1, "not a single full-batch step"
    sigma = float(metrics[R.NOISE_MULTIPLIER])
    assert sigma > 0

    floats = [k for k, v in start.items() if np.issubdtype(v.dtype, np.floating)]
    moved = [k for k in floats if not np.array_equal(a[k], start[k])]
    assert moved, "DP training left every parameter unchanged"
    diff = np.concatenate([(a[k].astype(np.float64) - b[k].astype(np.float64)).ravel() for k in moved])
    assert np.any(diff != 0), "two releases from identical seeds and RNG states drew identical noise: noise is seeded"

    n_train = round(N_ROWS * (1 - cfg.data.validation_fraction))
    expected = LR * sigma * cfg.dp.max_grad_norm * np.sqrt(2) / n_train
    assert diff.size > 1000
    assert diff.std() == pytest.approx(expected, rel=0.15), (
        f"the two releases differ by {diff.std():.3g} per coordinate, planned Gaussian noise gives {expected:.3g}"
    )
    assert abs(diff.mean()) < 5 * expected / np.sqrt(diff.size)  # centred: noise, not a drift


def test_central_dp_noise_is_fresh_under_identical_seeds() -> None:
    """Server-side (user-level) DP: the same clipped mean, noised twice from identical global RNG states."""
    from server.aggregation import CentralDPMean

    rng = np.random.default_rng(0)  # the test's own inputs may be seeded; the mechanism's noise must not
    ref = OrderedDict(w=np.zeros((40, 50), np.float32), steps=np.array([3], np.int64))
    updates = [OrderedDict(w=rng.normal(size=(40, 50)).astype(np.float32), steps=ref["steps"]) for _ in range(4)]
    results = []
    for _ in range(2):
        _seed_everything(7)
        mean = CentralDPMean(ref, noise_multiplier=1.0, clipping_norm=1.0)
        for u in updates:
            mean.add(u)
        results.append((mean.result(), mean.stdv))
    (a, stdv), (b, _) = results
    diff = a["w"].astype(np.float64) - b["w"].astype(np.float64)
    assert np.any(diff != 0), "central DP drew identical noise from identical seeds: noise is seeded"
    assert diff.std() == pytest.approx(stdv * np.sqrt(2), rel=0.15)
    assert a["steps"][0] == 3  # integer buffers are not noised
