"""The deployment as an operator drives it: `provision init`, `server start`, `client start`,
`evaluator start`, `run start --follow`, `node revoke` — each a real process on 127.0.0.1.

Nodes run under their owners' policies and accept only runs signed with the federation's
run-signing key; a refusal is recorded and the round goes on with the other nodes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from client.sent_log import read_sent
from common.config import RunConfig
from common.fairness import FederatedAudit, merge_counts
from common.kit import fingerprint_cert
from common.processes import free_port
from server.runs import start_run, wait_for_run
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
    # alpha: counts allowed; beta: counts allowed but one local epoch at most; judge: the evaluator default
    (base / "alpha-policy.toml").write_text('fairness_columns = ["group"]\n')
    (base / "beta-policy.toml").write_text('fairness_columns = ["group"]\nmax_local_epochs = 1\n')
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
            "--ca-fingerprint",
            ca_fp,
        )
        procs.append(server)
        wait_for(base / "server.log", "server ready", server)
        for i, (name, role) in enumerate([("alpha", "client"), ("beta", "client"), ("judge", "evaluator")]):
            data = base / f"{name}.csv"
            make_tabular(300, seed=20 + i).to_csv(data, index=False)
            args = (
                [role, "start"]
                if role == "evaluator"
                else ["client", "start", "--policy", str(base / f"{name}-policy.toml")]
            )
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


def submit(base: Path, cfg: RunConfig, name: str, *sign: str, timeout: float = 600) -> dict:
    """`run start --follow` with the given signing flags; the run's row from the store."""
    with RunStore(base / "srv" / "runs.db") as store:
        before = {r["run_id"] for r in store.runs()}
    proc = fedguard(
        "run",
        "start",
        "--config",
        str(write_run_toml(cfg, base / f"{name}.toml")),
        "--server-workdir",
        str(base / "srv"),
        *sign,
        "--follow",
        "--timeout",
        str(timeout),
        timeout=timeout + 100,
    )
    with RunStore(base / "srv" / "runs.db") as store:
        (run,) = [r for r in store.runs() if r["run_id"] not in before]
    run["proc"] = proc
    return run


def test_a_signed_run_trains_and_is_audited(federation: dict) -> None:
    base = federation["base"]
    cfg = tabular_config(
        rounds=2,
        server={"round_timeout": 240, "wait_for_nodes": 120},
        data__validation_fraction=0.5,  # groups of ~75 rows per node clear the counts' release threshold
        fairness={"count_noise_multiplier": 1.0},
        dp__target_epsilon=5.8,  # the whole run: z = 1 counts alone spend ε ≈ 4.2 of it (δ = 1e-4)
    )
    run = submit(base, cfg, "run", "--signing-key", str(federation["kits"] / "admin" / "run-signing.key"))
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    with RunStore(base / "srv" / "runs.db") as store:
        rounds = store.rounds(run["run_id"])
        audits = store.audits(run["run_id"])
        fed = store.federated(run["run_id"])
        releases = store.count_releases(run["run_id"])
        assert "TLS" in store.run(run["run_id"])["meta"]["transport"]
    assert run["status"] == "finished"
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, 2), (2, 2)]
    assert [a["round"] for a in audits] == [0, 1, 2] and audits[0]["evaluated_by"].startswith("evaluator node")
    # Federated fairness: both clients sent noised counts; the store holds their sum, not theirs.
    assert [r["status"] for r in releases] == ["accepted", "accepted"]
    assert all("counts-json" not in json.dumps(r["values"]) for r in releases)
    sent = [_sent_counts(base / name) for name in ("alpha", "beta")]
    totals = FederatedAudit.model_validate_json(fed["audit_json"])
    summed = merge_counts(sent)
    sizes = {g.group: g.size for a in totals.attributes for g in a.groups if a.name == "group"}
    assert set(summed["group"]) == set(sizes) == {"g1", "g2"}
    assert all(sizes[g] == sum(max(0, c) for c in cells) for g, cells in summed["group"].items())
    dump = "\n".join(sqlite3.connect(base / "srv" / "runs.db").iterdump())
    for counts in sent:
        for cells in counts["group"].values():
            assert json.dumps(cells) not in dump  # no client's (noised) group counts on the server
    assert fed["spread"]["clients"] == 2
    # The CLI drives the SuperLink only as audited actions, like the control service.
    from server.control.audit import AuditLog

    started = [e for e in AuditLog(base / "srv").entries() if e.action == "run.start"]
    assert started and started[0].outcome.startswith("ok: Flower run") and cfg.name in started[0].target


def _sent_counts(workdir: Path) -> dict:
    """What the node itself logged as sent (its sent log): its noised counts."""
    (entry,) = [e for e in read_sent(workdir) if "fairness-counts" in e["records"]]
    return json.loads(entry["records"]["fairness-counts"]["counts-json"]["value"])


