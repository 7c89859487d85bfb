"""Only enrolled keys take part (issue 20, items 2 and 4).

In process (fast): ``Federation.refresh`` intersects the SuperLink's registered keys with the
enrolled set ``server start`` writes; a stranger is never asked, never sampled, alarmed once per
run (run store, operator log, audit log); deployment fails closed without the enrolled set; old
run stores open and gain the alarms table.

Real processes (slow): ``server start`` reconciles the SuperLink's registry with the kit — a key
an insider registered with ``flwr supernode register`` is removed, a real node an insider
unregistered is registered again, a revoked node stays out and no longer breaks the next start —
and a rogue SuperNode online during a run is never sampled and shows as an alarm in
``fedguard run status``, while the other nodes train.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.reply_signing import key_fingerprint
from common.resources import Meter
from server.enrollment import (
    WORKDIR_ENV,
    Enrolled,
    EnrollmentError,
    drop_enrolled,
    enrolled_path,
    read_enrolled,
    write_enrolled,
)
from server.grid_io import MeteredGrid
from server.rounds.base import STRANGER, Federation
from server.store import RunStore
from tests.helpers import tabular_config


# -- in process: the intersection on Federation.refresh -----------------------------------------------------------
def _pem_key() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class FakeGrid:
    """The Grid calls ``refresh`` makes: registered nodes with keys, online ids; pushes are recorded, never answered."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        self.keys = keys
        self.pushed: list[int] = []

    def get_nodes(self) -> list[Any]:
        return [SimpleNamespace(node_id=n, public_key=k) for n, k in self.keys.items()]

    def get_node_ids(self) -> list[int]:
        return list(self.keys)

    def push_messages(self, messages: Any) -> list[str]:
        messages = list(messages)
        self.pushed += [int(m.metadata.dst_node_id) for m in messages]
        return [""] * len(messages)  # unreachable: no reply to wait for

    def pull_messages(self, ids: Any) -> list[Any]:
        return []


@pytest.fixture
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    keys = {11: _pem_key(), 22: _pem_key(), 33: _pem_key(), 44: _pem_key()}  # 44: the stranger
    fps = {n: key_fingerprint(k) for n, k in keys.items()}
    workdir = tmp_path / "srv"
    workdir.mkdir()
    write_enrolled(
        workdir,
        [
            Enrolled("alpha", "client", fps[11]),
            Enrolled("beta", "client", fps[22]),
            Enrolled("judge", "evaluator", fps[33]),
        ],
    )
    monkeypatch.setenv(WORKDIR_ENV, str(workdir))
    grid = FakeGrid(keys)
    cfg = tabular_config()
    store = RunStore(workdir / "runs.db")
    run_id = store.create_run("t", cfg.to_json(), cfg.digest(), 7)
    lines: list[str] = []
    fed = Federation(
        MeteredGrid(grid),  # type: ignore[arg-type]
        cfg,
        store,
        run_id,
        7,
        {},
        signed=True,
        evaluator_key=fps[33],
        meter=Meter(),
        progress=lines.append,
        rng=np.random.default_rng(0),
    )
    fed.roles = {11: "client", 22: "client", 33: "evaluator"}  # known: only unknown nodes would be asked
    return {"fed": fed, "grid": grid, "fps": fps, "store": store, "run_id": run_id, "lines": lines, "workdir": workdir}


def test_a_stranger_is_never_asked_never_sampled_and_alarmed_once(setting: dict[str, Any]) -> None:
    fed, grid, fps, store = setting["fed"], setting["grid"], setting["fps"], setting["store"]
    for _ in range(3):  # three rounds
        clients = fed.refresh()
        assert clients == [11, 22]
        assert set(fed.sample(clients)) <= {11, 22}
    assert 44 not in fed.node_keys  # its replies fail the envelope check: no key to verify them with
    assert grid.pushed == []  # never asked for its role
    assert fed.evaluator == 33
    (alarm,) = store.alarms(setting["run_id"])
    assert alarm["kind"] == STRANGER and alarm["subject"] == fps[44] and alarm["node_id"] == 44
    assert fps[44] in alarm["detail"]
    assert [line for line in setting["lines"] if "ALARM" in line] == [f"ALARM: {alarm['detail']}"]
    from server.control.audit import AuditLog

    (entry,) = [e for e in AuditLog(setting["workdir"]).entries() if e.action == "node.stranger"]
    assert entry.target == f"{fps[44]} (node 44)" and f"run {setting['run_id']}" in entry.outcome


