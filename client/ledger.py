"""The node's privacy-budget ledger: the source of truth for what each dataset has spent.

One SQLite file per host (WAL, ``synchronous=FULL``). Every DP release is written *before*
its result leaves the node, in the same ``BEGIN IMMEDIATE`` transaction as the budget check,
so two processes can never both spend the last of a budget and a crash can only over-count:
a reserved release is ``pending`` until training ends, counts as spent either way and never
shrinks. ε is always recomputed from a dataset's whole history (all rounds, all runs) with
Opacus's accountant, at the budget's δ less the δ some releases add outside the accountant (a
count release's group selection, ``extra_delta``): what a dataset has spent is (ε, budget δ), every
release included.

A dataset is keyed by the id its owner declares, not by a content hash, so appending rows
does not reset its budget. A marker file in the node's work directory remembers how many
releases each dataset had; a ledger holding fewer (deleted, or restored from an old backup)
is refused until the owner restores a backup that has them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import BudgetExceeded, FedGuardError
from common.ledger_export import (
    ExportedDataset,
    ExportedRelease,
    LedgerExport,
    public_openssh,
    sign_export,
    ssh_fingerprint,
)
from common.privacy import History, epsilon_spent, epsilon_within

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id       TEXT NOT NULL,
    run_id           TEXT NOT NULL,     -- Flower run id (and FedGuard run id) that asked
    round            INTEGER NOT NULL,
    message_id       TEXT NOT NULL UNIQUE,  -- a retry or resume is a new message: a new release
    mechanism        TEXT NOT NULL,     -- dp-sgd
    noise_multiplier REAL NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    delta            REAL NOT NULL,
    max_grad_norm    REAL NOT NULL,
    accountant       TEXT NOT NULL,
    extra_delta      REAL NOT NULL DEFAULT 0,  -- δ outside the accountant: a count release's group selection
    status           TEXT NOT NULL,     -- pending | confirmed (both count as spent)
    created_at       REAL NOT NULL,
    confirmed_at     REAL
);
CREATE INDEX IF NOT EXISTS releases_by_dataset ON releases(dataset_id, seq);
CREATE TABLE IF NOT EXISTS budgets (
    dataset_id TEXT PRIMARY KEY,
    epsilon    REAL NOT NULL,
    delta      REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS releases_never_shrink BEFORE DELETE ON releases
BEGIN SELECT RAISE(ABORT, 'ledger releases are append-only'); END;
"""


class LedgerError(FedGuardError):
    """The ledger cannot be used as it is (missing history, unreadable file)."""

    code = "ledger-invalid"


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Release:
    dataset_id: str
    run_id: str
    round: int
    message_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str
    mechanism: str = "dp-sgd"
    extra_delta: float = 0.0  # δ this release adds outside the accountant (a count release's group selection)


@dataclass(frozen=True)
class RunSpend:
    """One run's releases of a dataset and its ε, exactly as the node reported it to that run's server: the
    run's history at the δ and accountant of its latest release (so `fedguard runs` and the privacy report
    show the same number)."""

    run_id: str  # the run key (`fedguard runs` prints it as the nodes' ledger key)
    releases: int
    epsilon: float
    delta: float
    extra_delta: float = 0.0  # the run's count releases' selection δ: its δ total is delta + extra_delta


@dataclass(frozen=True)
class DatasetSummary:
    dataset_id: str
    releases: int
    pending: int
    budget: Budget | None
    epsilon: float  # at the budget's δ (or the last release's δ without a budget), extra_delta included
    delta: float
    accountant: str
    extra_delta: float = 0.0  # the part of ``delta`` spent outside the accountant (count releases' selection)
    runs: tuple[RunSpend, ...] = ()

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else max(0.0, self.budget.epsilon - self.epsilon)


def _history(rows: list[sqlite3.Row]) -> History:
    return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rows]


def _extra_delta(rows: list[sqlite3.Row] | list[dict[str, Any]]) -> float:
    return sum(float(r["extra_delta"]) for r in rows)


#: What a ledger written before ``extra_delta`` existed is migrated with: each count release's selection δ
#: at the largest value any FedGuard release used (the default); over-counting is the safe side.
_LEGACY_SELECTION_DELTA = 1e-7


def _marker_name(dataset_id: str) -> str:
    return hashlib.sha256(dataset_id.encode()).hexdigest()[:32] + ".json"


