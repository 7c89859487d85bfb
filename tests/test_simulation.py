"""Real simulated federations on Flower's simulation engine (Ray), each in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.store import RunStore
from tests.helpers import ONE_ACTOR, ROOT, make_tabular, small_sim_toml, tabular_config, toml_features

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def test_cli_simulation_records_both_rounds(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    make_tabular(500).to_csv(data, index=False)
    features = [f.model_dump(exclude_none=True) for f in tabular_config(data).data.schema_.features]
    toml = tmp_path / "run.toml"
    schema = f'sensitive = ["group"]\n{toml_features(features)}'
    toml.write_text(small_sim_toml("two-by-two", seed=3, rounds=2, clients=2, schema=schema), encoding="utf-8")
    proc = run(["-m", "fedguard.cli", "simulate", "--config", str(toml), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    with RunStore(summary["store"]) as store:
        rounds = store.rounds(summary["run_id"])
        clients = store.client_rounds(summary["run_id"])
        evals = store.evaluations(summary["run_id"])
    assert [r["round"] for r in rounds] == [1, 2]
    # on failure, say which round lost which node and why (a flake seen once in a loaded full run)
    assert all(r["accepted"] == 2 and r["aggregated"] == 1 for r in rounds), (rounds, proc.stdout[-3000:])
    assert len(clients) == 4 and all(0 < c["epsilon"] <= 4.0 for c in clients)
    assert sorted(evals) == [0, 1, 2]
    assert "round 2/2" in proc.stderr  # with --json, progress goes to stderr
    # One ε per node: the summary states the privacy report's (the fairness counts release included).
    from server.privacy_report import build_privacy_report

    report = build_privacy_report(summary["store"], summary["run_id"])
    stated = {c.node_id: c.epsilon_run for c in report.clients}
    assert {str(n): e for n, e in summary["epsilon_per_node"].items()} == stated
    assert all(c.count_release is not None for c in report.clients)  # the counts did leave and count


@pytest.mark.parametrize(
    ("bound", "reason"),
    [
        ({"max_update_norm": 100.0}, "exceeds server.max_update_norm"),
        ({}, "server.norm_bound_factor"),  # a config that says nothing about bounds is safe too
    ],
    ids=["fixed-bound", "defaults"],
)
def test_bad_replies_are_left_out_and_the_round_completes(tmp_path: Path, bound: dict, reason: str) -> None:
    data = tmp_path / "data.csv"
    make_tabular(600).to_csv(data, index=False)
    cfg = tabular_config(
        data,
        rounds=3,
        clients_per_round=3,
        simulation={"num_clients": 3, "data_path": str(data), **ONE_ACTOR},
        server={**bound, "round_timeout": 120, "wait_for_nodes": 60},
    )
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json(), encoding="utf-8")
    proc = run(["-m", "tests.malicious_sim", str(tmp_path / "work"), str(cfg_file)], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = int(proc.stdout.split("RUN_ID=")[1].split()[0])
    with RunStore(tmp_path / "work" / "runs.db") as store:
        rounds = store.rounds(run_id)
        clients = store.client_rounds(run_id)
        evals = store.evaluations(run_id)
        assert store.run(run_id)["status"] == "finished"
    assert [(r["round"], r["accepted"], r["rejected"], r["aggregated"]) for r in rounds] == [
        (1, 2, 1, 1),
        (2, 2, 1, 1),
        (3, 2, 1, 1),
    ]
    reasons = [c["reason"] for c in clients if c["status"] == "rejected"]
    assert "non-finite values" in reasons[0] and "wrong shape" in reasons[1] and reason in reasons[2]
    # A +1000 shift on any tensor would send the loss far above this; DP noise alone does not.
    assert np.isfinite(evals[3]["loss"]) and evals[3]["loss"] < 3.0


def test_a_failed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    make_tabular(500).to_csv(data, index=False)
    cfg = tabular_config(data, rounds=3, server={"round_retries": 0, "round_timeout": 120, "wait_for_nodes": 60})
    cfg_file, marker, work = tmp_path / "cfg.json", tmp_path / "fail-round-2", tmp_path / "work"
    cfg_file.write_text(cfg.to_json(), encoding="utf-8")
    marker.touch()
    proc = run(["-m", "tests.flaky_sim", str(work), str(cfg_file), str(marker)], ROOT)
    assert "FAILED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    with RunStore(work / "runs.db") as store:
        (first,) = store.runs()
        assert first["status"] == "failed" and "round 2" in first["error"]
    assert (work / "checkpoints" / "run-1" / "round-00001.ckpt").exists()

    marker.unlink()
    proc = run(["-m", "fedguard.cli", "run", "resume", "1", "--store", str(work / "runs.db"), "--json"], ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with RunStore(work / "runs.db") as store:
        second = store.run(summary["run_id"])
        rounds = store.rounds(summary["run_id"])
        evals = store.evaluations(summary["run_id"])
    assert second["status"] == "finished" and int(second["resumed_from"]) == 1
    assert [(r["round"], r["aggregated"]) for r in rounds] == [(2, 1), (3, 1)]  # round 1 is not run again
    assert sorted(evals) == [2, 3]
    assert (work / f"privacy-report-run-{summary['run_id']}.html").is_file()  # ends like simulate: its reports
    # The reviewer of the resumed run is pointed at the interrupted one, whose releases count too.
    from server.privacy_report import build_privacy_report, render

    report = build_privacy_report(work / "runs.db", summary["run_id"])
    assert report.resumed_from == 1
    assert "Resumes run 1: the rounds before the interruption" in render(report, "md")


def test_an_evaluator_that_answers_late_scores_from_then_on() -> None:
    """A slow evaluator (its role reply missed the start) is picked up, not silently replaced by the server."""
    import numpy as np

    from server.rounds.base import Federation

    lines: list[str] = []

    def federation(signed: bool, evaluator_key: str = "") -> Federation:
        return Federation(
            None, tabular_config(), None, 1, 1, {}, signed=signed, evaluator_key=evaluator_key, meter=None,  # type: ignore[arg-type]
            progress=lines.append, rng=np.random.default_rng(0), roles={11: "client", 12: "client"},
        )  # fmt: skip

    fed = federation(signed=False)
    fed.adopt_evaluator()
    assert fed.scorer is not None and not fed.scorer.active  # nobody new: the server scores (or nobody)
    first = fed.scorer
    fed.adopt_evaluator()
    assert fed.scorer is first
    fed.roles[13] = "evaluator"
    fed.adopt_evaluator()
    assert fed.evaluator == 13 and fed.scorer.active
    assert lines == ["evaluator node 13 answered late; it scores and audits the rounds from now on"]
    # A named node is named as the round lines name it, not by its 19-digit SuperLink id.
    lines.clear()
    fed = federation(signed=False)
    fed.adopt_evaluator()
    fed.names[13] = "node-5"
    fed.roles[13] = "evaluator"
    fed.adopt_evaluator()
    assert lines == ["evaluator node-5 answered late; it scores and audits the rounds from now on"]
    assert fed.scorer.describe(fed.label) == "evaluator node-5 scores and audits every round's model"
    # Deployment: a claim from a key that is not the enrolled evaluator's is refused, and reported once.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.reply_signing import key_fingerprint

    def pem() -> bytes:
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    enrolled, other = pem(), pem()
    lines.clear()
    fed = federation(signed=True, evaluator_key=key_fingerprint(enrolled))
    fed.node_keys = {14: other, 15: enrolled}
    fed.adopt_evaluator()
    fed.roles[14] = "evaluator"
    fed.adopt_evaluator()
    fed.adopt_evaluator()
    assert fed.evaluator is None
    assert len(lines) == 1 and "not the enrolled evaluator" in lines[0]
    fed.roles[15] = "evaluator"
    fed.adopt_evaluator()
    assert fed.evaluator == 15


@pytest.mark.slow
def test_an_evaluator_that_refuses_its_held_out_data_stops_the_run_before_any_node_trains(tmp_path: Path) -> None:
    """The held-out file turns bad after simulate's own check (in a deployment the evaluator's file is never
    seen by anyone else): the evaluator refuses round 0 and the run fails at once, with every node's budget
    untouched. It used to train every round, spend every node's ε and end "finished" with no score."""
    data, holdout = tmp_path / "data.csv", tmp_path / "holdout.csv"
    make_tabular(400).to_csv(data, index=False)
    make_tabular(100, seed=1).to_csv(holdout, index=False)
    cfg = tabular_config(data, data={"schema": tabular_config().data.schema_.model_dump(by_alias=True),
                                     "evaluation_path": str(holdout)})  # fmt: skip
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from common.config import config_from_json
from common.errors import FedGuardError
from fedguard.simulate import simulate

def corrupt(run_cfg, partitions):
    path = Path(run_cfg.data.evaluation_path)
    path.write_text(path.read_text() + "0.1,0.2,w,g1,1\\n")  # an undeclared category of c

try:
    simulate(config_from_json({cfg.to_json()!r}), Path({str(tmp_path / "work")!r}), after_partitions=corrupt)
except FedGuardError as exc:
    print("FAILED", exc)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "FAILED the evaluator refused its held-out data before round 1: data-invalid" in out, out[-3000:]
    with RunStore(tmp_path / "work" / "runs.db") as store:
        (run,) = store.runs()
        assert run["status"] == "failed" and "nothing was trained" in run["error"]
        assert store.client_rounds(run["run_id"]) == [] and store.evaluations(run["run_id"]) == {}
