"""Simulation partitioners: every row in exactly one part, deterministic, and the intended skew."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError
from common.partition import by_column, describe_parts, dirichlet, iid, label_shares, partition_frame
from common.schema import DataSchema

SCHEMA = DataSchema(task="text", text_column="text", label="label", classes=["0", "1", "2", "3"])


def labels(n: int = 2000, k: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    assert sum(len(p) for p in parts) == n
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # disjoint and complete


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid() -> None:
    parts = iid(103, 5, seed=1)
    assert_partition(parts, 103)
    assert {len(p) for p in parts} == {20, 21}
    assert same(parts, iid(103, 5, seed=1))
    assert not same(parts, iid(103, 5, seed=2))


def test_dirichlet_partition_properties() -> None:
    y = labels()
    parts = dirichlet(y, 8, alpha=0.5, seed=3)
    assert_partition(parts, len(y))
    assert min(len(p) for p in parts) >= 1
    assert same(parts, dirichlet(y, 8, alpha=0.5, seed=3))
    assert not same(parts, dirichlet(y, 8, alpha=0.5, seed=4))
    big = dirichlet(y, 8, alpha=0.5, seed=3, min_size=50)
    assert_partition(big, len(y))
    assert min(len(p) for p in big) >= 50


def class_shares(y: np.ndarray, parts: list[np.ndarray], k: int = 4) -> np.ndarray:
    """shares[c, j]: the fraction of class c's rows that part j holds."""
    counts = np.stack([np.bincount(y[p], minlength=k) for p in parts], axis=1)
    return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_splits_each_class_in_dirichlet_shares() -> None:
    """Per class, the parts' shares follow Dir(alpha): mean 1/K, variance (1/K)(1-1/K)/(K·alpha+1)."""
    y = labels(40_000)
    for alpha in (0.1, 1.0, 10.0):
        k_parts = 5
        shares = np.concatenate([class_shares(y, dirichlet(y, k_parts, alpha, seed=s)) for s in range(40)])
        m = 1 / k_parts
        expected_var = m * (1 - m) / (k_parts * alpha + 1)
        assert abs(shares.mean() - m) < 1e-9  # every row placed
        assert shares.var() == pytest.approx(expected_var, rel=0.25), alpha
    # No cap on a part's size: with small alpha sizes differ wildly (a capped scheme keeps them near n/K).
    sizes = [len(p) for p in dirichlet(y, 5, 0.1, seed=0)]
    assert max(sizes) > 2 * len(y) / 5


def mean_max_share(y: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(y[p], minlength=4).max() / len(p) for p in parts]))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    y = labels()
    skewed = np.mean([mean_max_share(y, dirichlet(y, 10, 0.1, seed=s)) for s in range(3)])
    flat = np.mean([mean_max_share(y, dirichlet(y, 10, 100.0, seed=s)) for s in range(3)])
    assert skewed > 0.6 and flat < 0.35 and skewed > flat + 0.3


def test_dirichlet_empty_part_gets_a_row_from_the_largest() -> None:
    y = labels(2000)
    # alpha 0.01 over 20 parts leaves many parts empty in the raw draw; each gets rows moved to it.
    parts = dirichlet(y, 20, 0.01, seed=0, min_size=5)
    assert_partition(parts, len(y))
    assert min(len(p) for p in parts) == 5
    assert same(parts, dirichlet(y, 20, 0.01, seed=0, min_size=5))
    ones = dirichlet(y[:25], 25, 0.05, seed=1)
    assert sorted(len(p) for p in ones) == [1] * 25


def test_dirichlet_string_labels_and_errors() -> None:
    y = np.array(["a", "b"] * 50, dtype=object)
    assert_partition(dirichlet(y, 4, 1.0, seed=0), 100)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet(y, 4, 0.0, seed=0)
    with pytest.raises(ConfigError, match="at least 30"):
        dirichlet(y, 4, 1.0, seed=0, min_size=30)
    with pytest.raises(ConfigError, match="more partitions than rows"):
        dirichlet(y, 101, 1.0, seed=0)


