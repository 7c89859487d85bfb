"""Splitting one dataset into simulated client datasets (simulation only; real nodes hold their own).

Every partitioner returns row indices with each row in exactly one part, sorted within a part,
and is deterministic given its seed, so a simulated federation can be rerun exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from common.data import group_keys
from common.errors import ConfigError, closest_name
from common.schema import DataSchema


def _check_parts(n: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ConfigError(f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1")
    if num_parts > n:
        raise ConfigError(
            f"cannot split {n} rows into {num_parts} partitions (more partitions than rows)",
            fix="use fewer partitions or a larger dataset",
        )


def iid(n: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Uniformly random parts of near-equal size (sizes differ by at most one)."""
    _check_parts(n, num_parts)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_parts)]


def dirichlet(
    labels: Sequence[Any] | np.ndarray, num_parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed parts by the usual definition: each class is spread over the parts in Dir(alpha) shares.

    For every class (in sorted label order) one draw ``p ~ Dir(alpha, ..., alpha)`` over the
    ``num_parts`` parts; the class's rows, shuffled, are cut at the cumulative shares of ``p``. No
    part is capped, so small ``alpha`` (0.1) leaves most parts with one or two classes and very
    different sizes, and large ``alpha`` (100) approaches an IID split. ``seed`` fixes the draws:
    the same labels, parts, alpha and seed always give the same split.

    Every part ends with at least ``min_size`` rows: while a part has fewer, one row (drawn by the
    same seeded generator) moves to it from the part with the most rows. That changes the draw by
    the fewest rows possible and never fails when ``min_size * num_parts`` rows exist.
    """
    keys = group_keys(np.asarray(labels, dtype=object))
    n = len(keys)
    _check_parts(n, num_parts)
    if alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}", fix="use e.g. 0.5 (smaller = more skew)")
    if min_size < 0 or min_size * num_parts > n:
        raise ConfigError(
            f"cannot give each of {num_parts} partitions at least {min_size} of {n} rows",
            fix="use fewer partitions or a smaller min_size",
        )
    _, codes = np.unique(keys, return_inverse=True)
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for k in range(int(codes.max()) + 1):
        idx = rng.permutation(np.flatnonzero(codes == k))
        shares = rng.dirichlet(np.full(num_parts, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for j, chunk in enumerate(np.split(idx, cuts)):
            chunks[j].append(chunk)
    parts = [list(np.concatenate(c)) for c in chunks]
    sizes = [len(p) for p in parts]
    while min(sizes) < min_size:
        short, donor = int(np.argmin(sizes)), int(np.argmax(sizes))
        parts[short].append(parts[donor].pop(int(rng.integers(sizes[donor]))))
        sizes[short], sizes[donor] = sizes[short] + 1, sizes[donor] - 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_shares(labels: Sequence[Any] | np.ndarray | pd.Series, classes: Sequence[str]) -> dict[str, float]:
    """Share of each declared class among ``labels`` (1, 1.0 and "1" count as class "1")."""
    keys = group_keys(labels if isinstance(labels, pd.Series) else np.asarray(labels, dtype=object))
    total = max(len(keys), 1)
    return {c: float(np.count_nonzero(keys == c)) / total for c in classes}


def simulated_node_name(partition: int) -> str:
    """The simulated node holding partition ``partition``: its name in round lines and its work folder's."""
    return f"node-{partition}"


def describe_parts(parts: Sequence[pd.DataFrame], label: str, classes: Sequence[str]) -> list[str]:
    """One line per simulated node: its name, rows and label shares (what that node will train on)."""
    lines = []
    for i, part in enumerate(parts):
        shares = label_shares(part[label], classes)
        shown = ", ".join(f"{c} {share:.0%}" for c, share in shares.items())
        present = sum(share > 0 for share in shares.values())
        note = " (one class only)" if present == 1 else ""
        lines.append(f"  {simulated_node_name(i)}: {len(part)} rows; labels {shown}{note}")
    return lines


def by_column(values: Sequence[Any] | np.ndarray | pd.Series, num_parts: int | None = None) -> list[np.ndarray]:
    """Natural split: one part per distinct value (sorted as strings; missing is the value "missing").

    With ``num_parts`` below the number of distinct values, the sorted values are dealt round-robin.
    """
    keys = group_keys(values if isinstance(values, pd.Series) else np.asarray(values, dtype=object))
    distinct, codes = np.unique(keys, return_inverse=True)
    if num_parts is None:
        num_parts = len(distinct)
    if num_parts < 1:
        raise ConfigError(f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1")
    if len(distinct) < num_parts:
        raise ConfigError(
            f"the column has {len(distinct)} distinct value(s), fewer than the {num_parts} partitions asked for",
            fix="use at most that many partitions, or another partitioning",
        )
    part_of = codes % num_parts
    return [np.flatnonzero(part_of == j) for j in range(num_parts)]


def partition_frame(
    df: pd.DataFrame,
    schema: DataSchema,
    kind: Literal["iid", "dirichlet", "column"],
    num_parts: int,
    seed: int,
    alpha: float = 0.5,
    column: str | None = None,
) -> list[pd.DataFrame]:
    """Split a table into ``num_parts`` client tables (index reset, so error rows count from 1 per part).

    ``dirichlet`` skews the schema's label column; ``column`` splits by ``column`` (e.g. a site id).
    """
    if num_parts < 1:
        raise ConfigError(f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1")
    if num_parts > len(df):
        raise ConfigError(
            f"cannot split {len(df)} rows into {num_parts} partitions (more partitions than rows)",
            fix="use fewer partitions or a larger dataset",
        )
    if kind == "iid":
        parts = iid(len(df), num_parts, seed)
    elif kind == "dirichlet":
        if alpha <= 0:
            raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}", fix="use e.g. 0.5 (smaller = more skew)")
        if schema.label not in df.columns:
            raise ConfigError(
                f"label column {schema.label!r} is not in the data",
                fix="check the schema's label against the data's columns",
            )
        parts = dirichlet(df[schema.label].to_numpy(dtype=object), num_parts, alpha, seed)
    elif kind == "column":
        if not column:
            raise ConfigError("partitioning by column needs a column name", fix="set the partition column")
        if column not in df.columns:
            have = [str(c) for c in df.columns]
            close = closest_name(column, have)
            raise ConfigError(
                f"partition column {column!r} is not in the data (columns: {', '.join(have)})",
                where="simulation.column",
                fix=f"did you mean {close!r}? (names are case-sensitive)" if close else "use one of the data's columns",
            )
        parts = by_column(df[column], num_parts)
    else:
        raise ConfigError(f"unknown partitioning {kind!r}", fix='use one of "iid", "dirichlet" or "column"')
    return [df.iloc[idx].reset_index(drop=True) for idx in parts]
