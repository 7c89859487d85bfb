"""A real federation of separate processes on 127.0.0.1: SuperLink (TLS + node auth), SuperNodes + executors.

One federation is shared by the module (start-up dominates the cost). Refusal tests end at the
handshake. The executor tests check that code shipped in the server's app bundle never runs on a node.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from client.executor import AppIdentity, FabRefused, check_fab, fab_identity, installed_identity
from client.supernode import SuperNode, SuperNodeError
from common.config import RunConfig
from server.enrollment import Enrolled, write_enrolled
from server.runs import run_logs, stage_app, start_run, wait_for_run
from server.store import RunStore
from server.superlink import SuperLink, SuperLinkError, TlsFiles, key_fingerprint
from tests.helpers import ROOT, make_tabular, tabular_config, write_run_toml
from tests.tls_material import TlsMaterial, make_other_ca, make_tls_material, make_unregistered_key

MARKER_LINE = "FEDGUARD-TEST-MARKER"


def tampered_app(dest: Path, marker: Path, version: str | None = None) -> Path:
    """A copy of FedGuard whose client/app.py writes ``marker`` when imported (optionally another version)."""
    app = stage_app(ROOT, dest)
    client_app = app / "client" / "app.py"
    client_app.write_text(
        f"import pathlib as _pl  # {MARKER_LINE}\n_pl.Path({str(marker)!r}).write_text('server code ran here')\n"
        + client_app.read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    if version is not None:
        project = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
        project["project"]["version"] = version
        (app / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(addr)
                hosts.add(
                    socket.inet_ntop(socket.AF_INET, raw[::-1])
                    if len(raw) == 4
                    else socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                )
    return hosts


def plaintext_health(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class Federation:
    base: Path
    tls: TlsMaterial
    superlink: SuperLink
    nodes: list[SuperNode]

    def run(
        self, name: str, cfg: RunConfig, app_dir: Path = ROOT, timeout: float = 240, succeed: bool = True
    ) -> tuple[int, Path]:
        """Submit a run, wait for Flower to report it finished; return (flower run id, run store path).

        The ServerApp records every run in the server's own store (``<workdir>/runs.db``): look a
        run up there with ``fedguard_run``.
        """
        config = write_run_toml(cfg, self.base / f"{name}.toml")
        store = self.superlink.workdir / "runs.db"
        sl = self.superlink
        run_id = start_run(sl.address, self.tls.ca_cert, app_dir, config, store, sl.flwr_home)
        status = wait_for_run(run_id, sl.address, self.tls.ca_cert, sl.flwr_home, timeout=timeout, poll=2.0)
        logs = run_logs(run_id, sl.address, self.tls.ca_cert, sl.flwr_home)
        assert status.succeeded == succeed, f"{status.status} {status.details}\n{logs[-3000:]}"
        return run_id, store

    def fedguard_run(self, flower_run_id: int) -> int:
        """The FedGuard run id (in the server's run store) of a Flower run."""
        with RunStore(self.superlink.workdir / "runs.db") as store:
            return next(int(r["run_id"]) for r in store.runs() if str(r["flower_run_id"]) == str(flower_run_id))

    def events(self, run_id: int, message_type: str | None = "train") -> list[list[dict]]:
        """Each node's executor task records for one Flower run (train messages by default)."""
        out = []
        for node in self.nodes:
            lines = node.events_path.read_text(encoding="utf-8").splitlines() if node.events_path.exists() else []
            out.append(
                [
                    e
                    for e in map(json.loads, lines)
                    if int(e["run_id"]) == run_id and message_type in (None, e["message_type"])
                ]
            )
        return out


@contextlib.contextmanager
def bring_up(base: Path, sizes: dict[str, int], seed: int, ready_timeout: float = 120) -> Iterator[Federation]:
    """A TLS SuperLink and one enrolled SuperNode + executor per ``sizes`` entry (that many rows), all
    stopped on exit. Nodes are started together, then waited for: their executors import torch in parallel."""
    tls = make_tls_material(base / "kits", list(sizes))
    superlink = SuperLink(base / "server", TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key))
    nodes: list[SuperNode] = []
    enrolled: list[Enrolled] = []
    try:
        superlink.start(timeout=90)
        for i, (name, size) in enumerate(sizes.items()):
            superlink.register_node(tls.nodes[name].public, name)
            enrolled.append(Enrolled(name, "client", key_fingerprint(tls.nodes[name].public)))
            write_enrolled(superlink.workdir, enrolled)  # what `server start` writes from the kit
            data = base / name / "data.csv"
            data.parent.mkdir(parents=True)
            make_tabular(size, seed=seed + i).to_csv(data, index=False)
            nodes.append(
                SuperNode(
                    base / name,
                    superlink=superlink.address,
                    root_certificates=tls.ca_cert,
                    private_key=tls.nodes[name].private,
                    node_config={"data-path": str(data), "workdir": str(base / name / "work"), "budget-epsilon": 100.0},
                )
            )
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_ready(timeout=ready_timeout)
        yield Federation(base, tls, superlink, nodes)
    finally:
        for node in nodes:
            node.stop()
        superlink.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    with bring_up(tmp_path_factory.mktemp("deploy"), {"alpha": 300, "beta": 300}, seed=10) as fed:
        yield fed


