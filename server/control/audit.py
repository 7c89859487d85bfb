"""The audit log: an append-only, HMAC-chained record of who did what through the control service.

Each entry's MAC is HMAC-SHA256(key, previous MAC || canonical entry). The key lives outside the database, in
``<workdir>/secrets/audit.key``: a plain hash chain stored beside the data it protects can simply be recomputed by
whoever edits the data, a keyed one cannot. SQLite triggers refuse UPDATE and DELETE, which stops mistakes; the chain
catches the rest:

* an edited entry, or one recomputed with plain hashes: its MAC does not verify;
* a deleted middle entry: the sequence numbers jump (and renumbering breaks the MACs);
* a truncated tail: ``secrets/audit-head`` anchors the latest (seq, MAC) outside the database, and exported reports
  embed the head, which ``verify(expect_head=...)`` requires to be in the chain.
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
from server.control.errors import ControlError
from server.control.users import connect, require_workdir

GENESIS = "0" * 64
"""The head of an empty log: the 'previous MAC' of entry 1."""

KEY_BYTES = 32
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
    """The result of :meth:`AuditLog.verify`. ``problem`` names the first bad entry and what is wrong with it."""

    ok: bool
    entries: int
    head: str
    problem: str | None
    bad_seq: int | None = None


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
                self._create_key()
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

    def _create_key(self) -> None:
        """Create the key on first use, under a lock: a lost key must be restored, never silently replaced."""
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
            atomic_write(self.key_path, secrets.token_bytes(KEY_BYTES), private=True, replace=False)

    def _read_anchor(self) -> tuple[int, str] | None:
        try:
            doc = json.loads(self.anchor_path.read_text(encoding="utf-8"))
            return int(doc["seq"]), str(doc["head"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return (-1, "")  # unreadable: verify reports it

    def _advance_anchor(self, seq: int, head: str) -> None:
        """Record (seq, head) unless a later append already did: concurrent appenders may finish out of order."""
        with self._flock("audit-head.lock"):
            current = self._read_anchor()
            if current is None or current[0] < seq:
                data = json.dumps({"seq": seq, "head": head}).encode()
                atomic_write(self.anchor_path, data, private=True)

    # -- the log -------------------------------------------------------------------------------------------------
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
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                at = time.time()
                mac = entry_mac(key, prev, seq, at, actor, role, action, target, outcome)
                conn.execute(
                    f"INSERT INTO audit ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                    (seq, at, actor, role, action, target, outcome, mac),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._advance_anchor(seq, mac)
        return AuditEntry(seq, at, actor, role, action, target, outcome, mac)

    def head(self) -> str:
        """The MAC of the last entry (:data:`GENESIS` when empty): what exported reports embed."""
        with self._db() as conn:
            row = conn.execute("SELECT mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS

    def entries(self, limit: int | None = None, offset: int = 0) -> list[AuditEntry]:
        """Entries newest first; ``limit``/``offset`` page through them."""
        if (limit is not None and limit < 0) or offset < 0:
            raise AuditError("limit and offset must not be negative", fix="pass limit >= 0 and offset >= 0")
        with self._db() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ? OFFSET ?",
                (-1 if limit is None else limit, offset),
            ).fetchall()
        return [AuditEntry(*r) for r in rows]

    def verify(self, expect_head: str | None = None) -> AuditCheck:
        """Recompute the chain with the key; check the anchor and, if given, a head taken from an exported report."""
        with self._db() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq").fetchall()
        head = rows[-1][7] if rows else GENESIS

        def bad(problem: str, seq: int | None) -> AuditCheck:
            return AuditCheck(False, len(rows), head, problem, seq)

        key = self._load_key(create=False)
        anchor = self._read_anchor()
        if key is None:
            if rows or anchor:
                return bad(f"the audit key is missing ({self.key_path}): the chain cannot be checked", None)
        else:
            prev, macs = GENESIS, {GENESIS: 0}
            for expected, row in enumerate(rows, start=1):
                seq, at, actor, role, action, target, outcome, mac = row
                if seq != expected:
                    return bad(
                        f"entry {expected} is missing: the log jumps from entry {expected - 1} to {seq} "
                        "(entries were deleted)",
                        expected,
                    )
                try:
                    good = isinstance(mac, str) and hmac.compare_digest(
                        mac, entry_mac(key, prev, seq, at, actor, role, action, target, outcome)
                    )
                except (TypeError, ValueError):  # a value of the wrong type smuggled in with raw SQL
                    good = False
                if not good:
                    return bad(
                        f"entry {seq} does not match its MAC: it, or the chain before it, was altered "
                        f"(recorded: {actor} {role} {action} {target} {outcome})",
                        seq,
                    )
                prev = mac
                macs[mac] = seq
            if anchor is None and rows:
                return bad(f"the head anchor {self.anchor_path} is missing: truncation cannot be ruled out", None)
            if anchor is not None:
                a_seq, a_head = anchor
                if a_seq < 0:
                    return bad(f"the head anchor {self.anchor_path} is unreadable", None)
                if a_seq > len(rows):
                    return bad(
                        f"entry {len(rows) + 1} is missing: the log ends at entry {len(rows)} but entry {a_seq} "
                        "was written (the tail was truncated)",
                        len(rows) + 1,
                    )
                if macs.get(a_head) != a_seq:
                    return bad(
                        f"entry {a_seq} is not the entry anchored outside the database (history rewritten)", a_seq
                    )
        if expect_head is not None and expect_head.strip().lower() not in {GENESIS, *(r[7] for r in rows)}:
            return bad(
                f"the expected head {expect_head.strip()[:16]}… is not in the log: entries up to it were removed "
                "or rewritten",
                None,
            )
        return AuditCheck(True, len(rows), head, None, None)
