"""The audit log: an append-only, HMAC-chained record of who did what through the control service.

Each entry's MAC is HMAC-SHA256(key, previous MAC || canonical entry). The key lives outside the database, in
``<workdir>/secrets/audit.key``: a plain hash chain stored beside the data it protects can simply be recomputed by
whoever edits the data, a keyed one cannot. SQLite triggers refuse UPDATE and DELETE, which stops mistakes; the chain
catches the rest:

* an edited entry, or one recomputed with plain hashes: its MAC does not verify;
* a deleted middle entry: the sequence numbers jump (and renumbering breaks the MACs);
* a wiped log: a log is never empty. Its first record, the *genesis* record (``seq`` 0, action ``audit.genesis``),
  is written together with the key, and entry 1 chains from it, so an empty table, or one whose genesis was deleted,
  fails verification;
* a truncated tail: ``secrets/audit-head`` anchors the latest (seq, MAC) outside the database, itself MACed with the
  key, so it cannot be rewritten to match a shortened log; exported reports embed the head, which
  ``verify(expect_head=...)`` requires to be in the chain.

What stays out of reach of an on-host check: whoever can read the key (root, or the server's own user) can forge a
whole new history, and whoever can copy ``control.db`` and ``audit-head`` can later put both back together (a
consistent rollback). Only a head kept off the host (``fedguard audit verify --expect-head``) catches those.

Logs written before the genesis record existed (entry 1 chains from :data:`GENESIS`, anchor without a MAC) still
verify, flagged ``legacy``; the first append by this version records an ``audit.upgrade`` entry and MACs the anchor,
after which an unMACed anchor is refused for that log too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_write, group_or_world_readable
from server.control.errors import ControlError, Unavailable
from server.control.users import connect, require_workdir

GENESIS = "0" * 64
"""The 'previous MAC' of the genesis record (and of entry 1 in a legacy log)."""

GENESIS_ACTION = "audit.genesis"
UPGRADE_ACTION = "audit.upgrade"
SYSTEM_ACTOR = "fedguard"
KEY_BYTES = 32
_ANCHOR_LABEL = b"fedguard-audit-head\x00"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    mac TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
_COLUMNS = "seq, at, actor, role, action, target, outcome, mac"


class AuditError(ControlError):
    """The audit log cannot be written or read (key missing or exposed, bad arguments)."""

    code = "audit-error"


class AuditTampered(AuditError, Unavailable):
    """The log was wiped or truncated: the service refuses to audit (and so to act) until an admin restores it."""

    code = "audit-tampered"


@dataclass(frozen=True)
class AuditEntry:
    """One action: who (actor, role), what (action, target), when (``at``, Unix seconds) and how it ended."""

    seq: int
    at: float
    actor: str
    role: str
    action: str
    target: str
    outcome: str
    mac: str


@dataclass(frozen=True)
class AuditCheck:
    """The result of :meth:`AuditLog.verify`. ``problem`` names the first bad entry and what is wrong with it.

    ``entries`` counts recorded actions (the genesis record is not one); ``legacy`` marks a log written before the
    genesis record and the MACed anchor existed (see the module docstring).
    """

    ok: bool
    entries: int
    head: str
    problem: str | None
    bad_seq: int | None = None
    legacy: bool = False


@dataclass(frozen=True)
class Anchor:
    """The parsed ``audit-head`` file: ``mac`` is None in the legacy (unauthenticated) format."""

    seq: int
    head: str
    mac: str | None


def canonical(seq: int, at: float, actor: str, role: str, action: str, target: str, outcome: str) -> bytes:
    """The bytes an entry's MAC covers: a JSON array, so no field can bleed into the next."""
    fields = [seq, at, actor, role, action, target, outcome]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def entry_mac(
    key: bytes, prev_mac: str, seq: int, at: float, actor: str, role: str, action: str, target: str, outcome: str
) -> str:
    """HMAC-SHA256(key, previous MAC (32 bytes) || canonical entry), hex."""
    body = bytes.fromhex(prev_mac) + canonical(seq, at, actor, role, action, target, outcome)
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def anchor_mac(key: bytes, seq: int, head: str) -> str:
    """HMAC-SHA256 over (seq, head) under a label of its own: an anchor cannot pass for an entry, nor vice versa."""
    body = _ANCHOR_LABEL + json.dumps([seq, head], separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class AuditLog:
    """The audit table in ``<workdir>/control.db``; its key and head anchor in ``<workdir>/secrets/``. Thread-safe."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.secrets_dir = self.workdir / "secrets"
        self.key_path = self.secrets_dir / "audit.key"
        self.anchor_path = self.secrets_dir / "audit-head"
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._ready = False

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with connect(self.workdir) as conn:
            if not self._ready:
                conn.executescript(_SCHEMA)  # also puts back triggers someone dropped
                self._ready = True
            yield conn

    # -- key and anchor ------------------------------------------------------------------------------------------
    def _load_key(self, *, create: bool) -> bytes | None:
        with self._lock:
            if self._key is not None:
                return self._key
            if not self.key_path.exists():
                if not create:
                    return None
                self._create_log()
            exposed = group_or_world_readable(self.key_path)
            if exposed:
                raise AuditError(
                    f"the audit key is readable by other users (mode {exposed})",
                    where=str(self.key_path),
                    fix=f"chmod 600 {self.key_path}; whoever could read it could rewrite the audit history",
                )
            key = self.key_path.read_bytes()
            if len(key) != KEY_BYTES:
                raise AuditError(
                    f"the audit key has {len(key)} bytes, expected {KEY_BYTES}",
                    where=str(self.key_path),
                    fix="restore the key from backup; without it the existing history cannot be verified",
                )
            self._key = key
            return key

    @contextlib.contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        """An exclusive lock shared with every process and thread using this workdir."""
        fd = os.open(self.secrets_dir / name, os.O_CREAT | os.O_RDWR, 0o600)
        with os.fdopen(fd, "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _create_log(self) -> None:
        """Create the key and the genesis record together, under a lock (a lost key is restored, never replaced).

        The genesis record and its anchor are written before the key file appears, so no other process can see a
        key without a genesis record beside it.
        """
        require_workdir(self.workdir)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        with self._flock("audit.key.lock"):
            if self.key_path.exists():  # another appender created it meanwhile
                return
            with self._db() as conn:
                has_history = conn.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is not None
            if has_history or self.anchor_path.exists():  # a new key would fork the chain
                raise AuditError(
                    "the audit key is missing but the audit log has entries",
                    where=str(self.key_path),
                    fix="restore secrets/audit.key from backup; the service refuses to audit with a new key",
                )
            key = secrets.token_bytes(KEY_BYTES)
            at = time.time()
            fields = (SYSTEM_ACTOR, "-", GENESIS_ACTION, str(self.workdir.resolve())[:300], "log created")
            mac = entry_mac(key, GENESIS, 0, at, *fields)
            with self._db() as conn:
                conn.execute(f"INSERT INTO audit ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", (0, at, *fields, mac))
            self._write_anchor(key, 0, mac)
            atomic_write(self.key_path, key, private=True, replace=False)

    def _read_anchor(self) -> Anchor | None:
        """The anchor file: None if absent; ``seq`` -1 if unreadable (verify reports it)."""
        try:
            doc = json.loads(self.anchor_path.read_text(encoding="utf-8"))
            mac = doc.get("mac")
            return Anchor(int(doc["seq"]), str(doc["head"]), None if mac is None else str(mac))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return Anchor(-1, "", None)

    def _anchor_ok(self, key: bytes, anchor: Anchor) -> bool:
        return anchor.mac is not None and hmac.compare_digest(anchor.mac, anchor_mac(key, anchor.seq, anchor.head))

    def _write_anchor(self, key: bytes, seq: int, head: str) -> None:
        data = json.dumps({"seq": seq, "head": head, "mac": anchor_mac(key, seq, head)}).encode()
        atomic_write(self.anchor_path, data, private=True)

    def _advance_anchor(self, key: bytes, seq: int, head: str) -> None:
        """Record (seq, head) unless a later append already did: concurrent appenders may finish out of order."""
        with self._flock("audit-head.lock"):
            current = self._read_anchor()
            if current is None or current.seq < seq or current.mac is None:
                self._write_anchor(key, seq, head)

    def _check_before_append(self, key: bytes, conn: sqlite3.Connection, last_seq: int | None) -> bool:
        """Refuse to extend a wiped or truncated log (appending would bury the evidence); True: a legacy log."""
        fix = "run `fedguard audit verify --server-workdir DIR`, then restore control.db and secrets/ from backup"
        if last_seq is None:
            raise AuditTampered(
                "the audit log is empty: its genesis record was deleted (the log was wiped)",
                where=str(self.workdir / "control.db"),
                fix=fix,
            )
        legacy = conn.execute("SELECT 1 FROM audit WHERE seq = 0").fetchone() is None
        anchor = self._read_anchor()
        if anchor is None or anchor.seq < 0:
            problem = "missing" if anchor is None else "unreadable"
            raise AuditTampered(f"the audit head anchor is {problem}", where=str(self.anchor_path), fix=fix)
        if anchor.mac is None and not legacy:
            raise AuditTampered(
                "the audit head anchor has no MAC: it was rewritten", where=str(self.anchor_path), fix=fix
            )
        if anchor.mac is not None and not self._anchor_ok(key, anchor):
            raise AuditTampered("the audit head anchor's MAC does not verify", where=str(self.anchor_path), fix=fix)
        if anchor.seq > last_seq:
            raise AuditTampered(
                f"the audit log ends at entry {last_seq} but entry {anchor.seq} was written (the tail was truncated)",
                where=str(self.workdir / "control.db"),
                fix=fix,
            )
        return legacy and anchor.mac is None

    # -- the log -------------------------------------------------------------------------------------------------
    def create(self) -> None:
        """Create the log (key and genesis record) if it does not exist yet; the service calls this at start."""
        self._load_key(create=True)

    def check_appendable(self) -> None:
        """AuditTampered if the next append would be refused: callers check before acting, so that nothing is
        done that cannot be audited."""
        key = self._load_key(create=True)
        assert key is not None
        with self._db() as conn:
            last = conn.execute("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            self._check_before_append(key, conn, None if last is None else last[0])

    def append(self, *, actor: str, role: str, action: str, target: str, outcome: str) -> AuditEntry:
        """Append one entry (serialized across threads and processes by the database's write lock)."""
        fields = {"actor": actor, "role": role, "action": action, "target": target, "outcome": outcome}
        for field, value in fields.items():
            if not isinstance(value, str):
                raise AuditError(f"audit field {field} must be text, got {type(value).__name__}")
        key = self._load_key(create=True)
        assert key is not None
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                last = conn.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                upgrade = self._check_before_append(key, conn, None if last is None else last[0])
                seq, prev = last
                if upgrade:  # a log from before the MACed anchor: say so in the chain, then MAC the anchor
                    seq, at = seq + 1, time.time()
                    note = (SYSTEM_ACTOR, "-", UPGRADE_ACTION, "audit-head", "anchor now MACed with the audit key")
                    prev = entry_mac(key, prev, seq, at, *note)
                    conn.execute(f"INSERT INTO audit ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", (seq, at, *note, prev))
                seq, at = seq + 1, time.time()
                mac = entry_mac(key, prev, seq, at, actor, role, action, target, outcome)
                conn.execute(
                    f"INSERT INTO audit ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                    (seq, at, actor, role, action, target, outcome, mac),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._advance_anchor(key, seq, mac)
        return AuditEntry(seq, at, actor, role, action, target, outcome, mac)

    def head(self) -> str:
        """The MAC of the last record (the genesis record's in a log with no actions): what reports embed."""
        with self._db() as conn:
            row = conn.execute("SELECT mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS

    def entries(self, limit: int | None = None, offset: int = 0) -> list[AuditEntry]:
        """Records newest first (the genesis record, ``seq`` 0, last); ``limit``/``offset`` page through them."""
        if (limit is not None and limit < 0) or offset < 0:
            raise AuditError("limit and offset must not be negative", fix="pass limit >= 0 and offset >= 0")
        with self._db() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ? OFFSET ?",
                (-1 if limit is None else limit, offset),
            ).fetchall()
        return [AuditEntry(*r) for r in rows]

    def verify(self, expect_head: str | None = None) -> AuditCheck:
        """Recompute the chain with the key; check the genesis record, the MACed anchor and, if given, a head taken
        from an exported report or kept off the host."""
        with self._db() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq").fetchall()
        head = rows[-1][7] if rows else GENESIS
        genesis = rows[0] if rows and rows[0][0] == 0 else None
        actions = rows[1:] if genesis else rows
        legacy = bool(rows) and genesis is None

        def bad(problem: str, seq: int | None) -> AuditCheck:
            return AuditCheck(False, len(actions), head, problem, seq, legacy)

        key = self._load_key(create=False)
        anchor = self._read_anchor()
        if key is None:
            if rows or anchor:
                return bad(f"the audit key is missing ({self.key_path}): the chain cannot be checked", None)
            return bad(
                "there is no audit log here (no key, no genesis record): it was never created in this work "
                "directory, or it was wiped together with its key",
                0,
            )
        if not rows:
            return bad(
                "the audit log is empty and has no genesis record: every entry was deleted (a log is never empty, "
                "its genesis record is written when it is created)",
                0,
            )
        prev, macs = GENESIS, {}
        if genesis is not None:
            seq, at, actor, role, action, target, outcome, mac = genesis
            if action != GENESIS_ACTION or not self._mac_ok(key, GENESIS, genesis):
                return bad("the genesis record (entry 0) does not match its MAC: the log was replaced", 0)
            prev, macs = mac, {mac: 0}
        elif rows[0][0] < 1:
            return bad(f"entry {rows[0][0]} is out of range", rows[0][0])
        upgraded = False
        for expected, row in enumerate(actions, start=1):
            seq = row[0]
            if seq != expected:
                if expected == 1 and genesis is None and seq > 1:
                    problem = (
                        f"the genesis record and entries 1 to {seq - 1} are missing: the log starts at entry {seq} "
                        "(entries were deleted)"
                    )
                    return bad(problem, 0)
                return bad(
                    f"entry {expected} is missing: the log jumps from entry {expected - 1} to {seq} "
                    "(entries were deleted)",
                    expected,
                )
            if not self._mac_ok(key, prev, row):
                return bad(
                    f"entry {seq} does not match its MAC: it, or the chain before it, was altered "
                    f"(recorded: {row[2]} {row[3]} {row[4]} {row[5]} {row[6]})",
                    seq,
                )
            upgraded = upgraded or row[4] == UPGRADE_ACTION and row[2] == SYSTEM_ACTOR
            prev = row[7]
            macs[prev] = seq
        last_seq = rows[-1][0]
        if anchor is None:
            return bad(f"the head anchor {self.anchor_path} is missing: truncation cannot be ruled out", None)
        if anchor.seq < 0:
            return bad(f"the head anchor {self.anchor_path} is unreadable", None)
        if anchor.mac is None:
            if genesis is not None or upgraded:
                return bad(f"the head anchor {self.anchor_path} has no MAC: it was rewritten", None)
        elif not self._anchor_ok(key, anchor):
            return bad(f"the head anchor {self.anchor_path} does not match its MAC: it was rewritten", None)
        if anchor.seq > last_seq:
            return bad(
                f"entry {last_seq + 1} is missing: the log ends at entry {last_seq} but entry {anchor.seq} "
                "was written (the tail was truncated)",
                last_seq + 1,
            )
        if macs.get(anchor.head) != anchor.seq:
            return bad(
                f"entry {anchor.seq} is not the entry anchored outside the database (history rewritten)", anchor.seq
            )
        if expect_head is not None and expect_head.strip().lower() not in macs:
            return bad(
                f"the expected head {expect_head.strip()[:16]}… is not in the log: entries up to it were removed "
                "or rewritten",
                None,
            )
        return AuditCheck(True, len(actions), head, None, None, legacy)

    @staticmethod
    def _mac_ok(key: bytes, prev: str, row: tuple[object, ...]) -> bool:
        """Whether a row's stored MAC is the one the key gives for it after ``prev``."""
        seq, at, actor, role, action, target, outcome, mac = row
        try:
            return isinstance(mac, str) and hmac.compare_digest(
                mac,
                entry_mac(key, prev, seq, at, actor, role, action, target, outcome),  # type: ignore[arg-type]
            )
        except (TypeError, ValueError):  # a value of the wrong type smuggled in with raw SQL
            return False
