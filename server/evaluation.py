"""Server-side evaluation hook: score the global model on a held-out split after each round."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.data import Encoded


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 512) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and macro-F1 on ``data``."""
    model.eval()
    losses, preds = [], []
    for i in range(0, len(data), batch_size):
        logits = model(data.x[i : i + batch_size])
        y = data.y[i : i + batch_size]
        losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").item())
        preds.append(logits.argmax(-1))
    y_true = data.y.numpy()
    y_pred = torch.cat(preds).numpy()
    f1s = []
    for c in np.unique(np.concatenate([y_true, y_pred])):
        tp = np.sum((y_pred == c) & (y_true == c))
        denom = np.sum(y_pred == c) + np.sum(y_true == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "loss": float(sum(losses) / len(data)),
        "macro_f1": float(np.mean(f1s)),
        "n": float(len(data)),
    }
