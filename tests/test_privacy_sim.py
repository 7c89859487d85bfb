"""Budgets, planning, composition across runs and the privacy report, on real simulated federations.

One workdir is shared: run 1 (one node's budget too small), ``run plan``, then run 2 with central
DP on the same datasets; each step runs the real CLI in its own process (Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.ledger import Ledger
from common.privacy import epsilon_spent, epsilon_within
from server.fairness_report import FairnessReport
from server.privacy_report import PrivacyReport
from server.store import RunStore
from tests.helpers import ONE_ACTOR, ROOT, make_tabular, tabular_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def fedguard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("privacy-sim")
    data = tmp / "data.csv"
    make_tabular(700).to_csv(data, index=False)
    work = tmp / "work"
    base = {"num_clients": 2, "data_path": str(data), "budget_epsilon": [20.0, 0.5], **ONE_ACTOR}
    cfg1 = tabular_config(data, server={"min_replies": 1, "round_timeout": 120, "wait_for_nodes": 60}, simulation=base)
    (tmp / "run1.json").write_text(cfg1.to_json())
    first = fedguard("simulate", "--config", "run1.json", "--workdir", str(work), "--json", cwd=tmp)
    run1 = json.loads(first.stdout.splitlines()[-1])
    plan = json.loads(
        fedguard("run", "plan", "--config", "run1.json", "--workdir", str(work), "--json", cwd=tmp).stdout.splitlines()[
            -1
        ]
    )
    cfg2 = cfg1.model_copy(
        update={"central_dp": cfg1.central_dp.model_copy(update={"enabled": True, "noise_multiplier": 0.5})}
    )
    (tmp / "run2.json").write_text(cfg2.to_json())
    second = fedguard("simulate", "--config", "run2.json", "--workdir", str(work), "--json", cwd=tmp)
    run2 = json.loads(second.stdout.splitlines()[-1])
    return {
        "tmp": tmp, "work": work, "run1": run1, "run2": run2, "plan": plan, "store": run1["store"],
        "run1_progress": first.stderr, "run2_progress": second.stderr,
    }  # fmt: skip


def test_a_second_run_in_the_same_work_directory_says_what_the_first_spent(federation: dict) -> None:
    """The simulated owners keep their ledger in the work directory, so run 2 composes with run 1: it says so
    before training, with what each node spent (node-1, whose budget fit no round, spent nothing)."""
    with Ledger(federation["work"] / "partitions" / "ledger.db") as ledger:  # run 1's releases: all there was
        history = ledger.history("sim-partition-0", federation["run1"]["ledger_run_key"])
        budget, accountant = ledger.budget("sim-partition-0"), ledger.releases("sim-partition-0")[0]["accountant"]
        (summary,) = [s for s in ledger.summaries() if s.dataset_id == "sim-partition-0"]
    (run1,) = [r for r in summary.runs if r.run_id == federation["run1"]["ledger_run_key"]]
    assert budget is not None
    # Against the budget: run 1's ε at the budget's δ less its fairness counts' selection share, the figure
    # `fedguard client budget` showed then (4.790, where the whole δ gives 4.787).
    spent = epsilon_within(history, budget.delta, run1.extra_delta, accountant)
    assert run1.extra_delta > 0 and spent > epsilon_spent(history, budget.delta, accountant)
    assert (
        f"already spent part of the simulated owners' budgets (node-0 ε {spent:.3f} of 20);"
        in (federation["run2_progress"])
    )


def test_simulate_says_before_training_what_its_own_settings_make_impossible(federation: dict, tmp_path: Path) -> None:
    """node-1's budget (0.5) is below the target ε 4: a warning before training; when no owner's budget
    covers the target the run is refused before anything is written or spent (``fedguard demo --epsilon 20``
    once failed that way: every node refused round 1); so is sampling more nodes than the simulation has."""
    from common.errors import ConfigError
    from fedguard.demo import demo_config
    from fedguard.simulate import check_simulation, plan, simulate

    progress = federation["run1_progress"]
    assert "WARNING: the run's target ε = 4 exceeds the simulated owners' budget ε = 0.5" in progress
    assert "on node-1: they will refuse" in progress
    assert progress.index("WARNING: the run's") < progress.index("round 1")
    cfg = tabular_config(tmp_path / "data.csv", simulation__budget_epsilon=3.0)
    with pytest.raises(ConfigError, match=r"target ε = 4 exceeds .* budget ε = 3 .* on every node") as err:
        simulate(cfg, tmp_path / "work")
    assert "budget_epsilon to at least 4" in (err.value.fix or "")
    assert not (tmp_path / "work").exists()
    for command in (simulate, plan):  # each waited wait_for_nodes (120 s) for a node that never came
        with pytest.raises(ConfigError, match=r"clients_per_round = 3 exceeds \[simulation\] num_clients = 2"):
            command(tabular_config(tmp_path / "data.csv", clients_per_round=3), tmp_path / "work")
    demo = demo_config(tmp_path / "gss.csv", epsilon=20.0)
    check_simulation(demo, progress=pytest.fail)  # the demo's owners can afford what the demo asks
    assert demo.simulation.budget_for(0) == 20.0 and demo_config(tmp_path / "gss.csv").simulation.budget_for(0) == 10


def test_simulate_refuses_before_training_a_delta_that_a_node_would_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Diamonds, 4 nodes, δ = 1e-5: the node with 11,878 training rows refused every round (δ > 1/(10·n)), the run
    finished without its data and the reason was in its log only. Now the run is refused before any node starts,
    the node named, with a δ it accepts: rounded down (8.6e-06 → 8e-06; the node's own fix once said 9e-06)."""
    from common.config import DPConfig
    from common.errors import ConfigError
    from common.privacy import delta_within, max_delta, plan_dp
    from fedguard.simulate import simulate

    data = tmp_path / "data.csv"
    make_tabular(600).to_csv(data, index=False)  # 480 after the hold-out: 240 per node, 192 training rows each
    cfg = tabular_config(data, dp__delta=1e-3)
    with pytest.raises(ConfigError) as err:
        simulate(cfg, tmp_path / "work", progress=lambda _: None)
    said = "dp.delta: δ = 0.001 is larger than 1/(10·n) on node-0 (192 training records: at most 0.000521)"
    assert str(err.value).startswith(said)
    assert "node-1 (192 training records" in str(err.value) and "would refuse every round" in str(err.value)
    assert err.value.where == "dp.delta" and (err.value.fix or "").startswith("set dp.delta ≤ 0.0005 ")
    assert (
        not (tmp_path / "work" / "runs.db").exists() and not (tmp_path / "work" / "partitions" / "ledger.db").exists()
    )
    accepted = DPConfig(target_epsilon=4.0, delta=delta_within(max_delta(192)))
    plan_dp(192, accepted, batch_size=32, local_epochs=1, rounds=2)  # the fix's δ is one the node accepts
    assert delta_within(8.6e-6) == pytest.approx(8e-6) and delta_within(1e-5) == pytest.approx(1e-5)
    assert max_delta(11_628) > 8.5e-6 and delta_within(max_delta(11_628)) <= max_delta(11_628)
    # `fedguard run plan` still asks the nodes (their verdict: privacy-plan-infeasible) and says why beforehand
    import fedguard.simulate

    monkeypatch.setattr(fedguard.simulate, "run_on_simulation", lambda *a, **k: None)  # the nodes' part: not here
    lines: list[str] = []
    fedguard.simulate.plan(cfg, tmp_path / "planned", progress=lines.append)
    assert any(line.startswith("WARNING: " + said) and "set dp.delta ≤ 0.0005" in line for line in lines), lines
    # without DP there is no δ to refuse
    cfg_off = tabular_config(data, dp={"enabled": False}, rounds=1)
    from fedguard.simulate import check_delta

    check_delta(cfg_off, tmp_path / "work" / "partitions")


