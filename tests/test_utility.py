"""Utility options: server optimizers, FedProx, warm-up, virtual steps, public class weights.

Most tests drive the real ClientApp in process (``client_app(message, context)``), with a small
round loop doing what server/app.py's loop does (``WeightedMean``, then the server optimizer);
the one test through the real ServerApp on Flower's simulation engine is marked and runs once
server/app.py calls ``common.optimizers.make_server_optimizer``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from opacus.accountants import RDPAccountant

from client.app import app as client_app
from client.training import PerSampleWeightedCE, loader_batch_size, train_local
from common import records as R
from common.codec import record_to_numpy
from common.config import RECIPES, ServerOptimizerConfig, parse_config
from common.data import encode
from common.errors import ConfigError
from common.models import build_model
from common.optimizers import AVERAGE_PREFIX, FLOWER_DEFAULTS, make_server_optimizer
from common.privacy import epsilon_spent, plan_dp
from server.aggregation import WeightedMean
from server.store import RunStore
from tests.helpers import (
    ROOT,
    global_state,
    make_tabular,
    node_context,
    simulate_in_subprocess,
    tabular_config,
    train_message,
)

pytestmark = pytest.mark.usefixtures("server_identity")

State = OrderedDict[str, np.ndarray]


# --------------------------------------------------------------------------- helpers


def _distance(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in a))


def _federation(cfg, datasets: list[Path], workdir: Path) -> tuple[list[State], list[State], list[list[float]]]:
    """``cfg.rounds`` rounds on the real ClientApp, aggregated as server/app.py does.

    Returns the global model before each round and after the last, each round's weighted mean,
    and each round's client distances from the global model they started from.
    """
    state = global_state(cfg)
    opt = make_server_optimizer(cfg.server.optimizer)
    contexts = [node_context(d, workdir / f"node{i}") for i, d in enumerate(datasets)]
    globals_, means, distances = [state], [], []
    for rnd in range(1, cfg.rounds + 1):
        mean = WeightedMean(state)
        dist = []
        for ctx in contexts:
            reply = client_app(train_message(cfg, state, rnd), ctx)
            assert R.ARRAYS in reply.content, reply.content
            update = record_to_numpy(reply.content[R.ARRAYS])
            dist.append(_distance(update, state))
            mean.add(update, float(reply.content[R.METRICS][R.NUM_EXAMPLES]))
        means.append(mean.result())
        state = opt.step(state, means[-1])
        globals_.append(state)
        distances.append(dist)
    return globals_, means, distances


@pytest.fixture
def two_nodes(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(2):
        p = tmp_path / f"node{i}.csv"
        make_tabular(500, seed=i).to_csv(p, index=False)
        paths.append(p)
    return paths


def _flower_reply(state: State) -> Message:
    ins = Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content, reply_to=ins)


def _flower_strategy(name: str, **p: float):
    if name == "fedavgm":
        return FedAvgM(server_learning_rate=p["learning_rate"], server_momentum=p["momentum"])
    if name == "fedadagrad":
        return FedAdagrad(eta=p["learning_rate"], tau=p["tau"])
    cls = FedAdam if name == "fedadam" else FedYogi
    return cls(eta=p["learning_rate"], beta_1=p["momentum"], beta_2=p["beta_2"], tau=p["tau"])


def _flower_step(strategy, rnd: int, global_state: State, aggregate: State) -> State:
    """One round of Flower's own strategy: it sees ``global_state`` sent and ``aggregate`` as the mean."""
    if isinstance(strategy, FedAvgM):
        if strategy.current_arrays is None:
            strategy.current_arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in global_state.items()})
    else:
        strategy.current_arrays = {k: np.asarray(v) for k, v in global_state.items()}
    arrays, _ = strategy.aggregate_train(rnd, [_flower_reply(aggregate)])
    return OrderedDict((k, arrays[k].numpy()) for k in global_state)


# --------------------------------------------------------------------------- server optimizers