def test_describe_parts_shows_rows_and_label_shares() -> None:
    parts = [
        pd.DataFrame({"label": [1, 1, 1, 1]}),
        pd.DataFrame({"label": ["0", "1", "1", "3"]}),
    ]
    lines = describe_parts(parts, "label", ["0", "1", "2", "3"])
    assert lines == [
        "  node-0: 4 rows; labels 0 0%, 1 100%, 2 0%, 3 0% (one class only)",
        "  node-1: 4 rows; labels 0 25%, 1 50%, 2 0%, 3 25%",
    ]
    assert label_shares(np.array([1.0, "1", 0], dtype=object), ["0", "1"]) == pytest.approx({"0": 1 / 3, "1": 2 / 3})


def test_by_column() -> None:
    values = ["b", "a", None, "a", 1.0, "1", "c"]
    parts = by_column(values)
    # sorted distinct keys: "1" (1.0 and "1"), "a", "b", "c", "missing"
    assert [p.tolist() for p in parts] == [[4, 5], [1, 3], [0], [6], [2]]
    two = by_column(["b", "a", "c", "d", "a"], num_parts=2)
    assert [p.tolist() for p in two] == [[1, 2, 4], [0, 3]]  # a, c | b, d
    assert_partition(two, 5)
    with pytest.raises(ConfigError, match="2 distinct value"):
        by_column(["x", "y", "x"], num_parts=3)
    with pytest.raises(ConfigError):
        by_column(["x"], num_parts=0)


def frame(n: int = 200) -> pd.DataFrame:
    y = labels(n)
    return pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": y, "site": np.arange(n) % 3})


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "column"])
def test_partition_frame(kind: str) -> None:
    df = frame()
    parts = partition_frame(df, SCHEMA, kind, 3, seed=5, alpha=1.0, column="site")  # type: ignore[arg-type]
    assert len(parts) == 3 and sum(len(p) for p in parts) == len(df)
    assert sorted(pd.concat(parts)["text"]) == sorted(df["text"])
    assert all(list(p.index) == list(range(len(p))) for p in parts)
    again = partition_frame(df, SCHEMA, kind, 3, seed=5, alpha=1.0, column="site")  # type: ignore[arg-type]
    assert all(a.equals(b) for a, b in zip(parts, again, strict=True))
    if kind == "column":
        assert [sorted(p["site"].unique()) for p in parts] == [[0], [1], [2]]


def test_partition_frame_errors() -> None:
    df = frame(10)
    with pytest.raises(ConfigError, match="at least 1"):
        partition_frame(df, SCHEMA, "iid", 0, seed=0)
    with pytest.raises(ConfigError, match="more partitions than rows"):
        partition_frame(df, SCHEMA, "iid", 11, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        partition_frame(df, SCHEMA, "dirichlet", 2, seed=0, alpha=0)
    with pytest.raises(ConfigError, match="'hospital' is not in the data"):
        partition_frame(df, SCHEMA, "column", 2, seed=0, column="hospital")
    with pytest.raises(ConfigError) as exc:  # a name that differs in case only: the fix names the column
        partition_frame(df, SCHEMA, "column", 2, seed=0, column=str(df.columns[0]).upper())
    assert exc.value.fix == f"did you mean {str(df.columns[0])!r}? (names are case-sensitive)"
    assert exc.value.where == "simulation.column"
    with pytest.raises(ConfigError, match="needs a column"):
        partition_frame(df, SCHEMA, "column", 2, seed=0)
    with pytest.raises(ConfigError, match="label column 'label'"):
        partition_frame(df.drop(columns="label"), SCHEMA, "dirichlet", 2, seed=0)
    with pytest.raises(ConfigError, match="unknown partitioning"):
        partition_frame(df, SCHEMA, "bogus", 2, seed=0)  # type: ignore[arg-type]
