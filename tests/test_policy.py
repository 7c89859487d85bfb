"""The node policy: each rule refuses a violating run by name and lets a compliant one through."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.policy import DEFAULT_POLICY_TOML, NodePolicy, PolicyError, Violation, check_run, describe, load_policy
from common.privacy import DPPlan
from tests.helpers import tabular_config

FP = "ab" * 32
FP_UPPER_COLON = ":".join(["AB"] * 32)


def plan(sigma: float) -> DPPlan:
    return DPPlan(
        n_train=1000,
        sample_rate=0.032,
        steps_per_round=32,
        rounds=2,
        noise_multiplier=sigma,
        target_epsilon=4.0,
        delta=1e-4,
        max_grad_norm=1.0,
        accountant="rdp",
    )


def refused(v: Violation | None, rule: str) -> str:
    assert v is not None and v.rule == rule, v
    assert f"({rule})" in v.message
    return v.message


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text, encoding="utf-8")
    return p


# -- rules ------------------------------------------------------------------------------------
def test_allowed_models() -> None:
    cfg = tabular_config()
    msg = refused(check_run(NodePolicy(allowed_models=["text-transformer"]), cfg, purpose="train"), "allowed_models")
    assert "'ft-transformer'" in msg and "text-transformer" in msg
    assert check_run(NodePolicy(allowed_models=["ft-transformer"]), cfg, purpose="train") is None
    assert check_run(NodePolicy(), cfg, purpose="train") is None  # None = any built-in model


def test_require_dp_for_train_and_plan() -> None:
    no_dp = tabular_config(dp__enabled=False)
    for purpose in ("train", "plan"):
        refused(check_run(NodePolicy(), no_dp, purpose=purpose), "require_dp")  # type: ignore[arg-type]
    assert check_run(NodePolicy(require_dp=False), no_dp, purpose="train") is None
    assert check_run(NodePolicy(), tabular_config(), purpose="plan") is None


HE = {"context_fingerprint": "ab" * 32, "bundle": "/srv/he", "evaluator_key": "SHA256:x"}


def test_require_homomorphic() -> None:
    policy = NodePolicy(require_homomorphic=True)
    msg = refused(check_run(policy, tabular_config(), purpose="train"), "require_homomorphic")
    assert "'none'" in msg
    assert check_run(policy, tabular_config(secure_aggregation="homomorphic", homomorphic=HE), purpose="train") is None


def test_max_rounds() -> None:
    policy = NodePolicy(max_rounds=20)
    msg = refused(check_run(policy, tabular_config(rounds=50), purpose="train"), "max_rounds")
    assert msg == "the run asks for 50 rounds; this node's policy allows at most 20 (max_rounds)"
    assert check_run(policy, tabular_config(rounds=20), purpose="train") is None
    assert check_run(NodePolicy(max_rounds=None), tabular_config(rounds=5000), purpose="train") is None


def test_max_local_epochs() -> None:
    policy = NodePolicy(max_local_epochs=2)
    msg = refused(check_run(policy, tabular_config(train__local_epochs=3), purpose="plan"), "max_local_epochs")
    assert "3 local epochs" in msg and "at most 2" in msg
    assert check_run(policy, tabular_config(train__local_epochs=2), purpose="plan") is None


def test_min_noise_multiplier() -> None:
    policy = NodePolicy(min_noise_multiplier=0.8)
    cfg = tabular_config()
    msg = refused(check_run(policy, cfg, purpose="train", plan=plan(0.5)), "min_noise_multiplier")
    assert "0.500" in msg and "0.8" in msg
    assert check_run(policy, cfg, purpose="train", plan=plan(0.8)) is None
    assert check_run(policy, cfg, purpose="train") is None  # no plan yet: checked once the node has one
    # a run without DP has σ = 0 even when the owner does not require DP
    no_dp = NodePolicy(require_dp=False, min_noise_multiplier=0.8)
    refused(check_run(no_dp, tabular_config(dp__enabled=False), purpose="train"), "min_noise_multiplier")


def test_max_epsilon_per_run() -> None:
    policy = NodePolicy(max_epsilon_per_run=4.0)
    cfg = tabular_config()
    msg = refused(check_run(policy, cfg, purpose="plan", epsilon_run=6.5), "max_epsilon_per_run")
    assert "6.5" in msg and "at most 4" in msg
    assert check_run(policy, cfg, purpose="plan", epsilon_run=4.0) is None
    assert check_run(policy, cfg, purpose="plan") is None
    no_dp = NodePolicy(require_dp=False, max_epsilon_per_run=4.0)
    refused(check_run(no_dp, tabular_config(dp__enabled=False), purpose="train"), "max_epsilon_per_run")


def test_allow_values_for_evaluation() -> None:
    cfg = tabular_config()
    refused(check_run(NodePolicy(), cfg, purpose="evaluate"), "allow_values")
    assert check_run(NodePolicy(allow_values=["evaluation-metrics"]), cfg, purpose="evaluate") is None
    # evaluation sends no update: training rules do not apply to it
    assert check_run(NodePolicy.default_for("evaluator"), tabular_config(rounds=500), purpose="evaluate") is None


def test_fairness_columns() -> None:
    cfg = tabular_config()
    policy = NodePolicy(fairness_columns=["group"])
    msg = refused(
        check_run(policy, cfg, purpose="fairness-counts", sensitive_columns=["group", "age"]), "fairness_columns"
    )
    assert "age" in msg and "over group" not in msg.split(";")[0]
    assert check_run(policy, cfg, purpose="fairness-counts", sensitive_columns=["group"]) is None
    # default: the schema's sensitive columns (["group"]); the default policy allows none
    assert check_run(policy, cfg, purpose="fairness-counts") is None
    msg = refused(check_run(NodePolicy(), cfg, purpose="fairness-counts"), "fairness_columns")
    assert "group" in msg and "none" in msg


def test_first_violation_in_fixed_order() -> None:
    policy = NodePolicy(allowed_models=["text-transformer"], require_homomorphic=True, max_rounds=1)
    cfg = tabular_config(rounds=5, dp__enabled=False)
    refused(check_run(policy, cfg, purpose="train"), "allowed_models")
    refused(check_run(policy.model_copy(update={"allowed_models": None}), cfg, purpose="train"), "require_dp")


def test_unknown_purpose_fails_closed() -> None:
    with pytest.raises(ValueError, match="unknown purpose"):
        check_run(NodePolicy(), tabular_config(), purpose="exfiltrate")  # type: ignore[arg-type]


# -- defaults ---------------------------------------------------------------------------------
def test_defaults_for_roles() -> None:
    client = NodePolicy.default_for("client")
    assert client == NodePolicy()
    assert client.require_dp and client.allowed_models is None and client.allow_values == []
    assert (client.max_rounds, client.max_local_epochs, client.min_group_size) == (100, 10, 20)
    evaluator = NodePolicy.default_for("evaluator")
    assert evaluator.allow_values == ["evaluation-metrics"]
    assert evaluator.model_copy(update={"allow_values": []}) == client
    with pytest.raises(ValueError, match="role"):
        NodePolicy.default_for("server")


def test_describe_one_line_per_rule() -> None:
    lines = describe(NodePolicy())
    assert "max rounds per run: 100" in lines
    assert "values allowed to leave beyond DP-protected ones: none" in lines
    assert len(lines) == len(NodePolicy.model_fields)
    assert "values allowed to leave beyond DP-protected ones: evaluation-metrics" in describe(
        NodePolicy.default_for("evaluator")
    )


def test_default_policy_toml_loads_as_client_defaults(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, DEFAULT_POLICY_TOML)) == NodePolicy.default_for("client")


# -- fingerprints -----------------------------------------------------------------------------
@pytest.mark.parametrize("given", [FP, FP.upper(), ":".join(["ab"] * 32), f"  {FP_UPPER_COLON} "])
def test_fingerprints_normalized(given: str) -> None:
    assert NodePolicy(allowed_servers=[given]).allowed_servers == [FP_UPPER_COLON]


def test_fingerprints_normalized_from_file(tmp_path: Path) -> None:
    p = write(tmp_path, f'allowed_servers = ["{FP}", "{FP_UPPER_COLON}"]\n')
    assert load_policy(p).allowed_servers == [FP_UPPER_COLON]


def test_bad_fingerprint(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, 'allowed_servers = ["ab:cd"]\n'))
    assert "allowed_servers" in e.value.render() and "64 hex digits" in e.value.render()


# -- load_policy errors -----------------------------------------------------------------------
def test_load_ok(tmp_path: Path) -> None:
    p = write(tmp_path, 'allowed_models = ["ft-transformer"]\nmax_rounds = 5\nmin_noise_multiplier = 1\n')
    policy = load_policy(p)
    assert policy.allowed_models == ["ft-transformer"] and policy.max_rounds == 5
    assert policy.min_noise_multiplier == 1.0


def load_error(tmp_path: Path, text: str) -> PolicyError:
    p = write(tmp_path, text)
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert e.value.code == "policy-invalid" and e.value.where == str(p) and e.value.fix
    assert str(p) in e.value.render()
    return e.value


def test_unknown_field(tmp_path: Path) -> None:
    err = load_error(tmp_path, "max_round = 5\n")
    assert "max_round: unknown field" in err.what and "max_rounds" in err.what


def test_wrong_type(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'require_dp = "yes"\n')
    assert "require_dp: Input should be a valid boolean" in err.what
    err = load_error(tmp_path, 'max_rounds = "20"\n')
    assert "max_rounds: Input should be a valid integer" in err.what


def test_out_of_range(tmp_path: Path) -> None:
    err = load_error(tmp_path, "max_rounds = 0\nmin_group_size = 0\n")
    assert "max_rounds: Input should be greater than or equal to 1" in err.what
    assert "min_group_size: Input should be greater than or equal to 1" in err.what


def test_unknown_value_and_model(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'allow_values = ["raw-rows"]\n')
    assert "allow_values.0" in err.what and "evaluation-metrics" in err.what
    err = load_error(tmp_path, 'allowed_models = ["gpt-9"]\n')
    assert "allowed_models: unknown model(s) ['gpt-9']" in err.what and "ft-transformer" in err.what


def test_bad_toml(tmp_path: Path) -> None:
    err = load_error(tmp_path, "max_rounds = 5\nrequire_dp = \n")
    assert "not valid TOML" in err.what and "line 2" in err.what


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found") as e:
        load_policy(tmp_path / "nope.toml")
    assert e.value.where == str(tmp_path / "nope.toml")
