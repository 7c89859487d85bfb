"""Checkpoints, robust aggregation, update bounds and fuzzed loaders (in process)."""

from __future__ import annotations

import string
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from common.config import load_config, parse_config
from common.data import load_encoded
from common.errors import ConfigError, FedGuardError
from common.schema import DataSchema
from server import checkpoint
from server.aggregation import CoordinateRobust
from server.checkpoint import Checkpoint, CheckpointError
from tests.helpers import TABULAR_SCHEMA, tabular_config

pytestmark = pytest.mark.timeout(300)


def state(value: float) -> OrderedDict[str, np.ndarray]:
    return OrderedDict(w=np.full((3, 4), value, np.float32), steps=np.array([7], np.int64))


def test_checkpoint_round_trip_and_a_bit_flip_falls_back_to_the_previous(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rng.random(3)
    for rnd in (1, 2, 3):
        checkpoint.save(tmp_path, Checkpoint(9, rnd, state(float(rnd)), rng.bit_generator.state, {"c": rnd}))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["round-00002.ckpt", "round-00003.ckpt"]
    latest = checkpoint.load(tmp_path / "round-00003.ckpt")
    assert latest.round == 3 and latest.extra == {"c": 3} and np.all(latest.state["w"] == 3.0)
    assert latest.state["steps"].dtype == np.int64
    restored = np.random.default_rng(0)
    restored.bit_generator.state = latest.rng_state
    assert restored.random() == rng.random()  # the sampling sequence continues exactly

    raw = bytearray((tmp_path / "round-00003.ckpt").read_bytes())
    raw[-5] ^= 0x10  # one flipped bit in the payload
    (tmp_path / "round-00003.ckpt").write_bytes(bytes(raw))
    warnings: list[str] = []
    good = checkpoint.latest_good(tmp_path, warnings.append)
    assert good.round == 2 and "checksum mismatch" in warnings[0]
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(tmp_path / "round-00003.ckpt")


def test_checkpoint_refuses_to_write_without_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save(tmp_path, Checkpoint(1, 1, state(1.0), {}, {}))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(CheckpointError, match="MB free"):
        checkpoint.save(tmp_path, Checkpoint(1, 2, state(2.0), {}, {}))
    assert checkpoint.latest_good(tmp_path).round == 1  # the earlier checkpoint is untouched


def test_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="at least one round"):
        checkpoint.latest_good(tmp_path)


def test_median_and_trimmed_mean_resist_one_outlier() -> None:
    ref = state(0.0)
    updates = [state(1.0), state(1.2), state(0.8), state(1e6)]
    med = CoordinateRobust(ref, "median")
    for u in updates:
        med.add(u, 1000.0)
    assert np.allclose(med.result()["w"], 1.1)
    assert med.result()["steps"][0] == 7  # integer buffers keep the global value


def test_trimmed_mean_is_not_the_median() -> None:
    """Five updates, trim 0.2: one value cut at each end per coordinate, the middle three averaged.

    The values are chosen so that median, trimmed mean and mean all differ, and the outliers sit in
    different updates for different coordinates (the trimming is per coordinate, not per update).
    """
    rng = np.random.default_rng(11)
    base = np.array([1.0, 1.2, 2.0, 3.5, 0.4])  # sorted middle: 1.0, 1.2, 2.0 -> trimmed 1.4, median 1.2
    values = np.stack([rng.permutation(base) for _ in range(12)], axis=1).reshape(5, 3, 4)
    values[np.argmax(values, axis=0), *np.indices((3, 4))] = 1e6  # the largest becomes a huge outlier
    values[np.argmin(values, axis=0), *np.indices((3, 4))] = -1e6  # and the smallest a huge negative one
    updates = [OrderedDict(w=v.astype(np.float32), steps=np.array([7], np.int64)) for v in values]
    med, trim = CoordinateRobust(state(0.0), "median"), CoordinateRobust(state(0.0), "trimmed-mean", 0.2)
    for u, weight in zip(updates, (1.0, 50.0, 2.0, 900.0, 3.0), strict=True):  # weights are ignored
        med.add(u, weight)
        trim.add(u, weight)
    got_median, got_trimmed = med.result()["w"], trim.result()["w"]
    assert np.allclose(got_median, 1.2) and np.allclose(got_trimmed, (1.0 + 1.2 + 2.0) / 3)
    assert np.allclose(got_trimmed, stats.trim_mean(values, 0.2, axis=0))
    assert not np.allclose(got_trimmed, got_median)
    assert trim.result()["steps"][0] == 7


def test_robust_aggregation_is_refused_with_central_dp_or_homomorphic_mode() -> None:
    with pytest.raises(ConfigError, match="different sensitivity"):
        tabular_config(server={"aggregation": "median"}, central_dp={"enabled": True})
    with pytest.raises(ConfigError, match="only sums ciphertexts"):
        tabular_config(server={"aggregation": "trimmed-mean"}, secure_aggregation="homomorphic")


# -- fuzzing: arbitrary input gives FedGuard errors, never an unhandled exception -------------
_toml_text = st.text(alphabet=string.printable, max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_toml_text)
def test_fuzzed_config_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except FedGuardError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.fixed_dictionaries(
        {},
        optional={
            "rounds": _json,
            "dp": _json,
            "train": _json,
            "data": st.just({"schema": TABULAR_SCHEMA}) | _json,
            "server": _json,
            "model": _json,
        },
    )
)
def test_fuzzed_config_values(raw: dict) -> None:
    try:
        parse_config(raw)
    except FedGuardError:
        pass


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=400) | st.text(alphabet=string.printable + "éß中", max_size=400).map(str.encode))
def test_fuzzed_data_files(tmp_path: Path, body: bytes) -> None:
    schema = DataSchema.model_validate(TABULAR_SCHEMA)
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,b,c,group,y\n" + body)
    try:
        load_encoded(path, schema)
    except FedGuardError:
        pass