def test_a_second_simulation_in_the_same_work_directory_waits_for_none_and_touches_nothing(tmp_path: Path) -> None:
    """Two `fedguard simulate` (or `run plan`) in one work directory at once: the second would rewrite the
    partition files the first one's nodes read. It stops before writing anything."""
    from common.errors import FedGuardError
    from fedguard.simulate import plan, simulate, work_dir_lock

    data = tmp_path / "data.csv"
    make_tabular(60).to_csv(data, index=False)
    work = tmp_path / "work"
    with work_dir_lock(work):  # the first run, still going
        for second in (simulate, plan):
            with pytest.raises(FedGuardError, match="another fedguard simulate, run plan or run resume is using"):
                second(tabular_config(data), work)
    assert not (work / "partitions").exists()


def test_a_node_out_of_budget_refuses_and_the_run_continues(federation: dict) -> None:
    with RunStore(federation["store"]) as store:
        run = federation["run1"]["run_id"]
        rounds = store.rounds(run)
        clients = store.client_rounds(run)
        assert store.run(run)["status"] == "finished"
    assert [(r["accepted"], r["refused"], r["aggregated"]) for r in rounds] == [(1, 1, 1), (1, 1, 1)]
    refused = [c for c in clients if c["status"] == "refused"]
    assert len(refused) == 2 and all("budget-exhausted" in c["reason"] for c in refused)
    assert all(c["received"] == ["refusal.code", "refusal.log-id"] for c in refused)