def test_nodes_passed_in_are_filtered_too(setting: dict[str, Any]) -> None:
    assert setting["fed"].refresh([11, 44]) == [11]


def test_a_revocation_takes_effect_at_the_next_round(setting: dict[str, Any]) -> None:
    fed, fps = setting["fed"], setting["fps"]
    assert fed.refresh() == [11, 22]
    drop_enrolled(setting["workdir"], fps[22])
    assert fed.refresh() == [11]
    assert {a["subject"] for a in setting["store"].alarms(setting["run_id"])} == {fps[44], fps[22]}


def test_an_enrolled_key_claiming_the_evaluator_role_is_not_the_evaluator(setting: dict[str, Any]) -> None:
    fed = setting["fed"]
    fed.roles[11] = "evaluator"  # a client claims the role: bound to the enrolled evaluator key, so ignored
    fed.refresh()
    assert fed.evaluator == 33


def test_without_a_server_workdir_there_is_no_intersection(
    setting: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WORKDIR_ENV)
    fed = setting["fed"]
    fed.roles[44] = "client"  # as if it had answered the role query (simulation and tests: no kit to check)
    assert fed.refresh() == [11, 22, 44]
    assert 44 in fed.node_keys
    assert setting["store"].alarms(setting["run_id"]) == []


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_deployment_fails_closed_without_the_enrolled_set(setting: dict[str, Any], damage: str) -> None:
    path = enrolled_path(setting["workdir"])
    if damage == "missing":
        path.unlink()
    else:
        path.write_text("{not json")
    with pytest.raises(EnrollmentError, match="no node can be trusted") as err:
        setting["fed"].refresh()
    assert err.value.where == str(path) and err.value.fix


def test_the_enrolled_set_is_private_and_atomic(tmp_path: Path) -> None:
    path = write_enrolled(tmp_path, [Enrolled("a", "client", "SHA256:x")])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_enrolled(tmp_path) == {"SHA256:x": Enrolled("a", "client", "SHA256:x")}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    drop_enrolled(tmp_path, "SHA256:x")
    assert read_enrolled(tmp_path) == {}