# --- fast checks (no processes) -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_executor_accepts_only_the_installed_app(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    expected = installed_identity()
    assert expected == AppIdentity("fedguard", "fedguard", expected.version, "client.app:app")
    fab = build_fab_from_disk(stage_app(ROOT, tmp_path / "same"))
    assert fab_identity(fab) == expected
    check_fab(fab, expected, "fedguard/fedguard", expected.version)

    other = tampered_app(tmp_path / "other", tmp_path / "marker", version="9.9.9")
    with pytest.raises(FabRefused, match="9.9.9"):
        check_fab(build_fab_from_disk(other), expected)
    with pytest.raises(FabRefused, match="run declares"):
        check_fab(fab, expected, "evil/fedguard", expected.version)
    with pytest.raises(FabRefused, match="unreadable"):
        check_fab(b"not a zip", expected)
    assert not (tmp_path / "marker").exists()


@pytest.mark.timeout(60)
def test_superlink_refuses_bad_setup_before_starting(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path / "kits", ["n"])
    good = TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key)
    with pytest.raises(SuperLinkError, match="share the Fleet port"):
        SuperLink(tmp_path / "s", good, host="0.0.0.0")
    with pytest.raises(SuperLinkError, match="key not found"):
        SuperLink(tmp_path / "s", TlsFiles(tls.ca_cert, tls.server_cert, tmp_path / "missing.key")).start()
    with pytest.raises(SuperLinkError, match="do not load together"):
        other = make_tls_material(tmp_path / "other", ["m"], federation="other")
        SuperLink(tmp_path / "s", TlsFiles(tls.ca_cert, tls.server_cert, other.server_key)).start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SuperLinkError, match="already in use"):
            SuperLink(tmp_path / "s", good, port=busy.getsockname()[1]).start()