def test_plan_shows_spent_budget_and_who_cannot_afford(federation: dict) -> None:
    plans = sorted(federation["plan"], key=lambda p: p["budget-epsilon"])
    poor, rich = plans
    assert (poor["name"], rich["name"]) == ("node-1", "node-0")  # as the round lines name them, not by SuperLink id
    assert poor["status"] == "planned" and poor["affordable"] == 0 and poor["budget-epsilon"] == 0.5
    assert rich["affordable"] == 1 and rich["epsilon-total"] > 0
    # The node's answer is its ledger's history (run 1) composed with the planned run, at its budget δ less the
    # group selection of the counts releases (run 1's and the planned one: 1e-7 each).
    with Ledger(federation["work"] / "partitions" / "ledger.db") as ledger:
        run1 = ledger.history("sim-partition-0")[:3]  # 2 DP-SGD rounds and the fairness counts
    assert run1[2] == (tabular_config().fairness.count_noise_multiplier, 1.0, 1)  # one Gaussian release, q = 1
    # the planned run: its 2 rounds and the counts after the last one
    planned = [(rich["noise-multiplier"], rich["sample-rate"], int(rich["steps-per-round"]))] * 2 + [run1[2]]
    assert rich["epsilon-total"] == pytest.approx(epsilon_spent(run1, rich["budget-delta"] - 1e-7))
    assert rich["epsilon-after"] == pytest.approx(epsilon_spent(run1 + planned, rich["budget-delta"] - 2e-7))
    assert "num-examples" not in rich  # sizes never leave a node


def test_epsilon_composes_across_runs(federation: dict) -> None:
    with RunStore(federation["store"]) as store:
        first = [c for c in store.client_rounds(federation["run1"]["run_id"]) if c["status"] == "accepted"]
        second = [c for c in store.client_rounds(federation["run2"]["run_id"]) if c["status"] == "accepted"]
    end_of_run1 = first[-1]["values"]["epsilon-total"]
    start_of_run2 = second[0]["values"]
    assert start_of_run2["epsilon-total"] > end_of_run1  # run 2 starts from run 1's total
    assert start_of_run2["epsilon"] < end_of_run1  # while the run's own ε starts afresh


def test_privacy_report_json_and_html(federation: dict) -> None:
    tmp, store, run2 = federation["tmp"], federation["store"], federation["run2"]["run_id"]
    fedguard("report", "privacy", str(run2), "--store", store, "--format", "json", "--out", "r.json", cwd=tmp)
    report = PrivacyReport.model_validate_json((tmp / "r.json").read_text())
    assert len(report.clients) == 2 and report.config_hash and report.versions["opacus"]
    assert report.central_dp is not None and report.central_dp.epsilon and len(report.central_dp.rounds) == 2
    accepted = next(c for c in report.clients if c.refusals == 0)
    assert accepted.epsilon_total and accepted.budget_remaining == pytest.approx(20.0 - accepted.epsilon_total)
    assert {v.privacy_class for v in accepted.sent} >= {"DP-protected", "declared public", "DP accounting"}
    fedguard("report", "privacy", str(run2), "--store", store, "--format", "html", "--out", "r.html", cwd=tmp)
    page = (tmp / "r.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "<script src" not in page
    assert page.count('class="eps-series"') == 2
    for client in report.clients:
        for rnd in client.rounds:
            if rnd.epsilon_run is not None:
                assert f"{rnd.epsilon_run:.3f}" in page
    assert "Central (user-level) DP" in page


def test_the_evaluator_node_scores_and_audits_every_round(federation: dict) -> None:
    tmp, store_path, run1 = federation["tmp"], federation["store"], federation["run1"]["run_id"]
    with RunStore(store_path) as store:
        audits = store.audits(run1)
        clients = store.client_rounds(run1)
    assert [a["round"] for a in audits] == [0, 1, 2]
    assert all(a["evaluated_by"].startswith("evaluator node") for a in audits)
    evaluator = int(audits[0]["evaluated_by"].split()[-1])
    assert evaluator not in {c["node_id"] for c in clients}  # it never trains
    assert audits[-1]["provenance"]["evaluation_size"] == 140 and len(audits[-1]["provenance"]["sha256"]) == 64
    fedguard("report", "fairness", str(run1), "--store", store_path, "--format", "json", "--out", "f.json", cwd=tmp)
    report = FairnessReport.model_validate_json((tmp / "f.json").read_text())
    assert [r.round for r in report.rounds] == [0, 1, 2] and report.provenance.evaluation_size == 140
    # The federated view: the node with budget left sent noised counts; the exhausted one refused.
    with RunStore(store_path) as store:
        releases = sorted((r["status"], r["reason"] or "") for r in store.count_releases(run1))
    assert [s for s, _ in releases] == ["accepted", "refused"] and "budget" in releases[1][1]
    assert report.federated is not None and report.federated.clients == 1
    assert report.federated.noise is not None and "Gaussian" in report.federated.noise
    # its disparities get intervals over the counts' noise (tests/test_fairness.py), as the central view's
    assert report.federated.confidence == 0.95 and report.federated.bootstrap_n > 0
