"""The federated-fairness counts release: per-group confusion tables on a node, noised, then summed.

A node computes its tables on its validation split, drops its small groups, and releases them
through a Gaussian mechanism whose σ comes from :func:`common.privacy.counts_mechanism` and is
charged to its ledger; the server only ever sums them (:func:`merge_counts`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from common.fairness.config import _Model
from common.fairness.metrics import CELLS, OVERALL, Counts, _binary, _cell_index, _confusion, _tables
from common.privacy import counts_mechanism


class NoisyCounts(_Model):
    """Counts that may leave a node in plaintext mode, and the Gaussian mechanism that noised them."""

    counts: Counts
    mechanism: Literal["gaussian"] = "gaussian"
    noise_multiplier: float  # z: the ledger charges one Gaussian release with this multiplier, q = 1
    sensitivity: float  # L2 sensitivity of the whole table set (add/remove one record): √tables
    sigma: float  # std of every cell's noise: z · sensitivity
    threshold: float  # a group leaves only if its noisy size reaches this
    selection_delta: float  # what the threshold adds to δ (the choice of released groups)


def group_confusion_counts(
    y_true: np.ndarray | Sequence[int],
    y_pred: np.ndarray | Sequence[int],
    groups: Mapping[str, np.ndarray | Sequence[object]],
    min_group_size: int,
    intersections: list[tuple[str, str]] | None = None,
) -> Counts:
    """A node's confusion tables per group, per attribute and intersection, plus the all-rows table.

    Every table the config defines is present (possibly empty), so the table set — and with it the
    noise sensitivity — does not depend on the data. A group with fewer than ``min_group_size``
    rows on this node is omitted entirely: it never leaves the node.
    """
    if min_group_size < 1:
        raise ValueError("min_group_size must be at least 1")
    y, yhat = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    if y.size != yhat.size:
        raise ValueError(f"y_true has {y.size} rows and y_pred {yhat.size}")
    cells = _cell_index(y, yhat)
    total = np.bincount(cells, minlength=4)
    out: Counts = {OVERALL: {OVERALL: [int(c) for c in total]} if y.size >= min_group_size else {}}
    for name, _, labels, codes in _tables(groups, y.size, intersections):
        tables = _confusion(codes, len(labels), cells)
        out[name] = {
            str(label): [int(c) for c in row]
            for label, row in zip(labels, tables, strict=True)
            if row.sum() >= min_group_size
        }
    return out


def release_threshold(min_group_size: int, sigma: float, selection_delta: float, tables: int) -> float:
    """Noisy size a group must reach to leave a node, so the *choice* of groups costs at most δ_sel.

    A neighbouring dataset can move at most one group per table across the true-size cut at
    ``min_group_size``; such a group (true size = minimum) passes only if the sum of its four
    Gaussian noises, N(0, 4σ²), reaches ``threshold − min_group_size``. Asking for
    ``selection_delta / tables`` per table (union bound) gives ``min + 2σ·Φ⁻¹(1 − δ_sel/T)``.
    """
    z = statistics.NormalDist().inv_cdf(1.0 - selection_delta / max(1, tables))
    return float(min_group_size + 2.0 * sigma * z)


def noisy_counts(
    counts: Counts,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    *,
    min_group_size: int,
    selection_delta: float = 1e-7,
) -> NoisyCounts:
    """Gaussian mechanism on a node's confusion tables: the counts to send and what to charge.

    Sensitivity and σ come from :func:`common.privacy.counts_mechanism`: under add/remove-one-record
    adjacency (the DP-SGD unit) the ``T`` tables (attributes + intersections + the all-rows table)
    have L2 sensitivity ``√T``, and every cell gets independent N(0, σ²) noise with ``σ = z·√T``.
    That is one Gaussian release with noise multiplier ``z`` and
    no subsampling, so the node's ledger composes it with its DP-SGD releases through the same
    RDP accountant (``Release(noise_multiplier=z, sample_rate=1, steps=1)``). The set of groups
    released would leak through the true-size cut, so a group also needs a noisy size (sum of its
    noised cells) of at least :func:`release_threshold`, which adds ``selection_delta`` to δ.
    Noisy cells are rounded to integers (post-processing) and not clipped at zero, so sums over
    clients stay unbiased.

    ``rng`` must be seeded from OS entropy on the node (the default), never from the config seed:
    seeded noise is predictable and not private.
    """
    mechanism = counts_mechanism(noise_multiplier, len(counts))  # raises on a non-positive z
    if not 0.0 < selection_delta < 1.0:
        raise ValueError(f"selection_delta must be in (0, 1), got {selection_delta}")
    rng = rng if rng is not None else np.random.default_rng()  # OS entropy
    tables = max(1, len(counts))
    sigma = mechanism.sigma
    threshold = release_threshold(min_group_size, sigma, selection_delta, tables)
    out: Counts = {}
    for table, rows in counts.items():
        out[table] = {}
        for group, cells in rows.items():
            if sum(cells) < min_group_size:
                continue  # the node's own cut; group_confusion_counts already applies it
            noisy = np.asarray(cells, dtype=np.float64) + rng.normal(0.0, sigma, size=4)
            if noisy.sum() >= threshold:
                out[table][group] = [int(v) for v in np.rint(noisy)]
    return NoisyCounts(
        counts=out,
        noise_multiplier=noise_multiplier,
        sensitivity=mechanism.sensitivity,
        sigma=sigma,
        threshold=threshold,
        selection_delta=selection_delta,
    )


def merge_counts(parts: Iterable[Counts]) -> Counts:
    """Cell-wise sums over clients (union of tables and groups; a group a client omitted adds nothing)."""
    totals: Counts = {}
    for part in parts:
        for table, rows in part.items():
            dest = totals.setdefault(table, {})
            for group, cells in rows.items():
                if len(cells) != 4:
                    raise ValueError(f"counts for {table}/{group} need 4 cells {CELLS}, got {len(cells)}")
                acc = dest.setdefault(group, [0, 0, 0, 0])
                for i, c in enumerate(cells):
                    acc[i] += int(c)
    return totals
