"""Test helpers: small generated datasets and run configs (no network, no hub downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import RunConfig, parse_config

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]

TABULAR_SCHEMA = {
    "task": "tabular",
    "label": "y",
    "classes": ["0", "1"],
    "sensitive": ["group"],
    "features": [
        {"name": "a", "type": "numeric", "range": [-3, 3]},
        {"name": "b", "type": "numeric"},
        {"name": "c", "type": "categorical", "categories": ["x", "y", "z"]},
    ],
}


def make_tabular(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A learnable synthetic task: y depends on a, b and c; a sensitive 'group' column."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = rng.exponential(size=n)
    c = rng.choice(["x", "y", "z"], size=n)
    logit = 2.0 * a - 1.0 * b + (c == "z") * 1.5
    y = (logit + rng.normal(scale=0.5, size=n) > 0).astype(int)
    return pd.DataFrame({"a": a, "b": b, "c": c, "group": rng.choice(["g1", "g2"], size=n), "y": y})


def tabular_config(data_path: Path | None = None, **overrides: object) -> RunConfig:
    raw: dict = {
        "name": "test",
        "seed": 3,
        "rounds": 2,
        "clients_per_round": 2,
        "train": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.01, "optimizer": "adam"},
        "dp": {"target_epsilon": 4.0, "delta": 1e-4},
        "model": {"name": "ft-transformer", "params": {"d_model": 16, "layers": 1, "heads": 2}},
        "data": {"schema": TABULAR_SCHEMA, "validation_fraction": 0.2},
        "server": {"round_timeout": 120, "wait_for_nodes": 60},
        "simulation": {"num_clients": 2, "data_path": str(data_path) if data_path else None},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return parse_config(raw, "test config")