def test_an_older_run_store_gains_the_alarms_table(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        run_id = store.create_run("old", "{}", "h", 1)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE alarms")  # as a store from before alarms existed
    with RunStore(path) as store:
        assert store.alarms(run_id) == []
        assert store.record_alarm(run_id, STRANGER, "SHA256:k", node_id=5, detail="d")
        assert not store.record_alarm(run_id, STRANGER, "SHA256:k", node_id=6, detail="again")  # once per run
        (alarm,) = store.alarms(run_id)
        assert alarm["node_id"] == 5 and alarm["detail"] == "d"
        assert store.run_by_flower_id(1)["run_id"] == run_id
        assert store.run_by_flower_id(999) is None


def test_the_dashboard_run_page_shows_the_alarms(tmp_path: Path) -> None:
    from tests.test_control_api import _browser_session, make_service

    svc, _ = make_service(tmp_path)
    token = svc.users.add("rita", "reviewer")[1]
    client, _ = _browser_session(svc, token)
    assert 'id="alarms"' not in client.get("/runs/1").text
    with RunStore(svc.store_path) as store:
        store.record_alarm(1, STRANGER, "SHA256:rogue", node_id=9, detail="registered node 9 with key SHA256:rogue")
    page = client.get("/runs/1")
    assert page.status_code == 200 and 'id="alarms"' in page.text
    assert "stranger (round 0): registered node 9 with key SHA256:rogue" in page.text
    assert svc.alarms(1)[0]["subject"] == "SHA256:rogue"


# -- real processes: server start reconciles, a rogue node online during a run -------------------------------------
def _flwr(home: Path, *args: str) -> dict[str, Any]:
    """The stock `flwr` CLI with the server's own FLWR_HOME: what an insider on the server host can run."""
    from common.processes import bin_path
    from tests.test_cli_deployment import ENV

    proc = subprocess.run(
        [bin_path("flwr"), *args, "fedguard", "--format", "json"],
        env={**ENV, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(proc.stdout or "{}")
    assert out.get("success"), proc.stdout + proc.stderr
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import tomli_w

    from common.kit import fingerprint_cert
    from tests.helpers import node_keypair
    from tests.test_cli_deployment import fedguard

    base = tmp_path_factory.mktemp("enroll")
    nodes = [
        {"name": "alpha", "organisation": "Clinic A"},
        {"name": "beta", "organisation": "Clinic B"},
        {"name": "judge", "organisation": "Ethics board", "role": "evaluator"},
    ]
    (base / "federation.toml").write_text(tomli_w.dumps({"name": "enroll-test", "nodes": nodes}))
    proc = fedguard(
        "provision", "init", str(base / "federation.toml"), "--out", str(base / "kits"), "--generate-node-keys"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    private, public = node_keypair()
    (base / "rogue.key").write_bytes(private)
    (base / "rogue.key").chmod(0o600)
    (base / "rogue.pub").write_bytes(public)
    from common.kit import fingerprint_public_key

    return {
        "base": base,
        "kits": base / "kits",
        "ca_fp": fingerprint_cert(base / "kits" / "server" / "ca.crt"),
        "rogue_fp": fingerprint_public_key(public.decode()),
        "srv": base / "srv",
    }


def _start_server(k: dict[str, Any], log_name: str, port: int) -> subprocess.Popen[bytes]:
    from tests.test_cli_deployment import spawn, wait_for

    log = k["base"] / log_name
    server = spawn(
        log,
        "server", "start", "--kit", str(k["kits"] / "server"), "--workdir", str(k["srv"]), "--port", str(port),
        "--ca-fingerprint", k["ca_fp"], "--control-port", "0",
    )  # fmt: skip
    try:
        wait_for(log, "server ready", server)
    except BaseException:
        _stop(server)
        raise
    return server


def _registry(srv: Path) -> dict[str, Any]:
    return json.loads((srv / "nodes.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_server_start_reconciles_the_registry_with_the_kit(kits: dict[str, Any]) -> None:
    """Strangers out, a real node an insider unregistered back in, a revoked node out without breaking the start."""
    from common.processes import free_port
    from server.control.audit import AuditLog
    from tests.test_cli_deployment import fedguard

    k, srv = kits, kits["srv"]
    port = free_port()
    server = _start_server(k, "server-1.log", port)
    try:
        enrolled = read_enrolled(srv)
        assert sorted(n.name for n in enrolled.values()) == ["alpha", "beta", "judge"]
        assert stat.S_IMODE(enrolled_path(srv).stat().st_mode) == 0o600
        fps = {v["name"]: fp for fp, v in _registry(srv).items()}
        # An insider, with the server's own FLWR_HOME: registers a key of their own, unregisters beta.
        _flwr(srv / "flwr-home", "supernode", "register", str(k["base"] / "rogue.pub"))
        _flwr(srv / "flwr-home", "supernode", "unregister", str(_registry(srv)[fps["beta"]]["node_id"]))
        # The operator revokes alpha through FedGuard.
        proc = fedguard("node", "revoke", "alpha", "--server-workdir", str(srv))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert fps["alpha"] not in read_enrolled(srv)  # a live run stops trusting it at its next round
    finally:
        _stop(server)

    server = _start_server(k, "server-2.log", port)  # used to fail: "Public key already in use" (alpha)
    try:
        log = (k["base"] / "server-2.log").read_text()
        assert f"WARNING: removed key {k['rogue_fp']}" in log, log
        assert "enrolled client beta" in log and "re-registered" in log, log
        assert f"client alpha (Clinic A) key {fps['alpha']} is revoked: left out" in log, log
        assert sorted(n.name for n in read_enrolled(srv).values()) == ["beta", "judge"]
        actions = {(e.action, e.outcome.split(":")[0]) for e in AuditLog(srv).entries()}
        assert {
            ("node.revoke", "ok"),
            ("node.stranger", "removed at server start"),
            ("node.reregister", "unregistered outside FedGuard"),
        } <= actions
    finally:
        _stop(server)

    server = _start_server(k, "server-3.log", port)  # a third start is quiet: nothing to put right
    try:
        log = (k["base"] / "server-3.log").read_text()
        assert "WARNING" not in log and "re-registered" not in log, log
        assert "alpha" in log and "is revoked: left out" in log
    finally:
        _stop(server)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_after_revoke_and_restart_the_others_train_and_a_rogue_node_is_never_sampled(kits: dict[str, Any]) -> None:
    """alpha revoked (previous test): it cannot join; a key an insider registers while the server runs, with a
    SuperNode online behind it, is never asked or sampled and shows as an alarm in `run status`; beta trains."""
    import tomli_w

    from client.supernode import SuperNode, SuperNodeError
    from common.kit import fingerprint_public_key
    from common.processes import free_port
    from tests.helpers import TABULAR_SCHEMA, make_tabular, node_keypair, write_run_toml
    from tests.test_cli_deployment import fedguard, spawn, wait_for

    k, srv, base = kits, kits["srv"], kits["base"]
    if not (srv / "nodes.json").is_file() or not any(v.get("revoked_at") for v in _registry(srv).values()):
        pytest.fail("needs test_server_start_reconciles_the_registry_with_the_kit to run first (alpha revoked)")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    rogue: SuperNode | None = None
    server = _start_server(k, "server-4.log", port)
    try:
        (base / "schema.toml").write_text(tomli_w.dumps(TABULAR_SCHEMA))
        for i, (name, role) in enumerate([("beta", "client"), ("judge", "evaluator"), ("alpha", "client")]):
            data = base / f"{name}.csv"
            make_tabular(300, seed=40 + i).to_csv(data, index=False)
            procs.append(
                spawn(
                    base / f"{name}.log",
                    role,
                    "start",
                    "--kit",
                    str(k["kits"] / "nodes" / name),
                    "--workdir",
                    str(base / name),
                    "--data",
                    str(data),
                    "--schema",
                    str(base / "schema.toml"),
                    "--superlink",
                    f"localhost:{port}",
                    "--ca-fingerprint",
                    k["ca_fp"],
                )  # fmt: skip
            )
        for name, node in zip(["beta", "judge"], procs[:2], strict=True):
            wait_for(base / f"{name}.log", "joined as node", node)
        # The insider registers a fresh key behind FedGuard's back (the first one, unregistered at the last
        # start, stays unusable) and brings a SuperNode online with it.
        private, public = node_keypair()
        (base / "rogue2.key").write_bytes(private)
        (base / "rogue2.key").chmod(0o600)
        (base / "rogue2.pub").write_bytes(public)
        rogue_fp = fingerprint_public_key(public.decode())
        _flwr(srv / "flwr-home", "supernode", "register", str(base / "rogue2.pub"))
        rogue = SuperNode(
            base / "rogue",
            superlink=f"localhost:{port}",
            root_certificates=k["kits"] / "server" / "ca.crt",
            private_key=base / "rogue2.key",
            node_config={"role": "client"},
            executor=False,
        ).start()
        cfg = tabular_config(
            rounds=2,
            clients_per_round=2,
            server={"round_timeout": 240, "wait_for_nodes": 60, "min_replies": 1},
        )
        proc = fedguard(
            "run", "start", "--config", str(write_run_toml(cfg, base / "run.toml")), "--server-workdir", str(srv),
            "--signing-key", str(k["kits"] / "admin" / "run-signing.key"), "--follow", "--timeout", "900",
            timeout=1000,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        with RunStore(srv / "runs.db") as store:
            run = store.runs()[-1]
            nodes = {c["node_id"] for c in store.client_rounds(run["run_id"])}
            alarms = store.alarms(run["run_id"])
            traffic = {t["node_id"] for t in store.node_traffic(run["run_id"])}
        assert run["status"] == "finished"
        beta_id = _registry(srv)[next(fp for fp, v in _registry(srv).items() if v["name"] == "beta")]["node_id"]
        assert nodes == {beta_id}  # beta trained every round; alpha and the rogue never took part
        assert rogue.node_id not in traffic  # not one message to or from it
        assert [(a["kind"], a["subject"], a["node_id"]) for a in alarms] == [(STRANGER, rogue_fp, rogue.node_id)]
        assert procs[2].poll() is not None or "joined as node" not in (base / "alpha.log").read_text()
        status = fedguard("run", "status", str(run["flower_run_id"]), "--server-workdir", str(srv))
        assert status.returncode == 0 and "ALARM (stranger, round 1)" in status.stdout, status.stdout + status.stderr
        assert rogue_fp in status.stdout
        as_json = fedguard("run", "status", str(run["flower_run_id"]), "--server-workdir", str(srv), "--json")
        assert [a["subject"] for a in json.loads(as_json.stdout)["alarms"]] == [rogue_fp]
    finally:
        if rogue is not None:
            try:
                rogue.stop()
            except SuperNodeError:
                pass
        for p in procs:
            _stop(p)
        _stop(server)
