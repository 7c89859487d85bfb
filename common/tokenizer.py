"""A fixed byte-level tokenizer: the vocabulary is the 256 byte values, never learned from data.

A vocabulary built from one node's private text would leak it (and nodes would disagree on ids);
UTF-8 bytes cover every language, Chinese included, with the same ids on every node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.errors import ConfigError

PAD_ID = 0
CLS_ID = 1
#: Between a long text's head and tail in ``read = "head+tail"`` (the middle left out there); byte
#: value b has id b + BYTE_OFFSET.
CUT_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET
#: What a text model reads of a text longer than its input: its beginning, or its beginning and its
#: end (Sun et al. 2019 found head+tail best for long IMDB reviews: a verdict often comes last).
READS = ("head", "head+tail")


def halves(n: int) -> tuple[int, int]:
    """How ``read = "head+tail"`` splits a budget of ``n`` bytes or word pieces: head, tail."""
    return n - n // 2, n // 2


def encode_texts(texts: Sequence[str], max_len: int, read: str = "head") -> torch.Tensor:
    """Encode texts as ``[CLS] + UTF-8 bytes``, right-padded with PAD to ``max_len``.

    A text longer than ``max_len - 1`` bytes is cut: ``read = "head"`` keeps its first bytes,
    ``"head+tail"`` its first and last ``halves(max_len - 2)`` bytes, ``CUT_ID`` between. Returns a
    LongTensor of shape (len(texts), max_len). A cut may split a multi-byte character; that is
    harmless for a byte-level model, and the pretrained model's decoder drops the broken character.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be at least 1, got {max_len}", fix="set max_len to e.g. 128")
    if read not in READS:
        raise ConfigError(f"read must be one of {list(READS)}, got {read!r}", fix='set read = "head" or "head+tail"')
    both = read == "head+tail"
    if both and max_len < 4:
        raise ConfigError(f'read = "head+tail" needs max_len ≥ 4, got {max_len}', fix="raise max_len")
    body = max_len - 1
    raw = [(t if isinstance(t, str) else str(t)).encode("utf-8", errors="replace") for t in texts]
    head, tail = halves(body - 1)  # head+tail: head bytes, CUT_ID, tail bytes
    was_cut = np.fromiter((len(c) > body for c in raw), dtype=bool, count=len(raw))
    # b"\0" holds the cut's place; it becomes CUT_ID below (a byte value cannot be CUT_ID).
    chunks = [
        c[:head] + b"\0" + c[len(c) - tail :] if both and cut else c[:body] for c, cut in zip(raw, was_cut, strict=True)
    ]
    n = len(chunks)
    out = np.full((n, max_len), PAD_ID, dtype=np.int64)
    if n == 0:
        return torch.from_numpy(out)
    out[:, 0] = CLS_ID
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=n)
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    # A boolean mask assignment fills True cells in row-major order, i.e. text by text.
    mask = np.arange(body)[None, :] < lengths[:, None]
    out[:, 1:][mask] = flat
    if both:
        out[was_cut, 1 + head] = CUT_ID
    return torch.from_numpy(out)


def filled_rows(tokens: torch.Tensor) -> torch.Tensor:
    """Rows of ``encode_texts`` output with no PAD left at the end: texts cut to ``max_len`` (or that
    fill it exactly), whose model reads them only in part. Bool (B,)."""
    return tokens[:, -1] != PAD_ID
