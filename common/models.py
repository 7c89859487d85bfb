"""Built-in models: a byte-level text Transformer and an FT-Transformer for tabular data.

Both are built only from modules Opacus computes per-sample gradients for (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``): no ``nn.MultiheadAttention`` (rejected by the validator),
no bare ``nn.Parameter`` on a custom module (no grad sampler), attention from ``nn.Linear`` +
``F.scaled_dot_product_attention``. They pass ``ModuleValidator.validate(strict=True)`` as is and
train under ``PrivacyEngine.make_private`` in the ``hooks``, ``ew``, ``ghost`` and ``functorch``
modes (``bench/dp_overhead.py`` measures them; ``ModelSpec.default_grad_sample_mode`` is the fastest).

Inputs are one tensor so the ``ew`` mode (tensor as first positional argument, batch first)
works: text takes ``LongTensor (B, L)`` token ids from ``common.tokenizer``; tabular takes
``float32 (B, F)`` in schema feature order, categorical features as the float index into their
declared ``categories``.

``ew`` caveat (torch ExpandedWeights): a second forward of the wrapped model before the optimizer
step or ``zero_grad`` clears ``grad_sample`` raises, and gradient accumulation is not supported:
evaluate with the unwrapped module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.devices import resolve_device
from common.errors import ModelError
from common.schema import DataSchema
from common.tokenizer import PAD_ID, READS, VOCAB_SIZE, filled_rows, halves

#: SHA-256 of the pinned pretrained checkpoint (mirrors ``common.pretrained.BASE_SHA256``; kept here so
#: the registry imports without the optional extra).
_BASE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

__all__ = [
    "MODELS",
    "FTTransformer",
    "ModelSpec",
    "TextTransformer",
    "build_model",
    "count_parameters",
    "describe_model",
    "long_text_note",
    "pick_device",
    "text_encoding",
]


# --------------------------------------------------------------------------- building blocks


class _Attention(nn.Module):
    """Multi-head self-attention from one qkv ``nn.Linear`` (Opacus-friendly, batch first)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cls_only: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        # unbind, not qkv[0], qkv[1], qkv[2]: indexing's backward writes each gradient into its own
        # zero-filled (3, B, H, T, dh) tensor and adds the three; unbind's stacks them once. Same values,
        # bit for bit; training steps 8-15% faster plain and 14-16% under DP-SGD (bench/README.md).
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).unbind(2)  # (B, T, H, dh) each
        if cls_only:  # only the first token's output is used downstream: query it alone
            q = q[:, :1]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, q.shape[1], d))


class _Block(nn.Module):
    """Pre-LN Transformer block. ``glu`` selects ReGLU (FT-Transformer) over GELU for the FFN.

    DP cost: Opacus clips and noises per parameter *tensor* with Python loops (``scale_grad`` is
    even quadratic in their number), so for small models the tensor count weighs as much as the
    parameter count. The LayerNorms carry no affine (a gain/bias feeding a Linear folds
    into it) and only ``ffn_in`` keeps a bias (the activation threshold); the feature/byte tokens
    still carry biases. Measured (ew mode, same process): 27 → 15 tensors took ft-transformer from
    2.06× to 1.76× plain time at batch 64 and 1.68× to 1.52× at batch 256; test accuracy on a
    synthetic DP task 0.762 vs 0.755 (3 seeds, within noise).
    """

    def __init__(
        self, d_model: int, heads: int, ffn_mult: float, dropout: float, *, glu: bool, first_norm: bool
    ) -> None:
        super().__init__()
        hidden = max(1, round(d_model * ffn_mult))
        self.glu = glu
        # FT-Transformer drops the first block's attention LayerNorm (Gorishniy et al. 2021, §3.3).
        self.norm1: nn.Module = nn.LayerNorm(d_model, elementwise_affine=False) if first_norm else nn.Identity()
        self.attn = _Attention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False)
        self.ffn_in = nn.Linear(d_model, 2 * hidden if glu else hidden)
        self.ffn_out = nn.Linear(hidden, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        a = self.attn(self.norm1(x), mask, cls_only)
        x = (x[:, :1] if cls_only else x) + self.drop(a)
        z = self.ffn_in(self.norm2(x))
        if self.glu:
            z, gate = z.chunk(2, dim=-1)
            z = z * F.relu(gate)
        else:
            z = F.gelu(z)
        return x + self.drop(self.ffn_out(self.drop(z)))


def _sinusoids(max_len: int, d_model: int) -> torch.Tensor:
    """Fixed sinusoidal positions (Vaswani et al.): no parameters, so no per-sample gradients."""
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return pe


# --------------------------------------------------------------------------- models


class TextTransformer(nn.Module):
    """Byte-level Transformer encoder classifier (English, Chinese, any UTF-8 text).

    The vocabulary is the fixed 259-token byte tokenizer: no data-dependent vocabulary can leak
    a node's text, and a small embedding keeps per-sample gradients cheap. Padding (``PAD_ID``)
    is masked out of attention and pooling, so extra padding does not change the logits.
    """

    positions: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: float = 2.0,
        dropout: float = 0.0,
        max_len: int = 128,
        pooling: Literal["cls", "mean"] = "cls",
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.pooling = pooling
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.register_buffer("positions", _sinusoids(max_len, d_model), persistent=False)
        self.blocks = nn.ModuleList(
            _Block(d_model, heads, ffn_mult, dropout, glu=False, first_norm=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)  # its affine folds into the head
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: LongTensor (B, L), L ≤ max_len, ``[CLS] + bytes + PAD…``; returns logits (B, C)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"expected token ids of shape (batch, ≤{self.max_len}), got {tuple(tokens.shape)}")
        keep = tokens != PAD_ID  # (B, L)
        x = self.embed(tokens.contiguous()) + self.positions[: tokens.shape[1]]
        mask = keep[:, None, None, :]  # (B, 1, 1, L): True = attend
        cls_last = self.pooling == "cls"
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cls_only=cls_last and i == len(self.blocks) - 1)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            w = keep.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(self.norm(pooled))