def test_a_policy_refusal_is_recorded_and_the_round_goes_on(federation: dict) -> None:
    base = federation["base"]
    cfg = tabular_config(
        rounds=1,
        train__local_epochs=2,  # beta's owner allows one local epoch
        fairness={"federated_counts": False},
        server={"round_timeout": 240, "wait_for_nodes": 120, "min_replies": 1},
    )
    run = submit(base, cfg, "epochs", "--signing-key", str(federation["kits"] / "admin" / "run-signing.key"))
    assert run["status"] == "finished", run["proc"].stdout[-3000:]
    with RunStore(base / "srv" / "runs.db") as store:
        (rnd,) = store.rounds(run["run_id"])
        rows = {r["status"]: r for r in store.client_rounds(run["run_id"])}
    assert (rnd["accepted"], rnd["refused"], rnd["aggregated"]) == (1, 1, 1)
    assert "policy-violation [rule max_local_epochs]" in rows["refused"]["reason"]
    inspect = fedguard("client", "inspect", "--workdir", str(base / "beta"))
    assert "REFUSED policy-violation" in inspect.stdout and "(max_local_epochs)" in inspect.stdout


def test_unsigned_and_foreign_signed_runs_are_refused_by_the_nodes(federation: dict, tmp_path: Path) -> None:
    base = federation["base"]
    cfg = tabular_config(
        rounds=1, fairness={"federated_counts": False}, server={"round_timeout": 120, "round_retries": 0}
    )
    # Someone on the server host reaches the control API directly: no FedGuard signature.
    state = json.loads((base / "srv" / "server.json").read_text())
    with RunStore(base / "srv" / "runs.db") as store:
        before = {r["run_id"] for r in store.runs()}
    flower_run = start_run(
        state["address"],
        Path(state["ca_cert"]),
        ROOT,
        write_run_toml(cfg, base / "unsigned.toml"),
        base / "srv" / "runs.db",
        Path(state["flwr_home"]),
    )
    wait_for_run(flower_run, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]), timeout=400)
    # ... and a run signed with a key that is not the federation's.
    foreign = tmp_path / "foreign.key"
    foreign.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    submit(base, cfg, "foreign", "--signing-key", str(foreign), timeout=400)
    with RunStore(base / "srv" / "runs.db") as store:
        new = [r for r in store.runs() if r["run_id"] not in before]
        reasons = [[c["reason"] for c in store.client_rounds(r["run_id"])] for r in new]
    assert [r["status"] for r in new] == ["failed", "failed"]
    assert all(len(rs) == 2 for rs in reasons), reasons  # both clients refused round 1 (the evaluator never trains)
    assert all(r.startswith("run-unsigned") for r in reasons[0]), reasons
    assert all(r.startswith("run-signature-invalid") for r in reasons[1]), reasons
    log = (base / "alpha" / "node.log").read_text()
    assert "run-unsigned" in log and "run-signature-invalid" in log


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


def test_a_homomorphic_run_sums_ciphertexts_the_server_cannot_read(federation: dict) -> None:
    """Server + two clients + evaluator over TLS with node authentication, in homomorphic mode."""
    base, kits = federation["base"], federation["kits"]
    proc = fedguard(
        "evaluator",
        "keygen",
        "--kit",
        str(kits / "server"),
        "--workdir",
        str(base / "judge"),
        "--out",
        str(base / "srv" / "he-bundle"),
        "--ca-fingerprint",
        federation["ca_fp"],
        "--bound",
        "100",
        "--force",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads((base / "srv" / "he-bundle" / "he-keys.json").read_text())
    cfg = tabular_config(
        rounds=2,
        secure_aggregation="homomorphic",
        homomorphic={
            "context_fingerprint": info["fingerprint"],
            "bundle": str(base / "srv" / "he-bundle"),
            "evaluator_key": info["recipients"]["judge"],
        },
        server={"round_timeout": 240, "wait_for_nodes": 120},
    )
    run = submit(base, cfg, "he", "--signing-key", str(kits / "admin" / "run-signing.key"))
    assert run["status"] == "finished", run["proc"].stdout[-4000:] + run["proc"].stderr[-2000:]
    with RunStore(base / "srv" / "runs.db") as store:
        rounds = store.rounds(run["run_id"])
        evaluations = store.evaluations(run["run_id"])
    assert [(r["round"], r["accepted"], r["aggregated"]) for r in rounds] == [(1, 2, 1), (2, 2, 1)]
    assert sorted(evaluations) == [0, 1, 2]  # the evaluator decrypted, evaluated and re-encrypted each round
    he_meta = rounds[0]["meta"]["homomorphic"]
    assert he_meta["scheme"] == "fedguard-add" and len(he_meta["bytes_per_client"]) == 2
    assert he_meta["params"]["private"] is False and he_meta["params"]["galois_keys"] is False
    # No secret-key material anywhere on the server side: its files, its run store, its bundle.
    secret = (base / "judge" / "he-secret.ctx").read_bytes()
    probes = [secret[i : i + 48] for i in range(len(secret) // 4, len(secret) - 48, len(secret) // 10)]
    for path in [p for p in (base / "srv").rglob("*") if p.is_file()]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a live server's SQLite -wal/-shm, folded into runs.db when it closes
            continue
        assert not any(p in data for p in probes), path


def test_node_revoke(federation: dict) -> None:
    proc = fedguard("node", "revoke", "beta", "--server-workdir", str(federation["base"] / "srv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "can no longer join" in proc.stdout
