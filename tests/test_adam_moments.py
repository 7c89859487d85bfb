"""``train.keep_second_moments``: a node's Adam keeps its second moments and step count from round to
round, in the run's node-local context, and they never travel in a reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.app import _ADAM_SQUARES, _ADAM_STEP
from client.app import app as client_app
from client.training import AdamMoments
from common import records as R
from common.codec import record_to_numpy
from common.config import RECIPES
from common.models import build_model
from tests.helpers import global_state, node_context, tabular_config, train_message

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(300)]


def _trained_names(cfg) -> set[str]:  # type: ignore[no-untyped-def]
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_tabular_recipe_keeps_adam_second_moments() -> None:
    assert RECIPES["tabular"]["train"]["keep_second_moments"] is True
    assert tabular_config().train.keep_second_moments is True  # a config that leaves the field out gets it


def test_a_node_keeps_its_second_moments_across_rounds_and_never_sends_them(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config(train={"local_epochs": 1, "batch_size": 32, "learning_rate": 0.01, "optimizer": "adam",
                                "keep_second_moments": True})  # fmt: skip
    state = global_state(cfg)
    ctx = node_context(tabular_csv, tmp_path / "node")
    first = client_app(train_message(cfg, state, rnd=1), ctx)
    steps1 = int(first.content[R.METRICS][R.STEPS])
    squares = record_to_numpy(ctx.state[_ADAM_SQUARES])  # type: ignore[arg-type]
    assert set(squares) == _trained_names(cfg)
    assert all((v >= 0).all() and v.any() for v in squares.values())
    assert float(ctx.state[_ADAM_STEP]["step"]) == steps1  # type: ignore[index,arg-type]
    # the reply carries the model and nothing of the optimizer
    assert set(record_to_numpy(first.content[R.ARRAYS])) == set(state)
    assert _ADAM_SQUARES not in first.content and _ADAM_STEP not in first.content

    second = client_app(train_message(cfg, state, rnd=2), ctx)
    steps2 = int(second.content[R.METRICS][R.STEPS])
    assert float(ctx.state[_ADAM_STEP]["step"]) == steps1 + steps2  # round 2 went on from round 1's count


def test_without_the_option_nothing_is_kept(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config(train={"local_epochs": 1, "batch_size": 32, "learning_rate": 0.01, "optimizer": "adam",
                                "keep_second_moments": False})  # fmt: skip
    ctx = node_context(tabular_csv, tmp_path / "node")
    client_app(train_message(cfg, global_state(cfg)), ctx)
    assert _ADAM_SQUARES not in ctx.state and _ADAM_STEP not in ctx.state


def test_restored_moments_seed_adam_with_a_zero_first_moment_and_mismatches_start_fresh() -> None:
    model = torch.nn.Linear(3, 2)
    kept = AdamMoments({"weight": torch.full((2, 3), 0.25), "bias": torch.full((2,), 0.5)}, step=7.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    assert kept.restore(opt, model)
    st = opt.state[model.weight]
    assert float(st["step"]) == 7.0 and torch.equal(st["exp_avg_sq"], torch.full((2, 3), 0.25))
    assert not st["exp_avg"].any()
    model(torch.ones(4, 3)).sum().backward()
    opt.step()  # the step count goes on and the moments move from the kept ones
    kept.keep(opt, model)
    assert kept.step == 8.0 and not torch.equal(kept.squares["weight"], torch.full((2, 3), 0.25))

    other = torch.nn.Linear(4, 2)  # another layout: nothing restored, Adam starts as usual
    fresh = torch.optim.Adam(other.parameters(), lr=0.1)
    assert not kept.restore(fresh, other) and not fresh.state
