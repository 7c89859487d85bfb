"""A bad config is refused before anything starts, naming the field path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.schema import load_schema

GOOD = """
name = "t"
rounds = 2
clients_per_round = 2
[model]
name = "ft-transformer"
[dp]
target_epsilon = 3.0
[data.schema]
task = "tabular"
label = "y"
classes = ["0", "1"]
features = [{name = "a", type = "numeric"}]
[simulation]
data_path = "data.csv"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_config_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.rounds == 2 and cfg.dp.target_epsilon == 3.0
    assert cfg.simulation.data_path == str(tmp_path / "data.csv")
    assert len(cfg.digest()) == 64


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("rounds = 2", "rounds = 0", "rounds: Input should be greater than or equal to 1"),
        ("target_epsilon = 3.0", "target_epsilon = -1", "dp.target_epsilon: Input should be greater than 0"),
        ("[dp]", "[dp]\nnoise = 1", "dp.noise: Extra inputs are not permitted"),
        ('task = "tabular"', 'task = "image"', "data.schema.task: Input should be 'text' or 'tabular'"),
        ('classes = ["0", "1"]', 'classes = ["0"]', "data.schema.classes: List should have at least 2 items"),
        ('type = "numeric"', 'type = "categorical"', "needs a 'categories' list"),
        ("clients_per_round = 2", "clients_per_round = 2\n[server]\nmin_replies = 5", "min_replies (5) exceeds"),
    ],
)
def test_bad_config_names_field_and_reason(tmp_path: Path, old: str, new: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD.replace(old, new)))
    assert expected in str(err.value)
    assert "run.toml" in str(err.value)


def test_sensitive_column_as_feature_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace('label = "y"', 'label = "y"\nsensitive = ["a"]')
    with pytest.raises(ConfigError, match=r"sensitive columns \['a'\] are listed as features"):
        load_config(write(tmp_path, text))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 3"))
    bad_schema = tmp_path / "schema.toml"
    bad_schema.write_text('task = "text"\nlabel = "y"\nclasses = ["a", "b"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="task 'text' needs 'text_column'"):
        load_schema(bad_schema)
