"""Faults in a real deployment: SIGKILLed processes on 127.0.0.1, restarted as an operator would.

One federation (a server and three client nodes, each a `fedguard ... start` process in its own
process group; the provisioned evaluator is never started) is shared by the two process
scenarios, which run in this order (the second uses the server the first restarted):

1. **The SuperLink dies during round 2** (DP off, so training is deterministic). Once round 1 is
   in the run store and a node has pulled its round-2 task, the SuperLink process (pid in
   ``server.json``) is SIGKILLed and its ``fedguard server start`` wrapper stopped; the server is
   started again with the same kit, workdir and port. Proves: the dead run's ServerApp exits
   with its SuperLink and records the run as failed (nothing keeps writing to the store); the
   server restarts on the same port at once (connections left in TIME_WAIT do not block it);
   the SuperNodes ride out the outage and reconnect by themselves, none left holding a task of
   the dead run; ``fedguard run resume`` continues the run from its last checkpoint as a new
   run linked by ``resumed_from``; rounds 1, 2 and 3 are each recorded once across the two runs,
   every round with all three nodes; and the final model equals the final model of the same
   config run uninterrupted afterwards on the same federation, to 1e-5 (observed 3e-8 to 1.2e-7:
   float32 summation order of the shuffled full batch and of FedAvg; the model moves 8e-3 in
   rounds 2-3).
2. **A client node dies during round 2** (DP on). Once the node has reserved its round-2 release
   in its ledger (so it is training), its whole process group (``fedguard client start``,
   SuperNode, executor) is SIGKILLed and the node restarted with the same kit, key and workdir.
   Proves: the restarted node gets in at once with the same node id (it takes over its crashed
   session, which the SuperLink would otherwise hold for up to a minute); round 2 completes
   with the other two (min_replies 2) after ``round_timeout`` and records the killed node as
   dropped; its interrupted release stays in its ledger as pending (a crash over-counts, never
   under-counts); and the restarted node trains and is accepted in round 3.

A third, in-process test pins the Flower 1.42 bug behind a node wedged after a SuperLink crash
and FedGuard's patch of it (``common.flower_internals.clean_up_receives_of_stopped_runs``).

Faults are triggered on observed state (run store rows, SuperNode log lines, ledger rows), never
on fixed sleeps. Data and models are tiny: the machine running these has two busy cores, where
a Flower round takes 10-20 s (the SuperNode polls every 3 s); the file takes about 6.5 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
import tomli_w

from common.kit import fingerprint_cert
from common.processes import descendants, free_port
from server.checkpoint import checkpoint_dir, latest_good
from server.store import RunStore
from tests.helpers import ROOT, TABULAR_SCHEMA, make_tabular, tabular_config, text, wait_until, write_run_toml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
NODES = ("alpha", "beta", "gamma")
#: Rows per node; gamma's larger set keeps it training long enough to be killed mid-round.
ROWS = {"alpha": 150, "beta": 200, "gamma": 1000}


def fedguard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """A `fedguard` command in a new session: its children share its process group, ours to kill."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedguard.cli", *args],
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group we created for ``proc`` (its pid is the group id)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM our wrapper (it stops its children), then SIGKILL whatever is left in its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)
    proc.wait(timeout=30)


