"""Data-owner control on the real ClientApp, in process: signed runs, the node policy, the request log,
and the federated-fairness counts that a policy governs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.admission import read_requests
from client.app import app as client_app
from client.ledger import Ledger
from common import records as R
from common.codec import numpy_to_record
from common.config import RunConfig
from common.privacy import epsilon_spent
from common.run_signing import sign_run
from tests.helpers import ROOT, global_state, node_context, tabular_config, train_message

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(300)]


@pytest.fixture
def run_key(tmp_path: Path) -> tuple[ed25519.Ed25519PrivateKey, Path]:
    """A federation run-signing key and its pinned public half (OpenSSH, as in a kit)."""
    key = ed25519.Ed25519PrivateKey.generate()
    pub = tmp_path / "run-signing.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return key, pub


def signed(msg: Message, token: str) -> Message:
    config = dict(msg.content[R.CONFIG])
    msg.content[R.CONFIG] = ConfigRecord({**config, R.RUN_SIGNATURE: token})
    return msg


def refusal(reply: Message) -> tuple[str, str | None]:
    assert set(reply.content.keys()) == {R.REFUSAL}, list(reply.content.keys())
    rec = reply.content[R.REFUSAL]
    return str(rec[R.REFUSAL_CODE]), rec.get(R.REFUSAL_RULE)


# -- signed runs ---------------------------------------------------------------------------------


def test_only_runs_signed_by_the_pinned_key_train(tabular_csv: Path, tmp_path: Path, run_key) -> None:
    key, pub = run_key
    cfg = tabular_config(rounds=1)
    state = global_state(cfg)
    ctx = node_context(tabular_csv, tmp_path / "node", run_signing_pub_path=str(pub))
    assert refusal(client_app(train_message(cfg, state), ctx))[0] == "run-unsigned"
    foreign = sign_run(cfg.to_json(), ed25519.Ed25519PrivateKey.generate())
    assert refusal(client_app(signed(train_message(cfg, state), foreign), ctx))[0] == "run-signature-invalid"
    other_cfg = sign_run(tabular_config(rounds=1, seed=99).to_json(), key)  # approved, but another config
    assert refusal(client_app(signed(train_message(cfg, state), other_cfg), ctx))[0] == "run-signature-invalid"
    token = sign_run(cfg.to_json(), key)
    reply = client_app(signed(train_message(cfg, state), token), ctx)
    assert set(reply.content.keys()) == {R.ARRAYS, R.METRICS}
    # Nothing was read or spent for the refused requests: one release in the ledger.
    with Ledger(tmp_path / "node" / "ledger.db", tmp_path / "node" / "ledger-markers") as ledger:
        assert ledger.summaries()[0].releases == 1
    log = [(e["accepted"], e["code"]) for e in read_requests(tmp_path / "node")]
    assert log == [
        (False, "run-unsigned"),
        (False, "run-signature-invalid"),
        (False, "run-signature-invalid"),
        (True, ""),
    ]
    node_log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "refused run 1 (test, ledger key run-a) train round 1: run-unsigned" in node_log


def test_a_signed_request_is_good_for_one_flower_run_only(tabular_csv: Path, tmp_path: Path, run_key) -> None:
    key, pub = run_key
    cfg = tabular_config(rounds=2)
    state = global_state(cfg)
    ctx = node_context(tabular_csv, tmp_path / "node", run_signing_pub_path=str(pub))
    token = sign_run(cfg.to_json(), key)
    for rnd in (1, 2):  # every message of the approved run carries the same token
        assert R.ARRAYS in client_app(signed(train_message(cfg, state, rnd), token), ctx).content
    TaskIdentity.run_id = 2  # a second Flower run replaying the captured token
    replay = client_app(signed(train_message(cfg, state, 1, run_uid="run-b"), token), ctx)
    assert refusal(replay)[0] == "run-signature-replayed"


# -- the node policy -----------------------------------------------------------------------------

COMPLIANT = {"rounds": 2, "train__local_epochs": 1}


@pytest.mark.parametrize(
    ("policy", "overrides", "rule"),
    [
        ('allowed_models = ["text-transformer"]', {}, "allowed_models"),
        ("require_dp = true", {"dp": {"enabled": False}}, "require_dp"),
        ("require_homomorphic = true", {}, "require_homomorphic"),
        ("max_rounds = 1", {}, "max_rounds"),
        ("max_local_epochs = 1", {"train__local_epochs": 2}, "max_local_epochs"),
        ("min_noise_multiplier = 50.0", {}, "min_noise_multiplier"),
        ("max_epsilon_per_run = 1.0", {}, "max_epsilon_per_run"),
    ],
)
def test_each_training_rule_refuses_a_run_that_breaks_it(
    tabular_csv: Path, tmp_path: Path, policy: str, overrides: dict, rule: str
) -> None:
    (tmp_path / "policy.toml").write_text(policy + "\n")
    ctx = node_context(tabular_csv, tmp_path / "node", policy_path=str(tmp_path / "policy.toml"))
    bad = tabular_config(**{**COMPLIANT, **overrides})
    code, named = refusal(client_app(train_message(bad, global_state(bad)), ctx))
    assert (code, named) == ("policy-violation", rule)
    assert not (tmp_path / "node" / "ledger.db").exists() or _releases(tmp_path / "node") == 0
    entry = read_requests(tmp_path / "node")[-1]
    assert (entry["accepted"], entry["code"]) == (False, "policy-violation") and f"({rule})" in entry["reason"]
    # The same node takes a run within its policy (homomorphic runs are not available yet).
    compliant = {
        "allowed_models": 'allowed_models = ["ft-transformer"]',
        "require_dp": "require_dp = true",
        "max_rounds": "max_rounds = 2",
        "max_local_epochs": "max_local_epochs = 1",
        "min_noise_multiplier": "min_noise_multiplier = 0.1",
        "max_epsilon_per_run": "max_epsilon_per_run = 50.0",
    }
    if rule in compliant:
        (tmp_path / "policy.toml").write_text(compliant[rule] + "\n")
        ok = tabular_config(**COMPLIANT)
        assert set(client_app(train_message(ok, global_state(ok)), ctx).content.keys()) == {R.ARRAYS, R.METRICS}


def _releases(workdir: Path) -> int:
    with Ledger(workdir / "ledger.db", workdir / "ledger-markers") as ledger:
        return sum(s.releases for s in ledger.summaries())


def evaluate_message(cfg: RunConfig) -> Message:
    content = RecordDict(
        {
            R.ARRAYS: numpy_to_record(global_state(cfg)),
            R.CONFIG: ConfigRecord({R.RUN_CONFIG: cfg.to_json(), R.ROUND: 0, R.RUN_UID: "run-a"}),
        }
    )
    return Message(content, dst_node_id=1, message_type="evaluate")


def test_evaluation_metrics_leave_only_if_the_policy_allows_them(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    (tmp_path / "strict.toml").write_text("allow_values = []\n")
    strict = node_context(tabular_csv, tmp_path / "ev", role="evaluator", policy_path=str(tmp_path / "strict.toml"))
    assert refusal(client_app(evaluate_message(cfg), strict)) == ("policy-violation", "allow_values")
    default = node_context(tabular_csv, tmp_path / "ev", role="evaluator", policy_path="default")
    assert R.EVALUATION in client_app(evaluate_message(cfg), default).content


def counts_message(cfg: RunConfig, rnd: int = 2) -> Message:
    content = RecordDict(
        {
            R.ARRAYS: numpy_to_record(global_state(cfg)),
            R.CONFIG: ConfigRecord({R.RUN_CONFIG: cfg.to_json(), R.ROUND: rnd, R.RUN_UID: "run-a"}),
        }
    )
    return Message(content, dst_node_id=1, message_type="query.fairness")


def test_fairness_counts_need_the_owners_consent_and_are_charged_to_the_ledger(
    tabular_csv: Path, tmp_path: Path
) -> None:
    cfg = tabular_config()
    ctx = node_context(tabular_csv, tmp_path / "node", policy_path="default")  # default: no columns
    assert refusal(client_app(counts_message(cfg), ctx)) == ("policy-violation", "fairness_columns")
    (tmp_path / "policy.toml").write_text('fairness_columns = ["group"]\nmin_group_size = 30\n')
    ctx = node_context(tabular_csv, tmp_path / "node", policy_path=str(tmp_path / "policy.toml"))
    reply = client_app(counts_message(cfg), ctx)
    assert set(reply.content.keys()) == {R.FAIRNESS_COUNTS, R.METRICS}
    counts = json.loads(str(reply.content[R.FAIRNESS_COUNTS][R.COUNTS_JSON]))
    assert set(counts) == {"(all)", "group"}
    assert all(len(cells) == 4 for rows in counts.values() for cells in rows.values())
    # one Gaussian release, composed by the ledger's accountant: ε is the accountant's, not a guess
    z = cfg.fairness.count_noise_multiplier
    metrics = reply.content[R.METRICS]
    assert metrics[R.EPSILON] == pytest.approx(epsilon_spent([(z, 1.0, 1)], metrics[R.DELTA]))
    assert reply.content[R.FAIRNESS_COUNTS][R.COUNT_SIGMA] == pytest.approx(z * 2**0.5)  # √2 tables
    assert _releases(tmp_path / "node") == 1
    off = tabular_config(fairness={"federated_counts": False})
    assert refusal(client_app(counts_message(off), ctx))[0] == "counts-not-in-run-config"


def test_inspect_shows_policy_budget_and_decisions(tabular_csv: Path, tmp_path: Path, run_key) -> None:
    key, pub = run_key
    cfg = tabular_config(rounds=1)
    (tmp_path / "policy.toml").write_text("max_rounds = 5\n")
    work = tmp_path / "node"
    ctx = node_context(tabular_csv, work, run_signing_pub_path=str(pub), policy_path=str(tmp_path / "policy.toml"))
    client_app(train_message(cfg, global_state(cfg)), ctx)  # unsigned: refused
    client_app(signed(train_message(cfg, global_state(cfg)), sign_run(cfg.to_json(), key)), ctx)
    (work / "node-start.json").write_text(json.dumps({"role": "client", "policy": str(tmp_path / "policy.toml")}))
    out = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "client", "inspect", "--workdir", str(work)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "max rounds per run: 5" in out.stdout
    assert "REFUSED run-unsigned" in out.stdout and "train round 1: accepted" in out.stdout
    assert "releases" in out.stdout  # the budget table
    # each decision names the run's ledger key, the one the budget table files its releases under
    assert "'test' (ledger key run-a) train round 1: accepted" in out.stdout
    assert "  run run-a: 1 release(s)" in out.stdout