OPTIMIZERS = {
    "fedavgm": {"learning_rate": 1.0, "momentum": 0.9},
    "fedadagrad": {"learning_rate": 0.05},
    "fedadam": {"learning_rate": 0.05},
    "fedyogi": {"learning_rate": 0.05},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_server_optimizer_matches_flower_strategy(name: str) -> None:
    """Same inputs, same outputs as Flower 1.42's strategy, over several rounds (state carried)."""
    rng = np.random.default_rng(0)
    cfg = ServerOptimizerConfig(name=name, **OPTIMIZERS[name])  # type: ignore[arg-type]
    ours = make_server_optimizer(cfg)
    params = {**FLOWER_DEFAULTS[name], **OPTIMIZERS[name]}
    flower = _flower_strategy(name, **params)
    state: State = OrderedDict(w=rng.normal(size=(4, 3)).astype(np.float32), b=rng.normal(size=3).astype(np.float32))
    for rnd in range(1, 5):
        aggregate = OrderedDict(
            (k, (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32)) for k, v in state.items()
        )
        expected = _flower_step(flower, rnd, state, aggregate)
        state = ours.step(state, aggregate)
        for k in state:
            assert state[k].dtype == np.float32
            np.testing.assert_allclose(state[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", *sorted(OPTIMIZERS)])
def test_two_round_federation_moves_the_model_as_each_optimizer_should(
    name: str, two_nodes: list[Path], tmp_path: Path
) -> None:
    """Two rounds of DP training on the real ClientApp; the global model follows the optimizer's rule."""
    opt = {"name": name, **OPTIMIZERS.get(name, {})}
    cfg = tabular_config(server={"optimizer": opt})
    globals_, means, _ = _federation(cfg, two_nodes, tmp_path)
    assert all(_distance(globals_[r + 1], globals_[r]) > 0 for r in range(2)), "a round left the model unchanged"
    if name == "fedavg":
        for r in range(2):  # FedAvg: the mean becomes the global model
            assert _distance(globals_[r + 1], means[r]) == 0
        return
    # The same rounds through Flower's own strategy give the same global models.
    flower = _flower_strategy(name, **{**FLOWER_DEFAULTS[name], **OPTIMIZERS[name]})
    for r in range(2):
        expected = _flower_step(flower, r + 1, globals_[r], means[r])
        for k in expected:
            np.testing.assert_allclose(globals_[r + 1][k], expected[k], rtol=1e-5, atol=1e-6)
    # ... and differ from plain FedAvg (the mean) in round 2, where state has built up.
    assert _distance(globals_[2], means[1]) > 1e-4


def test_server_optimizer_state_survives_a_checkpoint() -> None:
    rng = np.random.default_rng(1)
    cfg = ServerOptimizerConfig(name="fedadam", learning_rate=0.1)
    a = make_server_optimizer(cfg)
    state: State = OrderedDict(w=rng.normal(size=5).astype(np.float32))
    aggs = [OrderedDict(w=(state["w"] + rng.normal(size=5)).astype(np.float32)) for _ in range(3)]
    s1 = a.step(state, aggs[0])
    saved = json.loads(json.dumps(a.scalars())), {k: v.copy() for k, v in a.arrays().items()}
    expected = a.step(s1, aggs[1])["w"]
    resumed = make_server_optimizer(cfg)
    resumed.load(*saved)
    np.testing.assert_array_equal(resumed.step(s1, aggs[1])["w"], expected)
    assert not np.array_equal(make_server_optimizer(cfg).step(s1, aggs[1])["w"], expected)  # state matters


def test_the_model_average_is_released_while_nodes_train_from_the_latest_model() -> None:
    """``ema_decay``: the released model is the EMA of the rounds' global models (decay warming up over
    the first rounds); the optimizer's own trajectory (what the nodes train from) is unchanged, and a
    checkpoint resumes both."""
    rng = np.random.default_rng(2)
    state: State = OrderedDict(w=rng.normal(size=4).astype(np.float32), n=np.array([3], np.int64))
    aggs = [OrderedDict(w=(state["w"] + rng.normal(size=4)).astype(np.float32), n=state["n"]) for _ in range(4)]
    plain = make_server_optimizer(ServerOptimizerConfig(name="fedavgm", momentum=0.5))
    avg = make_server_optimizer(ServerOptimizerConfig(name="fedavgm", momentum=0.5, ema_decay=0.6))
    assert avg.released(state) is not state and np.array_equal(avg.released(state)["w"], state["w"])  # round 0
    s_plain, s_avg, expected = state, state, state["w"].astype(np.float64)
    for r, agg in enumerate(aggs):
        s_plain, s_avg = plain.step(s_plain, agg), avg.step(s_avg, agg)
        np.testing.assert_array_equal(s_avg["w"], s_plain["w"])  # training follows the optimizer alone
        d = min(0.6, r / (r + 2))  # step t = r + 1: d = min(decay, (t − 1)/(t + 1)); 0 in round 1 (a = w)
        expected = d * expected + (1 - d) * s_avg["w"].astype(np.float64)
        released = avg.released(s_avg)
        np.testing.assert_allclose(released["w"], expected, rtol=1e-6)
        assert released["w"].dtype == np.float32 and released["n"] is s_avg["n"]  # integers are not averaged
        if r == 1:
            saved = json.loads(json.dumps(avg.scalars())), {k: v.copy() for k, v in avg.arrays().items()}
            resumed = make_server_optimizer(ServerOptimizerConfig(name="fedavgm", momentum=0.5, ema_decay=0.6))
            resumed.load(*saved)
            s_resumed = s_avg
    assert not np.allclose(avg.released(s_avg)["w"], s_avg["w"])  # the average is not the latest model
    for agg in aggs[2:]:
        s_resumed = resumed.step(s_resumed, agg)
    np.testing.assert_allclose(resumed.released(s_resumed)["w"], avg.released(s_avg)["w"], rtol=1e-6)
    # Without ema_decay the released model is the latest one.
    assert plain.released(s_plain)["w"] is s_plain["w"]
    assert not any(k.startswith(AVERAGE_PREFIX) for k in plain.arrays())


def test_server_optimizer_config_is_validated() -> None:
    # no [server.optimizer]: the recommended recipe's (common.config.RECIPES), taken whole
    assert tabular_config().server.optimizer.model_dump(exclude_none=True) == RECIPES["tabular"]["server.optimizer"]
    with pytest.raises(ConfigError, match="fedavg' takes no parameters; remove learning_rate"):
        tabular_config(server={"optimizer": {"name": "fedavg", "learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="fedavgm' takes learning_rate, momentum; remove tau"):
        tabular_config(server={"optimizer": {"name": "fedavgm", "tau": 0.1}})
    with pytest.raises(ConfigError, match="server.optimizer.name"):
        tabular_config(server={"optimizer": {"name": "sgd"}})


# --------------------------------------------------------------------------- FedProx


def test_fedprox_keeps_client_models_closer_to_the_global_model(two_nodes: list[Path], tmp_path: Path) -> None:
    """Two DP rounds with and without a large μ: the proximal step pulls every update towards the global model."""
    plain = tabular_config()
    prox = tabular_config(train={**plain.train.model_dump(), "proximal_mu": 50.0})  # lr·μ = 0.5 per step
    _, _, d_plain = _federation(plain, two_nodes, tmp_path / "plain")
    _, _, d_prox = _federation(prox, two_nodes, tmp_path / "prox")
    for r in range(2):
        for a, b in zip(d_prox[r], d_plain[r], strict=True):
            assert a < 0.5 * b, (d_prox, d_plain)


def test_fedprox_costs_no_privacy(tabular_csv: Path, tmp_path: Path) -> None:
    eps = []
    for mu in (0.0, 10.0):
        cfg = tabular_config(train={**tabular_config().train.model_dump(), "proximal_mu": mu})
        reply = client_app(train_message(cfg, global_state(cfg)), node_context(tabular_csv, tmp_path / f"mu{mu}"))
        eps.append(reply.content[R.METRICS][R.EPSILON])
    assert eps[0] == eps[1]


def test_fedprox_step_is_applied_after_the_optimizer_step(tabular_csv: Path) -> None:
    """μ with lr·μ ≥ 1 puts the model back on w_global after every step: nothing moves."""
    cfg = tabular_config(train={**tabular_config().train.model_dump(), "proximal_mu": 1000.0})
    data = encode(make_tabular(400), cfg.data.schema_)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_dp(len(data), cfg.dp, batch_size=32, local_epochs=1, rounds=2)
    train_local(model, data, cfg, plan, torch.device("cpu"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


# --------------------------------------------------------------------------- DP-aware training choices


def test_virtual_steps_report_the_accountants_epsilon_for_the_logical_batch(tmp_path: Path) -> None:
    """Logical batch 512 in physical batches of ≤ 64: one DP step per logical batch, q = 1/⌈n/512⌉."""
    data_path = tmp_path / "big.csv"
    make_tabular(3000).to_csv(data_path, index=False)
    base = tabular_config(dp={"target_epsilon": 4.0, "delta": 1e-5})
    cfg = tabular_config(
        dp={"target_epsilon": 4.0, "delta": 1e-5},
        train={**base.train.model_dump(), "batch_size": 512, "physical_batch_size": 64},
    )
    seen: list[int] = []
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    data = encode(make_tabular(3000), cfg.data.schema_)
    plan = plan_dp(len(data), cfg.dp, batch_size=512, local_epochs=1, rounds=2)
    result = train_local(model, data, cfg, plan, torch.device("cpu"))
    assert plan.sample_rate == 1 / math.ceil(3000 / 512)
    assert result.steps == plan.steps_per_round == 6
    assert result.history == [(plan.noise_multiplier, plan.sample_rate, 6)]
    assert max(seen) <= 64 and len(seen) > result.steps  # several physical batches per DP step
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, 12)]
    assert epsilon_spent(result.history * 2, cfg.dp.delta) == pytest.approx(acc.get_epsilon(cfg.dp.delta))
    # Through the real ClientApp: the ε it reports is the accountant's for the logical batch.
    ctx = node_context(data_path, tmp_path / "node")
    state = global_state(cfg)
    for rnd in (1, 2):
        metrics = client_app(train_message(cfg, state, rnd), ctx).content[R.METRICS]
    n_train = round(3000 * (1 - cfg.data.validation_fraction))
    q = 1 / math.ceil(n_train / 512)
    assert metrics[R.SAMPLE_RATE] == pytest.approx(q)
    acc = RDPAccountant()
    acc.history = [(metrics[R.NOISE_MULTIPLIER], q, 2 * int(metrics[R.STEPS]))]
    accounted = cfg.dp.delta - cfg.fairness.count_selection_delta  # the planned counts' selection takes the rest
    assert metrics[R.DELTA] == pytest.approx(accounted)
    assert metrics[R.EPSILON] == pytest.approx(acc.get_epsilon(accounted))
    assert metrics[R.EPSILON] <= cfg.dp.target_epsilon


def test_physical_batches_refuse_the_ew_mode() -> None:
    base = tabular_config()
    with pytest.raises(ConfigError, match='"ew" mode cannot'):
        tabular_config(dp={"grad_sample_mode": "ew"}, train={**base.train.model_dump(), "physical_batch_size": 8})


@pytest.mark.parametrize(("n", "batch"), [(8924, 256), (1057, 64), (480, 32), (10, 3), (7, 256), (5000, 1024)])
def test_loader_batch_realizes_the_planned_schedule(n: int, batch: int) -> None:
    from common.config import DPConfig

    plan = plan_dp(n, DPConfig(delta=1 / (10 * n)), batch_size=batch, local_epochs=1, rounds=1)
    assert math.ceil(n / loader_batch_size(n, plan)) == plan.steps_per_round == round(1 / plan.sample_rate)


def test_per_node_batch_follows_the_sample_rate() -> None:
    base = tabular_config()
    cfg = tabular_config(train={**base.train.model_dump(), "batch_size": 64, "sample_rate": 0.05})
    assert cfg.train.logical_batch_size(10_000) == 500
    assert cfg.train.logical_batch_size(600) == 64  # never below batch_size
    assert base.train.logical_batch_size(10_000) == base.train.batch_size


def test_warmup_slows_the_first_steps() -> None:
    base = tabular_config()
    data = encode(make_tabular(400), base.data.schema_)
    moved = []
    for warmup in (0, 1_000_000):
        cfg = tabular_config(train={**base.train.model_dump(), "warmup_steps": warmup})
        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
        before = [p.detach().clone() for p in model.parameters()]
        train_local(model, data, cfg, None, torch.device("cpu"))
        with torch.no_grad():
            moved.append(sum(float((p - b).norm()) for p, b in zip(model.parameters(), before, strict=True)))
    assert moved[1] < 0.01 * moved[0]


def test_clip_without_dp_bounds_non_private_steps() -> None:
    """Without DP, one SGD step moves the model by at most lr·C when clip_without_dp is on."""
    data = encode(make_tabular(400), tabular_config().data.schema_)
    moved = {}
    for clip in (False, True):
        cfg = tabular_config(
            dp={"enabled": False, "max_grad_norm": 0.01},
            train={
                "optimizer": "sgd",
                "learning_rate": 1.0,
                "batch_size": 400,
                "local_epochs": 1,
                "clip_without_dp": clip,
            },
        )
        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
        before = [p.detach().clone() for p in model.parameters()]
        result = train_local(model, data, cfg, None, torch.device("cpu"))
        assert result.steps == 1
        with torch.no_grad():
            moved[clip] = math.sqrt(
                sum(float(((p - b) ** 2).sum()) for p, b in zip(model.parameters(), before, strict=True))
            )
    assert moved[True] <= 0.01 * (1 + 1e-4) < moved[False]


# --------------------------------------------------------------------------- class weights


def test_class_weighted_loss_is_per_record() -> None:
    """A record's weighted loss does not depend on which other records share its batch."""
    crit = PerSampleWeightedCE([1.0, 3.0])
    logits = torch.randn(6, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 1])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none") * torch.tensor([1.0, 3.0])[y]
    assert crit(logits, y).item() == pytest.approx(per.mean().item())
    assert crit(logits[:2], y[:2]).item() == pytest.approx(per[:2].mean().item())
    crit.reduction = "none"  # how Opacus's ghost clipping asks for per-sample losses
    torch.testing.assert_close(crit(logits, y), per)


@pytest.mark.parametrize("mode", ["ew", "ghost"])
def test_class_weights_train_under_dp(mode: str, tabular_csv: Path, tmp_path: Path) -> None:
    base = tabular_config()
    cfg = tabular_config(
        dp={**base.dp.model_dump(), "grad_sample_mode": mode},
        train={**base.train.model_dump(), "class_weights": [1.0, 2.0]},
    )
    reply = client_app(train_message(cfg, global_state(cfg)), node_context(tabular_csv, tmp_path / "node"))
    assert R.ARRAYS in reply.content and reply.content[R.METRICS][R.EPSILON] > 0
    with pytest.raises(ConfigError, match="class_weights needs 2 positive weights"):
        tabular_config(train={**base.train.model_dump(), "class_weights": [1.0]})


# --------------------------------------------------------------------------- the real ServerApp


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_server_app_applies_the_server_optimizer(tmp_path: Path) -> None:
    """Real ServerApp on Flower's simulation engine, 2 rounds: with a server learning rate of 1e-9
    the global model (hence the held-out loss) stays where it started; with FedAvg it moves."""
    data = tmp_path / "data.csv"
    make_tabular(500).to_csv(data, index=False)
    losses = {}
    for name, opt in {"frozen": {"name": "fedavgm", "learning_rate": 1e-9}, "fedavg": {"name": "fedavg"}}.items():
        cfg = tabular_config(data, server={"round_timeout": 120, "wait_for_nodes": 60, "optimizer": opt})
        run_id, store, _ = simulate_in_subprocess(cfg, tmp_path / name)
        with RunStore(store) as runs:
            losses[name] = [e["loss"] for _, e in sorted(runs.evaluations(run_id).items())]
    assert losses["frozen"][2] == pytest.approx(losses["frozen"][0], abs=1e-6)
    assert abs(losses["fedavg"][2] - losses["fedavg"][0]) > 1e-4


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_scores_and_checkpoints_the_model_average(tmp_path: Path) -> None:
    """Real ServerApp on Flower's simulation engine, 3 rounds, ``ema_decay = 0.5``: each checkpoint keeps
    the nodes' model and the average; the round's recorded held-out score is the average's, and
    ``Checkpoint.model`` (what ``fedguard evaluate`` and the privacy audit load) is the average."""
    from common.codec import load_numpy_state
    from common.data import load_encoded
    from common.evaluation import evaluate_and_audit
    from common.models import text_encoding
    from server.checkpoint import load as load_checkpoint

    data = tmp_path / "data.csv"
    make_tabular(500).to_csv(data, index=False)
    cfg = tabular_config(
        data,
        rounds=3,
        dp={"enabled": False},
        evaluation={"calibration": "none"},
        server={"round_timeout": 120, "wait_for_nodes": 60, "optimizer": {"name": "fedavg", "ema_decay": 0.5}},
    )
    run_id, store, _ = simulate_in_subprocess(cfg, tmp_path / "work")
    with RunStore(store) as runs:
        losses = {rnd: e["loss"] for rnd, e in runs.evaluations(run_id).items()}
    folder = tmp_path / "work" / "checkpoints" / f"run-{run_id}"
    two, three = load_checkpoint(folder / "round-00002.ckpt"), load_checkpoint(folder / "round-00003.ckpt")
    moved = False
    for k, v in three.state.items():
        if np.issubdtype(v.dtype, np.floating):
            want = 0.5 * two.model[k].astype(np.float64) + 0.5 * v
            np.testing.assert_allclose(three.model[k], want, rtol=1e-5, atol=1e-6)
            moved |= not np.allclose(three.model[k], v)
    assert moved  # the average is not the nodes' model

    def held_out_loss(state: State) -> float:
        model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
        load_numpy_state(model, state)
        (holdout,) = (tmp_path / "work").rglob("holdout.parquet")
        enc = load_encoded(holdout, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params))
        return float(evaluate_and_audit(model, enc, cfg.fairness)[0]["loss"])

    assert losses[3] == pytest.approx(held_out_loss(three.model), abs=1e-5)
    assert losses[3] != pytest.approx(held_out_loss(three.state), abs=1e-5)


# --------------------------------------------------------------------------- the benchmark runs the product's path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_bench_and_the_cli_run_the_same_federation(tmp_path: Path) -> None:
    """bench/utility.py's run function and ``fedguard simulate`` on the same user-written config and seed:
    the same split, the same σ on every node, and accuracies that differ only by DP noise (each run draws
    fresh noise from os.urandom on the nodes, so the models are not bit-identical)."""
    import tomllib

    from bench.utility import partition_summary, read_run, run_config, write_dataset

    # A cell whose 3-round curve is stable across DP draws: spam's seed 3 swung by 0.13 between two runs of the
    # same config, which says nothing about the two paths.
    data, schema = write_dataset("computers", tmp_path / "data")
    raw = run_config(data, schema, split="dir0.5", epsilon=8.0, seed=4, method="fedguard", rounds=3)
    assert "train" not in raw and "server" not in raw  # the product's defaults, as a user gets them
    raw_file = tmp_path / "raw.json"
    raw_file.write_text(json.dumps(raw), encoding="utf-8")
    code = (
        "import json, sys; from pathlib import Path; from bench.utility import run_federation; "
        "raw = json.loads(Path(sys.argv[1]).read_text()); "
        "print('RESULT', json.dumps(run_federation(raw, Path(sys.argv[2]))))"
    )
    proc = _run([sys.executable, "-c", code, str(raw_file), str(tmp_path / "bench")], 280)
    bench = json.loads(proc.stdout.split("RESULT", 1)[1].strip().splitlines()[0])
    config = tmp_path / "bench" / "config.toml"
    assert not {"train", "server"} & set(tomllib.loads(config.read_text(encoding="utf-8")))  # as a user wrote it

    _run([sys.executable, "-m", "fedguard.cli", "simulate", "--config", str(config), "--workdir", str(tmp_path / "cli"),
          "--json"], 280)  # fmt: skip
    cli = read_run(tmp_path / "cli" / "runs.db", 1)
    cli["partitions"] = partition_summary(tmp_path / "cli" / "partitions", schema["label"], schema["classes"])

    assert bench["partitions"] == cli["partitions"]  # rows, label shares and content of every node's file
    assert len(bench["sigmas"]) == 5 and bench["sigmas"] == pytest.approx(cli["sigmas"], rel=1e-9)
    assert bench["accepted"] == cli["accepted"] == 5 * 3  # every node trained every round, in both
    assert bench["status"] == cli["status"] == "finished"

    # Within DP noise: the mean held-out accuracy of rounds 1-3 (eight runs of this config with two local epochs per
    # round: 0.755-0.792, the last round alone 0.728-0.804, one DP draw can swing a round; three with the recipe's
    # one epoch since 2026-12-07: 0.767-0.775).
    def mean(run: dict) -> float:
        trained = [c["accuracy"] for c in run["curve"] if c["round"] > 0]
        return sum(trained) / len(trained)

    assert abs(mean(bench) - mean(cli)) <= 0.08, (bench["curve"], cli["curve"])


def test_the_no_dp_reference_is_the_default_config_without_dp_once_per_split_and_seed(tmp_path: Path) -> None:
    """bench/utility.py's ``no-dp`` rows: the ``fedguard`` config with DP off (nothing else changed), one run per
    split and seed whatever ``--epsilons`` says, with keys and table cells of their own."""
    import argparse

    from bench.utility import NO_DP, plan_jobs, run_config, summarize, write_dataset

    data, schema = write_dataset("computers", tmp_path / "data")
    fedguard = run_config(data, schema, split="dir0.5", epsilon=8.0, seed=1, method="fedguard", rounds=10)
    no_dp = run_config(data, schema, split="dir0.5", epsilon=None, seed=1, method=NO_DP, rounds=10)
    assert no_dp["dp"] == {"enabled": False}
    assert {k: v for k, v in no_dp.items() if k not in ("dp", "name")} == {
        k: v for k, v in fedguard.items() if k not in ("dp", "name")
    }
    assert parse_config(no_dp, "test").dp.enabled is False

    args = argparse.Namespace(
        epsilons=[1.0, 8.0, 3.0], seeds=[1, 2], datasets=["spam"], splits=["dir0.5", "dir0.1"],
        methods=["fedguard", NO_DP], rounds=10,
    )  # fmt: skip
    jobs = plan_jobs(args)
    keys = [j.key for j in jobs]
    assert sorted(k for k in keys if k.endswith(NO_DP)) == sorted(
        f"spam/{s}/no-dp/seed{seed}/no-dp" for s in ("dir0.5", "dir0.1") for seed in (1, 2)
    )
    assert keys.index("spam/dir0.5/no-dp/seed1/no-dp") > keys.index("spam/dir0.1/eps8/seed2/fedguard")  # after ε=8
    assert keys.index("spam/dir0.5/no-dp/seed1/no-dp") < keys.index("spam/dir0.5/eps3/seed1/fedguard")
    runs = {
        j.key: {"dataset": j.dataset, "split": j.split, "epsilon": j.epsilon, "method": j.method, "seed": j.seed,
                "accuracy": 0.8, "macro_f1": 0.7}
        for j in jobs
    }  # fmt: skip
    cells = summarize({"runs": runs, "references": {}})["cells"]
    assert cells["spam/dir0.1/no-dp/no-dp"]["accuracy"] == {"1": 0.8, "2": 0.8}
    assert "spam/dir0.1/eps8/fedguard" in cells
