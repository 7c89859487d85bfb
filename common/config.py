"""The run configuration: one TOML file, validated before anything starts.

The config travels to every node inside each train message, so it never holds secrets.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError
from common.fairness import FairnessConfig
from common.fairness.config import MitigationConfig
from common.schema import DataSchema, format_validation_error, read_schema_table

#: A node's budget per dataset when its owner sets none: one default run (ε=8) fits, a second does not.
DEFAULT_BUDGET_EPSILON = 10.0
DEFAULT_BUDGET_DELTA = 1e-5


#: The recommended recipes, chosen and checked on ``fedguard simulate``'s path. A run config gets its
#: model's recipe (``RECIPE_OF_MODEL``) for every ``[train]`` and ``[dp]`` field it leaves out, and the
#: whole ``[server.optimizer]`` table when it has none, and the recipe's ``rounds`` when it sets none;
#: explicit values always win (``fedguard models`` prints each recipe).
#:
#: - ``tabular`` (``ft-transformer``; ``bench/utility.py``, 20 rounds): Adam with a small client learning
#:   rate on batches of 64 for one local epoch per round (little drift towards a skewed node's own
#:   labels) and strong server momentum (FedAvgM 0.8), which keeps the direction the rounds agree on
#:   while skewed clients pull the mean back and forth. 20 rounds of one epoch, not 10 of two (until
#:   2026-12-07): the same DP steps, hence the same σ on every node, averaged twice as often (ε = 8,
#:   Dirichlet 0.5, seeds 1-5: spam 0.840 → 0.850, computers 0.859 → 0.874; 30 rounds 0.858 / 0.871;
#:   the whole grid rerun at 20: 0.856 / 0.871, +0.60 points over its 90 DP runs). Adam starts fresh
#:   every round: keeping each node's second moments across rounds gained computers 1.0 point in one
#:   draw and lost it in the next (−0.16 over 30 ε = 8 runs; bench/README.md).
#:   The run releases the moving average of the rounds' models (``ema_decay`` 0.7,
#:   ``common.optimizers.ModelAverage``): it averages part of each round's DP noise away (+0.63 points
#:   at round 10 in 45 runs at ε = 8, both models scored in the same runs).
#: - ``text`` (the pretrained ``minilm-lora``/``minilm-full``; 6 rounds): Adam on the small adapter set,
#:   batch 128, plain FedAvg. On label-skewed nodes the global model swings between the nodes' majority
#:   classes from round to round; 6 rounds at batch 128 take the same DP steps as 3 at batch 64 but
#:   average twice as often (``bench/text_utility.py``, movie-review snippets, ε = 8: 5 nodes Dirichlet
#:   0.5, seeds 1 and 2, 0.715 and 0.699 against 0.655 and 0.604 with 3 rounds at batch 64; IID and 3
#:   skewed nodes unchanged or better). Twice the training time of the 3-round recipe. The swing is in
#:   the decision boundary more than in the ranking, so the evaluator prior-calibrates the decisions
#:   (``[evaluation] calibration = "prior"``, ``common.calibration``): the same cell, seeds 1 and 2,
#:   0.736 and 0.747 (the model's own decisions 0.733 and 0.684), every round from 3 on within 0.70-0.75.
#: - ``text-scratch`` (``text-transformer``, trained from scratch; 3 rounds): Adam 0.01 at batch 64. They
#:   learned the demo's tweets at ε = 8 (0.74–0.83, majority 0.53, 950–1,600 rows per node) but ended on
#:   the majority class on movie reviews with ~2,000 rows per node, so the DP plan warns at such sizes
#:   (``MIN_ROWS_PER_NODE``).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "tabular": {
        "train": {"local_epochs": 1, "batch_size": 64, "learning_rate": 0.002, "optimizer": "adam"},
        "dp": {"max_grad_norm": 1.0},
        "server.optimizer": {"name": "fedavgm", "learning_rate": 1.0, "momentum": 0.8, "ema_decay": 0.7},
        "run": {"rounds": 20},
        # A model that swung to one class is repaired by matching the held-out class shares; offsets that
        # do not clearly gain accuracy on the fitting rows are not kept (common.calibration). churn,
        # Dirichlet 0.5, seed 5: the model's own decisions 0.731 (the majority class), calibrated 0.797.
        "evaluation": {"calibration": "prior"},
    },
    "text": {
        "train": {"local_epochs": 1, "batch_size": 128, "learning_rate": 0.01, "optimizer": "adam"},
        "dp": {"max_grad_norm": 1.0},
        "server.optimizer": {"name": "fedavg"},
        "run": {"rounds": 6},
        # Decisions matched to the held-out class shares (common.calibration): on 5 skewed nodes the
        # model's own decisions swing between rounds (seed 2: 0.571 → 0.680 → 0.589 → 0.684 in rounds 3-6),
        # calibrated 0.732 → 0.729 → 0.738 → 0.747.
        "evaluation": {"calibration": "prior"},
    },
    "text-scratch": {
        "train": {"local_epochs": 1, "batch_size": 64, "learning_rate": 0.01, "optimizer": "adam"},
        "dp": {"max_grad_norm": 1.0},
        "server.optimizer": {"name": "fedavg"},
        "run": {"rounds": 3},
    },
}

#: The recipe each built-in model gets (a model not listed gets its task's: ``tabular`` or ``text``).
RECIPE_OF_MODEL: dict[str, str] = {
    "ft-transformer": "tabular",
    "text-transformer": "text-scratch",
    "minilm-lora": "text",
    "minilm-full": "text",
}

#: The model a config without ``model.name`` gets, per task; text takes the pretrained model when the
#: ``pretrained`` extra is installed (``default_model``).
DEFAULT_MODELS: dict[str, str] = {"tabular": "ft-transformer", "text": "minilm-lora"}
#: Text without the ``pretrained`` extra: the byte-level model trained from scratch.
TEXT_FALLBACK_MODEL = "text-transformer"
PRETRAINED_INSTALL = "pip install 'fedguard[pretrained]'"

#: Rows per node below which the plan warns that a model may end constant under DP
#: (``small_data_warning``), measured with ``fedguard simulate`` at ε = 8, 3 rounds (``bench/text_utility.py``).
#:
#: - ``text-transformer``: every held-out prediction the majority class on movie-review snippets with
#:   2,000 rows per node (3 nodes, IID and Dirichlet 0.5; issue 27's trial saw the same with two recipes);
#:   on the demo's tweets (short texts with strong surface cues) it did learn: 0.742 with 950 rows per
#:   node and 0.828 with 1,583, majority class 0.53. 10,000 is a margin of 5× over the failure seen,
#:   not a measured point where it learns.
#: - ``minilm-lora``: the majority class on 888 drug reviews over 3 nodes (~213 training rows per node)
#:   with every recipe tried (learning rate 0.01, 0.002, 0.001; 1 or 3 local epochs; LoRA's A trained or
#:   fixed); it learned the demo's tweets at 320 rows per node (0.688, majority 0.53; A trained) and movie
#:   review snippets at 1,080-1,800 (0.769-0.778 IID, 6 rounds at batch 128).
#: - ``ft-transformer``: the default tabular recipe (5 IID nodes, 10 rounds, ε = 8, δ = 1e-5; synthetic income
#:   data, 2026-12-05) reached 0.591 at ~63 training rows per node (its errors mostly on one class), 0.649 at
#:   ~123, 0.723 at ~203 and 0.813 at ~443; without DP, 0.778 at ~123. A floor of 300 warns where DP cost
#:   over ten points there; it is a measured trend on one data set, not a point where the model starts to learn.
MIN_ROWS_PER_NODE: dict[str, int] = {"text-transformer": 10_000, "minilm-lora": 300, "ft-transformer": 300}

#: What each floor's warning says was seen, and what to change (``small_data_warning``).
_SMALL_DATA_ADVICE: dict[str, str] = {
    "text-transformer": "it is trained from scratch: under DP-SGD at ε = 8 with 2,000 rows per node it predicted "
    "only the majority class on movie reviews (it did learn short tweets with strong surface cues). Change: "
    f'{PRETRAINED_INSTALL} and use the pretrained model (model.name = "minilm-lora", the text default once '
    "installed: 0.778 on the same reviews, central TF-IDF without DP 0.754), or give each node at least {floor:,} "
    "training rows",
    "ft-transformer": "under DP-SGD at ε = 8 with ~120 training rows per node it scored 0.65 where the same "
    "federation without DP scored 0.78 (0.81 with DP at ~440 rows per node): the noise needed for so few records "
    "drowns most of their signal. Change: give each node at least {floor:,} training rows (fewer, larger nodes), "
    "or a larger ε",
    "minilm-lora": "under DP-SGD at ε = 8 with ~213 rows per node it predicted only the majority class on drug "
    "reviews, whatever the learning rate or local epochs (it learned tweets at 320 rows per node). Change: give "
    "each node at least {floor:,} training rows (fewer, larger nodes), or a larger ε",
}


#: Which model for which data, with what it was measured on (``fedguard models`` and docs/models.md).
MODEL_GUIDANCE: dict[str, str] = {
    "ft-transformer": "tabular data. Benchmarked (bench/utility.py) with 5 nodes sharing 4,600-7,000 rows "
    "(about 660-1,010 training rows per node on average, Dirichlet 0.5 and 0.1 splits), 20 rounds, ε = 8: "
    "0.94-0.98× the accuracy of central training without DP (decisions prior-calibrated by the evaluator).",
    "minilm-lora": "English text, the text default (pip install 'fedguard[pretrained]'), from about 300 rows "
    "per node. bench/text_utility.py, ε = 8, 6 rounds at batch 128: 6,000 movie-review snippets over 3 nodes "
    "(1,800 training rows per node) 0.778 IID and 0.764 Dirichlet 0.5 (seeds 1-3; central TF-IDF + logistic "
    "regression without DP 0.754 on those seeds; this model central without DP 0.794); over 5 nodes 0.769 "
    "IID and 0.746 Dirichlet 0.5 (seeds 1-3, decisions prior-calibrated by the evaluator; the "
    "model's own 0.717; 0.666 with 3 rounds at batch 64). BBC news articles in five topics, 340-567 rows per "
    "node: 0.947-0.961 (central TF-IDF 0.971; seeds 1-3, 3 and 5 nodes, IID and Dirichlet 0.5). Drug reviews with "
    "29-412 rows per node: the majority class in all 12 runs (the DP plan warns below 300). IMDB movie reviews "
    "(232 words on average; it reads each long review's first and last 63 word pieces, about 94 words), 720 rows "
    "per node over 3 nodes: 0.781-0.786 against central TF-IDF's 0.869 (seeds 1-3; 0.743-0.754 reading the first "
    '126, [model.params] read = "head"). About 2.5 minutes '
    "per round on 2 CPU cores for 5,400 training rows in all (15 for the 6 rounds); a GPU helps.",
    "minilm-full": "English text when LoRA adapters are not enough and nodes have a GPU: 10.8M parameters "
    "per update (~290× the LoRA upload), about 2× plain training time under DP. Not yet benchmarked for "
    "accuracy at any number of rows per node: start with minilm-lora.",
    "text-transformer": "non-English or mixed-script text, or when the pretrained extra cannot be installed. "
    "Trained from scratch: it learned the demo's tweets at ε = 8 (950-1,600 rows per node, 3 rounds: "
    "0.74-0.83, majority class 0.53) but predicted only the majority class on movie-review snippets and drug "
    "reviews with up to 2,000 rows per node (bench/text_utility.py); the DP plan warns below 10,000 rows per node.",
}


def default_model(task: str) -> str:
    """The model a config for ``task`` gets when it names none (explicit ``model.name`` wins).

    Text: ``minilm-lora`` (the benchmarked default) when the ``pretrained`` extra is installed, else
    ``text-transformer``, whose DP plan then says to install the extra (``small_data_warning``).
    """
    if task == "text":
        from common.pretrained import pretrained_available  # torch: only for text configs naming no model

        return DEFAULT_MODELS["text"] if pretrained_available() else TEXT_FALLBACK_MODEL
    return DEFAULT_MODELS.get(task, DEFAULT_MODELS["tabular"])


def recipe_for(model: str, task: str) -> dict[str, dict[str, Any]]:
    """The recipe ``model`` gets (``RECIPE_OF_MODEL``), or its task's for a model not listed."""
    return RECIPES[RECIPE_OF_MODEL.get(model, task if task in RECIPES else "tabular")]


