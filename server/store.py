"""The run store: one SQLite file recording runs, rounds, per-node outcomes and evaluations.

Only values that may leave a node are stored per node (docs/privacy.md): its status, the declared
public weight, the ε its accountant reported, the DP parameters it used, and the list of every
record key it sent (so reports can show each value's privacy class). The server's own figures
are stored exactly: per round its time, aggregation time and energy (``round_costs``), per node
and round the bytes it sent to and received from the node (``node_traffic``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import StoreError

#: accepted: used in aggregation; rejected: failed validation; refused: the node declined
#: (budget, policy, infeasible plan); failed: Flower reported an error; dropped: no reply in time.
STATUSES = ("accepted", "rejected", "refused", "failed", "dropped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    status      TEXT NOT NULL,            -- running | finished | failed
    config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    flower_run_id TEXT,            -- Flower run ids are uint64
    started_at  REAL NOT NULL,
    finished_at REAL,
    error       TEXT,
    meta_json   TEXT,           -- engine, transport, secure aggregation, software versions
    resumed_from INTEGER        -- the run this one continues (fedguard run resume)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    sampled     INTEGER NOT NULL,
    accepted    INTEGER NOT NULL,
    rejected    INTEGER NOT NULL,
    refused     INTEGER NOT NULL,
    dropped     INTEGER NOT NULL,
    failed      INTEGER NOT NULL,
    aggregated  INTEGER NOT NULL,         -- 1 when the global model was updated
    meta_json   TEXT,                     -- server-side mechanisms of the round (central DP)
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_rounds (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    node_id     TEXT NOT NULL,            -- Flower node ids are uint64
    status      TEXT NOT NULL,            -- accepted | rejected | refused | failed | dropped
    reason      TEXT,
    weight      REAL,
    epsilon     REAL,
    delta       REAL,
    noise_multiplier REAL,
    sample_rate REAL,
    steps       INTEGER,
    values_json TEXT,                     -- every accounting/public value the node reported
    received_json TEXT,                   -- "record.key" of everything the node sent
    PRIMARY KEY (run_id, round, node_id)
);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    audit_json  TEXT,                     -- fairness audit of the round's global model (common.fairness)
    provenance_json TEXT,                 -- evaluation-set size and fingerprint
    evaluated_by TEXT,                    -- "server" or "evaluator node <id>"
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS federated_audits (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    audit_json  TEXT,                     -- metrics from the summed noised counts (no client's counts)
    spread_json TEXT,                     -- per-client accuracy: worst, best, spread (no client named)
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS count_releases (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    node_id     TEXT NOT NULL,
    status      TEXT NOT NULL,            -- accepted | rejected | refused | failed | dropped
    reason      TEXT,
    values_json TEXT,                     -- the node's accounting values (ε, σ), never its counts
    received_json TEXT,
    PRIMARY KEY (run_id, round, node_id)
);
CREATE TABLE IF NOT EXISTS round_costs (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,         -- 0: setup (role discovery, scoring the initial model)
    wall_seconds REAL,                    -- the server's time for the round, retries and scoring included
    aggregation_seconds REAL,             -- validating and aggregating replies, stepping the model
    bytes_sent  INTEGER NOT NULL DEFAULT 0,     -- to every node, Flower wire format (common.resources)
    bytes_received INTEGER NOT NULL DEFAULT 0,
    server_json TEXT,                     -- the server's own usage (CPU, memory, energy and its label)
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS node_traffic (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    node_id     TEXT NOT NULL,
    role        TEXT,                     -- client | evaluator (as the server learnt it)
    bytes_sent  INTEGER NOT NULL DEFAULT 0,     -- server → node
    bytes_received INTEGER NOT NULL DEFAULT 0,  -- node → server
    messages    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, round, node_id)
);
CREATE TABLE IF NOT EXISTS node_names (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    node_id     TEXT NOT NULL,            -- the SuperLink's id (uint64)
    name        TEXT NOT NULL,            -- the name the plan and the operator use (kit name; node-0… in simulation)
    source      TEXT,                     -- kit: the enrolled key's name | node: the node's own answer (simulation)
    PRIMARY KEY (run_id, node_id)
);
CREATE TABLE IF NOT EXISTS alarms (
    run_id      INTEGER NOT NULL REFERENCES runs(run_id),
    kind        TEXT NOT NULL,            -- stranger: a registered key the kit does not enroll
    subject     TEXT NOT NULL,            -- the key fingerprint (SHA256:...)
    node_id     TEXT,                     -- the SuperLink's id for it when first seen
    detail      TEXT,
    first_round INTEGER,                  -- the round it was first seen in (0: setup)
    created_at  REAL NOT NULL,
    PRIMARY KEY (run_id, kind, subject)
);
"""


