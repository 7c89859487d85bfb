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
#: Id 2 is reserved (e.g. a future SEP/MASK token); byte value b has id b + BYTE_OFFSET.
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def encode_texts(texts: Sequence[str], max_len: int) -> torch.Tensor:
    """Encode texts as ``[CLS] + UTF-8 bytes``, truncated to ``max_len`` and right-padded with PAD.

    Returns a LongTensor of shape (len(texts), max_len). Truncation may cut a multi-byte
    character; that is harmless for a byte-level model.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be at least 1, got {max_len}", fix="set max_len to e.g. 128")
    body = max_len - 1
    chunks = [(t if isinstance(t, str) else str(t)).encode("utf-8", errors="replace")[:body] for t in texts]
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
    return torch.from_numpy(out)


def filled_rows(tokens: torch.Tensor) -> torch.Tensor:
    """Rows of ``encode_texts`` output with no PAD left at the end: texts cut to ``max_len`` (or that
    fill it exactly), whose model reads only their beginning. Bool (B,)."""
    return tokens[:, -1] != PAD_ID