# --- the real federation --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_complete_two_rounds_with_tls_and_node_auth(federation: Federation) -> None:
    sl = federation.superlink
    assert sl.healthy()
    assert not plaintext_health(sl.port)  # the one port speaks TLS only
    assert listening_hosts(sl.port) == {"127.0.0.1"}  # Fleet, Control and Runtime APIs: loopback only
    assert all(listening_hosts(n.runtime_port) == {"127.0.0.1"} for n in federation.nodes)

    run_id, store_path = federation.run("two-rounds", tabular_config(None, rounds=2, clients_per_round=2))
    fg = federation.fedguard_run(run_id)
    with RunStore(store_path) as store:
        rounds = store.rounds(fg)
        clients = store.client_rounds(fg)
        assert store.run(fg)["status"] == "finished"
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == 2 and r["aggregated"] == 1 for r in rounds)
    node_ids = {n.node_id for n in federation.nodes}
    assert {int(c["node_id"]) for c in clients} == node_ids
    assert len(clients) == 4 and all(c["status"] == "accepted" and 0 < c["epsilon"] <= 4.0 for c in clients)
    for events in federation.events(run_id):  # each node's executor ran both rounds in one process
        assert [(e["group_id"], e["status"]) for e in events] == [("1", "completed"), ("2", "completed")]
    for node in federation.nodes:  # nothing from the app bundle was installed on the nodes
        assert not (node.workdir / "flwr-home" / "apps").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_modified_clientapp_in_the_bundle_never_runs_on_a_node(federation: Federation, tmp_path: Path) -> None:
    marker = tmp_path / "server-code-ran-on-node"
    app = tampered_app(tmp_path / "app", marker)
    run_id, store_path = federation.run("tampered", tabular_config(None, rounds=1, clients_per_round=2), app)
    with RunStore(store_path) as store:
        (round1,) = store.rounds(federation.fedguard_run(run_id))
    assert round1["accepted"] == 2  # the nodes trained with their installed ClientApp
    assert not marker.exists()
    # The server did ship the tampered code (it is in the bundle the SuperLink installed for the ServerApp).
    shipped = list((federation.superlink.flwr_home / "apps").glob("*/client/app.py"))
    assert any(MARKER_LINE in p.read_text(encoding="utf-8") for p in shipped)
    assert all(e["status"] == "completed" for events in federation.events(run_id) for e in events)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bundle_of_another_version_is_refused_by_the_nodes(federation: Federation, tmp_path: Path) -> None:
    marker = tmp_path / "server-code-ran-on-node"
    app = tampered_app(tmp_path / "app", marker, version="9.9.9")
    cfg = tabular_config(None, rounds=1, clients_per_round=2)
    run_id, store_path = federation.run("other-version", cfg, app, succeed=False)  # no node accepts the task
    fg = federation.fedguard_run(run_id)
    with RunStore(store_path) as store:
        rounds = store.rounds(fg)
        clients = store.client_rounds(fg)
    assert rounds and all(r["accepted"] == 0 and r["aggregated"] == 0 for r in rounds)
    assert all(c["status"] != "accepted" for c in clients)
    assert all("refused the app bundle" in c["reason"] and "9.9.9" in c["reason"] for c in clients if c["reason"])
    assert not marker.exists()
    for events in federation.events(run_id, message_type=None):  # every task of the run, role queries included
        assert events and all(e["status"] == "refused" for e in events)
    assert "refused" in federation.nodes[0].executor_log.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_node_with_unregistered_key_is_refused(federation: Federation) -> None:
    key = make_unregistered_key(federation.base / "stranger-key")
    node = SuperNode(
        federation.base / "stranger",
        superlink=federation.superlink.address,
        root_certificates=federation.tls.ca_cert,
        private_key=key.private,
        node_config={"data-path": "/nonexistent.csv"},
        executor=False,
    )
    with pytest.raises(SuperNodeError, match="public key is not registered") as err:
        node.start(timeout=60)
    assert "Failed to activate SuperNode" in node.supernode_log.read_text(encoding="utf-8")
    assert not node.running() and node.node_id is None
    assert "Fix:" in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_revoked_node_key_is_refused(federation: Federation) -> None:
    key = make_unregistered_key(federation.base / "revoked-key")
    federation.superlink.register_node(key.public, "revoked")
    federation.superlink.unregister_node(key.public)
    node = SuperNode(
        federation.base / "revoked",
        superlink=federation.superlink.address,
        root_certificates=federation.tls.ca_cert,
        private_key=key.private,
        node_config={"data-path": "/nonexistent.csv"},
        executor=False,
    )
    with pytest.raises(SuperNodeError, match="public key is not registered"):
        node.start(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_node_without_the_federation_ca_fails_the_handshake(federation: Federation) -> None:
    node = SuperNode(
        federation.base / "wrong-ca",
        superlink=federation.superlink.address,
        root_certificates=make_other_ca(federation.base / "other-ca"),
        private_key=federation.tls.nodes["alpha"].private,
        node_config={"data-path": "/nonexistent.csv"},
        executor=False,
    )
    with pytest.raises(SuperNodeError, match="CERTIFICATE_VERIFY_FAILED"):
        node.start(timeout=60)
    assert "CERTIFICATE_VERIFY_FAILED" in node.supernode_log.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unreachable_superlink_is_reported(federation: Federation) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = SuperNode(
        federation.base / "unreachable",
        superlink=f"127.0.0.1:{port}",
        root_certificates=federation.tls.ca_cert,
        private_key=federation.tls.nodes["alpha"].private,
        node_config={"data-path": "/nonexistent.csv"},
        executor=False,
    )
    with pytest.raises(SuperNodeError, match="cannot reach the SuperLink"):
        node.start(timeout=15)
    assert not node.running()