def apply_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its task's default model (when it names none) and that model's recipe filling
    what it leaves out, ``rounds`` included (explicit values win): a config that sets nothing runs what
    the benchmark measured. A simulation that sets no ``clients_per_round`` samples all its
    ``simulation.num_clients`` nodes every round (the benchmark's federations); a deployment keeps 3.

    A ``[train]`` table that names another optimizer than the recipe's keeps the class defaults for
    ``learning_rate`` and ``momentum``: a learning rate tuned for Adam is wrong for SGD.
    """
    data = raw.get("data")
    schema = data.get("schema", data.get("schema_")) if isinstance(data, dict) else getattr(data, "schema_", None)
    task = schema.get("task") if isinstance(schema, dict) else getattr(schema, "task", None)
    if task not in RECIPES:
        return raw  # not a config (yet): validation reports what is missing
    out = dict(raw)
    model = out.get("model", {})
    if isinstance(model, ModelConfig):
        model = model.model_dump(exclude_unset=True)  # ModelConfig() names no model: the task's default
    if not isinstance(model, dict):
        return out  # validation reports it
    if "name" not in model:  # never the class default: a text schema must not get the tabular model
        model = {**model, "name": default_model(task)}
        out["model"] = model
    name = model["name"]
    recipe = recipe_for(name if isinstance(name, str) else "", task)
    for section in ("train", "dp"):
        given = out.get(section, {})
        if not isinstance(given, dict):
            continue
        fill = dict(recipe[section])
        if "optimizer" in given and given["optimizer"] != fill.get("optimizer"):
            fill = {k: v for k, v in fill.items() if k not in ("learning_rate", "momentum")}
        out[section] = {**fill, **given}
    server = out.get("server", {})
    if isinstance(server, dict) and "optimizer" not in server:
        out["server"] = {**server, "optimizer": dict(recipe["server.optimizer"])}
    out.setdefault("rounds", recipe["run"]["rounds"])
    simulation = out.get("simulation")
    n = simulation.get("num_clients") if isinstance(simulation, dict) else None
    if "clients_per_round" not in out and isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        out["clients_per_round"] = n  # in simulation every node trains every round, as benchmarked
    evaluation, mitigation = out.get("evaluation", {}), out.get("mitigation", {})
    thresholds = isinstance(mitigation, dict) and mitigation.get("method") == "thresholds"
    if "evaluation" in recipe and isinstance(evaluation, dict) and not thresholds:  # group thresholds decide alone
        out["evaluation"] = {**recipe["evaluation"], **evaluation}
    return out


def rows_from_sample_rate(train: TrainConfig, sample_rate: float) -> int | None:
    """A node's training rows as its DP plan's sampling rate states them, to within one batch.

    Opacus samples at q = 1/⌈n/B⌉, so n ≈ B/q: what the server can tell from a node's plan (never
    the exact size). With ``train.sample_rate`` set, a node whose batch grew with its size plans
    q ≤ ``sample_rate``, and q then no longer gives n: None for it (it holds at least about
    ``batch_size / sample_rate`` rows), as for a rate that is not positive. A smaller node keeps
    ``batch_size`` (q > ``sample_rate``), and q gives its size as without ``sample_rate``.
    """
    if not sample_rate > 0:
        return None
    if train.sample_rate is not None and sample_rate <= train.sample_rate * (1 + 1e-9):
        return None
    return round(train.batch_size / sample_rate)


def small_data_warning(cfg: RunConfig, rows_per_node: int, where: str = "on this node") -> str | None:
    """What the DP plan says, before any budget is spent, when the model may not learn from
    ``rows_per_node`` training rows, and what to change (``MIN_ROWS_PER_NODE``). ``where`` names whose
    rows they are (a node's own plan: "on this node"; the server's: "on the smallest node").

    None when the model has no known floor, DP is off, or the node has enough rows.
    """
    floor = MIN_ROWS_PER_NODE.get(cfg.model.name)
    if floor is None or not cfg.dp.enabled or rows_per_node >= floor:
        return None
    return (
        f"{cfg.model.name} may not learn at this data size (~{rows_per_node:,} training rows {where}, "
        f"ε = {cfg.dp.target_epsilon:g}): " + _SMALL_DATA_ADVICE[cfg.model.name].format(floor=floor)
    )


def federation_warning(cfg: RunConfig, sample_rates: list[float]) -> str | None:
    """The server's plan warning from its nodes' planned sampling rates (it never sees their sizes):
    ``small_data_warning`` for the smallest node, or None."""
    rows = [r for q in sample_rates if (r := rows_from_sample_rate(cfg.train, q)) is not None]
    return small_data_warning(cfg, min(rows), where="on the smallest node") if rows else None


class _Strict(BaseModel):
    # inf/nan are never a setting: ``max_grad_norm = inf`` would switch clipping (and so DP) off.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(_Strict):
    #: A registry name from ``common.models.MODELS``. A run config that leaves it out gets its task's
    #: default (``default_model``), never this class default: a text schema never gets the tabular model.
    name: str = "ft-transformer"
    #: Hyper-parameters overriding the registry defaults (d_model, layers, heads, ...).
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    local_epochs: int = Field(1, ge=1, le=100)
    #: Expected (logical) batch size; Opacus samples each record with rate batch_size / n.
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    #: ``auto`` = CUDA when available, else CPU; or ``cpu``, ``cuda``, ``cuda:N``. A node owner's
    #: node-config ``device`` (``fedguard client start --device``) overrides it on that node.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    #: torch threads per client; 1 is fastest when several nodes share a machine.
    threads: int = Field(1, ge=1)
    #: FedProx μ: after every optimizer step, w ← w − lr·μ·(w − w_global). Applied as a step, not a
    #: loss term, because Opacus's DP optimizer overwrites gradients with the clipped, noised
    #: per-sample sum (a loss term would be silently lost). Data-independent: costs no privacy.
    proximal_mu: float = Field(0.0, ge=0)
    #: Linear learning-rate warm-up over the first k optimizer steps of every round (0 = off): the
    #: optimizer restarts each round, and its first, noisiest steps under DP-SGD move the most.
    warmup_steps: int = Field(0, ge=0)
    #: Largest batch actually run through the model (Opacus BatchMemoryManager): a large logical
    #: ``batch_size`` is split into physical batches, one DP step per logical batch. Accounting is
    #: unchanged (q comes from the logical batch). None = no split.
    physical_batch_size: int | None = Field(None, ge=1)
    #: Each node's logical batch follows its own size: batch = max(batch_size, ⌈sample_rate·n⌉), so
    #: large nodes take proportionally larger batches (same q, hence the same σ, on every node) and
    #: small ones keep at least ``batch_size``. None = ``batch_size`` on every node.
    sample_rate: float | None = Field(None, gt=0, le=1)
    #: Public per-class loss weights, in schema class order (e.g. 1/(C·p_c) for a published class
    #: prior p). Never computed from a node's own label counts: those are private, and weights that
    #: depend on other records change each record's gradient outside DP-SGD's per-record bound.
    class_weights: list[float] | None = None
    #: Without DP, clip each batch's gradient to ``dp.max_grad_norm``: DP-SGD's clipped, averaged
    #: gradient never exceeds that norm, so a learning rate chosen for DP (e.g. SGD at 0.5) would
    #: diverge on raw gradients once DP is switched off. No effect when DP is on.
    clip_without_dp: bool = False

    def logical_batch_size(self, n_train: int) -> int:
        """The expected DP batch on a node with ``n_train`` records (see ``sample_rate``)."""
        if self.sample_rate is None:
            return self.batch_size
        return max(self.batch_size, math.ceil(self.sample_rate * n_train))


class DPConfig(_Strict):
    enabled: bool = True
    #: Record-level ε each node may reach over the whole run (all rounds, all epochs).
    target_epsilon: float = Field(8.0, gt=0)
    #: Must be ≤ 1/(10·n) for every node with n training records.
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    #: Per-sample-gradient engine: ``auto`` = ``bk`` (FedGuard's book-keeping clipping, checked equal
    #: to Opacus's step in tests/test_dp_fast_path.py) for the built-in from-scratch models, else the
    #: model's measured fastest Opacus mode; or one of Opacus's own.
    grad_sample_mode: Literal["auto", "bk", "hooks", "ew", "ghost", "functorch"] = "auto"


class CentralDPConfig(_Strict):
    """User-level (central) DP at the server, on top of the clients' record-level DP-SGD.

    Each accepted update is clipped to ``clipping_norm`` around the global model, the updates are
    averaged with equal weights, and Gaussian noise with std σ·C/m is added (m accepted replies).
    Accounted with Opacus's RDP accountant without sampling amplification (client selection is
    seeded, hence not secret).
    """

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0)
    clipping_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class DataConfig(_Strict):
    schema_: DataSchema = Field(alias="schema")
    #: Fraction of each node's rows kept for local validation (deterministic by seed).
    validation_fraction: float = Field(0.1, ge=0, le=0.9)
    #: Server-side held-out evaluation file (optional; same schema).
    evaluation_path: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class ServerOptimizerConfig(_Strict):
    """How the server turns the aggregated client models into the next global model.

    ``fedavg`` takes the aggregate as is; the others treat ``aggregate − global`` as a pseudo-gradient
    (Reddi et al. 2021; Flower's FedAvgM, FedAdagrad, FedAdam, FedYogi strategies). Unset fields take
    Flower's defaults for the chosen optimizer (``common.optimizers.FLOWER_DEFAULTS``).
    """

    name: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = "fedavg"
    #: Server learning rate (η; FedAvgM's ``server_learning_rate``).
    learning_rate: float | None = Field(None, gt=0)
    #: FedAvgM's server momentum; β₁ for FedAdam and FedYogi.
    momentum: float | None = Field(None, ge=0, lt=1)
    #: β₂ for FedAdam and FedYogi.
    beta_2: float | None = Field(None, ge=0, lt=1)
    #: τ, the adaptivity floor of FedAdagrad, FedAdam and FedYogi.
    tau: float | None = Field(None, gt=0)
    #: Any optimizer: the model the run scores, reports and saves is an exponential moving average of
    #: the rounds' global models with this decay (unset or 0: the latest model); nodes train from the latest
    #: model. Post-processing: no privacy cost (``common.optimizers.ModelAverage``).
    ema_decay: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_fields(self) -> ServerOptimizerConfig:
        takes = _SERVER_OPTIMIZER_FIELDS[self.name]
        extra = [k for k in ("learning_rate", "momentum", "beta_2", "tau") if getattr(self, k) is not None]
        extra = [k for k in extra if k not in takes]
        if extra:
            raise ValueError(
                f"server.optimizer {self.name!r} takes "
                + (", ".join(takes) if takes else "no parameters")
                + f"; remove {', '.join(extra)}"
            )
        return self


#: The ``[server.optimizer]`` fields each optimizer uses.
_SERVER_OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("learning_rate", "momentum"),
    "fedadagrad": ("learning_rate", "tau"),
    "fedadam": ("learning_rate", "momentum", "beta_2", "tau"),
    "fedyogi": ("learning_rate", "momentum", "beta_2", "tau"),
}


class ServerConfig(_Strict):
    #: Cap on a node's declared size used as its FedAvg weight; larger weights are rejected.
    max_weight: float = Field(1_000_000, gt=0)
    #: Seconds to wait for replies in a round.
    round_timeout: float = Field(600, gt=0)
    #: Fewest accepted replies for a round to update the model.
    min_replies: int = Field(1, ge=1)
    #: Seconds to wait at start for enough nodes to connect.
    wait_for_nodes: float = Field(120, gt=0)
    #: Poll interval for replies (Flower's built-in send_and_receive sleeps 3 s).
    poll_interval: float = Field(0.2, gt=0)
    #: ``[server.optimizer]``: FedAvg by default.
    optimizer: ServerOptimizerConfig = Field(default_factory=ServerOptimizerConfig)
    #: Fewest accepted replies as a fraction of the nodes sampled in a round (on top of min_replies).
    min_fraction: float = Field(0.0, ge=0, le=1)
    #: Times a round that got too few accepted replies is tried again before the run fails.
    round_retries: int = Field(1, ge=0, le=10)
    #: Reject an update whose L2 distance from the global model exceeds this (None: no fixed bound).
    max_update_norm: float | None = Field(None, gt=0)
    #: On by default (plaintext FedAvg and robust modes): reject an update whose norm exceeds this
    #: multiple of the round's median update norm and the global model's own norm (without DP, nodes the
    #: model already fits send ~0 and can make the median ~0). Honest DP-SGD updates differ a lot with node size
    #: (the noise per step scales with 1/batch: 150 vs 1,000 rows gave 9×), so the default catches
    #: gross poisoning (a +1e3 update is ~10⁵× the median), not subtle drift: for that set
    #: max_update_norm or a robust aggregation. 0 turns the bound off (explicitly).
    norm_bound_factor: float = Field(100.0, ge=0)
    #: On by default (plaintext FedAvg): a declared weight above this multiple of the round's median
    #: declared weight counts only as much as the cap. 0 turns the cap off (explicitly).
    weight_cap_factor: float = Field(10.0, ge=0)
    #: ``fedavg`` (weighted, streaming), or robust ``median`` / ``trimmed-mean`` (coordinate-wise,
    #: unweighted, hold every update in memory; plaintext mode only, not with central DP).
    aggregation: Literal["fedavg", "median", "trimmed-mean"] = "fedavg"
    #: Fraction cut from each end per coordinate for ``trimmed-mean``.
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)

    @field_validator("norm_bound_factor", "weight_cap_factor")
    @classmethod
    def _factor_is_off_or_above_one(cls, v: float) -> float:
        if 0 < v <= 1:
            raise ValueError("must be 0 (off) or above 1: a bound at or below the round's median refuses honest nodes")
        return v


class EvaluationConfig(_Strict):
    """``[evaluation]``: how the central evaluation service turns the global model's scores into decisions."""

    #: ``prior``: one offset per class on the log-probabilities, fitted on the held-out rows so the
    #: decisions' class shares match the labels' (``common.calibration``; metrics cross-fitted, the
    #: model's own decisions reported beside them, ``calibration.json`` released with the checkpoints).
    #: ``none``: the model's own argmax. The text recipe sets ``prior``.
    calibration: Literal["none", "prior"] = "none"


class SimulationConfig(_Strict):
    num_clients: int = Field(3, ge=1)
    #: Source data file split across the virtual clients.
    data_path: str | None = None
    partitioner: Literal["iid", "dirichlet", "column"] = "iid"
    alpha: float = Field(0.5, gt=0)
    column: str | None = None
    #: Fraction of the data held out as the server's evaluation set (when no evaluation_path).
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    #: CPUs Ray reserves per virtual client.
    client_cpus: float = Field(1, gt=0)
    #: Add an evaluator node holding the held-out set (it scores and audits every round's model).
    evaluator: bool = True
    #: Simulated owners' privacy budgets (ε per dataset): one value for all, or one per client.
    budget_epsilon: float | list[float] = DEFAULT_BUDGET_EPSILON

    def budget_for(self, partition: int) -> float:
        b = self.budget_epsilon
        return float(b[partition % len(b)]) if isinstance(b, list) else float(b)


class HomomorphicConfig(_Strict):
    """The federation's CKKS context in homomorphic mode, pinned by the admin-signed run config.

    ``fedguard evaluator keygen`` prints the values; the server reads the bundle (public context,
    contexts sealed to each node) from ``bundle`` on its own host.
    """

    #: SHA-256 fingerprint of the public context: a node refuses any other context before training.
    context_fingerprint: str = ""
    #: The keygen bundle's folder on the server host (``fedguard evaluator keygen --out``).
    bundle: str = ""
    #: The evaluator's key fingerprint (``SHA256:...``): clients decrypt only global models it signed.
    evaluator_key: str = ""
    #: B: largest |value| of a weighted update or a global-model weight (the CKKS overflow bound);
    #: a client clips its update to ±B before encrypting (post-processing of the DP output).
    bound: float = Field(100.0, gt=0)
    #: L2 bound on the decrypted mean update: a larger aggregate (a foreign-key or bit-flipped
    #: ciphertext decrypts to garbage) is discarded and the round reported.
    max_aggregate_norm: float = Field(100.0, gt=0)


class SecAggConfig(_Strict):
    """Threshold secure aggregation (SecAgg+, ``secure_aggregation = "secagg"``), pinned by the signed run config.

    Each node masks its quantized update with pairwise masks and a self mask whose seeds are
    Shamir-shared among the round's sampled nodes; the server learns only the sum.
    """

    #: t: shares needed to unmask; fewer than t nodes colluding with the server learn nothing about
    #: an individual update. Unset: a strict majority ⌊n/2⌋+1 of the round's n sampled nodes (at least 2,
    #: at most n): the fewest shares that still stop a server from collecting both kinds of share for one node.
    threshold: int | None = Field(None, ge=2)
    #: Each weighted update value is clipped to ±clipping_range before quantization
    #: (post-processing of the DP output; the clipped fraction is reported on the node).
    clipping_range: float = Field(8.0, gt=0)
    #: Quantization levels over [-clipping_range, clipping_range]: the error per value is at most
    #: clipping_range / (quantization_range - 1) per node before summation.
    quantization_range: int = Field(2**22, ge=2**8, le=2**30)


class RunConfig(_Strict):
    name: str = "fedguard-run"
    #: Drives data splits, model initialisation and client selection — never DP noise.
    seed: int = 0
    #: A config that sets none gets its model's recipe's rounds (``apply_recipe``); this default is
    #: for a config validated without a known task.
    rounds: int = Field(3, ge=1, le=10_000)
    #: Nodes sampled per round (capped at those online). A config that sets none gets every simulated
    #: node in ``fedguard simulate`` (``simulation.num_clients``, ``apply_recipe``), else 3.
    clients_per_round: int = Field(3, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    data: DataConfig
    server: ServerConfig = Field(default_factory=ServerConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    central_dp: CentralDPConfig = Field(default_factory=CentralDPConfig)
    #: Fairness audit of every round's global model over the schema's sensitive columns.
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    #: Group-fairness mitigation (reweighing, fairfed, qfedavg, thresholds); its node releases are planned and charged.
    mitigation: MitigationConfig = Field(default_factory=MitigationConfig)
    #: How held-out scores become decisions (prior calibration by the central evaluator).
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    #: ``homomorphic``: clients encrypt updates and the server sums ciphertexts (TenSEAL CKKS);
    #: ``secagg``: threshold secure aggregation (SecAgg+): no single party can read an update.
    secure_aggregation: Literal["none", "homomorphic", "secagg"] = "none"
    homomorphic: HomomorphicConfig = Field(default_factory=HomomorphicConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, raw: Any) -> Any:
        return apply_recipe(raw) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.server.aggregation != "fedavg" and self.secure_aggregation != "none":
            raise ValueError(
                f"server.aggregation = {self.server.aggregation!r} needs every plaintext update at the server; "
                + (
                    "in homomorphic mode the server only sums ciphertexts"
                    if self.secure_aggregation == "homomorphic"
                    else "in secagg mode the server only learns the sum"
                )
                + ': use "fedavg"'
            )
        if self.server.aggregation != "fedavg" and self.central_dp.enabled:
            raise ValueError(
                "central_dp's noise is calibrated to a mean of clipped updates; a median or trimmed mean has "
                'a different sensitivity: use server.aggregation = "fedavg" with central_dp'
            )
        if self.central_dp.enabled and self.secure_aggregation != "none":
            raise ValueError(
                "central_dp needs the server to clip each client's plaintext update, but in "
                f"{self.secure_aggregation} mode the server only learns the sum; the clients' DP-SGD already "
                "protects every record: "
                'disable central_dp or use secure_aggregation = "none"'
            )
        weights = self.train.class_weights
        if weights is not None:
            classes = self.data.schema_.num_classes
            if len(weights) != classes or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(
                    f"train.class_weights needs {classes} positive weights (one per class in "
                    f"data.schema.classes order), got {weights}"
                )
        pbs = self.train.physical_batch_size
        if pbs is not None and self.dp.enabled and self.dp.grad_sample_mode == "ew":
            raise ValueError(
                "train.physical_batch_size splits a logical batch and accumulates per-sample gradients "
                'across physical batches, which the "ew" mode cannot do: use dp.grad_sample_mode = '
                '"hooks", "ghost" or "auto"'
            )
        if self.server.min_replies > self.clients_per_round:
            raise ValueError(
                f"server.min_replies ({self.server.min_replies}) exceeds clients_per_round ({self.clients_per_round})"
            )
        self._check_mitigation()
        he = self.homomorphic
        if self.secure_aggregation == "homomorphic" and not (he.context_fingerprint and he.bundle and he.evaluator_key):
            raise ValueError(
                "homomorphic mode needs homomorphic.context_fingerprint, homomorphic.bundle and "
                "homomorphic.evaluator_key: run `fedguard evaluator keygen` and copy what it prints"
            )
        return self

    def _check_mitigation(self) -> None:
        m, schema = self.mitigation, self.data.schema_
        if m.method == "thresholds" and self.evaluation.calibration != "none":
            raise ValueError(
                'mitigation.method = "thresholds" and evaluation.calibration = '
                f"{self.evaluation.calibration!r} would both move the decision threshold: "
                'set evaluation.calibration = "none" (the group thresholds decide)'
            )
        if m.method == "none":
            return
        if len(schema.classes) != 2 or not schema.sensitive:
            raise ValueError(
                f"mitigation.method = {m.method!r} needs a binary task with sensitive columns; the schema has "
                f"{len(schema.classes)} classes and sensitive = {schema.sensitive}"
            )
        if m.attribute is not None and m.attribute not in schema.sensitive:
            raise ValueError(
                f"mitigation.attribute {m.attribute!r} is not one of the sensitive columns {schema.sensitive}"
            )
        if m.node_releases_per_round and (
            self.secure_aggregation != "none" or self.central_dp.enabled or self.server.aggregation != "fedavg"
        ):
            raise ValueError(
                f"mitigation.method = {m.method!r} weighs each node's plaintext update by its noised counts: it needs "
                'secure_aggregation = "none", server.aggregation = "fedavg" and no central_dp'
            )
        if m.method == "reweighing" and m.priors is not None:
            labels = {str(c) for c in schema.classes}
            bad = [k for k in m.priors if k.split("|")[1] not in labels]
            if bad:
                raise ValueError(
                    f"mitigation.priors keys {bad} name a label outside data.schema.classes {schema.classes}"
                )

    @property
    def mitigation_attribute(self) -> str | None:
        """The sensitive column mitigation works on (None without mitigation)."""
        if self.mitigation.method == "none":
            return None
        return self.mitigation.attribute or self.data.schema_.sensitive[0]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @property
    def wants_federated_counts(self) -> bool:
        """Clients send noised per-group counts after the last round (binary tasks with sensitive columns)."""
        plaintext = self.secure_aggregation == "none"  # encrypted counts in homomorphic mode: not yet
        return plaintext and self.fairness.federated_counts and self.data.schema_.no_audit_reason() is None

    def to_toml(self) -> str:
        """The config as a run file (unset optional values are left out: TOML has no null)."""
        import tomli_w

        def strip(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if v is not None}
            if isinstance(x, list):
                return [strip(v) for v in x]
            return x

        return tomli_w.dumps(strip(json.loads(self.to_json())))

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: the reproducibility manifest's config hash."""
        canon = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()


#: Deepest nesting a run config may have (the real schema needs 4: data.schema.features[i].categories).
MAX_DEPTH = 16
_DEPTH_FIX = "a run config has at most a few levels of tables; see 'Run configuration' in docs/configuration.md"


def _check_values(raw: Any, source: str) -> None:
    """Refuse nesting deeper than any config needs and non-finite numbers, naming the field.

    TOML and JSON both spell ``inf`` and ``nan``; a bound of ``inf`` silently disables the check it
    sets (clipping, a norm bound), so every number anywhere in the config — free-form model
    parameters included — must be finite. Depth is checked without recursion: a hostile file nested
    thousands of levels deep must give a clear error, never a RecursionError.
    """
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"the config is nested more than {MAX_DEPTH} levels deep (at {path or 'the top'})",
                where=source,
                fix=_DEPTH_FIX,
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"invalid run configuration: {path or 'value'}: {value} is not a finite number",
                where=source,
                fix="give a finite value (inf and nan are never valid settings)",
            )
        if isinstance(value, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    _check_values(raw, source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            "invalid run configuration:\n" + format_validation_error(exc, source, RunConfig),
            fix="correct the fields above; see 'Run configuration' in docs/configuration.md",
        ) from None


def load_config(path: str | Path, *, schema_files: bool = True) -> RunConfig:
    """Read and validate a run config (TOML, or JSON as ``to_json`` writes it); relative data paths
    resolve against its folder. ``schema_files=False`` refuses ``[data] schema = "file.toml"``: a config
    submitted over the control API must not make the server read files of its choosing."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", where=str(p), fix="pass the path of an existing TOML file")
    kind = "JSON" if p.suffix == ".json" else "TOML"
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid {kind}: {exc}", where=str(p)) from None
    except RecursionError:  # both parsers recurse per nesting level
        raise ConfigError(
            f"not a usable {kind} file: it is nested too deeply to read", where=str(p), fix=_DEPTH_FIX
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror or exc}", where=str(p)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config is a {kind} table, not a {type(raw).__name__}", where=str(p))
    base = p.resolve().parent
    cfg = parse_config(_with_schema_file(raw, base, str(p), schema_files), str(p))
    if cfg.simulation.data_path and not Path(cfg.simulation.data_path).is_absolute():
        cfg.simulation.data_path = str(base / cfg.simulation.data_path)
    if cfg.data.evaluation_path and not Path(cfg.data.evaluation_path).is_absolute():
        cfg.data.evaluation_path = str(base / cfg.data.evaluation_path)
    return cfg


def _with_schema_file(raw: dict[str, Any], base: Path, source: str, allowed: bool) -> dict[str, Any]:
    """``[data] schema = "schema.toml"`` (the file ``fedguard schema draft --out`` writes, a node's
    ``--schema``): that file's table in place of its name, relative to the config's folder. The config
    that travels to the server and the nodes holds the table itself, so they never read the file."""
    data = raw.get("data")
    if not (isinstance(data, dict) and isinstance(data.get("schema"), str)):
        return raw
    named = data["schema"]
    if not allowed:
        raise ConfigError(
            f"data.schema names a file ({named!r}); a submitted config must hold the schema itself",
            where=source,
            fix="put the schema's keys under [data.schema] (the server reads no file a submitted config names)",
        )
    path = Path(named) if Path(named).is_absolute() else base / named
    if not path.is_file():
        raise ConfigError(
            f"data.schema names the schema file {named!r}, which does not exist ({path})",
            where=source,
            fix="give the path of a schema TOML file, relative to this config (`fedguard schema draft --out` "
            "writes one), or put its keys under [data.schema]",
        )
    return {**raw, "data": {**data, "schema": read_schema_table(path)}}


def config_from_json(text: str) -> RunConfig:
    source = "run config received from the server"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError("run config is nested too deeply to read", where=source, fix=_DEPTH_FIX) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"run config is a JSON {type(raw).__name__}, not an object", where=source)
    return parse_config(raw, source)