class FTTransformer(nn.Module):
    """FT-Transformer (Gorishniy et al. 2021) for tabular data.

    Feature tokenizer: numeric feature j → ``x_j · W_j + b_j``; categorical feature j →
    ``E[offset_j + x_j] + b_j``; plus a [CLS] token. All of these vectors (W, b, E, CLS) are rows
    of ONE ``nn.Embedding`` looked up with per-sample row ids: Opacus has per-sample gradients for
    embeddings but not for a bare ``nn.Parameter``, and one table is one hook instead of four.
    The last block computes only the [CLS] token (the only output the head reads).

    A feature declared with ``missing = "token"`` learns what "missing" means: a categorical one has
    one more category (code = its number of categories), a numeric one a vector ``M_j`` that
    replaces ``x_j · W_j`` where ``x_j`` is NaN (one more table row per such feature, looked up for
    every row and masked, so each record's gradient stays its own).
    """

    fixed_ids: torch.Tensor
    num_pos: torch.Tensor
    cat_pos: torch.Tensor
    cat_offsets: torch.Tensor
    cat_sizes: torch.Tensor
    miss_pos: torch.Tensor
    miss_ids: torch.Tensor

    def __init__(
        self,
        categories: list[int | None],
        num_classes: int,
        *,
        missing: list[bool] | None = None,
        d_model: int = 32,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: float = 4 / 3,
        dropout: float = 0.0,
    ) -> None:
        """``categories[j]``: number of categories of feature j, ``None`` for a numeric feature;
        ``missing[j]``: feature j may be missing (``missing = "token"``); default none."""
        super().__init__()
        n_feat = len(categories)
        missing = missing or [False] * n_feat
        if len(missing) != n_feat:
            raise ValueError(f"missing has {len(missing)} entries for {n_feat} features")
        num_pos = [j for j, c in enumerate(categories) if c is None]
        cat_pos = [j for j, c in enumerate(categories) if c is not None]
        cat_sizes = [int(categories[j]) + int(missing[j]) for j in cat_pos]  # type: ignore[arg-type]
        miss_pos = [k for k, j in enumerate(num_pos) if missing[j]]  # among the numeric features
        n_num, n_cat = len(num_pos), len(cat_pos)
        # Table layout: [CLS] | W_num (n_num) | b (n_feat, numeric first) | E (sum of category counts) | M (missing)
        w_start, b_start, e_start = 1, 1 + n_num, 1 + n_num + n_feat
        m_start = e_start + sum(cat_sizes)
        self.n_num = n_num
        self.table = nn.Embedding(m_start + len(miss_pos), d_model)
        nn.init.normal_(self.table.weight, std=1.0 / math.sqrt(d_model))
        fixed = [0, *range(w_start, b_start), *range(b_start, e_start)]
        self.register_buffer("fixed_ids", torch.tensor(fixed, dtype=torch.long), persistent=False)
        self.register_buffer("num_pos", torch.tensor(num_pos, dtype=torch.long), persistent=False)
        self.register_buffer("cat_pos", torch.tensor(cat_pos, dtype=torch.long), persistent=False)
        offsets = [e_start + sum(cat_sizes[:i]) for i in range(n_cat)]
        self.register_buffer("cat_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("cat_sizes", torch.tensor(cat_sizes, dtype=torch.long), persistent=False)
        self.register_buffer("miss_pos", torch.tensor(miss_pos, dtype=torch.long), persistent=False)
        miss_ids = list(range(m_start, m_start + len(miss_pos)))
        self.register_buffer("miss_ids", torch.tensor(miss_ids, dtype=torch.long), persistent=False)
        self.n_features = n_feat
        self.blocks = nn.ModuleList(
            _Block(d_model, heads, ffn_mult, dropout, glu=True, first_norm=i > 0) for i in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float (B, F) in schema order; returns logits (B, C)."""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected features of shape (batch, {self.n_features}), got {tuple(x.shape)}")
        b = x.shape[0]
        ids = self.fixed_ids.expand(b, -1)
        if self.cat_pos.numel():
            cat = x[:, self.cat_pos].long()
            if bool(((cat < 0) | (cat >= self.cat_sizes)).any()):  # would silently read another row
                raise ValueError("categorical input outside its declared categories")
            ids = torch.cat([ids, cat + self.cat_offsets], dim=1)
        n_miss = self.miss_ids.numel()
        if n_miss:
            ids = torch.cat([ids, self.miss_ids.expand(b, -1)], dim=1)
        e = self.table(ids.contiguous())  # (B, 1 + n_num + F + n_cat + n_miss, d)
        n, f, c = self.n_num, self.n_features, self.cat_pos.numel()
        cls, w, bias, emb = e[:, :1], e[:, 1 : 1 + n], e[:, 1 + n : 1 + n + f], e[:, 1 + n + f : 1 + n + f + c]
        xn = x[:, self.num_pos]
        if not n_miss:
            num = w * xn.unsqueeze(-1)
        else:  # a NaN numeric value takes its feature's "missing" vector instead of x · W
            gone = torch.isnan(xn[:, self.miss_pos]).unsqueeze(-1).to(e.dtype)  # (B, n_miss, 1)
            num = (w * torch.nan_to_num(xn, nan=0.0).unsqueeze(-1)).index_add(1, self.miss_pos, e[:, -n_miss:] * gone)
        h = torch.cat([cls, torch.cat([num, emb], dim=1) + bias], dim=1)  # (B, 1 + F, d)
        for i, block in enumerate(self.blocks):
            h = block(h, None, cls_only=i == len(self.blocks) - 1)
        return self.head(F.relu(self.norm(h[:, 0])))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: the task it serves, its defaults and the fastest measured DP mode."""

    name: str
    task: Literal["text", "tabular"]
    summary: str
    #: Every accepted hyper-parameter with its default (read-only).
    defaults: Mapping[str, Any]
    #: Opacus ``grad_sample_mode`` measured fastest at the default size (bench/dp_overhead.py); ``auto``
    #: uses it for pretrained models and FedGuard's exact book-keeping path (``bk``) for the others.
    default_grad_sample_mode: str
    factory: Callable[[DataSchema, dict[str, Any]], nn.Module] = field(repr=False)
    #: Built from a pretrained checkpoint: the client runs ``client.preflight`` before training.
    pretrained: bool = False


def _build_text(schema: DataSchema, p: dict[str, Any]) -> nn.Module:
    return TextTransformer(schema.num_classes, **{k: v for k, v in p.items() if k != "read"})  # read: the encoder's


def _build_pretrained(finetune: str) -> Callable[[DataSchema, dict[str, Any]], nn.Module]:
    def build(schema: DataSchema, p: dict[str, Any]) -> nn.Module:
        from common.pretrained import PretrainedTextClassifier  # needs the optional [pretrained] extra

        return PretrainedTextClassifier(schema.num_classes, finetune=finetune, **p)

    return build


def _build_tabular(schema: DataSchema, p: dict[str, Any]) -> nn.Module:
    cats = [len(f.categories) if f.type == "categorical" and f.categories else None for f in schema.features]
    return FTTransformer(cats, schema.num_classes, missing=[f.missing == "token" for f in schema.features], **p)


#: What the pretrained MiniLM models read of a text: 128 word pieces (the length MiniLM was trained
#: at) of its first 768 UTF-8 bytes (about 150 English word pieces, so the bytes rarely cut first).
#: 64 pieces of 256 bytes until 2026-12-06: a news article (median 1,954 bytes) was read as its
#: headline and first sentence; reading 128 took 5-node BBC news at ε = 8 from 0.940 to 0.954 (IID)
#: and 0.939 to 0.954 (Dirichlet 0.5; seeds 1-3, bench/text_utility.py) for about 15% more time per
#: round. Texts shorter than the limit cost nothing more (batches are padded to their longest text).
_PRETRAINED_MAX_LEN = 768
_PRETRAINED_MAX_TOKENS = 128
#: Which part of a longer text they read: its first and last 63 word pieces (of its first and last 383
#: bytes), since 2026-12-06; its first 126 before. A review's verdict often comes last (Sun et al. 2019):
#: IMDB at ε = 8, 3 nodes, seeds 1-3, 0.754 → 0.786 (IID) and 0.743 → 0.781 (Dirichlet 0.5), better on
#: every seed; BBC news (whose headline comes first) −0.18 points on average over its 12 runs (standard
#: error 0.18; bench/text_utility.py). The same cost per step. Texts that fit are read whole either way
#: (every review snippet of that bench), so only long texts see a change.
_PRETRAINED_READ = "head+tail"
#: MiniLM's position table: it cannot read more word pieces than this.
_PRETRAINED_POSITIONS = 512


MODELS: dict[str, ModelSpec] = {
    "text-transformer": ModelSpec(
        name="text-transformer",
        task="text",
        summary="byte-level Transformer encoder classifier (any UTF-8 language)",
        defaults=MappingProxyType(
            {
                "d_model": 64,
                "layers": 2,
                "heads": 4,
                "ffn_mult": 2.0,
                "dropout": 0.0,
                "max_len": 128,
                "read": "head",
                "pooling": "cls",
            }
        ),
        default_grad_sample_mode="ew",
        factory=_build_text,
    ),
    "ft-transformer": ModelSpec(
        name="ft-transformer",
        task="tabular",
        summary="FT-Transformer for numeric and categorical features",
        defaults=MappingProxyType({"d_model": 32, "layers": 2, "heads": 4, "ffn_mult": 4 / 3, "dropout": 0.0}),
        default_grad_sample_mode="ew",
        factory=_build_tabular,
    ),
    # Pretrained all-MiniLM-L6-v2 (optional extra ``fedguard[pretrained]``; common/pretrained.py). It reads
    # _PRETRAINED_MAX_TOKENS word pieces of _PRETRAINED_MAX_LEN bytes of each text, a long one's head and tail.
    # FFA-LoRA by default (freeze_lora_a: A fixed from a public seed, only B and the head train and travel).
    # hooks: LoRA DP costs 0.97× plain, i.e. nothing measurable (bench/pretrained.py, batch 32: frozen base,
    # no per-sample embedding gradients); ghost 1.46× (its second backward pass is not worth it for 37.6k
    # parameters).
    "minilm-lora": ModelSpec(
        name="minilm-lora",
        task="text",
        summary="pretrained all-MiniLM-L6-v2 (English) with LoRA adapters; only adapter B's + head train and travel",
        defaults=MappingProxyType(
            {
                "lora_rank": 8,
                "lora_alpha": 16.0,
                "lora_dropout": 0.0,
                "freeze_lora_a": True,
                "max_len": _PRETRAINED_MAX_LEN,
                "max_tokens": _PRETRAINED_MAX_TOKENS,
                "read": _PRETRAINED_READ,
                "base_sha256": _BASE_SHA256,
            }
        ),
        default_grad_sample_mode="hooks",
        factory=_build_pretrained("lora"),
        pretrained=True,
    ),
    # Full fine-tuning (token-embedding table frozen by default): 10.8M parameters per update, ~290× the
    # LoRA upload. bench/pretrained.py, batch 32: ghost 2.03× plain, hooks 2.61× (and batch × 10.8M
    # per-sample gradients in memory); with the table trained (22.6M) ghost 2.11×, hooks 4.64×.
    "minilm-full": ModelSpec(
        name="minilm-full",
        task="text",
        summary="pretrained all-MiniLM-L6-v2 (English), full fine-tuning with ghost clipping (10.8M parameters)",
        defaults=MappingProxyType(
            {
                "max_len": _PRETRAINED_MAX_LEN,
                "max_tokens": _PRETRAINED_MAX_TOKENS,
                "read": _PRETRAINED_READ,
                "freeze_embeddings": True,
                "base_sha256": _BASE_SHA256,
            }
        ),
        default_grad_sample_mode="ghost",
        factory=_build_pretrained("full"),
        pretrained=True,
    ),
}

_CHOICES: dict[str, tuple[str, ...]] = {"pooling": ("cls", "mean"), "read": READS}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DEFAULT_MAX_LEN = 128  # what the encoder gets for models that take no max_len (ignored for tabular)


def _check_params(spec: ModelSpec, given: dict[str, Any]) -> dict[str, Any]:
    where = f"model {spec.name!r}"
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise ModelError(
            f"unknown hyper-parameter(s) {unknown}",
            where=where,
            fix=f"use only: {', '.join(sorted(spec.defaults))}",
        )
    p = {**spec.defaults, **given}
    for key, value in p.items():
        default = spec.defaults[key]
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ModelError(f"{key} must be one of {list(_CHOICES[key])}, got {value!r}", where=where)
        elif key == "base_sha256":
            if not isinstance(value, str) or not _HEX64.match(value.lower()):
                raise ModelError(
                    f"base_sha256 must be 64 hex digits, got {value!r}",
                    where=where,
                    fix="leave it unset (the pinned package's checksum) or copy `sha256sum model.safetensors`",
                )
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ModelError(f"{key} must be true or false, got {value!r}", where=where)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{key} must be a positive integer, got {value!r}", where=where)
        elif key.endswith("dropout"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ModelError(f"{key} must be a number in [0, 1), got {value!r}", where=where)
        elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ModelError(f"{key} must be a positive number, got {value!r}", where=where)
    if "d_model" in p and p["d_model"] % p["heads"]:
        raise ModelError(
            f"d_model ({p['d_model']}) is not divisible by heads ({p['heads']})",
            where=where,
            fix="pick d_model a multiple of heads, e.g. d_model = 64 with heads = 4",
        )
    if "max_len" in p and p["max_len"] < 2:
        raise ModelError(f"max_len must be ≥ 2 ([CLS] plus one byte), got {p['max_len']}", where=where)
    if p.get("read") == "head+tail" and p.get("max_len", _DEFAULT_MAX_LEN) < 4:
        raise ModelError(
            f'read = "head+tail" needs max_len ≥ 4 ([CLS], a byte of the head, the cut, one of the tail), '
            f"got {p['max_len']}",
            where=where,
        )
    if spec.pretrained and p.get("max_tokens", 3) < 3:
        raise ModelError(f"max_tokens must be ≥ 3 ([CLS], one word piece, [SEP]), got {p['max_tokens']}", where=where)
    if spec.pretrained and p.get("max_tokens", 0) > _PRETRAINED_POSITIONS:
        raise ModelError(
            f"max_tokens must be at most {_PRETRAINED_POSITIONS} (MiniLM's position table), got {p['max_tokens']}",
            where=where,
            fix=f"set max_tokens to {_PRETRAINED_POSITIONS} or less",
        )
    if spec.task == "text" and "d_model" in p and p["d_model"] % 2:
        raise ModelError(f"d_model must be even (sinusoidal positions), got {p['d_model']}", where=where)
    return p


def _spec(name: str) -> ModelSpec:
    spec = MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}", fix=f"choose one of: {', '.join(sorted(MODELS))}")
    return spec


def text_encoding(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """How the data encoder must encode texts for this model: ``max_len`` (bytes) and ``read`` (the
    part of a longer text kept), as keyword arguments of ``common.data.encode``/``load_encoded``;
    ``max_len`` 128 and ``read`` "head" for models without them (tabular ignores both).

    The one source for every side (node, evaluator, CLI): a model trained on heads and tails must be
    scored on heads and tails. Checked like ``build_model``, so a bad name or parameter fails before
    any data is read.
    """
    p = _check_params(_spec(name), dict(params or {}))
    return {"max_len": int(p.get("max_len", _DEFAULT_MAX_LEN)), "read": str(p.get("read", "head"))}


#: Share of a node's training texts read only in part above which the node says so (``long_text_note``).
LONG_TEXT_SHARE = 0.1


def long_text_note(model: nn.Module, tokens: torch.Tensor, name: str) -> str | None:
    """What a node says, once per run, when ``model`` reads only part of more than
    ``LONG_TEXT_SHARE`` of its training texts ``tokens`` (byte ids), and what to change; else None.

    Why: a model that reads a review's first hundred words misses a verdict at its end, and nothing
    else would tell the data owner (``minilm-lora`` reads 88% of IMDB reviews and 40% of drug reviews
    in part, ``bench/text_utility.py``'s sets). Computed and printed on the node only; nothing leaves it.
    """
    n = int(tokens.shape[0])
    if n == 0:
        return None
    cut_rows = getattr(model, "cut_rows", None)
    cut = int((cut_rows(tokens) if callable(cut_rows) else filled_rows(tokens)).sum())
    if cut <= LONG_TEXT_SHARE * n:
        return None
    body = int(tokens.shape[1]) - 1  # [CLS] + bytes
    pieces = getattr(model, "max_tokens", None)
    both = (getattr(model, "hparams", None) or {}).get("read") == "head+tail"
    longer = "a round then takes about proportionally longer"

    def ends(n: int, unit: str) -> str:  # "first and last 63 bytes", or "first 64 and last 63 bytes"
        a, b = halves(n)
        return f"first and last {a:,} {unit}" if a == b else f"first {a:,} and last {b:,} {unit}"

    if pieces is not None:
        reads = (
            f"the {ends(pieces - 2, 'word pieces')}, about {(pieces - 2) * 3 // 4} English words, "
            f"of each text's {ends(body - 1, 'bytes')}"
            if both
            else f"the first {pieces} word pieces, about {pieces * 3 // 4} English words, of at most {body:,} bytes"
        )
        raise_it = (
            f"raise [model.params] max_tokens and max_len together (e.g. {2 * pieces} and {2 * (body + 1):,}; "
            f"MiniLM reads at most 512 pieces; {longer})"
        )
        end_too = f"each text's {ends(pieces - 2, 'pieces')}"
    else:
        reads = f"the {ends(body - 1, 'bytes')}" if both else f"the first {body:,} bytes"
        raise_it, end_too = f"raise [model.params] max_len ({longer})", f"each text's {ends(body - 1, 'bytes')}"
    if both:
        gist, where, change = "it skips their middles", "in the middle of a text", raise_it
    else:
        gist, where = "it learns from their beginnings only", "later in a text"
        change = f'set [model.params] read = "head+tail" to read {end_too} at about the same cost, or {raise_it}'
    return (
        f"{cut:,} of {n:,} training texts on this node ({cut / n:.0%}) are longer than {name} reads ({reads}): "
        f"{gist}. If what decides the label can come {where}, {change}"
    )


def build_model(name: str, schema: DataSchema, params: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model for ``schema``; ``params`` override the spec's defaults."""
    spec = _spec(name)
    if spec.task != schema.task:
        fits = [n for n, s in sorted(MODELS.items()) if s.task == schema.task]
        raise ModelError(
            f"model {name!r} is for {spec.task} data but the schema's task is {schema.task!r}",
            fix=f"for {schema.task} data use: {', '.join(fits)}",
        )
    hparams = _check_params(spec, dict(params or {}))
    model = spec.factory(schema, hparams)
    model.hparams = hparams  # type: ignore[assignment]  # read by describe_model
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (what DP-SGD clips and noises, and what a round uploads)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_model(name: str, model: nn.Module) -> str:
    """One line for users, e.g. ``ft-transformer: 25,730 trainable parameters (d_model=32, …)``."""
    hp = getattr(model, "hparams", None)
    extra = ""
    if isinstance(hp, dict) and hp:
        fmt = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in hp.items()}
        extra = " (" + ", ".join(f"{k}={v}" for k, v in fmt.items()) + ")"
    return f"{name}: {count_parameters(model):,} trainable parameters{extra}"


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N`` (``common.devices.resolve_device``); an absent GPU is an error."""
    return resolve_device(requested)
