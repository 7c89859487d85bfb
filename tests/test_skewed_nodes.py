"""Single-class and tiny nodes are normal federated nodes: they train, are accepted and spend budget.

In process on the real ClientApp (tabular and text), then a real `fedguard simulate` on a seeded
Dirichlet split that puts a single-class node in the federation.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.app import app as client_app
from common import records as R
from common.codec import record_to_numpy
from common.config import RunConfig
from common.privacy import epsilon_spent
from server.store import RunStore
from tests.helpers import (
    ROOT,
    TABULAR_SCHEMA,
    global_state,
    make_tabular,
    node_context,
    small_sim_toml,
    tabular_config,
    toml_features,
    train_message,
)

TEXT_SCHEMA = {"task": "text", "text_column": "text", "label": "y", "classes": ["0", "1"], "sensitive": ["group"]}
WORDS = ["good", "great", "bad", "awful", "fine", "poor", "nice", "sad"]


def text_config() -> RunConfig:
    return tabular_config(
        model={"name": "text-transformer", "params": {"d_model": 16, "layers": 1, "heads": 2, "max_len": 32}},
        data={"schema": TEXT_SCHEMA, "validation_fraction": 0.2},
    )


def node_file(path: Path, task: str, n: int, label: int | None) -> Path:
    """``n`` rows of a tabular or text node; ``label`` set: every row carries that one class."""
    if task == "tabular":
        df = make_tabular(max(n, 50)).head(n)
    else:
        df = pd.DataFrame(
            {
                "text": [" ".join(WORDS[(i * 7 + j) % 8] for j in range(6)) for i in range(n)],
                "group": ["a" if i % 2 else "b" for i in range(n)],
                "y": [i % 2 for i in range(n)],
            }
        )
    if label is not None:
        df = df.assign(y=label)
    df.to_csv(path, index=False)
    return path


def train_rounds(cfg: RunConfig, data: Path, workdir: Path, rounds: int = 2) -> list[dict]:
    """Train ``rounds`` rounds on the real ClientApp; every reply's metrics (fails on a refusal)."""
    state = global_state(cfg)
    ctx = node_context(data, workdir)
    out = []
    for rnd in range(1, rounds + 1):
        reply = client_app(train_message(cfg, state, rnd), ctx)
        assert R.REFUSAL not in reply.content, dict(reply.content[R.REFUSAL])
        new = record_to_numpy(reply.content[R.ARRAYS])
        assert any(not np.allclose(new[k], state[k]) for k in state), "the node sent the model back unchanged"
        out.append(dict(reply.content[R.METRICS]))
        state = new
    return out


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("task", ["tabular", "text"])
def test_single_class_node_trains_and_spends_budget(tmp_path: Path, task: str) -> None:
    cfg = tabular_config() if task == "tabular" else text_config()
    data = node_file(tmp_path / "negatives.csv", task, 60, label=0)
    metrics = train_rounds(cfg, data, tmp_path / "node")
    eps = [m[R.EPSILON] for m in metrics]
    assert 0 < eps[0] < eps[1] <= cfg.dp.target_epsilon
    last = metrics[-1]
    history = [(last[R.NOISE_MULTIPLIER], last[R.SAMPLE_RATE], 2 * int(last[R.STEPS]))]
    assert last[R.DELTA] == pytest.approx(cfg.dp.delta - cfg.fairness.count_selection_delta)  # the accountant's δ
    assert eps[1] == pytest.approx(epsilon_spent(history, last[R.DELTA]))
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "round 2: trained" in log and "only one class" not in log


@pytest.mark.usefixtures("server_identity")
def test_tiny_nodes_train_down_to_one_record(tmp_path: Path) -> None:
    # 5 rows, 1 held for validation: Poisson sampling over 4 records at q = 1/4 draws an empty batch with
    # probability 0.75⁴ ≈ 0.32 per step (99% at least once in 12 steps); it still takes a noised step.
    cfg = tabular_config(train__batch_size=1, rounds=3)
    metrics = train_rounds(cfg, node_file(tmp_path / "five.csv", "tabular", 5, label=1), tmp_path / "five", rounds=3)
    assert metrics[-1][R.SAMPLE_RATE] == pytest.approx(0.25) and 0 < metrics[-1][R.EPSILON] <= 4.0
    # One record is a dataset too: DP-SGD's guarantee holds at any n ≥ 1, so it trains and is charged.
    one = train_rounds(cfg, node_file(tmp_path / "one.csv", "tabular", 1, label=1), tmp_path / "one", rounds=1)
    assert one[-1][R.SAMPLE_RATE] == pytest.approx(1.0) and 0 < one[-1][R.EPSILON] <= 4.0


