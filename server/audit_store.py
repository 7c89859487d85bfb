"""Empirical privacy audit results, kept in the run store's SQLite file in a table of their own.

A separate module (not ``server.store``) so the audit adds one table without touching the run
store's schema or migrations: ``CREATE TABLE IF NOT EXISTS`` on first write, one row per run,
replaced atomically (one transaction) when a run is audited again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_TABLE = """CREATE TABLE IF NOT EXISTS privacy_audits (
    run_id INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    result_json TEXT NOT NULL
)"""


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def save_audit(store_path: str | Path, run_id: int, result: dict[str, Any]) -> None:
    """Record (or replace) the audit of ``run_id``."""
    conn = _connect(store_path)
    try:
        with conn:
            conn.execute(_TABLE)
            conn.execute(
                "INSERT OR REPLACE INTO privacy_audits(run_id, created_at, result_json) VALUES (?, ?, ?)",
                (run_id, time.time(), json.dumps(result, sort_keys=True)),
            )
    finally:
        conn.close()


def load_audit(store_path: str | Path, run_id: int) -> dict[str, Any] | None:
    """The audit of ``run_id``, or None when the run was never audited (or the table is absent)."""
    if not Path(store_path).exists():
        return None
    conn = _connect(store_path)
    try:
        row = conn.execute("SELECT result_json FROM privacy_audits WHERE run_id = ?", (run_id,)).fetchone()
    except sqlite3.OperationalError:  # no table: nothing audited in this store yet
        return None
    finally:
        conn.close()
    return json.loads(row[0]) if row else None
