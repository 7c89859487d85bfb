"""Control-service identity and audit: tokens, roles, revocation, and an audit chain an attacker cannot rewrite.

Tampering is done the way an attacker with write access to ``control.db`` (but not to ``secrets/``) would: raw
sqlite3 after dropping the append-only triggers.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from common.errors import FedGuardError
from server.control.audit import GENESIS, AuditLog, canonical
from server.control.users import ROLES, UserStore, role_at_least

pytestmark = pytest.mark.timeout(60)

TOKEN_RE = re.compile(r"fg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def db_bytes(workdir: Path) -> bytes:
    """Everything SQLite keeps on disk for control.db, WAL included."""
    return b"".join(p.read_bytes() for p in sorted(workdir.glob("control.db*")))


def raw(workdir: Path) -> sqlite3.Connection:
    """The attacker's connection: no FedGuard code, triggers dropped."""
    conn = sqlite3.connect(workdir / "control.db", isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    return conn


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path)
    for i in range(5):
        audit.append(actor=f"user{i}", role="operator", action="run.start", target=f"run/{i}", outcome="ok")
    return audit


# -- tokens and users ------------------------------------------------------------------------------------------------


def test_token_format_entropy_and_only_its_hash_stored(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    tokens = [store.add(f"u{i}", "reviewer") for i in range(3)]
    for user, token in tokens:
        m = TOKEN_RE.fullmatch(token)
        assert m is not None and m.group(1) == user.id
        assert len(base64.urlsafe_b64decode(m.group(2) + "=")) == 32  # 256 random bits
    assert len({t for _, t in tokens}) == 3 and len({u.id for u, _ in tokens}) == 3
    on_disk = db_bytes(tmp_path)
    for _, token in tokens:
        secret = TOKEN_RE.fullmatch(token).group(2)  # type: ignore[union-attr]
        assert token.encode() not in on_disk and secret.encode() not in on_disk
    stored = sqlite3.connect(tmp_path / "control.db").execute("SELECT id, token_sha256 FROM users").fetchall()
    assert {(u.id, hashlib.sha256(t.encode()).digest()) for u, t in tokens} == set(stored)
    assert {u.name: u.role for u in store.list()} == {"u0": "reviewer", "u1": "reviewer", "u2": "reviewer"}


def test_authenticate_rejects_wrong_secret_malformed_and_revoked(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    alice, token = store.add("alice", "operator")
    assert store.authenticate(token) == alice
    uid, secret = TOKEN_RE.fullmatch(token).groups()  # type: ignore[union-attr]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    malformed = [token + "x", token[:-1], " " + token, token.upper(), "x" * 10_000, f"fg_{uid}_{secret[:-1]}é", ""]
    for bad in (f"fg_{uid}_{flipped}", f"fg_{'0' * 12}_{secret}", "fg_", *malformed):
        assert store.authenticate(bad) is None, bad
    other = UserStore(tmp_path)  # another worker of the service: no shared state but the database
    store.revoke("alice")
    assert other.authenticate(token) is None and store.authenticate(token) is None
    assert [u.revoked_at is not None for u in other.list()] == [True]
    # the name is free again; the new token works, the old one still does not
    alice2, token2 = store.add("alice", "reviewer")
    assert alice2.id != alice.id and store.authenticate(token2) == alice2 and store.authenticate(token) is None


def test_roles_are_ordered_by_privilege() -> None:
    assert ROLES == ("reviewer", "operator", "admin")
    assert role_at_least("admin", "operator") and role_at_least("operator", "operator")
    assert role_at_least("operator", "reviewer") and not role_at_least("operator", "admin")
    assert not role_at_least("reviewer", "operator") and not role_at_least("cli", "reviewer")


def test_bad_user_input_is_a_clear_error(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    store.add("bob", "admin")
    with pytest.raises(FedGuardError, match="already exists"):
        store.add("bob", "reviewer")
    with pytest.raises(FedGuardError, match="unknown role 'root'"):
        store.add("carol", "root")
    with pytest.raises(FedGuardError, match="invalid user name"):
        store.add("bad name; drop table", "admin")
    with pytest.raises(FedGuardError, match="no user 'nobody'"):
        store.revoke("nobody")
    with pytest.raises(FedGuardError, match="server work directory not found"):
        UserStore(tmp_path / "missing").add("dan", "admin")
    assert [u.name for u in store.list()] == ["bob"]


# -- audit chain -----------------------------------------------------------------------------------------------------


def test_clean_chain_verifies_and_secrets_stay_outside_the_database(log: AuditLog, tmp_path: Path) -> None:
    check = log.verify()
    assert check.ok and check.entries == 5 and check.problem is None and check.head == log.head() != GENESIS
    assert [e.seq for e in log.entries()] == [5, 4, 3, 2, 1, 0]  # 0: the genesis record, written with the key
    assert log.entries()[-1].action == "audit.genesis"
    assert [e.seq for e in log.entries(limit=2, offset=1)] == [4, 3]
    key = (tmp_path / "secrets" / "audit.key").read_bytes()
    assert len(key) == 32 and key not in db_bytes(tmp_path)
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "secrets" / "audit.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "control.db").stat().st_mode) == 0o600
    # the triggers refuse ordinary edits
    conn = sqlite3.connect(tmp_path / "control.db", isolation_level=None)
    for sql in ("UPDATE audit SET outcome = 'denied' WHERE seq = 2", "DELETE FROM audit WHERE seq = 5"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    assert AuditLog(tmp_path).verify(expect_head=check.head).ok
    # a lost key is never silently replaced: that would fork the chain
    (tmp_path / "secrets" / "audit.key").rename(tmp_path / "key.bak")
    with pytest.raises(FedGuardError, match="audit key is missing"):
        AuditLog(tmp_path).append(actor="a", role="admin", action="x", target="y", outcome="ok")
    assert "key is missing" in AuditLog(tmp_path).verify().problem  # type: ignore[operator]


def test_edited_entry_is_detected(log: AuditLog, tmp_path: Path) -> None:
    raw(tmp_path).execute("UPDATE audit SET outcome = 'denied', actor = 'someone-else' WHERE seq = 3")
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 3 and "entry 3" in check.problem  # type: ignore[operator]


def test_deleted_middle_entry_is_detected_even_when_renumbered(log: AuditLog, tmp_path: Path) -> None:
    conn = raw(tmp_path)
    conn.execute("DELETE FROM audit WHERE seq = 2")
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 2 and "entry 2 is missing" in check.problem  # type: ignore[operator]
    raw(tmp_path).execute(
        "UPDATE audit SET seq = seq - 1 WHERE seq > 2"
    )  # close the gap (verify restored the triggers)
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 2 and "MAC" in check.problem  # type: ignore[operator]


def test_truncated_tail_is_detected(log: AuditLog, tmp_path: Path) -> None:
    exported_head = log.head()  # what a report exported now embeds
    raw(tmp_path).execute("DELETE FROM audit WHERE seq >= 4")
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 4 and "truncated" in check.problem  # type: ignore[operator]
    assert not AuditLog(tmp_path).verify(expect_head=exported_head).ok
    (tmp_path / "secrets" / "audit-head").unlink()  # the anchor gone as well: still not accepted
    assert not AuditLog(tmp_path).verify().ok


def test_restored_older_copy_is_caught_by_a_reported_head(log: AuditLog, tmp_path: Path) -> None:
    """Rolling back database and anchor together passes the anchor check; a head from an exported report does not."""
    backup = tmp_path / "old"
    backup.mkdir()
    shutil.copy(tmp_path / "control.db", backup / "control.db")
    shutil.copy(tmp_path / "secrets" / "audit-head", backup / "audit-head")
    log.append(actor="mallory", role="operator", action="run.stop", target="run/4", outcome="ok")
    reported = log.head()
    shutil.copy(backup / "control.db", tmp_path / "control.db")
    shutil.copy(backup / "audit-head", tmp_path / "secrets" / "audit-head")
    assert AuditLog(tmp_path).verify().ok  # consistent in itself...
    check = AuditLog(tmp_path).verify(expect_head=reported)
    assert not check.ok and "expected head" in check.problem  # type: ignore[operator]


def test_recomputed_plain_hash_chain_is_detected(log: AuditLog, tmp_path: Path) -> None:
    """An attacker without the key rewrites entry 2 and re-chains everything after it with SHA-256."""
    conn = raw(tmp_path)
    rows = conn.execute(
        "SELECT seq, at, actor, role, action, target, outcome, mac FROM audit WHERE seq >= 1 ORDER BY seq"
    ).fetchall()
    prev = rows[0][7]
    for seq, at, actor, role, action, target, outcome, _ in rows[1:]:
        if seq == 2:
            outcome = "denied"
        mac = hashlib.sha256(bytes.fromhex(prev) + canonical(seq, at, actor, role, action, target, outcome)).hexdigest()
        conn.execute("UPDATE audit SET outcome = ?, mac = ? WHERE seq = ?", (outcome, mac, seq))
        prev = mac
    # even the anchor rewritten to the forged head does not help
    (tmp_path / "secrets" / "audit-head").write_text(json.dumps({"seq": 5, "head": prev}))
    check = AuditLog(tmp_path).verify()
    assert not check.ok and check.bad_seq == 2 and "entry 2 does not match its MAC" in check.problem  # type: ignore[operator]


def test_concurrent_appends_from_threads_form_one_chain(tmp_path: Path) -> None:
    """Six service workers, each its own AuditLog, race from the very first entry (which creates the key)."""
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(n: int) -> None:
        audit = AuditLog(tmp_path)
        start.wait()
        try:
            for i in range(8):
                audit.append(actor=f"t{n}", role="admin", action="user.add", target=f"user/{n}-{i}", outcome="ok")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check = AuditLog(tmp_path).verify()
    assert check.ok and check.entries == 48
    anchor = json.loads((tmp_path / "secrets" / "audit-head").read_text())
    assert anchor["seq"] == 48 and anchor["head"] == check.head and len(anchor["mac"]) == 64


# -- CLI -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``fedguard.cli.main``, with the user/audit commands plugged in if the CLI does not register them yet."""
    from fedguard import cli as cli_mod
    from fedguard.control_cli import add_commands

    original = cli_mod.build_parser
    sub = next(a for a in original()._actions if isinstance(a, argparse._SubParsersAction))
    if "user" not in sub.choices:

        def build_parser() -> argparse.ArgumentParser:
            parser = original()
            add_commands(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)))
            return parser

        monkeypatch.setattr(cli_mod, "build_parser", build_parser)
    return cli_mod.main


def test_cli_user_lifecycle_and_audit(cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    wd = ["--server-workdir", str(tmp_path)]
    assert cli(["user", "add", "rita", "--role", "reviewer", *wd]) == 0
    out = capsys.readouterr().out
    token = TOKEN_RE.search(out).group(0)  # type: ignore[union-attr]
    assert "shown ONCE" in out and UserStore(tmp_path).authenticate(token).name == "rita"  # type: ignore[union-attr]
    assert cli(["user", "add", "otto", "--role", "operator", "--json", *wd]) == 0
    otto = json.loads(capsys.readouterr().out)
    assert otto["role"] == "operator" and UserStore(tmp_path).authenticate(otto["token"]) is not None

    assert cli(["user", "list", *wd]) == 0
    listing = capsys.readouterr().out
    assert "rita" in listing and "reviewer" in listing and "otto" in listing and "fg_" not in listing
    assert cli(["user", "list", "--json", *wd]) == 0
    assert all("token" not in u for u in json.loads(capsys.readouterr().out))

    assert cli(["user", "revoke", "rita", *wd]) == 0
    assert "revoked" in capsys.readouterr().out and UserStore(tmp_path).authenticate(token) is None

    entries = AuditLog(tmp_path).entries()[:-1]  # the last: the genesis record
    assert [(e.action, e.target, e.outcome) for e in reversed(entries)] == [
        ("user.add", "rita (reviewer)", "ok"),
        ("user.add", "otto (operator)", "ok"),
        ("user.revoke", "rita (reviewer)", "ok"),
    ]
    assert {(e.actor, e.role) for e in entries} == {(getpass.getuser(), "cli")}
    assert token not in (tmp_path / "control.db").read_text(errors="replace")

    assert cli(["audit", "verify", "--json", *wd]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["entries"] == 3 and result["head"] == AuditLog(tmp_path).head()
    assert cli(["audit", "verify", "--expect-head", result["head"], *wd]) == 0
    assert "audit log intact: 3 entries" in capsys.readouterr().out

    raw(tmp_path).execute("UPDATE audit SET actor = 'nobody' WHERE seq = 2")
    assert cli(["audit", "verify", *wd]) == 1
    err = capsys.readouterr().err
    assert "TAMPERED" in err and "entry 2" in err and "Traceback" not in err
    assert cli(["audit", "verify", "--json", *wd]) == 1
    assert json.loads(capsys.readouterr().out)["bad_seq"] == 2


def test_cli_bad_input_gives_clear_errors(cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    wd = ["--server-workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        cli(["user", "add", "eve", "--role", "root", *wd])
    assert exc.value.code == 2 and "invalid choice: 'root'" in capsys.readouterr().err

    assert cli(["user", "add", "eve", "--role", "admin", *wd]) == 0
    capsys.readouterr()
    assert cli(["user", "add", "eve", "--role", "reviewer", *wd]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:") and "user 'eve' already exists" in err and "Fix:" in err
    assert (
        AuditLog(tmp_path).entries(limit=1)[0].outcome == "rejected: user 'eve' already exists"
    )  # refusals are audited too

    missing = tmp_path / "nope"
    for argv in (["user", "add", "x", "--role", "admin"], ["user", "list"], ["audit", "verify"]):
        assert cli([*argv, "--server-workdir", str(missing)]) == 2
        err = capsys.readouterr().err
        assert "server work directory not found" in err and str(missing) in err and "Traceback" not in err
    assert not missing.exists()

    assert cli(["user", "revoke", "mallory", *wd]) == 2
    assert "no user 'mallory'" in capsys.readouterr().err
    assert cli(["user", "add", "../etc", "--role", "admin", *wd]) == 2
    assert "invalid user name" in capsys.readouterr().err
    os.chmod(tmp_path / "secrets" / "audit.key", 0o644)
    assert cli(["audit", "verify", *wd]) == 2
    assert "readable by other users" in capsys.readouterr().err


# -- the control service: log-in limiter and run-token replay (issue 20, item 7) --------------------------------------


def _service(tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    from tests.test_control_api import make_service

    return make_service(tmp_path, **kw)


def _login(client, token: str) -> int:  # type: ignore[no-untyped-def]
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"token": token, "csrf_token": csrf}, follow_redirects=False).status_code


def test_an_outsider_cannot_lock_a_named_user_out_of_the_dashboard(tmp_path: Path) -> None:
    """Issue 20: five bad log-ins for a user's public id used to lock that user out for everyone."""
    from fastapi.testclient import TestClient

    from server.control.app import create_app
    from server.control.auth import RateLimiter
    from tests.test_control_api import BASE

    svc, _ = _service(tmp_path, login_limit=RateLimiter(max_failures=5, window=300.0))
    alice, token = svc.users.add("alice", "reviewer")
    app = create_app(svc)
    mallory = TestClient(app, base_url=BASE, client=("203.0.113.9", 4000))
    guess = f"fg_{alice.id}_" + "B" * 43  # alice's public id, a guessed secret
    codes = [_login(mallory, guess) for _ in range(7)]
    assert codes == [401] * 5 + [429] * 2  # brute force from one address is slowed
    assert _login(mallory, token) == 429  # ... and that address gets nothing more, right token or not
    # alice, from her own address, still gets in with her token
    alice_browser = TestClient(app, base_url=BASE, client=("198.51.100.4", 5000))
    assert _login(alice_browser, token) == 303
    # a guesser spread over many addresses is still refused once the id is under attack (not audited again)
    denied = len([e for e in svc.audit.entries() if e.action == "login" and e.outcome.startswith("denied")])
    helper = TestClient(app, base_url=BASE, client=("192.0.2.77", 6000))
    for _ in range(5):
        assert _login(helper, guess) in (401, 429)
    for i in range(3):
        other = TestClient(app, base_url=BASE, client=(f"192.0.2.{i + 1}", 6000))
        assert _login(other, guess) == 429
    after = len([e for e in svc.audit.entries() if e.action == "login" and e.outcome.startswith("denied")])
    assert after - denied <= 5


def test_a_run_token_starts_one_run_only(tmp_path: Path) -> None:
    """Issue 20: the control API accepted a replayed run token (only the nodes stopped it)."""
    from fastapi.testclient import TestClient

    from common.config import load_config
    from common.run_signing import sign_run
    from server.control.app import create_app
    from tests.test_control_api import BASE, bearer, demo_toml

    svc, fed = _service(tmp_path, service_signs=False)
    client = TestClient(create_app(svc), base_url=BASE)
    _, op = svc.users.add("op", "operator")
    toml = demo_toml(tmp_path)
    path = tmp_path / "offline.toml"
    path.write_text(toml, encoding="utf-8")
    token = sign_run(load_config(path).to_json(), svc.admin_key)  # type: ignore[attr-defined]
    body = {"config_toml": toml, "signature": token}
    first = client.post("/api/runs", json=body, headers=bearer(op))
    assert first.status_code == 201 and len(fed.started) == 1
    again = client.post("/api/runs", json=body, headers=bearer(op))
    assert again.status_code == 409 and "already used" in again.json()["detail"]
    assert str(first.json()["flower_run_id"]) in again.json()["detail"]
    assert len(fed.started) == 1  # never submitted
    assert svc.audit.entries(limit=1)[0].outcome.startswith("rejected: replayed run token")
    # the record survives a restart of the service
    from server.control.service import ControlService

    client2 = TestClient(create_app(ControlService(tmp_path, svc.store_path, fed, None)), base_url=BASE)
    assert client2.post("/api/runs", json=body, headers=bearer(op)).status_code == 409 and len(fed.started) == 1
    # a fresh signature over the same config is a new approval
    body["signature"] = sign_run(load_config(path).to_json(), svc.admin_key)  # type: ignore[attr-defined]
    assert client.post("/api/runs", json=body, headers=bearer(op)).status_code == 201


def test_a_run_token_whose_run_never_started_may_be_used_again(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from common.config import load_config
    from common.errors import FedGuardError
    from common.run_signing import sign_run
    from server.control.app import create_app
    from tests.test_control_api import BASE, bearer, demo_toml

    svc, fed = _service(tmp_path, service_signs=False)
    client = TestClient(create_app(svc), base_url=BASE)
    _, op = svc.users.add("op", "operator")
    toml = demo_toml(tmp_path)
    path = tmp_path / "offline.toml"
    path.write_text(toml, encoding="utf-8")
    body = {"config_toml": toml, "signature": sign_run(load_config(path).to_json(), svc.admin_key)}  # type: ignore[attr-defined]
    real_start = fed.start_run

    def refused(config_path: Path, token: str) -> int:
        raise FedGuardError("the SuperLink is not reachable")

    fed.start_run = refused  # type: ignore[method-assign]
    assert client.post("/api/runs", json=body, headers=bearer(op)).status_code == 502
    fed.start_run = real_start  # type: ignore[method-assign]
    assert client.post("/api/runs", json=body, headers=bearer(op)).status_code == 201