@pytest.mark.usefixtures("server_identity")
def test_a_node_with_gaps_in_its_rows_trains_on_them_with_missing_tokens(tmp_path: Path) -> None:
    """A node whose file has empty cells (a third of a's values, some of c's) refused every round; with the
    features declared missing = "token" the real ClientApp trains on every row under DP and spends budget, and its
    update carries the two extra table rows (a's missing vector, c's "missing" category)."""
    features = [dict(f, missing="token") if f["name"] in ("a", "c") else f for f in TABULAR_SCHEMA["features"]]
    cfg = tabular_config(data={"schema": dict(TABULAR_SCHEMA, features=features), "validation_fraction": 0.2})
    df = make_tabular(120).astype({"c": object})
    df.loc[df.index % 3 == 0, "a"] = np.nan
    df.loc[df.index % 7 == 0, "c"] = ""
    data = tmp_path / "gaps.csv"
    df.to_csv(data, index=False)
    state = global_state(cfg)
    reply = client_app(train_message(cfg, state, 1), node_context(data, tmp_path / "node"))
    assert R.REFUSAL not in reply.content, dict(reply.content[R.REFUSAL])
    metrics = dict(reply.content[R.METRICS])
    assert 0 < metrics[R.EPSILON] <= cfg.dp.target_epsilon
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "DP plan: n=96," in log  # every row of the training split: 120 rows less the validation fifth
    table = next(k for k in state if k.endswith("table.weight"))
    sent = record_to_numpy(reply.content[R.ARRAYS])[table]
    assert sent.shape[0] == state[table].shape[0]  # the update carries a's missing vector and c's extra category
    refusing = tabular_config(data={"schema": TABULAR_SCHEMA, "validation_fraction": 0.2})
    assert global_state(refusing)[table].shape[0] == state[table].shape[0] - 2
    reply = client_app(train_message(refusing, global_state(refusing), 1), node_context(data, tmp_path / "other"))
    assert R.REFUSAL in reply.content  # without the declaration the node refuses the file, as before


def test_an_empty_poisson_batch_takes_a_noised_step_that_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poisson sampling may draw no record at all for a step (likely on a tiny node). The step must still be
    taken, with noise only: the accountant charged it, so the noise must be in the update. The sampler's first
    batch is made empty here (the rest are its real draws), so this path runs every time, not by chance."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from client.training import train_local
    from common.codec import state_to_numpy
    from common.data import encode
    from common.models import build_model
    from common.privacy import plan_dp

    real_iter = UniformWithReplacementSampler.__iter__
    drawn: list[int] = []

    def first_batch_empty(self: UniformWithReplacementSampler):  # type: ignore[no-untyped-def]
        for i, indices in enumerate(real_iter(self)):
            drawn.append(0 if i == 0 else len(indices))
            yield [] if i == 0 else indices

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", first_batch_empty)
    cfg = tabular_config(train__batch_size=8, train__local_epochs=1)
    data = encode(make_tabular(80), cfg.data.schema_)
    plan = plan_dp(len(data), cfg.dp, batch_size=8, local_epochs=1, rounds=cfg.rounds)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    before = state_to_numpy(model)
    result = train_local(model, data, cfg, plan, torch.device("cpu"))
    after = state_to_numpy(model)
    assert drawn[0] == 0 and len(drawn) == plan.steps_per_round > 1
    assert result.steps == plan.steps_per_round  # the empty step counted, like the accountant's
    assert result.history == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert result.guards is not None and result.guards.steps == plan.steps_per_round  # the DP guards passed
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert all(not np.allclose(after[k], before[k]) for k in trainable)


