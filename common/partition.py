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
from common.errors import ConfigError
from common.schema import DataSchema

#: Dirichlet draws to try before giving up on ``min_size``.
MAX_DIRICHLET_TRIES = 100


def _check_parts(n: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ConfigError(
            f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1"
        )
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
    """Label-skewed parts: each class is spread over the parts in Dir(alpha) proportions.

    Small alpha gives each part few classes, large alpha approaches IID. As in the usual scheme
    (Hsu et al. 2019; NIID-Bench), a part already holding its fair share n/num_parts gets no more
    rows, and the whole draw is repeated until every part has ``min_size`` rows.
    """
    keys = group_keys(np.asarray(labels, dtype=object))
    n = len(keys)
    _check_parts(n, num_parts)
    if alpha <= 0:
        raise ConfigError(
            f"Dirichlet alpha must be > 0, got {alpha}", fix="use e.g. 0.5 (smaller = more skew)"
        )
    if min_size < 0 or min_size * num_parts > n:
        raise ConfigError(
            f"cannot give each of {num_parts} partitions at least {min_size} of {n} rows",
            fix="use fewer partitions or a smaller min_size",
        )
    _, codes = np.unique(keys, return_inverse=True)
    by_class = [np.flatnonzero(codes == k) for k in range(int(codes.max()) + 1)]
    rng = np.random.default_rng(seed)
    fair = n / num_parts
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        sizes = np.zeros(num_parts, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_parts, alpha)) * (sizes < fair)
            total = props.sum()
            props = props / total if total > 0 else np.full(num_parts, 1.0 / num_parts)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]
    raise ConfigError(
        f"no Dirichlet split (alpha={alpha}) gave all {num_parts} partitions at least {min_size} rows "
        f"in {MAX_DIRICHLET_TRIES} tries",
        fix="use a larger alpha, fewer partitions, or a smaller min_size",
    )


def by_column(
    values: Sequence[Any] | np.ndarray | pd.Series, num_parts: int | None = None
) -> list[np.ndarray]:
    """Natural split: one part per distinct value (sorted as strings; missing is the value "missing").

    With ``num_parts`` below the number of distinct values, the sorted values are dealt round-robin.
    """
    keys = group_keys(values if isinstance(values, pd.Series) else np.asarray(values, dtype=object))
    distinct, codes = np.unique(keys, return_inverse=True)
    if num_parts is None:
        num_parts = len(distinct)
    if num_parts < 1:
        raise ConfigError(
            f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1"
        )
    if len(distinct) < num_parts:
        raise ConfigError(
            f"the column has {len(distinct)} distinct value(s), fewer than the {num_parts} partitions "
            "asked for",
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
        raise ConfigError(
            f"number of partitions must be at least 1, got {num_parts}", fix="set num_parts >= 1"
        )
    if num_parts > len(df):
        raise ConfigError(
            f"cannot split {len(df)} rows into {num_parts} partitions (more partitions than rows)",
            fix="use fewer partitions or a larger dataset",
        )
    if kind == "iid":
        parts = iid(len(df), num_parts, seed)
    elif kind == "dirichlet":
        if alpha <= 0:
            raise ConfigError(
                f"Dirichlet alpha must be > 0, got {alpha}", fix="use e.g. 0.5 (smaller = more skew)"
            )
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
            have = ", ".join(map(str, df.columns))
            raise ConfigError(
                f"partition column {column!r} is not in the data (columns: {have})",
                fix="use one of the data's columns",
            )
        parts = by_column(df[column], num_parts)
    else:
        raise ConfigError(f"unknown partitioning {kind!r}", fix='use one of "iid", "dirichlet" or "column"')
    return [df.iloc[idx].reset_index(drop=True) for idx in parts]