class Federation:
    """The server and nodes of this module, as processes the tests may kill and restart."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.kits = base / "kits"
        self.srv = base / "srv"
        self.port = free_port()
        self.ca_fp = ""
        self.server: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, int] = {}
        self.spent: list[subprocess.Popen[bytes]] = []  # killed or replaced: reaped in teardown

    @property
    def store(self) -> Path:
        return self.srv / "runs.db"

    @property
    def server_log(self) -> Path:
        return self.base / "server.log"

    def start_server(self) -> None:
        start = len(text(self.server_log))
        self.server = spawn(
            self.server_log,
            *("server", "start", "--kit", str(self.kits / "server"), "--workdir", str(self.srv)),
            *("--port", str(self.port), "--ca-fingerprint", self.ca_fp),
        )
        wait_until(
            lambda: "server ready" in text(self.server_log)[start:],
            "server ready",
            alive=((self.server, self.server_log),),
        )

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.srv / "server.json").read_text()))

    def node_log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    def start_node(self, name: str) -> None:
        self.nodes[name] = spawn(
            self.node_log(name),
            *("client", "start", "--kit", str(self.kits / "nodes" / name), "--workdir", str(self.base / name)),
            *("--data", str(self.base / f"{name}.csv"), "--schema", str(self.base / "schema.toml")),
            *("--superlink", f"localhost:{self.port}", "--ca-fingerprint", self.ca_fp),
            *("--policy", str(self.base / "policy.toml")),
        )

    def wait_joined(self, name: str, after: int = 0) -> int:
        found = wait_until(
            lambda: re.search(r"joined as node (\d+)", text(self.node_log(name))[after:]),
            f"{name} to join",
            alive=((self.nodes[name], self.node_log(name)),),
        )
        return int(found.group(1))

    def supernode_log(self, name: str) -> Path:
        return self.base / name / "supernode.log"

    def run(self, *args: str, timeout: float = 500) -> subprocess.CompletedProcess[str]:
        signing = ("--signing-key", str(self.kits / "admin" / "run-signing.key"))
        proc = fedguard("run", *args, "--server-workdir", str(self.srv), *signing, timeout=timeout)
        assert proc.returncode == 0, f"run {args}: {proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
        return proc

    def runs(self) -> list[dict[str, Any]]:
        if not self.store.exists():
            return []
        with RunStore(self.store) as store:
            return store.runs()

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        with RunStore(self.store) as store:
            return store.rounds(run_id)

    def teardown(self) -> None:
        for proc in [*self.nodes.values(), *([self.server] if self.server else []), *self.spent]:
            try:
                stop(proc)
            except Exception:  # noqa: BLE001 - keep stopping the others
                kill_group(proc)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("faults")
    (base / "federation.toml").write_text(
        tomli_w.dumps(
            {
                "name": "faults",
                # An evaluator must be provisioned; it is never started (no scoring is needed here).
                "nodes": [{"name": n, "organisation": f"Clinic {n.title()}"} for n in NODES]
                + [{"name": "judge", "organisation": "Ethics board", "role": "evaluator"}],
            }
        )
    )
    proc = fedguard(
        "provision", "init", str(base / "federation.toml"), "--out", str(base / "kits"), "--generate-node-keys"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (base / "schema.toml").write_text(tomli_w.dumps(TABULAR_SCHEMA))
    # Scenario 1 trains without DP (deterministic); the owners' policy must allow it.
    (base / "policy.toml").write_text(tomli_w.dumps({"require_dp": False}))
    for i, name in enumerate(NODES):
        make_tabular(ROWS[name], seed=40 + i).to_csv(base / f"{name}.csv", index=False)
    fed = Federation(base)
    fed.ca_fp = fingerprint_cert(fed.kits / "server" / "ca.crt")
    try:
        fed.start_server()
        for name in NODES:
            fed.start_node(name)
        for name in NODES:
            fed.node_ids[name] = fed.wait_joined(name)
        yield fed
    finally:
        fed.teardown()


def test_a_run_that_stops_while_a_node_receives_its_message_does_not_wedge_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process: the Flower bug behind a wedged node after a SuperLink crash, and FedGuard's patch."""
    import flwr.supernode.start_client_internal as sci
    from flwr.common.constant import SubStatus
    from flwr.supercore.run import RunNotRunningException

    from common.flower_internals import clean_up_receives_of_stopped_runs as _clean_up_receives_of_stopped_runs

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)  # undone after the test
    message: Any = SimpleNamespace(
        metadata=SimpleNamespace(run_id=5, group_id="2", message_type="train", message_id="m-1")
    )

    def stopped(run_id: int, object_id: str) -> bytes:
        raise RunNotRunningException  # the restarted SuperLink: the run is no longer running

    def receive() -> tuple[MagicMock, MagicMock]:
        state, store = MagicMock(), MagicMock()
        state.create_task.return_value = 7
        store.preregister.return_value = ["object-1"]
        returned = sci._pull_and_store_message(
            state=state,
            object_store=store,
            node_config={},
            receive=lambda: (message, MagicMock()),
            get_run=MagicMock(),
            get_fab=MagicMock(),
            pull_object=stopped,
            confirm_message_received=MagicMock(),
            trusted_entities=None,
        )
        assert returned is None
        return state, store

    state, _ = receive()
    # flwr 1.42 as shipped: the task stays claimable with a message whose objects never arrive.
    assert state.create_task.called and not state.finish_task.called and not state.delete_messages.called
    _clean_up_receives_of_stopped_runs()
    state, store = receive()
    assert (
        state.finish_task.call_args.args[0] == 7
        and state.finish_task.call_args.kwargs["sub_status"] == SubStatus.FAILED
    )
    state.delete_messages.assert_called_once_with(message_ids=["m-1"])
    store.delete.assert_called_once_with("m-1")