def test_one_empty_batch_alone_moves_every_parameter_by_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round of one step whose batch is empty: no gradient at all, so every change is the DP noise."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from client.training import train_local
    from common.codec import state_to_numpy
    from common.data import encode
    from common.models import build_model
    from common.privacy import plan_dp

    def always_empty(self: UniformWithReplacementSampler):  # type: ignore[no-untyped-def]
        for _ in range(self.steps):
            yield []

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", always_empty)
    cfg = tabular_config(train__batch_size=8, train__local_epochs=1)
    data = encode(make_tabular(8), cfg.data.schema_)  # q = 1: one step per round
    plan = plan_dp(len(data), cfg.dp, batch_size=8, local_epochs=1, rounds=cfg.rounds)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    before = state_to_numpy(model)
    result = train_local(model, data, cfg, plan, torch.device("cpu"))
    after = state_to_numpy(model)
    assert plan.steps_per_round == 1 and result.steps == 1 and result.guards is not None
    assert all(not np.allclose(after[k], before[k]) for k, p in model.named_parameters() if p.requires_grad)


# -- a real simulated federation ----------------------------------------------------------------

SEED = 7  # with make_tabular(400), 3 clients and alpha 0.5 this split gives node-1 70 rows, all of class "1"


def simulate(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    make_tabular(400).to_csv(tmp_path / "data.csv", index=False)
    schema = f'sensitive = ["group"]\n{toml_features(TABULAR_SCHEMA["features"])}'
    extra = '[fairness]\nfederated_counts = false\n[simulation]\npartitioner = "dirichlet"\nalpha = 0.5\n'
    toml = small_sim_toml("skewed", seed=SEED, rounds=2, clients=3, schema=schema, extra=extra)
    (tmp_path / "run.toml").write_text(toml, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "simulate", "--config", "run.toml", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_simulated_single_class_node_is_accepted_every_round_and_spends_budget(tmp_path: Path) -> None:
    proc, summary = simulate(tmp_path)
    partitions = tmp_path / "run-sim" / "partitions"
    labels = [pd.read_parquet(partitions / f"partition-{i}.parquet")["y"].astype(str) for i in range(3)]
    single = [i for i, y in enumerate(labels) if y.nunique() == 1]
    assert single, f"the seeded split has no single-class node: {[y.value_counts().to_dict() for y in labels]}"
    k = single[0]
    assert f"node-{k}: {len(labels[k])} rows;" in proc.stderr and "(one class only)" in proc.stderr  # --json

    assert summary["status"] == "finished"
    with RunStore(summary["store"]) as store:
        rounds = store.rounds(summary["run_id"])
        clients = store.client_rounds(summary["run_id"])
        names = {name: node for node, name in store.node_names(summary["run_id"]).items()}
    assert [(r["round"], r["accepted"], r["refused"], r["aggregated"]) for r in rounds] == [(1, 3, 0, 1), (2, 3, 0, 1)]
    assert len(clients) == 6 and all(c["status"] == "accepted" and c["epsilon"] > 0 for c in clients)

    # The single-class node's own ledger: two confirmed DP-SGD releases, and the ε they compose to.
    with sqlite3.connect(partitions / "ledger.db") as db:
        rows = db.execute(
            "SELECT round, noise_multiplier, sample_rate, steps, status FROM releases WHERE dataset_id = ? "
            "AND mechanism = 'dp-sgd' ORDER BY seq",
            (f"sim-partition-{k}",),
        ).fetchall()
    assert [(r[0], r[4]) for r in rows] == [(1, "confirmed"), (2, "confirmed")]
    eps = epsilon_spent([(r[1], r[2], r[3]) for r in rows], 1e-4)
    assert 0 < eps <= 4.0
    (mine,) = [c for c in clients if c["round"] == 2 and c["node_id"] == names[f"node-{k}"]]
    assert mine["epsilon"] == pytest.approx(eps)  # node-k's own reply reports what its ledger composes
    log = (partitions / f"node-{k}" / "node.log").read_text(encoding="utf-8")
    assert "round 1: trained" in log and "round 2: trained" in log
