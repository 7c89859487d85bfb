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

from client.app import app as client_app
from common import records as R
from common.codec import record_to_numpy
from common.config import RunConfig
from common.privacy import epsilon_spent
from server.store import RunStore
from tests.helpers import ROOT, TABULAR_SCHEMA, global_state, make_tabular, node_context, tabular_config, train_message

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
    assert eps[1] == pytest.approx(epsilon_spent(history, cfg.dp.delta))
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


# -- a real simulated federation ----------------------------------------------------------------

SEED = 7  # with make_tabular(400), 3 clients and alpha 0.5 this split gives node-1 70 rows, all of class "1"


def simulate(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    make_tabular(400).to_csv(tmp_path / "data.csv", index=False)
    features = ", ".join(
        "{" + ", ".join(f"{key} = {json.dumps(value)}" for key, value in feature.items()) + "}"
        for feature in TABULAR_SCHEMA["features"]
    )
    (tmp_path / "run.toml").write_text(
        f"""name = "skewed"
seed = {SEED}
rounds = 2
clients_per_round = 3
[model]
name = "ft-transformer"
params = {{ d_model = 16, layers = 1, heads = 2 }}
[train]
batch_size = 32
optimizer = "adam"
learning_rate = 0.01
[dp]
target_epsilon = 4.0
delta = 1e-4
[data]
validation_fraction = 0.2
[data.schema]
task = "tabular"
label = "y"
classes = ["0", "1"]
sensitive = ["group"]
features = [{features}]
[fairness]
federated_counts = false
[simulation]
num_clients = 3
data_path = "data.csv"
partitioner = "dirichlet"
alpha = 0.5
""",
        encoding="utf-8",
    )
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
    assert f"node-{k}: {len(labels[k])} rows;" in proc.stdout and "(one class only)" in proc.stdout

    assert summary["status"] == "finished"
    with RunStore(summary["store"]) as store:
        rounds = store.rounds(summary["run_id"])
        clients = store.client_rounds(summary["run_id"])
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
    assert any(c["epsilon"] == pytest.approx(eps) for c in clients if c["round"] == 2)
    log = (partitions / f"node-{k}" / "node.log").read_text(encoding="utf-8")
    assert "round 1: trained" in log and "round 2: trained" in log
