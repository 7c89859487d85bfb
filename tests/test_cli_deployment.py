"""The deployment as an operator drives it: `provision init`, `server start`, `client start`,
`evaluator start`, `run start --follow`, `node revoke` — each a real process on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from common.kit import fingerprint_cert
from common.processes import free_port
from server.store import RunStore
from tests.helpers import ROOT, TABULAR_SCHEMA, make_tabular, tabular_config, write_run_toml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def fedguard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedguard.cli", *args], env=ENV, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("cli-deploy")
    (base / "federation.toml").write_text(
        tomli_w.dumps(
            {
                "name": "cli-test",
                "nodes": [
                    {"name": "alpha", "organisation": "Clinic A"},
                    {"name": "beta", "organisation": "Clinic B"},
                    {"name": "judge", "organisation": "Ethics board", "role": "evaluator"},
                ],
            }
        )
    )
    proc = fedguard(
        "provision", "init", str(base / "federation.toml"), "--out", str(base / "kits"), "--generate-node-keys"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kits = base / "kits"
    ca_fp = fingerprint_cert(kits / "server" / "ca.crt")
    (base / "schema.toml").write_text(tomli_w.dumps(TABULAR_SCHEMA))
    procs: list[subprocess.Popen[bytes]] = []
    port = free_port()
    try:
        server = spawn(
            base / "server.log",
            "server",
            "start",
            "--kit",
            str(kits / "server"),
            "--workdir",
            str(base / "srv"),
            "--port",
            str(port),
        )
        procs.append(server)
        wait_for(base / "server.log", "server ready", server)
        for i, (name, role) in enumerate([("alpha", "client"), ("beta", "client"), ("judge", "evaluator")]):
            data = base / f"{name}.csv"
            make_tabular(300, seed=20 + i).to_csv(data, index=False)
            args = [role, "start"] if role == "evaluator" else ["client", "start"]
            node = spawn(
                base / f"{name}.log",
                *args,
                "--kit",
                str(kits / "nodes" / name),
                "--workdir",
                str(base / name),
                "--data",
                str(data),
                "--schema",
                str(base / "schema.toml"),
                "--superlink",
                f"localhost:{port}",
                "--ca-fingerprint",
                ca_fp,
            )
            procs.append(node)
        for name, node in zip(["alpha", "beta", "judge"], procs[1:], strict=True):
            wait_for(base / f"{name}.log", "joined as node", node)
        yield {"base": base, "kits": kits, "ca_fp": ca_fp, "port": port}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_run_submitted_from_the_cli_trains_and_is_audited(federation: dict) -> None:
    base = federation["base"]
    cfg = tabular_config(rounds=2, server={"round_timeout": 240, "wait_for_nodes": 120})
    proc = fedguard(
        "run",
        "start",
        "--config",
        str(write_run_toml(cfg, base / "run.toml")),
        "--server-workdir",
        str(base / "srv"),
        "--follow",
        "--timeout",
        "600",
        timeout=700,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    with RunStore(base / "srv" / "runs.db") as store:
        (run,) = store.runs()
        rounds = store.rounds(run["run_id"])
        audits = store.audits(run["run_id"])
    assert run["status"] == "finished"
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, 2), (2, 2)]
    assert [a["round"] for a in audits] == [0, 1, 2] and audits[0]["evaluated_by"].startswith("evaluator node")
    with RunStore(base / "srv" / "runs.db") as store:
        assert "TLS" in store.run(run["run_id"])["meta"]["transport"]


def test_bad_data_is_reported_before_joining(federation: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,group,y\n1,2,q,g1,0\n1,2,x,g2,1\n")
    proc = fedguard(
        "client",
        "start",
        "--kit",
        str(federation["kits"] / "nodes" / "alpha"),
        "--workdir",
        str(tmp_path / "w"),
        "--data",
        str(bad),
        "--schema",
        str(federation["base"] / "schema.toml"),
        "--superlink",
        f"localhost:{federation['port']}",
        "--ca-fingerprint",
        federation["ca_fp"],
    )
    assert proc.returncode == 2 and "declared categories" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w" / "supernode.log").exists()


def test_a_kit_from_another_ca_is_refused(federation: dict) -> None:
    proc = fedguard(
        "client",
        "start",
        "--kit",
        str(federation["kits"] / "nodes" / "alpha"),
        "--workdir",
        "/tmp/unused",
        "--data",
        "x.csv",
        "--schema",
        "s.toml",
        "--superlink",
        "localhost:1",
        "--ca-fingerprint",
        "AA" * 32,
    )
    assert proc.returncode == 2 and "fingerprint" in proc.stderr.lower()


def test_node_revoke(federation: dict) -> None:
    proc = fedguard("node", "revoke", "beta", "--server-workdir", str(federation["base"] / "srv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "can no longer join" in proc.stdout
