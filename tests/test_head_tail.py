"""``read = "head+tail"``: a text model that reads a long text's beginning and its end.

A review's verdict often comes last ("… in the end, a masterpiece"); a model that reads only the
first hundred words never sees it. Real parts: the byte encoder every side uses, the pretrained
MiniLM's own WordPiece tokenizer from the installed package, the node's real ClientApp on a train
message, and the server's held-out scorer.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import common.pretrained as pretrained
from common import records as R
from common.config import parse_config
from common.data import load_encoded
from common.errors import ConfigError, ModelError
from common.models import build_model, long_text_note, text_encoding
from common.schema import DataSchema
from common.tokenizer import BYTE_OFFSET, CLS_ID, CUT_ID, PAD_ID, encode_texts
from fedguard.demo import TEXT_DEMO_SCHEMA
from tests.helpers import need, node_context

pytestmark = pytest.mark.timeout(180)

SCHEMA = DataSchema(task="text", text_column="review", label="y", classes=["neg", "pos"])
#: A long review whose verdict comes last, after ~90 words of plot.
REVIEW = (
    "The opening was slow and dull. " + "Then the plot wanders on for a while. " * 12 + "In the end, a masterpiece."
)


def _bytes(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def test_a_long_text_keeps_its_first_and_last_bytes_with_the_cut_between() -> None:
    texts = ["short", "abcdefgh" + "-" * 20 + "stuvwxyz"]
    head = encode_texts(texts, 16)
    both = encode_texts(texts, 16, "head+tail")
    assert head[1].tolist() == [CLS_ID, *_bytes("abcdefgh-------")]  # 15 bytes of the beginning
    assert both[1].tolist() == [CLS_ID, *_bytes("abcdefg"), CUT_ID, *_bytes("tuvwxyz")]  # 7 + cut + 7
    assert both[0].tolist() == head[0].tolist() == [CLS_ID, *_bytes("short"), *[PAD_ID] * 10]  # fits: no cut
    fits = encode_texts(["x" * 15], 16, "head+tail")  # exactly the budget: whole, no cut
    assert CUT_ID not in fits.tolist()[0]
    with pytest.raises(ConfigError, match=r"read must be one of \['head', 'head\+tail'\], got 'middle'"):
        encode_texts(texts, 16, "middle")
    with pytest.raises(ConfigError, match=r'read = "head\+tail" needs max_len ≥ 4, got 3'):
        encode_texts(texts, 3, "head+tail")


def test_every_side_encodes_the_part_the_model_was_configured_to_read(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    pd.DataFrame({"review": [REVIEW, "good"], "y": ["pos", "pos"]}).to_csv(data, index=False)
    cache = tmp_path / "cache"
    both = load_encoded(data, SCHEMA, **text_encoding("text-transformer", {"read": "head+tail"}), cache_dir=cache)
    head = load_encoded(data, SCHEMA, **text_encoding("text-transformer"), cache_dir=cache)  # not the cached one
    assert CUT_ID in both.x[0].tolist() and CUT_ID not in head.x[0].tolist()
    assert both.x[0, -len("masterpiece.") :].tolist() == _bytes("masterpiece.")
    again = load_encoded(data, SCHEMA, **text_encoding("text-transformer", {"read": "head+tail"}), cache_dir=cache)
    assert torch.equal(again.x, both.x)
    with pytest.raises(ModelError, match="read must be one of"):
        text_encoding("minilm-lora", {"read": "tail"})

    from server.scoring import Scorer  # the server's own held-out set: the same reading as the nodes'

    cfg = parse_config(
        {
            "data": {"schema": SCHEMA.model_dump(mode="json"), "evaluation_path": str(data)},
            "model": {"name": "text-transformer", "params": {"read": "head+tail"}},
        },
        "test config",
    )
    holdout = Scorer(cfg, evaluator=None)._holdout
    assert holdout is not None and torch.equal(holdout.x, both.x)


def test_minilm_reads_the_verdict_at_the_end_of_a_long_review() -> None:
    need(pretrained.pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    texts = [REVIEW, "a fine film"]
    cpu = torch.device("cpu")
    pieces = {}
    for read in ("head", "head+tail"):
        model = build_model("minilm-lora", SCHEMA, {"read": read, "max_tokens": 32}).eval()
        tok = pretrained._tokenizer(model.folder, None)
        verdict = tok.token_to_id("masterpiece")
        ids, mask = model.wordpiece(encode_texts(texts, 768, read), cpu)
        pieces[read] = (ids, mask)
        assert int(mask[0].sum()) == 32  # the budget either way
        assert model(encode_texts(texts, 768, read)).shape == (2, 2)
    (h_ids, h_mask), (b_ids, b_mask) = pieces["head"], pieces["head+tail"]
    assert verdict not in h_ids[0].tolist() and verdict in b_ids[0].tolist()
    assert b_ids[0, :16].tolist() == h_ids[0, :16].tolist()  # [CLS] + the same first 15 pieces
    words = tok.decode(b_ids[0].tolist())
    assert words.endswith("in the end, a masterpiece.") and words.startswith("the opening was slow and dull.")
    assert torch.equal(h_ids[1], b_ids[1]) and torch.equal(h_mask[1], b_mask[1])  # a short text: the same

    # A text cut in bytes (head, cut, tail) is read as its first and last pieces, never across the cut.
    long = "start " + "alpha " * 200 + "beta " * 200 + "finale"
    model = build_model("minilm-lora", SCHEMA, {"read": "head+tail", "max_tokens": 8, "max_len": 200}).eval()
    ids, _ = model.wordpiece(encode_texts([long], 200, "head+tail"), cpu)
    assert tok.decode(ids[0].tolist()) == "start alpha alpha beta beta finale"  # 3 + 3 of 6


def test_the_note_says_what_a_head_tail_model_reads() -> None:
    texts = ["review: " + "a fine film " * 20] * 10
    head = build_model("text-transformer", SCHEMA, {"max_len": 64})
    note = long_text_note(head, encode_texts(texts, 64), "text-transformer")
    assert note is not None and "(the first 63 bytes): it learns from their beginnings only" in note
    assert 'set [model.params] read = "head+tail" to read each text\'s first and last 31 bytes' in note
    both = build_model("text-transformer", SCHEMA, {"max_len": 64, "read": "head+tail"})
    note = long_text_note(both, encode_texts(texts, 64, "head+tail"), "text-transformer")
    assert note is not None and "(the first and last 31 bytes): it skips their middles" in note
    assert "If what decides the label can come in the middle of a text, raise [model.params] max_len" in note
    assert "read = " not in note and "raise [model.params] max_len" in note
    odd = build_model("text-transformer", SCHEMA, {"max_len": 65, "read": "head+tail"})  # 63 bytes: 32 + cut + 31
    tokens = encode_texts(texts, 65, "head+tail")
    assert (tokens[:, 33] == CUT_ID).all()
    note = long_text_note(odd, tokens, "text-transformer")
    assert note is not None and "(the first 32 and last 31 bytes)" in note


@pytest.mark.usefixtures("server_identity")
def test_a_node_trains_on_heads_and_tails_when_the_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.app import app as client_app
    from tests.helpers import global_state, train_message

    cfg = parse_config(
        {
            "data": {"schema": TEXT_DEMO_SCHEMA},
            "model": {"name": "text-transformer", "params": {"read": "head+tail"}},
            "dp": {"target_epsilon": 8.0, "delta": 1e-4},
        },
        "test config",
    )
    classes, label = TEXT_DEMO_SCHEMA["classes"], TEXT_DEMO_SCHEMA["label"]
    data = tmp_path / "long.csv"
    texts = [f"review {i}: " + "a fine film " * 20 + ("loved it" if i % 2 else "hated it") for i in range(200)]
    pd.DataFrame({"text": texts, label: [classes[i % 2] for i in range(200)]}).to_csv(data, index=False)
    ctx = node_context(data, tmp_path / "node", budget_epsilon=20.0)
    reply = client_app(train_message(cfg, global_state(cfg), 1), ctx)
    assert R.METRICS in reply.content, reply.content  # trained
    assert "the first and last 63 bytes): it skips their middles" in capsys.readouterr().out
    cached = [torch.load(p, weights_only=True)["x"] for p in (tmp_path / "node" / "cache").glob("*.pt")]
    assert len(cached) == 1 and (cached[0][:, 64] == CUT_ID).all()  # every row: 63 bytes, the cut, 63 bytes
    assert cached[0][1, -8:].tolist() == _bytes("loved it")
