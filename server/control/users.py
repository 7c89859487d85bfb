"""People who may use the control service: roles, bearer tokens and their revocation.

A token is ``fg_<id>_<secret>``: ``id`` is public and selects the row, ``secret`` carries 256 random bits. Only
SHA-256 of the whole token is stored. A slow KDF would buy nothing here (nobody can brute-force 2^256) and would cost
every API request; SHA-256 makes a stolen database useless for logging in.

Users and the audit log share one SQLite file, ``<server workdir>/control.db`` (WAL). Every call opens its own
connection, so one store can serve a threadpool.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.control.errors import Conflict, ControlError, Invalid, NotFound

ROLES = ("reviewer", "operator", "admin")
"""Ordered by privilege: each role may do everything the one before it may."""

DB_NAME = "control.db"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN = re.compile(r"fg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID_BYTES = 6  # 12 hex characters: a public handle, not a secret
_SECRET_BYTES = 32  # 256 bits from `secrets`; 43 base64url characters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_sha256 BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS users_active_name ON users(name) WHERE revoked_at IS NULL;
"""


def role_at_least(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (unknown roles may do nothing)."""
    if needed not in ROLES:
        raise ValueError(f"unknown role {needed!r}")  # a programming error, not a user's
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`, else a ControlError saying which ones exist."""
    if role not in ROLES:
        raise Invalid(f"unknown role {role!r}", where="--role", fix=f"use one of {', '.join(ROLES)}")
    return role


def check_name(name: str) -> str:
    """A user name that is safe to print, log and put in a URL."""
    if not _NAME.fullmatch(name):
        raise Invalid(
            f"invalid user name {name!r}",
            where="NAME",
            fix="use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
        )
    return name


def require_workdir(workdir: Path) -> Path:
    """``workdir`` if it is a directory: a typo must not silently start a second, empty user base."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ControlError(
            "server work directory not found",
            where=str(workdir),
            fix="pass the --workdir given to `fedguard server start` (create the directory first if the server "
            "has not started yet)",
        )
    return workdir


@contextlib.contextmanager
def connect(workdir: Path) -> Iterator[sqlite3.Connection]:
    """A fresh autocommit connection to ``<workdir>/control.db``, created on first use in an existing workdir.

    Callers open transactions explicitly (``BEGIN IMMEDIATE`` for writes that read first).
    """
    workdir = require_workdir(workdir)
    path = workdir / DB_NAME
    if not path.exists():  # private from the start: it names every user (SQLite gives -wal/-shm the same mode)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True)
class User:
    """A person known to the control service. The token is never part of it."""

    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


_DUMMY = _digest("fg_000000000000_" + "A" * 43)


class UserStore:
    """Users, roles and tokens in ``<workdir>/control.db``; safe to share between threads."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self._ready = False

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with connect(self.workdir) as conn:
            if not self._ready:
                conn.executescript(_SCHEMA)
                self._ready = True
            yield conn

    def add(self, name: str, role: str) -> tuple[User, str]:
        """Create a user; returns the token, which exists only in this return value (show it once)."""
        check_name(name)
        check_role(role)
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM users WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone():
                    raise Conflict(
                        f"user {name!r} already exists",
                        where=str(self.workdir / DB_NAME),
                        fix=f"pick another name, or `fedguard user revoke {name}` first to replace the token",
                    )
                while True:  # 48-bit ids: a collision is astronomically rare, but never overwrite a row
                    uid = secrets.token_hex(_ID_BYTES)
                    if not conn.execute("SELECT 1 FROM users WHERE id = ?", (uid,)).fetchone():
                        break
                token = f"fg_{uid}_{secrets.token_urlsafe(_SECRET_BYTES)}"
                user = User(uid, name, role, time.time(), None)
                conn.execute(
                    "INSERT INTO users (id, name, role, token_sha256, created_at, revoked_at) VALUES (?,?,?,?,?,NULL)",
                    (uid, name, role, _digest(token), user.created_at),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return user, token

    def authenticate(self, token: str) -> User | None:
        """The active user holding ``token``, else None (malformed, unknown id, wrong secret or revoked)."""
        if not isinstance(token, str) or len(token) > 64:
            return None
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        with self._db() as conn:
            row = conn.execute(
                "SELECT id, name, role, created_at, revoked_at, token_sha256 FROM users WHERE id = ?", (m.group(1),)
            ).fetchone()
        stored = row[5] if row is not None else _DUMMY
        if not hmac.compare_digest(stored, _digest(token)) or row is None or row[4] is not None:
            return None
        return User(*row[:5])

    def revoke(self, name: str) -> User:
        """Revoke the active user ``name``; the next :meth:`authenticate` with its token fails."""
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT id, name, role, created_at FROM users WHERE name = ? AND revoked_at IS NULL", (name,)
                ).fetchone()
                if row is None:
                    known = conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
                    raise NotFound(
                        f"user {name!r} is already revoked" if known else f"no user {name!r}",
                        where=str(self.workdir / DB_NAME),
                        fix="see `fedguard user list --server-workdir DIR` for the active users",
                    )
                now = time.time()
                conn.execute("UPDATE users SET revoked_at = ? WHERE id = ?", (now, row[0]))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return User(row[0], row[1], row[2], row[3], now)

    def list(self) -> list[User]:
        """Every user, active and revoked, oldest first."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT id, name, role, created_at, revoked_at FROM users ORDER BY created_at, id"
            ).fetchall()
        return [User(*r) for r in rows]