def marked_ledgers(marker_dir: Path) -> dict[Path, set[str]]:
    """The ledgers a node's markers guard, each with the datasets counted there (a marker records both):
    how a node whose ``ledger-path`` lies elsewhere (a host's shared ledger) finds it. Unreadable markers
    are skipped here; ``check_continuity`` refuses them when the node next spends."""
    named: dict[Path, set[str]] = {}
    for marker in sorted(marker_dir.glob("*.json")) if marker_dir.is_dir() else []:
        try:
            body = json.loads(marker.read_text(encoding="utf-8"))
            named.setdefault(Path(body["ledger"]), set()).add(str(body["dataset_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return named


class Ledger:
    """Open (or create) the ledger at ``path``; ``marker_dir`` keeps the per-dataset high-water marks."""

    def __init__(self, path: str | Path, marker_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.marker_dir = Path(marker_dir) if marker_dir is not None else self.path.parent / "ledger-markers"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
            with self._immediate() as db:
                if db.execute("SELECT value FROM meta WHERE key='ledger-id'").fetchone() is None:
                    db.execute("INSERT INTO meta VALUES ('ledger-id', ?)", (uuid.uuid4().hex,))
                    db.execute("INSERT INTO meta VALUES ('created-at', ?)", (repr(time.time()),))
        except sqlite3.DatabaseError as exc:
            raise LedgerError(
                f"cannot open the privacy ledger: {exc}",
                where=str(self.path),
                fix="restore it from a backup with `fedguard client ledger restore`",
            ) from None

    def _migrate(self) -> None:
        """Add ``extra_delta`` to a ledger written before it existed, counting its count releases' selection δ."""

        def migrated() -> bool:
            return "extra_delta" in {r["name"] for r in self._db.execute("PRAGMA table_info(releases)")}

        if migrated():
            return
        with self._immediate() as db:
            if migrated():  # another process sharing this ledger got there first
                return
            db.execute("ALTER TABLE releases ADD COLUMN extra_delta REAL NOT NULL DEFAULT 0")
            db.execute(
                "UPDATE releases SET extra_delta=? WHERE mechanism LIKE 'gaussian-%'", (_LEGACY_SELECTION_DELTA,)
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that holds the write lock from its first statement."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def ledger_id(self) -> str:
        return str(self._db.execute("SELECT value FROM meta WHERE key='ledger-id'").fetchone()[0])

    # -- continuity -----------------------------------------------------------
    def _marker_path(self, dataset_id: str) -> Path:
        return self.marker_dir / _marker_name(dataset_id)

    def _write_marker(self, dataset_id: str, releases: int) -> None:
        """Raise the high-water mark (atomically); it never goes down."""
        path = self._marker_path(dataset_id)
        if self._marker_count(dataset_id) >= releases:
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"dataset_id": dataset_id, "releases": releases, "ledger": str(self.path.resolve())})
        fd, tmp = tempfile.mkstemp(dir=self.marker_dir, prefix=".marker-")
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _marker_count(self, dataset_id: str) -> int:
        try:
            return int(json.loads(self._marker_path(dataset_id).read_text())["releases"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, OSError) as exc:
            raise LedgerError(
                f"unreadable ledger marker for dataset {dataset_id!r} ({exc}); refusing to guess its history",
                where=str(self._marker_path(dataset_id)),
                fix="restore the ledger and its marker directory from a backup",
            ) from None

    def check_continuity(self, dataset_id: str) -> None:
        """Refuse a ledger that lacks releases this node already made for ``dataset_id``."""
        known = self._marker_count(dataset_id)
        have = self._count(dataset_id)
        if have < known:
            raise LedgerError(
                f"the privacy ledger holds {have} release(s) for dataset {dataset_id!r} but this node has made "
                f"{known}: the ledger was deleted or restored from an older copy, so its budget would be under-counted",
                where=str(self.path),
                fix="restore the latest backup with `fedguard client ledger restore --workdir DIR --file BACKUP`",
            )

    def _count(self, dataset_id: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM releases WHERE dataset_id=?", (dataset_id,)).fetchone()[0])

    # -- spending -------------------------------------------------------------
    def set_budget(self, dataset_id: str, budget: Budget) -> None:
        with self._immediate() as db:
            db.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?,?,?,?)",
                (dataset_id, budget.epsilon, budget.delta, time.time()),
            )

    def releases(self, dataset_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM releases" + (" WHERE dataset_id=?" if dataset_id is not None else "") + " ORDER BY seq"
        return [dict(r) for r in self._db.execute(sql, () if dataset_id is None else (dataset_id,))]

    def history(self, dataset_id: str, run_id: str | None = None) -> History:
        sql, args = "SELECT * FROM releases WHERE dataset_id=?", [dataset_id]
        if run_id is not None:
            sql, args = sql + " AND run_id=?", [*args, run_id]
        return _history(self._db.execute(sql + " ORDER BY seq", args).fetchall())

    def would_spend(
        self, dataset_id: str, extra: History, delta: float, accountant: str, extra_delta: float = 0.0
    ) -> float:
        """ε of the dataset's whole history plus ``extra`` releases, which add ``extra_delta`` outside the
        accountant, within a total δ of ``delta`` (planning; writes nothing)."""
        spent = _extra_delta(self.releases(dataset_id))
        return epsilon_within(self.history(dataset_id) + extra, delta, spent + extra_delta, accountant)

    def reserve(self, release: Release, budget: Budget) -> float:
        """Check the budget and record ``release`` as pending, atomically; return the new total ε.

        Raises BudgetExceeded (and records nothing) if the release would pass the budget.
        """
        self.check_continuity(release.dataset_id)
        new = (release.noise_multiplier, release.sample_rate, release.steps)
        with self._immediate() as db:
            sql = "SELECT * FROM releases WHERE dataset_id=? ORDER BY seq"
            rows = db.execute(sql, (release.dataset_id,)).fetchall()
            if any(r["message_id"] == release.message_id for r in rows):
                raise LedgerError(
                    f"message {release.message_id} already has a release on this node; a replay is not trained again",
                    where=str(self.path),
                )
            extra = _extra_delta(rows)
            before = epsilon_within(_history(rows), budget.delta, extra, release.accountant)
            after = epsilon_within(
                _history(rows) + [new], budget.delta, extra + release.extra_delta, release.accountant
            )
            if after > budget.epsilon:
                outside = extra + release.extra_delta
                share = f", {outside:g} of it spent by group selection" if outside else ""
                what = "round" if release.mechanism == "dp-sgd" else "release"
                raise BudgetExceeded(
                    f"dataset {release.dataset_id!r} has spent ε={before:.3f} of its ε={budget.epsilon:g} budget "
                    f"(δ={budget.delta:g}{share}); this {what} would bring it to ε={after:.3f}",
                    where=str(self.path),
                    fix="the owner may raise the budget (--budget-epsilon, --budget-delta) or the run may add noise",
                )
            db.execute(
                "INSERT INTO releases(dataset_id, run_id, round, message_id, mechanism, noise_multiplier, "
                "sample_rate, steps, delta, max_grad_norm, accountant, extra_delta, status, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',?)",
                (
                    release.dataset_id,
                    release.run_id,
                    release.round,
                    release.message_id,
                    release.mechanism,
                    release.noise_multiplier,
                    release.sample_rate,
                    release.steps,
                    release.delta,
                    release.max_grad_norm,
                    release.accountant,
                    release.extra_delta,
                    time.time(),
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?,?,?,?)",
                (release.dataset_id, budget.epsilon, budget.delta, time.time()),
            )
            count = len(rows) + 1
        self._write_marker(release.dataset_id, count)
        return after

    def confirm(self, message_id: str) -> None:
        """Mark a release as sent-ready after training; it was counted from the moment it was reserved."""
        with self._immediate() as db:
            db.execute(
                "UPDATE releases SET status='confirmed', confirmed_at=? WHERE message_id=? AND status='pending'",
                (time.time(), message_id),
            )

    # -- reading --------------------------------------------------------------
    def budget(self, dataset_id: str) -> Budget | None:
        row = self._db.execute("SELECT * FROM budgets WHERE dataset_id=?", (dataset_id,)).fetchone()
        return None if row is None else Budget(float(row["epsilon"]), float(row["delta"]))

    def summaries(self) -> list[DatasetSummary]:
        ids = [r[0] for r in self._db.execute("SELECT DISTINCT dataset_id FROM releases ORDER BY dataset_id")]
        ids += [r[0] for r in self._db.execute("SELECT dataset_id FROM budgets ORDER BY dataset_id") if r[0] not in ids]
        out = []
        for dataset_id in ids:
            rows = self.releases(dataset_id)
            budget = self.budget(dataset_id)
            accountant = rows[-1]["accountant"] if rows else "rdp"
            delta = budget.delta if budget else (rows[-1]["delta"] if rows else 0.0)
            out.append(
                DatasetSummary(
                    dataset_id=dataset_id,
                    releases=len(rows),
                    pending=sum(r["status"] == "pending" for r in rows),
                    budget=budget,
                    epsilon=epsilon_within(_history(rows), delta, _extra_delta(rows), accountant) if rows else 0.0,
                    delta=delta,
                    accountant=accountant,
                    extra_delta=_extra_delta(rows),
                    runs=self._run_spends(dataset_id, rows),
                )
            )
        return out

    def _run_spends(self, dataset_id: str, rows: list[dict[str, Any]]) -> tuple[RunSpend, ...]:
        by_run: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_run.setdefault(str(r["run_id"]), []).append(r)
        return tuple(
            RunSpend(
                run_id=run,
                releases=len(mine),
                epsilon=epsilon_spent(_history(mine), float(mine[-1]["delta"]), mine[-1]["accountant"]),
                delta=float(mine[-1]["delta"]),
                extra_delta=_extra_delta(mine),
            )
            for run, mine in by_run.items()
        )

    def export(self, private_key_openssh: bytes, only: set[str] | None = None) -> dict[str, object]:
        """Every dataset's releases (or those in ``only``: a node's own in a ledger its host shares), signed with
        the node's key, for a reviewer to recompute ε."""
        datasets = []
        for s in self.summaries():
            if only is not None and s.dataset_id not in only:
                continue
            datasets.append(
                ExportedDataset(
                    dataset_id=s.dataset_id,
                    budget_epsilon=s.budget.epsilon if s.budget else None,
                    budget_delta=s.budget.delta if s.budget else None,
                    epsilon=s.epsilon,
                    delta=s.delta,
                    extra_delta=s.extra_delta,
                    accountant=s.accountant,
                    releases=[
                        ExportedRelease.model_validate({k: r[k] for k in ExportedRelease.model_fields})
                        for r in self.releases(s.dataset_id)
                    ],
                )
            )
        pub = public_openssh(private_key_openssh)
        body = LedgerExport(
            ledger_id=self.ledger_id,
            created_at=time.time(),
            public_key=pub,
            public_key_fingerprint=ssh_fingerprint(pub),
            datasets=datasets,
        )
        return sign_export(body, private_key_openssh)

    # -- backup ---------------------------------------------------------------
    def backup(self, dest: str | Path) -> Path:
        """A consistent copy (SQLite online backup) written atomically; markers are not needed to restore."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        out = sqlite3.connect(tmp)
        try:
            self._db.backup(out)
        finally:
            out.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return dest


def restore(ledger_path: str | Path, backup: str | Path, marker_dir: str | Path | None = None) -> list[DatasetSummary]:
    """Install ``backup`` as the ledger if it holds at least every release the node knows of.

    A backup older than the node's high-water marks would under-count: it is refused. The
    current ledger, if any, is kept as ``<name>.replaced-<time>`` rather than deleted.
    """
    ledger_path, backup = Path(ledger_path), Path(backup)
    if not backup.is_file():
        raise LedgerError("backup file not found", where=str(backup), fix="pass the file `ledger backup` wrote")
    with Ledger(backup, marker_dir if marker_dir is not None else ledger_path.parent / "ledger-markers") as candidate:
        try:
            for dataset_id in {r["dataset_id"] for r in candidate.releases()}:
                candidate.check_continuity(dataset_id)
            markers = list(candidate.marker_dir.glob("*.json")) if candidate.marker_dir.is_dir() else []
            for m in markers:
                info = json.loads(m.read_text())
                candidate.check_continuity(str(info["dataset_id"]))
        except LedgerError as exc:
            raise LedgerError(
                "the backup is older than this node's ledger history: " + exc.what,
                where=str(backup),
                fix="restore a newer backup; an older one would under-count the budget",
            ) from None
        summaries = candidate.summaries()
    if ledger_path.exists():
        ledger_path.rename(ledger_path.with_name(f"{ledger_path.name}.replaced-{int(time.time())}"))
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger_path}{suffix}").unlink(missing_ok=True)
    tmp = ledger_path.with_name(f".{ledger_path.name}.restore")
    tmp.write_bytes(backup.read_bytes())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, ledger_path)
    return summaries


def summary_dict(s: DatasetSummary) -> dict[str, Any]:
    d = asdict(s)
    d["remaining"] = s.remaining
    return d