def deterministic_config(name: str) -> Any:
    """DP off, one full batch per local epoch and plain SGD: the same inputs give the same model."""
    return tabular_config(
        name=name,
        rounds=3,
        clients_per_round=3,
        seed=11,
        train={"local_epochs": 2, "batch_size": 4096, "learning_rate": 0.3, "optimizer": "sgd"},
        dp={"enabled": False},
        model={"name": "ft-transformer", "params": {"d_model": 8, "layers": 1, "heads": 2, "dropout": 0.0}},
        # Every round needs all three replies: a lost node fails the run instead of changing the model.
        server={"round_timeout": 60, "wait_for_nodes": 120, "min_replies": 3, "round_retries": 0},
    )


def submitted_run(stdout: str) -> int:
    found = re.search(r"as Flower run (\d+)", stdout)
    assert found, stdout
    return int(found.group(1))


def store_run(fed: Federation, flower_run_id: int) -> dict[str, Any] | None:
    return next((r for r in fed.runs() if r["flower_run_id"] == str(flower_run_id)), None)


def test_superlink_killed_in_round_2_then_restarted_and_the_run_resumed(fed: Federation) -> None:
    t0 = time.monotonic()
    config = write_run_toml(deterministic_config("resumable"), fed.base / "resumable.toml")
    flower_id = submitted_run(fed.run("start", "--config", str(config)).stdout)

    def round_1_done() -> dict[str, Any] | None:
        run = store_run(fed, flower_id)
        return run if run and [r["round"] for r in fed.rounds(run["run_id"])] == [1] else None

    run = wait_until(round_1_done, "round 1 in the run store")
    run_id = int(run["run_id"])
    marker = f"[RUN {flower_id}, ROUND 2]"
    wait_until(lambda: any(marker in text(fed.supernode_log(n)) for n in NODES), "a node to pull its round-2 task")
    assert [r["round"] for r in fed.rounds(run_id)] == [1], "round 2 finished before the kill"

    superlink = int(fed.state()["pid"])
    children = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(superlink)}
    assert any(b"flwr-serverapp" in cmd for cmd in children.values()), children
    os.kill(superlink, signal.SIGKILL)
    print(f"[{time.monotonic() - t0:.0f}s] SuperLink {superlink} killed")
    assert fed.server is not None
    stop(fed.server)
    fed.spent.append(fed.server)
    # The dead run's ServerApp (and SuperExec) must not outlive their SuperLink.
    wait_until(lambda: not any(pid_alive(p) for p in children), "the SuperLink's children to exit", timeout=60)
    # ... and recorded on its way out that its run failed; nothing resumes it behind our back.
    dead = wait_until(lambda: (r := store_run(fed, flower_id)) and r["status"] != "running" and r, "the run to fail")
    assert dead["status"] == "failed", dead

    fed.start_server()
    print(f"[{time.monotonic() - t0:.0f}s] server restarted")
    resumed_out = fed.run("resume", str(run_id), "--follow", "--timeout", "400").stdout
    print(f"[{time.monotonic() - t0:.0f}s] resumed:\n{resumed_out[-2500:]}")
    resumed = store_run(fed, submitted_run(resumed_out))
    assert resumed is not None
    for name in NODES:
        assert fed.nodes[name].poll() is None, text(fed.node_log(name))[-2000:]

    # The continuation is linked to the run it resumes; each round is recorded exactly once.
    assert resumed["status"] == "finished" and int(resumed["resumed_from"]) == run_id
    original_rounds, resumed_rounds = fed.rounds(run_id), fed.rounds(int(resumed["run_id"]))
    assert [r["round"] for r in original_rounds] == [1]
    assert [r["round"] for r in resumed_rounds] == [2, 3]
    assert all(r["accepted"] == 3 and r["aggregated"] for r in original_rounds + resumed_rounds)

    # The same config, uninterrupted, on the same federation: the reference for the final model.
    reference_out = fed.run("start", "--config", str(config), "--follow", "--timeout", "400").stdout
    reference = store_run(fed, submitted_run(reference_out))
    assert reference is not None and reference["status"] == "finished"
    print(f"[{time.monotonic() - t0:.0f}s] reference finished")
    final = latest_good(checkpoint_dir(fed.store, int(resumed["run_id"])))
    expected = latest_good(checkpoint_dir(fed.store, int(reference["run_id"])))
    after_round_1 = latest_good(checkpoint_dir(fed.store, run_id))
    assert final.round == expected.round == 3 and after_round_1.round == 1
    diff = max(float(np.max(np.abs(final.state[k] - expected.state[k]))) for k in expected.state)
    moved = max(float(np.max(np.abs(final.state[k] - after_round_1.state[k]))) for k in expected.state)
    print(f"max |resumed - reference| = {diff:.3g}; max |resumed - round 1| = {moved:.3g}")
    assert diff < 1e-5 and moved > 1e-3


