"""The privacy ledger on the real ClientApp, in process: accounting, budgets, crashes, exports."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from opacus.accountants import RDPAccountant

from client import ledger as ledger_module
from client.app import app as client_app
from client.ledger import Budget, BudgetExceeded, Ledger, LedgerError, Release, restore
from common import records as R
from common.ledger_export import ExportError, verify_export
from common.privacy import epsilon_spent
from fedguard.cli import main as cli
from tests.helpers import ROOT, global_state, make_tabular, node_context, tabular_config, train_message

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(300)]


def train(cfg, data: Path, workdir: Path, rnd: int = 1, run_uid: str = "run-a", **node_config):  # noqa: ANN001, ANN201
    return client_app(train_message(cfg, global_state(cfg), rnd, run_uid), node_context(data, workdir, **node_config))


def opacus_epsilon(rows: list[dict], delta: float) -> float:
    """ε straight from Opacus's RDP accountant, stepping through every recorded release."""
    acc = RDPAccountant()
    for r in rows:
        for _ in range(int(r["steps"])):
            acc.step(noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"])
    return acc.get_epsilon(delta=delta)


def node_key(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "node.key"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    return path


def test_ledger_epsilon_and_signed_export_recompute_with_opacus(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    work = tmp_path / "node"
    replies = [train(cfg, tabular_csv, work, rnd, dataset_id="ds") for rnd in (1, 2)]
    metrics = replies[-1].content[R.METRICS]
    with Ledger(work / "ledger.db") as ledger:
        rows = ledger.releases("ds")
    assert [r["status"] for r in rows] == ["confirmed", "confirmed"]
    assert {r["run_id"] for r in rows} == {"run-a"}
    assert metrics[R.EPSILON_TOTAL] == pytest.approx(opacus_epsilon(rows, metrics[R.BUDGET_DELTA]), rel=1e-9)

    key = node_key(tmp_path)
    export = tmp_path / "export.json"
    assert cli(["client", "ledger", "export", "--workdir", str(work), "--key", str(key), "--out", str(export)]) == 0
    body = verify_export(export)
    (ds,) = body.datasets
    rows_again = [r.model_dump() for r in ds.releases]
    assert ds.epsilon == pytest.approx(opacus_epsilon(rows_again, ds.delta), rel=1e-9)
    assert ds.epsilon == pytest.approx(metrics[R.EPSILON_TOTAL], rel=1e-9)

    doc = json.loads(export.read_text())
    doc["export"]["datasets"][0]["releases"][0]["steps"] -= 1  # a node hiding part of its spending
    export.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="bad signature"):
        verify_export(export)


def test_appending_rows_keeps_the_budget_and_a_deleted_ledger_is_refused(tmp_path: Path) -> None:
    cfg = tabular_config()
    data, work = tmp_path / "data.csv", tmp_path / "node"
    make_tabular(600).to_csv(data, index=False)
    first = train(cfg, data, work, 1, dataset_id="clinic-a").content[R.METRICS]
    make_tabular(700, seed=1).iloc[600:].to_csv(data, mode="a", header=False, index=False)  # 100 new rows
    second = train(cfg, data, work, 1, run_uid="run-b", dataset_id="clinic-a").content[R.METRICS]
    assert second[R.EPSILON_TOTAL] > first[R.EPSILON_TOTAL]  # composed, not reset
    assert second[R.SAMPLE_RATE] != first[R.SAMPLE_RATE]  # the node did see the new size

    (work / "ledger.db").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{work / 'ledger.db'}{suffix}").unlink(missing_ok=True)
    reply = train(cfg, data, work, 2, run_uid="run-b", dataset_id="clinic-a")
    assert set(reply.content.keys()) == {R.REFUSAL}
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "ledger-invalid"
    assert "deleted or restored from an older copy" in (work / "node.log").read_text()


def test_backup_and_restore(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    work = tmp_path / "node"
    train(cfg, tabular_csv, work, 1, dataset_id="ds")
    old = tmp_path / "old.db"
    assert cli(["client", "ledger", "backup", "--workdir", str(work), "--out", str(old)]) == 0
    train(cfg, tabular_csv, work, 2, dataset_id="ds")
    new = tmp_path / "new.db"
    assert cli(["client", "ledger", "backup", "--workdir", str(work), "--out", str(new)]) == 0
    (work / "ledger.db").unlink()
    # An older backup would under-count: refused, and nothing is installed.
    with pytest.raises(LedgerError, match="older than this node's ledger history"):
        restore(work / "ledger.db", old, work / "ledger-markers")
    assert not (work / "ledger.db").exists()
    assert cli(["client", "ledger", "restore", "--workdir", str(work), "--file", str(new)]) == 0
    reply = train(cfg, tabular_csv, work, 3, dataset_id="ds")
    assert R.ARRAYS in reply.content
    with Ledger(work / "ledger.db") as ledger:
        assert len(ledger.releases("ds")) == 3


def test_budget_refusal_trains_nothing_and_records_nothing(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    work = tmp_path / "node"
    ok = train(cfg, tabular_csv, work, 1, dataset_id="ds", budget_epsilon=6.0).content[R.METRICS]
    assert ok[R.EPSILON_TOTAL] < 6.0 and ok[R.BUDGET_EPSILON] == 6.0
    # Round 2 of the same plan would pass a budget set just above round 1's spending.
    reply = train(cfg, tabular_csv, work, 2, dataset_id="ds", budget_epsilon=ok[R.EPSILON_TOTAL] + 0.01)
    assert set(reply.content.keys()) == {R.REFUSAL}
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "budget-exhausted"
    with Ledger(work / "ledger.db") as ledger:
        assert len(ledger.releases("ds")) == 1
    log = (work / "node.log").read_text()
    assert "this round would bring it to" in log
    sent = [json.loads(line) for line in (work / "sent.jsonl").read_text().splitlines()]
    assert [list(s["records"]) for s in sent] == [[R.ARRAYS, R.METRICS], [R.REFUSAL]]
    assert all(k["class"] for s in sent for rec in s["records"].values() for k in rec.values())


def test_concurrent_reservations_never_overspend(tmp_path: Path) -> None:
    """Three processes racing for a budget that fits one release: BEGIN IMMEDIATE lets exactly one through."""
    path = tmp_path / "ledger.db"
    release = (1.0, 0.1, 50)
    one, two = (epsilon_spent([release] * k, 1e-5) for k in (1, 2))
    script = (
        "import sys; from client.ledger import *\n"
        "l = Ledger(sys.argv[1])\n"
        "r = Release('ds', 'r', 1, sys.argv[2], 1.0, 0.1, 50, 1e-5, 1.0, 'rdp')\n"
        "try:\n    l.reserve(r, Budget(float(sys.argv[3]), 1e-5)); print('OK')\n"
        "except BudgetExceeded: print('REFUSED')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), f"m{i}", str((one + two) / 2)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["OK", "REFUSED", "REFUSED"]
    with Ledger(path) as ledger:
        assert ledger.would_spend("ds", [], 1e-5, "rdp") == pytest.approx(one)


def test_sigkill_mid_training_leaves_the_release_counted(tmp_path: Path) -> None:
    data, work = tmp_path / "data.csv", tmp_path / "node"
    make_tabular(4000).to_csv(data, index=False)
    cfg = tabular_config(
        train={"local_epochs": 30, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.01},
        dp={"target_epsilon": 4.0, "delta": 1e-5},
    )
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger_victim", str(data), str(work), str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        pending = []
        while time.monotonic() < deadline and proc.poll() is None and not pending:
            if (work / "ledger.db").exists():
                try:
                    db = sqlite3.connect(f"file:{work / 'ledger.db'}?mode=ro", uri=True, timeout=5)
                    pending = db.execute("SELECT * FROM releases WHERE status='pending'").fetchall()
                    db.close()
                except sqlite3.OperationalError:
                    pass
            time.sleep(0.05)
        assert pending, f"no pending release observed; victim output: {proc.stdout.read() if proc.stdout else ''}"
        os.kill(proc.pid, signal.SIGKILL)  # mid-training: the release is reserved, training not done
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with Ledger(work / "ledger.db") as ledger:
        (row,) = ledger.releases("ds")
        assert row["status"] == "pending"
        killed = [(row["noise_multiplier"], row["sample_rate"], row["steps"])]
        # The restarted node's next budget check includes the killed round.
        budget = Budget(ledger.would_spend("ds", killed, 1e-5, "rdp") - 1e-3, 1e-5)  # killed + this one
        release = Release("ds", "victim", 2, "m2", *killed[0][:2], killed[0][2], 1e-4, 1.0, "rdp")
        with pytest.raises(BudgetExceeded):
            ledger.reserve(release, budget)
        assert ledger.would_spend("ds", [], 1e-5, "rdp") == pytest.approx(ledger.summaries()[0].epsilon)


def test_privacy_unit_caps_records_and_reports_group_epsilon(tmp_path: Path) -> None:
    df = make_tabular(600)
    df["patient"] = [f"p{i // 4}" for i in range(len(df))]  # 4 records per patient
    data = tmp_path / "data.csv"
    df.to_csv(data, index=False)
    cfg = tabular_config()
    schema = cfg.data.schema_.model_copy(update={"privacy_unit": "patient", "max_records_per_unit": 2})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"schema_": schema})})
    metrics = train(cfg, data, tmp_path / "node", 1, dataset_id="ds").content[R.METRICS]
    assert metrics[R.UNIT_CAP] == 2
    eps = metrics[R.EPSILON_TOTAL]
    assert metrics[R.UNIT_EPSILON] == pytest.approx(2 * eps)
    # 300 of 600 rows kept (2 per patient): the rounded public weight shows the smaller training set.
    assert metrics[R.NUM_EXAMPLES] == 200  # 80% of 300 = 240 → rounded to 200


def test_budget_command_shows_spent_and_remaining(tabular_csv: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = tabular_config()
    work = tmp_path / "node"
    metrics = train(cfg, tabular_csv, work, 1, dataset_id="ward-7", budget_epsilon=9.0).content[R.METRICS]
    capsys.readouterr()
    assert cli(["client", "budget", "--workdir", str(work), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dataset_id"] == "ward-7" and row["releases"] == 1 and row["pending"] == 0
    assert row["epsilon"] == pytest.approx(metrics[R.EPSILON_TOTAL])
    assert row["remaining"] == pytest.approx(9.0 - metrics[R.EPSILON_TOTAL])
    assert cli(["client", "budget", "--workdir", str(tmp_path / "nowhere")]) == 2


def test_a_node_whose_ledger_lives_elsewhere_finds_it_and_shows_only_its_own_datasets(
    tabular_csv: Path,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    """Two nodes on one host share a ledger through `ledger-path` (as simulated nodes share partitions/ledger.db):
    each node's work directory holds only its markers, yet `client budget` and `client inspect` on that
    directory show that node's budget, and only its own; before, both said "no privacy ledger here"."""
    cfg = tabular_config()
    shared = tmp_path / "host" / "ledger.db"
    spent = {
        name: train(cfg, tabular_csv, tmp_path / name, 1, dataset_id=f"ds-{name}", ledger_path=shared).content[
            R.METRICS
        ][R.EPSILON_TOTAL]
        for name in ("a", "b")
    }
    assert not (tmp_path / "a" / "ledger.db").exists() and shared.exists()
    capsys.readouterr()
    for name in ("a", "b"):
        assert cli(["client", "budget", "--workdir", str(tmp_path / name), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["dataset_id"] == f"ds-{name}" and row["epsilon"] == pytest.approx(spent[name])
    assert cli(["client", "inspect", "--workdir", str(tmp_path / "b")]) == 0
    shown = capsys.readouterr().out
    assert "ds-b " in shown and "ds-a" not in shown and "no ledger yet" not in shown
    # node b's signed export holds its own dataset, not its neighbour's, and verifies with Opacus's ε
    out = tmp_path / "b-export.json"
    assert cli(["client", "ledger", "export", "--workdir", str(tmp_path / "b"), "--key", str(node_key(tmp_path)),
                "--out", str(out)]) == 0  # fmt: skip
    body = verify_export(out)
    assert [d.dataset_id for d in body.datasets] == ["ds-b"] and body.datasets[0].epsilon == pytest.approx(spent["b"])


# -- δ spent outside the accountant: a count release's group selection ------------------------------------------------
def _counts_release(message_id: str, extra_delta: float, run_id: str = "r") -> Release:
    return Release("ds", run_id, 3, message_id, 5.0, 1.0, 1, 1e-5, 1.0, "rdp", "gaussian-counts", extra_delta)


def test_the_budget_counts_the_delta_a_count_releases_group_selection_spends(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Budget (ε, 1e-5): a count release whose group selection adds 1e-7 leaves the accountant 1e-5 − 1e-7, so the
    dataset's ε is the larger value at that δ, and a release whose selection would take the whole δ is refused."""
    rounds = (1.0, 0.1, 50)
    work = tmp_path / "node"
    with Ledger(work / "ledger.db") as ledger:
        ledger.reserve(Release("ds", "r", 1, "m1", *rounds, 1e-5, 1.0, "rdp"), Budget(100.0, 1e-5))
        ledger.reserve(_counts_release("m2", 1e-7), Budget(100.0, 1e-5))
        with pytest.raises(BudgetExceeded, match=r"spent by group selection\); this release"):
            ledger.reserve(_counts_release("m3", 1e-5), Budget(100.0, 1e-5))
        (ds,) = ledger.summaries()
        rows = ledger.releases("ds")
    assert len(rows) == 2 and sum(r["extra_delta"] for r in rows) == 1e-7
    assert ds.epsilon == pytest.approx(opacus_epsilon(rows, 1e-5 - 1e-7), rel=1e-9)
    assert ds.epsilon > opacus_epsilon(rows, 1e-5)  # what the ledger said before it counted the selection
    (run,) = ds.runs
    assert (run.delta, run.extra_delta) == (1e-5, 1e-7)
    # The owner sees the dataset's δ split and the run's δ total, as the server shows it.
    assert cli(["client", "budget", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "1e-05 (1e-07 of it by group selection)" in out
    assert "at δ=1.01e-05 (accountant δ 1e-05 + group selection 1e-07)" in out
    # A budget that the DP-SGD rounds and the counts fit only at the full δ refuses the counts.
    exact = opacus_epsilon(rows, 1e-5)
    with Ledger(tmp_path / "other.db") as ledger:
        ledger.reserve(Release("ds", "r", 1, "m1", *rounds, 1e-5, 1.0, "rdp"), Budget(exact * 1.00001, 1e-5))
        with pytest.raises(BudgetExceeded):
            ledger.reserve(_counts_release("m2", 1e-7), Budget(exact * 1.00001, 1e-5))


def test_a_ledger_written_before_the_selection_delta_counts_its_count_releases(tmp_path: Path) -> None:
    """A ledger file from before ``extra_delta`` existed opens, and its count releases count the default selection δ."""
    path = tmp_path / "ledger.db"
    (new_line,) = [line for line in ledger_module.SCHEMA.splitlines(keepends=True) if "extra_delta" in line]
    old_schema = ledger_module.SCHEMA.replace(new_line, "")
    assert old_schema != ledger_module.SCHEMA
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    for seq, (mechanism, sigma, q, steps) in enumerate([("dp-sgd", 1.0, 0.1, 50), ("gaussian-counts", 5.0, 1.0, 1)]):
        db.execute(
            "INSERT INTO releases(dataset_id, run_id, round, message_id, mechanism, noise_multiplier, sample_rate, "
            "steps, delta, max_grad_norm, accountant, status, created_at) VALUES ('ds','r',1,?,?,?,?,?,1e-5,1,'rdp',"
            "'confirmed',0)",
            (f"m{seq}", mechanism, sigma, q, steps),
        )
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        rows = ledger.releases("ds")
        assert [r["extra_delta"] for r in rows] == [0.0, 1e-7]
        assert ledger.would_spend("ds", [], 1e-5, "rdp") == pytest.approx(opacus_epsilon(rows, 1e-5 - 1e-7))


def test_a_signed_export_states_the_selection_delta_and_a_changed_one_fails(tmp_path: Path) -> None:
    work = tmp_path / "node"
    with Ledger(work / "ledger.db") as ledger:
        ledger.reserve(Release("ds", "r", 1, "m1", 1.0, 0.1, 50, 1e-5, 1.0, "rdp"), Budget(100.0, 1e-5))
        ledger.reserve(_counts_release("m2", 1e-7), Budget(100.0, 1e-5))
    key, export = node_key(tmp_path), tmp_path / "export.json"
    assert cli(["client", "ledger", "export", "--workdir", str(work), "--key", str(key), "--out", str(export)]) == 0
    (ds,) = verify_export(export).datasets
    assert ds.extra_delta == 1e-7 and [r.extra_delta for r in ds.releases] == [0.0, 1e-7]
    assert ds.epsilon == pytest.approx(opacus_epsilon([r.model_dump() for r in ds.releases], 1e-5 - 1e-7), rel=1e-9)
    doc = json.loads(export.read_text())
    doc["export"]["datasets"][0]["releases"][1]["extra_delta"] = 0.0  # a node hiding its selection δ
    export.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="bad signature"):
        verify_export(export)


def test_an_export_signed_before_format_2_still_verifies(tmp_path: Path) -> None:
    """A reviewer's format-1 export (no selection δ field, signed without it) keeps verifying."""
    from common.kit.keys import load_node_private_key
    from common.ledger_export import ExportedDataset, ExportedRelease, LedgerExport, public_openssh, ssh_fingerprint

    key = node_key(tmp_path).read_bytes()
    row = {"run_id": "r", "round": 1, "message_id": "m1", "mechanism": "dp-sgd", "noise_multiplier": 1.0,
           "sample_rate": 0.1, "steps": 50, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp",
           "status": "confirmed", "created_at": 0.0}  # fmt: skip
    eps = opacus_epsilon([row], 1e-5)
    pub = public_openssh(key)
    body = LedgerExport(
        format="fedguard-ledger-export/1", ledger_id="l", created_at=0.0, public_key=pub,
        public_key_fingerprint=ssh_fingerprint(pub),
        datasets=[ExportedDataset(dataset_id="ds", budget_epsilon=10.0, budget_delta=1e-5, epsilon=eps, delta=1e-5,
                                  accountant="rdp", releases=[ExportedRelease.model_validate(row)])],
    )  # fmt: skip
    doc = body.model_dump(mode="json")
    for ds in doc["datasets"]:  # what a format-1 node wrote and signed
        ds.pop("extra_delta")
        for r in ds["releases"]:
            r.pop("extra_delta")
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sig = load_node_private_key(key, where="k", error=ExportError).sign(canonical, ec.ECDSA(hashes.SHA384()))
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"export": doc, "signature": base64.b64encode(sig).decode()}))
    assert verify_export(path).datasets[0].epsilon == eps
    doc["datasets"][0]["releases"][0]["extra_delta"] = 1e-6  # a field format 1 never signed
    path.write_text(json.dumps({"export": doc, "signature": base64.b64encode(sig).decode()}))
    with pytest.raises(ExportError, match="outside the accountant"):
        verify_export(path)
