"""Threshold secure aggregation on a real federation: SuperLink (TLS + node auth), four SuperNodes + executors.

One federation serves the module. Training runs without DP noise and on the whole split in one
batch, so a node's update is the same whichever mode the run uses (up to float summation order):
the secagg round's model can then be compared with a plaintext FedAvg round of the same nodes.
A node stopped (SIGSTOP) right after its masked update left drops out of the unmask step; its
update is recovered from the others' shares. ``fedguard demo --secure-agg`` runs its own federation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.he_custody import flatten_state, trainable_keys
from server.checkpoint import checkpoint_dir, latest_good
from server.store import RunStore
from tests.helpers import ROOT, tabular_config, wait_until
from tests.test_deployment import Federation, bring_up

pytestmark = [pytest.mark.slow]

#: The last node has the least data: it finishes training first, so it can be stopped before the unmask step.
SIZES = {"alpha": 900, "beta": 900, "gamma": 900, "delta": 60}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with bring_up(tmp_path_factory.mktemp("secagg-deploy"), SIZES, seed=20, ready_timeout=180) as fed:
        yield fed


def config(mode: str, round_timeout: float = 60, batch_size: int = 4096, epochs: int = 3):  # noqa: ANN201
    return tabular_config(
        None,
        rounds=1,
        clients_per_round=4,
        secure_aggregation=mode,
        dp={"enabled": False},  # no noise: the same update in either mode
        train={"local_epochs": epochs, "batch_size": batch_size, "learning_rate": 0.01, "optimizer": "adam"},
        server={"round_timeout": round_timeout, "wait_for_nodes": 60, "norm_bound_factor": 0, "weight_cap_factor": 0},
        fairness={"federated_counts": False},
    )


def global_model(federation: Federation, flower_run: int) -> np.ndarray:
    store = federation.superlink.workdir / "runs.db"
    state = latest_good(checkpoint_dir(store, federation.fedguard_run(flower_run)), lambda _: None).state
    return flatten_state(state, trainable_keys(state))


def round_row(federation: Federation, flower_run: int) -> dict:
    with RunStore(federation.superlink.workdir / "runs.db") as store:
        return store.rounds(federation.fedguard_run(flower_run))[0]


@pytest.mark.timeout(600)
def test_a_secagg_round_equals_plaintext_fedavg_within_the_stated_error(federation: Federation) -> None:
    plain_run, _ = federation.run("plain", config("none"))
    masked_run, _ = federation.run("masked", config("secagg"))
    row = round_row(federation, masked_run)
    info = row["meta"]["secagg"]
    assert row["accepted"] == 4 and info["threshold"] == 3 and info["contributors"] == 4
    error = np.abs(global_model(federation, masked_run) - global_model(federation, plain_run)).max()
    assert error <= info["error_bound"] + 1e-5, (error, info["error_bound"])  # + float summation order
    # What left each node in the masked run: its masked vector, sealed shares, public keys; never a model tensor.
    for node in federation.nodes:
        sent = [json.loads(line) for line in (node.workdir / "work" / "sent.jsonl").read_text().splitlines()]
        masked_runs = {s["run"] for s in sent if "secagg-masked" in s["records"]}
        assert len(masked_runs) == 1
        assert not any("arrays" in s["records"] for s in sent if s["run"] in masked_runs)


@pytest.mark.timeout(600)
def test_a_node_stopped_after_masking_is_recovered_from_the_others_shares(federation: Federation) -> None:
    delta = federation.nodes[-1]

    def trained() -> int:  # train messages delta's executor finished (its reply handed to the SuperNode)
        lines = delta.events_path.read_text().splitlines() if delta.events_path.exists() else []
        return sum('"message_type": "train"' in line and '"completed"' in line for line in lines)

    seen = trained()
    # Small batches: the others train ~15× as many steps as delta, which is stopped between its reply
    # and the unmask request (that request waits for every masked update); it is given up on after 60 s.
    # Enough epochs that the others are still training well after delta's reply: at 5 epochs a quiet
    # machine trained them in 0.7 s, and in one full-suite run the unmask request reached delta before it
    # was stopped (recovered_from_shares 0). At 40: ~6 s quiet, well within the timeout when loaded.
    cfg = config("secagg", round_timeout=60, batch_size=8, epochs=40)
    run_file = federation.base / "dropout.toml"
    run_file.write_text(cfg.to_toml(), encoding="utf-8")
    sl = federation.superlink
    from server.runs import start_run, wait_for_run

    run = start_run(sl.address, federation.tls.ca_cert, ROOT, run_file, sl.workdir / "runs.db", sl.flwr_home)

    def masked_sent() -> bool:
        return trained() > seen

    wait_until(masked_sent, "delta's masked update", timeout=240, poll=0.05)
    time.sleep(1.5)  # the SuperNode forwards the reply to the SuperLink
    os.kill(delta.pids[0], signal.SIGSTOP)  # its SuperNode stops polling: it never answers the unmask request
    try:
        status = wait_for_run(run, sl.address, federation.tls.ca_cert, sl.flwr_home, timeout=300, poll=2.0)
    finally:
        os.kill(delta.pids[0], signal.SIGCONT)
    assert status.succeeded, status.details
    row = round_row(federation, run)
    info = row["meta"]["secagg"]
    assert row["aggregated"] == 1 and info["contributors"] == 4 and info["recovered_from_shares"] == 1, info


@pytest.mark.timeout(900)
def test_fedguard_demo_secure_agg_runs_a_deployed_federation(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "demo", "--secure-agg", "--rounds", "1", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "threshold secure aggregation (SecAgg" in proc.stdout and "t = 2 of 3" in proc.stdout
    with RunStore(tmp_path / "runs.db") as store:
        run = store.runs()[-1]
        rounds = store.rounds(run["run_id"])
    assert run["status"] == "finished" and rounds[0]["aggregated"] == 1
    assert rounds[0]["meta"]["secagg"]["contributors"] >= rounds[0]["meta"]["secagg"]["threshold"]