class RunStore:
    """Thin, transactional access to the run store file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._migrate()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise StoreError(
                f"cannot open the run store: {exc}",
                where=str(self.path),
                fix="pass --store with a writable path to a FedGuard run store (SQLite)",
            ) from None
        self._db.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        """Add columns that newer versions introduced to a store an older FedGuard created.

        New tables (``round_costs``, ``node_traffic``, ``alarms``, ``node_names``) need no step here: ``SCHEMA``
        creates them when an older store is opened.
        """
        for table, column in (
            ("runs", "meta_json"),
            ("runs", "resumed_from"),
            ("rounds", "meta_json"),
            ("client_rounds", "values_json"),
            ("client_rounds", "received_json"),
            ("evaluations", "audit_json"),
            ("evaluations", "provenance_json"),
            ("evaluations", "evaluated_by"),
        ):
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db:
            yield self._db

    # -- writes ---------------------------------------------------------------
    def create_run(
        self,
        name: str,
        config_json: str,
        config_hash: str,
        flower_run_id: int | None,
        meta: dict[str, Any] | None = None,
        resumed_from: int | None = None,
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs(name, status, config_json, config_hash, flower_run_id, started_at, meta_json, "
                "resumed_from) VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    config_json,
                    config_hash,
                    None if flower_run_id is None else str(flower_run_id),
                    time.time(),
                    json.dumps(meta or {}),
                    resumed_from,
                ),
            )
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status=?, finished_at=?, error=? WHERE run_id=?",
                (status, time.time(), error, run_id),
            )

    def record_round(
        self,
        run_id: int,
        round_: int,
        started_at: float,
        outcomes: list[dict[str, Any]],
        aggregated: bool,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Write a round and its per-node outcomes in one transaction."""
        count = {s: sum(o["status"] == s for o in outcomes) for s in STATUSES}
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    round_,
                    started_at,
                    time.time(),
                    len(outcomes),
                    count["accepted"],
                    count["rejected"],
                    count["refused"],
                    count["dropped"],
                    count["failed"],
                    int(aggregated),
                    json.dumps(meta or {}),
                ),
            )
            for o in outcomes:
                values = o.get("values") or {}
                db.execute(
                    "INSERT OR REPLACE INTO client_rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        run_id,
                        round_,
                        str(o["node_id"]),
                        o["status"],
                        o.get("reason"),
                        o.get("weight"),
                        values.get("epsilon"),
                        values.get("delta"),
                        values.get("noise-multiplier"),
                        values.get("sample-rate"),
                        values.get("steps"),
                        json.dumps(values),
                        json.dumps(o.get("received") or []),
                    ),
                )

    def record_evaluation(
        self,
        run_id: int,
        round_: int,
        metrics: dict[str, float],
        audit_json: str | None = None,
        provenance: dict[str, Any] | None = None,
        evaluated_by: str = "server",
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?)",
                (
                    run_id,
                    round_,
                    json.dumps(metrics),
                    audit_json or None,
                    json.dumps(provenance) if provenance else None,
                    evaluated_by,
                ),
            )

    def record_federated(
        self, run_id: int, round_: int, audit_json: str | None, spread: dict[str, Any] | None, outcomes: list[dict]
    ) -> None:
        """The federated view of one round and every node's answer (accounting only) in one transaction."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO federated_audits VALUES (?,?,?,?)",
                (run_id, round_, audit_json, json.dumps(spread) if spread else None),
            )
            self._count_rows(db, run_id, round_, outcomes)

    def record_count_releases(self, run_id: int, round_: int, outcomes: list[dict]) -> None:
        """Every node's answer to a counts release outside the federated view (round 0: reweighing's label
        counts): its accounting values count towards the node's ε (server.run_health)."""
        with self._tx() as db:
            self._count_rows(db, run_id, round_, outcomes)

    @staticmethod
    def _count_rows(db: sqlite3.Connection, run_id: int, round_: int, outcomes: list[dict]) -> None:
        for o in outcomes:
            db.execute(
                "INSERT OR REPLACE INTO count_releases VALUES (?,?,?,?,?,?,?)",
                (
                    run_id,
                    round_,
                    str(o["node_id"]),
                    o["status"],
                    o.get("reason"),
                    json.dumps(o.get("values") or {}),
                    json.dumps(o.get("received") or []),
                ),
            )

    def record_alarm(
        self, run_id: int, kind: str, subject: str, *, node_id: int | None = None, detail: str = "", round_: int = 0
    ) -> bool:
        """Record an alarm once per run, kind and subject; True when it is new (so callers report it once)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO alarms(run_id, kind, subject, node_id, detail, first_round, created_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (run_id, kind, subject, None if node_id is None else str(node_id), detail, round_, time.time()),
            )
            return cur.rowcount == 1

    def record_node_names(self, run_id: int, names: dict[int, str], source: str) -> None:
        """Remember the names of a run's nodes; a kit name replaces a node's own answer, never the reverse."""
        with self._tx() as db:
            for node, name in names.items():
                db.execute(
                    "INSERT INTO node_names VALUES (?,?,?,?) ON CONFLICT(run_id, node_id) DO UPDATE SET "
                    "name = excluded.name, source = excluded.source WHERE excluded.source = 'kit' OR source != 'kit'",
                    (run_id, str(node), name, source),
                )

    def record_costs(
        self,
        run_id: int,
        round_: int,
        traffic: dict[int, dict[str, int]],
        roles: dict[int, str],
        *,
        server: dict[str, Any] | None = None,
        wall_seconds: float | None = None,
        aggregation_seconds: float | None = None,
    ) -> None:
        """Add a round's traffic (node → sent/received/messages) and the server's usage, in one transaction.

        Bytes accumulate, so traffic after a round (e.g. the fairness counts after the last one) can
        be added to it later; time and the server's usage are replaced when given.
        """
        sent = sum(t["sent"] for t in traffic.values())
        received = sum(t["received"] for t in traffic.values())
        with self._tx() as db:
            db.execute(
                "INSERT INTO round_costs(run_id, round, wall_seconds, aggregation_seconds, bytes_sent, bytes_received,"
                " server_json) VALUES (?,?,?,?,?,?,?) ON CONFLICT(run_id, round) DO UPDATE SET"
                " bytes_sent = bytes_sent + excluded.bytes_sent,"
                " bytes_received = bytes_received + excluded.bytes_received,"
                " wall_seconds = COALESCE(excluded.wall_seconds, wall_seconds),"
                " aggregation_seconds = COALESCE(excluded.aggregation_seconds, aggregation_seconds),"
                " server_json = COALESCE(excluded.server_json, server_json)",
                (
                    run_id,
                    round_,
                    wall_seconds,
                    aggregation_seconds,
                    sent,
                    received,
                    json.dumps(server) if server is not None else None,
                ),
            )
            for node, t in traffic.items():
                db.execute(
                    "INSERT INTO node_traffic VALUES (?,?,?,?,?,?,?) ON CONFLICT(run_id, round, node_id) DO UPDATE SET"
                    " bytes_sent = bytes_sent + excluded.bytes_sent,"
                    " bytes_received = bytes_received + excluded.bytes_received,"
                    " messages = messages + excluded.messages, role = COALESCE(excluded.role, role)",
                    (run_id, round_, str(node), roles.get(node), t["sent"], t["received"], t["messages"]),
                )

    # -- reads ----------------------------------------------------------------
    def run(self, run_id: int) -> dict[str, Any]:
        row = self._db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id}", where=str(self.path), fix="list runs with `fedguard runs`")
        out = dict(row)
        out["meta"] = json.loads(out.pop("meta_json") or "{}")
        return out

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute("SELECT * FROM runs ORDER BY run_id")]

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self._db.execute("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,))]
        for r in rows:
            r["meta"] = json.loads(r.pop("meta_json") or "{}")
        return rows

    def client_rounds(self, run_id: int) -> list[dict[str, Any]]:
        rows = [
            dict(r) for r in self._db.execute("SELECT * FROM client_rounds WHERE run_id=? ORDER BY round", (run_id,))
        ]
        for r in rows:
            r["node_id"] = int(r["node_id"])
            r["values"] = json.loads(r.pop("values_json") or "{}")
            r["received"] = json.loads(r.pop("received_json") or "[]")
        return sorted(rows, key=lambda r: (r["round"], r["node_id"]))

    def audits(self, run_id: int) -> list[dict[str, Any]]:
        """Rounds with a fairness audit: round, audit JSON, provenance, who evaluated."""
        rows = self._db.execute(
            "SELECT round, audit_json, provenance_json, evaluated_by FROM evaluations "
            "WHERE run_id=? AND audit_json IS NOT NULL ORDER BY round",
            (run_id,),
        )
        return [
            {
                "round": int(r["round"]),
                "audit_json": r["audit_json"],
                "provenance": json.loads(r["provenance_json"] or "{}"),
                "evaluated_by": r["evaluated_by"],
            }
            for r in rows
        ]

    def federated(self, run_id: int) -> dict[str, Any] | None:
        """The latest federated fairness view of a run (audit JSON, client spread), if any."""
        row = self._db.execute(
            "SELECT * FROM federated_audits WHERE run_id=? ORDER BY round DESC LIMIT 1", (run_id,)
        ).fetchone()
        if row is None:
            return None
        return {
            "round": int(row["round"]),
            "audit_json": row["audit_json"],
            "spread": json.loads(row["spread_json"] or "null"),
        }

    def count_releases(self, run_id: int) -> list[dict[str, Any]]:
        rows = [
            dict(r) for r in self._db.execute("SELECT * FROM count_releases WHERE run_id=? ORDER BY round", (run_id,))
        ]
        for r in rows:
            r["node_id"] = int(r["node_id"])
            r["values"] = json.loads(r.pop("values_json") or "{}")
            r["received"] = json.loads(r.pop("received_json") or "[]")
        return rows

    def evaluations(self, run_id: int) -> dict[int, dict[str, float]]:
        return {
            int(r["round"]): json.loads(r["metrics_json"])
            for r in self._db.execute("SELECT * FROM evaluations WHERE run_id=? ORDER BY round", (run_id,))
        }

    def round_costs(self, run_id: int) -> list[dict[str, Any]]:
        """The server's own figures per round (round 0: setup), oldest first."""
        rows = [dict(r) for r in self._db.execute("SELECT * FROM round_costs WHERE run_id=? ORDER BY round", (run_id,))]
        for r in rows:
            r["server"] = json.loads(r.pop("server_json") or "{}")
        return rows

    def node_names(self, run_id: int) -> dict[int, str]:
        """Node id → the name the operator knows it by (nodes whose name was never learnt are absent)."""
        rows = self._db.execute("SELECT node_id, name FROM node_names WHERE run_id=?", (run_id,))
        return {int(r["node_id"]): str(r["name"]) for r in rows}

    def alarms(self, run_id: int) -> list[dict[str, Any]]:
        """A run's alarms (e.g. strangers: registered keys the kit does not enroll), oldest first."""
        rows = [dict(r) for r in self._db.execute("SELECT * FROM alarms WHERE run_id=? ORDER BY created_at", (run_id,))]
        for r in rows:
            r["node_id"] = None if r["node_id"] is None else int(r["node_id"])
        return rows

    def run_by_flower_id(self, flower_run_id: int) -> dict[str, Any] | None:
        """The latest FedGuard run recorded for a Flower run id, or None."""
        row = self._db.execute(
            "SELECT run_id FROM runs WHERE flower_run_id=? ORDER BY run_id DESC LIMIT 1", (str(flower_run_id),)
        ).fetchone()
        return None if row is None else self.run(int(row["run_id"]))

    def node_traffic(self, run_id: int) -> list[dict[str, Any]]:
        """Bytes the server sent to and received from each node, per round."""
        rows = [dict(r) for r in self._db.execute("SELECT * FROM node_traffic WHERE run_id=?", (run_id,))]
        for r in rows:
            r["node_id"] = int(r["node_id"])
        return sorted(rows, key=lambda r: (r["round"], r["node_id"]))
