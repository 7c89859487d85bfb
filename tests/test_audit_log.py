"""The audit log against someone who wants it gone: wiped, truncated, its head anchor rewritten (issue 20, item 5).

The attacker can write ``control.db`` and the files in ``secrets/`` but cannot read ``secrets/audit.key`` (raw
sqlite3 after dropping the append-only triggers, plain file writes). Every attack must end in a failed verification
(``fedguard audit verify`` exits 1 and names the problem, no stack trace) and, where the service keeps writing, a
service that refuses to append rather than bury the evidence.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.control.app import create_app
from server.control.audit import (
    GENESIS,
    KEY_BYTES,
    AuditLog,
    AuditTampered,
    anchor_mac,
    entry_mac,
)
from server.control.users import UserStore
from tests.test_control_api import BASE, bearer, make_service
from tests.test_control_auth import cli, raw  # noqa: F401 - cli is a fixture

pytestmark = pytest.mark.timeout(60)

ANCHOR = ("secrets", "audit-head")


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path)
    for i in range(5):
        audit.append(actor=f"user{i}", role="operator", action="run.start", target=f"run/{i}", outcome="ok")
    return audit


@pytest.fixture
def verify_cli(cli, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]  # noqa: F811
    """``fedguard audit verify`` on a workdir: (exit code, stdout, stderr)."""
    main = cli

    def run(workdir: Path, *extra: str) -> tuple[int, str, str]:
        code = main(["audit", "verify", "--server-workdir", str(workdir), *extra])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def anchor_path(workdir: Path) -> Path:
    return workdir.joinpath(*ANCHOR)


# -- a log is never empty --------------------------------------------------------------------------------------------


def test_the_log_starts_with_a_genesis_record_written_with_the_key(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path)
    audit.create()
    (genesis,) = audit.entries()
    assert (genesis.seq, genesis.action, genesis.actor) == (0, "audit.genesis", "fedguard")
    check = audit.verify()
    assert check.ok and check.entries == 0 and check.head == genesis.mac and not check.legacy
    first = audit.append(actor="a", role="admin", action="user.add", target="b (reviewer)", outcome="ok")
    assert first.seq == 1 and first.mac == entry_mac(
        (tmp_path / "secrets" / "audit.key").read_bytes(),
        genesis.mac,
        1,
        first.at,
        "a",
        "admin",
        "user.add",
        "b (reviewer)",
        "ok",
    )  # entry 1 chains from the genesis record, not from a constant anyone can compute
    assert AuditLog(tmp_path).verify().ok


def test_control_service_creates_the_log_at_start(tmp_path: Path) -> None:
    svc, _ = make_service(tmp_path)
    check = svc.audit.verify()
    assert check.ok and check.entries == 0 and svc.audit.entries()[0].action == "audit.genesis"


def test_deleting_every_row_and_the_head_file_fails_verification(log: AuditLog, tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    """Issue 20: this used to say "audit log intact: 0 entries" and exit 0."""
    raw(tmp_path).execute("DELETE FROM audit")
    anchor_path(tmp_path).unlink()
    check = AuditLog(tmp_path).verify()
    assert not check.ok and "no genesis record" in check.problem  # type: ignore[operator]
    code, out, err = verify_cli(tmp_path)
    assert code == 1 and "TAMPERED" in err and "genesis" in err and "intact" not in out
    code, out, _ = verify_cli(tmp_path, "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    # and the service does not start a fresh chain over the wiped one
    with pytest.raises(AuditTampered, match="wiped"):
        AuditLog(tmp_path).append(actor="x", role="admin", action="user.add", target="y", outcome="ok")


def test_deleting_every_row_keeping_the_head_file_fails(log: AuditLog, tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    raw(tmp_path).execute("DELETE FROM audit")
    code, _, err = verify_cli(tmp_path)
    assert code == 1 and "genesis" in err


def test_wiping_the_key_as_well_is_not_a_clean_slate(log: AuditLog, tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    raw(tmp_path).execute("DELETE FROM audit")
    anchor_path(tmp_path).unlink()
    (tmp_path / "secrets" / "audit.key").unlink()
    code, _, err = verify_cli(tmp_path)
    assert code == 1 and "no audit log here" in err


def test_deleting_or_forging_the_genesis_record_is_caught(log: AuditLog, tmp_path: Path) -> None:
    conn = raw(tmp_path)
    genesis = conn.execute(
        "SELECT seq, at, actor, role, action, target, outcome, mac FROM audit WHERE seq = 0"
    ).fetchone()
    conn.execute("DELETE FROM audit WHERE seq = 0")  # now it looks like an old log that chains from the zero head
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 1 and "MAC" in check.problem  # type: ignore[operator]
    forged_mac = hashlib.sha256(b"forged").hexdigest()
    conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)", (*genesis[:7], forged_mac))
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 0 and "genesis" in check.problem  # type: ignore[operator]


# -- truncation and the MACed head anchor ----------------------------------------------------------------------------


def test_anchor_is_maced_with_the_audit_key(log: AuditLog, tmp_path: Path) -> None:
    doc = json.loads(anchor_path(tmp_path).read_text())
    key = (tmp_path / "secrets" / "audit.key").read_bytes()
    assert doc["seq"] == 5 and doc["head"] == log.head() and doc["mac"] == anchor_mac(key, 5, log.head())
    assert doc["mac"] not in {e.mac for e in log.entries()}  # its own label: an anchor never passes for an entry


@pytest.mark.parametrize("forged_anchor", ["no-mac", "wrong-mac", "old-mac"])
def test_truncating_the_tail_and_rewriting_the_head_file_is_caught(
    log: AuditLog,
    tmp_path: Path,
    verify_cli,
    forged_anchor: str,  # type: ignore[no-untyped-def]
) -> None:
    """Issue 20: truncating the tail and rewriting the (unauthenticated) head file used to pass."""
    kept = {e.seq: e.mac for e in log.entries()}
    raw(tmp_path).execute("DELETE FROM audit WHERE seq >= 4")
    doc: dict[str, Any] = {"seq": 3, "head": kept[3]}
    if forged_anchor == "wrong-mac":
        doc["mac"] = hashlib.sha256(b"guess").hexdigest()
    elif forged_anchor == "old-mac":  # a MAC lifted from the old anchor (another seq and head)
        doc["mac"] = json.loads(anchor_path(tmp_path).read_text())["mac"]
    anchor_path(tmp_path).write_text(json.dumps(doc))
    check = AuditLog(tmp_path).verify()
    assert not check.ok and "anchor" in check.problem and "rewritten" in check.problem  # type: ignore[operator]
    code, _, err = verify_cli(tmp_path)
    assert code == 1 and "audit-head" in err
    with pytest.raises(AuditTampered, match="anchor"):  # appending would re-anchor the shortened log
        AuditLog(tmp_path).append(actor="x", role="admin", action="user.add", target="y", outcome="ok")


def test_truncation_is_not_laundered_by_the_next_append(log: AuditLog, tmp_path: Path) -> None:
    raw(tmp_path).execute("DELETE FROM audit WHERE seq >= 4")
    with pytest.raises(AuditTampered, match="truncated"):
        AuditLog(tmp_path).append(actor="x", role="admin", action="user.add", target="y", outcome="ok")
    assert [e.seq for e in AuditLog(tmp_path).entries()] == [3, 2, 1, 0]  # nothing was added on top
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 4 and "truncated" in check.problem  # type: ignore[operator]


def test_a_tampered_log_stops_the_control_service_with_503(tmp_path: Path) -> None:
    svc, _ = make_service(tmp_path)
    client = TestClient(create_app(svc), base_url=BASE, raise_server_exceptions=False)
    _, token = svc.users.add("root", "admin")
    assert client.post("/api/users", json={"name": "ann", "role": "reviewer"}, headers=bearer(token)).status_code == 201
    raw(tmp_path).execute("DELETE FROM audit")
    r = client.post("/api/users", json={"name": "bea", "role": "reviewer"}, headers=bearer(token))
    assert r.status_code == 503 and "wiped" in r.json()["detail"]
    assert "bea" not in {u.name for u in svc.users.list()}  # refused before acting: nothing unaudited happened
    audit = client.get("/api/audit", headers=bearer(token))
    assert audit.status_code == 200 and audit.json()["verified"] is False
    assert "genesis" in audit.json()["problem"]


# -- off-host anchoring: --expect-head -------------------------------------------------------------------------------


def test_expect_head_catches_a_consistent_rollback(log: AuditLog, tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    """Database and anchor restored together are consistent; only a head kept off the host shows the loss."""
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(tmp_path / "control.db", backup / "control.db")
    shutil.copy(anchor_path(tmp_path), backup / "audit-head")
    log.append(actor="mallory", role="admin", action="user.add", target="mallory2 (admin)", outcome="ok")
    code, out, _ = verify_cli(tmp_path, "--json")
    off_host = json.loads(out)["head"]  # what an operator copies somewhere else after each verify
    assert code == 0
    assert verify_cli(tmp_path, "--expect-head", off_host)[0] == 0
    for f in ("control.db-wal", "control.db-shm"):
        (tmp_path / f).unlink(missing_ok=True)
    shutil.copy(backup / "control.db", tmp_path / "control.db")
    shutil.copy(backup / "audit-head", anchor_path(tmp_path))
    assert verify_cli(tmp_path)[0] == 0  # consistent in itself
    code, _, err = verify_cli(tmp_path, "--expect-head", off_host)
    assert code == 1 and "expected head" in err
    assert verify_cli(tmp_path, "--expect-head", GENESIS)[0] == 1  # the zero head proves nothing


def test_expect_head_of_an_older_entry_still_verifies(log: AuditLog, tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    older = log.head()
    log.append(actor="a", role="admin", action="user.revoke", target="b (reviewer)", outcome="ok")
    code, out, _ = verify_cli(tmp_path, "--expect-head", older)
    assert code == 0 and "contains the expected head" in out


# -- logs written before the genesis record --------------------------------------------------------------------------


def _legacy_log(workdir: Path, n: int = 3) -> list[str]:
    """A log as FedGuard wrote it before issue 20: entry 1 chains from the zero head, the anchor has no MAC."""
    key = bytes(range(KEY_BYTES))
    secrets_dir = workdir / "secrets"
    secrets_dir.mkdir(mode=0o700)
    key_path = secrets_dir / "audit.key"
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    AuditLog(workdir).entries()  # creates the table (and nothing else)
    conn = sqlite3.connect(workdir / "control.db", isolation_level=None)
    prev, macs = GENESIS, []
    for seq in range(1, n + 1):
        fields = ("old-admin", "cli", "user.add", f"u{seq} (reviewer)", "ok")
        prev = entry_mac(key, prev, seq, 1000.0 + seq, *fields)
        conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)", (seq, 1000.0 + seq, *fields, prev))
        macs.append(prev)
    conn.close()
    (secrets_dir / "audit-head").write_text(json.dumps({"seq": n, "head": prev}))
    return macs


def test_an_intact_legacy_log_still_verifies_and_is_upgraded(tmp_path: Path, verify_cli) -> None:  # type: ignore[no-untyped-def]
    macs = _legacy_log(tmp_path)
    check = AuditLog(tmp_path).verify(expect_head=macs[-1])
    assert check.ok and check.legacy and check.entries == 3
    code, out, _ = verify_cli(tmp_path)
    assert code == 0 and "predates the genesis record" in out
    entry = AuditLog(tmp_path).append(actor="a", role="admin", action="user.add", target="b (reviewer)", outcome="ok")
    assert entry.seq == 5 and AuditLog(tmp_path).entries()[1].action == "audit.upgrade"
    assert "mac" in json.loads(anchor_path(tmp_path).read_text())
    assert AuditLog(tmp_path).verify(expect_head=macs[-1]).ok
    # once upgraded, the old unauthenticated anchor format is refused: no downgrade to truncate under
    raw(tmp_path).execute("DELETE FROM audit WHERE seq >= 5")
    anchor_path(tmp_path).write_text(json.dumps({"seq": 4, "head": AuditLog(tmp_path).head()}))
    check = AuditLog(tmp_path).verify()
    assert not check.ok and "no MAC" in check.problem  # type: ignore[operator]


def test_a_truncated_legacy_log_is_still_caught_by_its_anchor(tmp_path: Path) -> None:
    _legacy_log(tmp_path)
    raw(tmp_path).execute("DELETE FROM audit WHERE seq = 3")
    check = AuditLog(tmp_path).verify()
    assert not check.ok and "truncated" in check.problem  # type: ignore[operator]


def test_cli_user_commands_refuse_on_a_wiped_log(log: AuditLog, tmp_path: Path, cli, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    raw(tmp_path).execute("DELETE FROM audit")
    assert cli(["user", "add", "eve", "--role", "admin", "--server-workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "wiped" in err and "Traceback" not in err
    assert UserStore(tmp_path).list() == []  # refused before acting