def ledger_rows(fed: Federation, name: str) -> list[dict[str, Any]]:
    """The node's ledger releases, read-only (the node keeps writing it)."""
    path = fed.base / name / "ledger.db"
    if not path.exists():
        return []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT run_id, round, message_id, status FROM releases ORDER BY seq")]
        except sqlite3.OperationalError:  # not created yet
            return []


def test_client_node_killed_in_round_2_is_dropped_and_rejoins_for_round_3(fed: Federation) -> None:
    t0 = time.monotonic()
    before = {r["message_id"] for r in ledger_rows(fed, "gamma")}
    cfg = tabular_config(
        name="node-crash",
        rounds=3,
        clients_per_round=3,
        seed=5,
        train={"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "optimizer": "sgd"},
        dp={"enabled": True, "target_epsilon": 3.0, "delta": 1e-4},
        model={"name": "ft-transformer", "params": {"d_model": 8, "layers": 1, "heads": 2}},
        # Long enough for the restart (the node takes over its crashed session at once), so it is
        # back before round 3 samples the nodes online: the server does not wait for nodes per round.
        server={"round_timeout": 60, "wait_for_nodes": 120, "min_replies": 2, "round_retries": 0},
    )
    flower_id = submitted_run(fed.run("start", "--config", str(write_run_toml(cfg, fed.base / "crash.toml"))).stdout)

    def reserved_round_2() -> dict[str, Any] | None:
        rows = [r for r in ledger_rows(fed, "gamma") if r["message_id"] not in before]
        return next((r for r in rows if r["round"] == 2), None)

    # The node reserves each release in its ledger before it trains: pending = training now.
    release = wait_until(reserved_round_2, "gamma to reserve its round-2 release", timeout=240, poll=0.02)
    victim = fed.nodes["gamma"]
    tree = [victim.pid, *descendants(victim.pid)]
    kill_group(victim)
    assert release["status"] == "pending", "gamma finished training before it could be killed"
    victim.wait(timeout=30)
    fed.spent.append(victim)
    wait_until(lambda: not any(pid_alive(p) for p in tree), "gamma's processes to exit", timeout=30)
    print(f"[{time.monotonic() - t0:.0f}s] gamma killed in round 2 ({len(tree)} processes)")

    offset = len(text(fed.node_log("gamma")))
    fed.start_node("gamma")
    assert fed.wait_joined("gamma", after=offset) == fed.node_ids["gamma"]  # the key decides the node id
    print(f"[{time.monotonic() - t0:.0f}s] gamma rejoined")
    run = store_run(fed, flower_id)
    assert run is not None
    # Signing the crashed session off (common.flower_internals.take_over_crashed_session) makes the
    # SuperLink answer its round-2 message with an error at once, so round 2 may close before the
    # test sees the node back; round 3 must not have closed without it.
    assert [r["round"] for r in fed.rounds(run["run_id"])] in ([1], [1, 2]), "round 3 ended before gamma was back"

    run = wait_until(
        lambda: (r := store_run(fed, flower_id)) and r["status"] != "running" and r, "the run to end", timeout=300
    )
    print(f"[{time.monotonic() - t0:.0f}s] run ended: {run['status']} {run['error']}")
    assert run["status"] == "finished", run["error"]
    rounds = fed.rounds(run["run_id"])
    # A killed node is dropped (the README's word), never "failed": that is for a node that answered an error.
    assert [(r["round"], r["accepted"], r["dropped"], r["failed"]) for r in rounds] == [
        (1, 3, 0, 0),
        (2, 2, 1, 0),
        (3, 3, 0, 0),
    ]
    with RunStore(fed.store) as store:
        gamma_rows = [r for r in store.client_rounds(run["run_id"]) if r["node_id"] == fed.node_ids["gamma"]]
    gamma = {r["round"]: r["status"] for r in gamma_rows}
    assert gamma == {1: "accepted", 2: "dropped", 3: "accepted"}, gamma_rows
    reason = next(r["reason"] for r in gamma_rows if r["round"] == 2)
    assert "offline" in reason or "expired" in reason or "no reply" in reason, reason

    # The interrupted release stays spent in the node's ledger: a crash over-counts, never under-counts.
    rows = [r for r in ledger_rows(fed, "gamma") if r["message_id"] not in before]
    assert [(r["round"], r["status"]) for r in rows] == [(1, "confirmed"), (2, "pending"), (3, "confirmed")]
    assert rows[1]["message_id"] == release["message_id"]
