"""A bad config is refused before anything starts, naming the field path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RECIPES, RunConfig, TrainConfig, config_from_json, load_config, recipe_for
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
        # a misspelt table or key gets the one it most resembles, at any depth (aliases included)
        ("[dp]", "[dpp]", "dpp: Extra inputs are not permitted (did you mean 'dp'?)"),
        (
            "[dp]",
            "[server.optimiser]\nname = 'fedadam'\n[dp]",
            "server.optimiser: Extra inputs are not permitted (did you mean 'optimizer'?)",
        ),
        ('label = "y"', 'lable = "y"', "data.schema.lable: Extra inputs are not permitted (did you mean 'label'?)"),
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


SCHEMA_TABLE = GOOD[GOOD.index("[data.schema]") + len("[data.schema]\n") : GOOD.index("[simulation]")]
BY_FILE = GOOD.replace("[data.schema]\n" + SCHEMA_TABLE, '[data]\nschema = "schemas/draft.toml"\n')


def test_the_schema_may_be_a_file_next_to_the_config(tmp_path: Path) -> None:
    """``[data] schema = "draft.toml"`` (what ``fedguard schema draft --out`` wrote, a node's ``--schema``):
    the config that goes to the server and the nodes holds the table itself."""
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "draft.toml").write_text(SCHEMA_TABLE, encoding="utf-8")
    cfg = load_config(write(tmp_path, BY_FILE))
    assert cfg.data.schema_ == load_config(write(tmp_path, GOOD)).data.schema_
    assert config_from_json(cfg.to_json()).data.schema_.features[0].name == "a"  # no file on the nodes
    with pytest.raises(ConfigError, match="must hold the schema itself"):  # the control API's configs
        load_config(write(tmp_path, BY_FILE), schema_files=False)
    (tmp_path / "schemas" / "draft.toml").write_text(SCHEMA_TABLE.replace("label", "lable"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"draft.toml: lable: Extra inputs .*did you mean 'label'"):
        load_config(write(tmp_path, BY_FILE))
    (tmp_path / "schemas" / "draft.toml").unlink()
    with pytest.raises(ConfigError, match=r"names the schema file 'schemas/draft.toml', which does not exist"):
        load_config(write(tmp_path, BY_FILE))


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("[dp]", "[dp]\nmax_grad_norm = inf", "dp.max_grad_norm"),
        ("[dp]", "[dp]\nmax_grad_norm = nan", "dp.max_grad_norm"),
        ("target_epsilon = 3.0", "target_epsilon = inf", "dp.target_epsilon"),
        ("[dp]", "[dp]\ndelta = nan", "dp.delta"),
        ("[model]", "[train]\nlearning_rate = inf\n[model]", "train.learning_rate"),
        ("[model]", "[train]\nclass_weights = [1.0, -inf]\n[model]", "train.class_weights[1]"),
        ("[model]", "[server]\nmax_update_norm = inf\n[model]", "server.max_update_norm"),
        ("[model]", "[server]\nmax_weight = inf\n[model]", "server.max_weight"),
        ("[model]", "[homomorphic]\nbound = inf\n[model]", "homomorphic.bound"),
        ('name = "ft-transformer"', 'name = "ft-transformer"\nparams = {dropout = nan}', "model.params.dropout"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path: Path, old: str, new: str, field: str) -> None:
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert f"{field}: " in str(err.value) and "not a finite number" in str(err.value)


def test_models_refuse_non_finite_values_even_when_built_in_code() -> None:
    from common.config import DPConfig, ServerConfig

    with pytest.raises(ValueError, match="finite"):
        DPConfig(max_grad_norm=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        ServerConfig(max_update_norm=float("nan"))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.toml", "a = " + "[" * 30_000 + "]" * 30_000),
        ("deep-tables.toml", "a = " + "{b = " * 5_000 + "1" + "}" * 5_000),
        ("deep.json", '{"a": ' * 30_000 + "1" + "}" * 30_000),
        ("moderate.toml", "[model]\nparams = " + "{a = " * 40 + "1" + "}" * 40),
    ],
)
def test_deeply_nested_files_are_a_clear_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="nested") as err:
        load_config(path)
    assert name in str(err.value)


def test_a_config_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    from common.config import config_from_json

    path = tmp_path / "run.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a list"):
        load_config(path)
    with pytest.raises(ConfigError, match="not an object"):
        config_from_json("3")
    with pytest.raises(ConfigError, match="nested too deeply"):
        config_from_json("[" * 100_000 + "]" * 100_000)


# --------------------------------------------------------------------------- defaults = the benchmarked recipe

TEXT_GOOD = (
    GOOD.replace('features = [{name = "a", type = "numeric"}]', 'text_column = "text"')
    .replace('task = "tabular"', 'task = "text"')
    .replace('name = "ft-transformer"', 'name = "text-transformer"')
)


def test_a_config_without_train_or_server_optimizer_gets_its_tasks_recipe(tmp_path: Path) -> None:
    """What bench/utility.py measured as ``fedguard`` is what a user's config gets by leaving them out."""
    for text, task in ((GOOD, "tabular"), (TEXT_GOOD, "text")):
        cfg = load_config(write(tmp_path, text))
        recipe = recipe_for(cfg.model.name, task)
        for key, value in recipe["train"].items():
            assert getattr(cfg.train, key) == value, (task, key)
        assert cfg.dp.max_grad_norm == recipe["dp"]["max_grad_norm"]
        assert cfg.server.optimizer.model_dump(exclude_none=True) == recipe["server.optimizer"]
        assert cfg.data.validation_fraction == 0.1
        assert cfg.dp.target_epsilon == 3.0  # the file's own [dp] value stays
        assert cfg.rounds == 2  # the file's own rounds stay
        # a config without rounds runs as many as its recipe was benchmarked with, not a class default
        cfg = load_config(write(tmp_path, text.replace("rounds = 2\n", "")))
        assert cfg.rounds == recipe["run"]["rounds"], task
    # the tabular case tells the recipe's rounds from the class default
    assert RECIPES["tabular"]["run"]["rounds"] != RunConfig.model_fields["rounds"].default


def test_a_simulation_without_clients_per_round_trains_every_node_as_the_benchmark_does(tmp_path: Path) -> None:
    """bench/utility.py's configs name no clients_per_round: 5 simulated nodes train every round, for a user too."""
    from bench.utility import run_config

    schema = {"task": "tabular", "label": "y", "classes": ["0", "1"], "features": [{"name": "a"}]}
    raw = run_config(tmp_path / "d.csv", schema, split="dir0.5", epsilon=8.0, seed=1, method="fedguard", rounds=10)
    assert "clients_per_round" not in raw and RunConfig.model_validate(raw).clients_per_round == 5
    set_two = GOOD.replace("[simulation]\n", "[simulation]\nnum_clients = 5\n")
    five = set_two.replace("clients_per_round = 2\n", "")
    assert load_config(write(tmp_path, five)).clients_per_round == 5
    assert load_config(write(tmp_path, set_two)).clients_per_round == 2  # an explicit value wins
    # a deployment config (no [simulation] table) keeps the class default
    deployed = GOOD.replace("clients_per_round = 2\n", "").split("[simulation]")[0]
    assert load_config(write(tmp_path, deployed)).clients_per_round == 3
    assert config_from_json(load_config(write(tmp_path, five)).to_json()).clients_per_round == 5


def test_explicit_values_win_over_the_recipe(tmp_path: Path) -> None:
    text = GOOD + '[train]\nbatch_size = 256\n[server.optimizer]\nname = "fedadam"\n'
    cfg = load_config(write(tmp_path, text))
    recipe = RECIPES["tabular"]["train"]
    assert cfg.train.batch_size == 256
    assert cfg.train.learning_rate == recipe["learning_rate"] and cfg.train.optimizer == recipe["optimizer"]
    # a [server.optimizer] table is taken whole: no recipe momentum mixed into another optimizer
    assert cfg.server.optimizer.name == "fedadam" and cfg.server.optimizer.momentum is None


def test_another_optimizer_does_not_inherit_the_recipes_learning_rate(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD + '[train]\noptimizer = "sgd"\n'))
    assert cfg.train.optimizer == "sgd"
    assert cfg.train.learning_rate == TrainConfig.model_fields["learning_rate"].default
    assert cfg.train.batch_size == RECIPES["tabular"]["train"]["batch_size"]


def test_the_recipe_survives_the_trip_to_the_nodes(tmp_path: Path) -> None:
    """Nodes parse the JSON the server sends: the same settings, not a second round of defaults."""
    cfg = load_config(write(tmp_path, GOOD + "[train]\nlearning_rate = 0.01\n"))
    again = config_from_json(cfg.to_json())
    assert again.train == cfg.train and again.server.optimizer == cfg.server.optimizer


def test_the_demo_uses_the_defaults(tmp_path: Path) -> None:
    from fedguard.demo import demo_config

    cfg = demo_config(tmp_path / "data.csv")
    for key, value in RECIPES["tabular"]["train"].items():
        assert getattr(cfg.train, key) == value
    assert cfg.server.optimizer.model_dump(exclude_none=True) == RECIPES["tabular"]["server.optimizer"]
    assert cfg.data.validation_fraction == 0.1
