"""The control service's service layer: every action the API and the dashboard offer, implemented once.

``ControlService`` holds what every request needs (run store, users, audit log, sessions, the
federation door) and implements each action once, so the API and the dashboard behave and audit
identically. Every state-changing action and every report download, allowed or denied, is
appended to the HMAC-chained audit log, and every exported report embeds the chain head after its
own download entry, so ``fedguard audit verify --expect-head`` can later prove that history up to
the export is intact.

A run token (the admin's signed approval from ``fedguard run sign``) starts one run: its request id
is recorded in ``control.db`` (``used_run_tokens``) before the run is submitted, and a second start
with the same token is refused (nodes refuse a replay too, but the service must not even submit it).

Nothing here knows about HTTP: failures are the domain errors of ``server.control.errors``,
which ``server.control.app`` maps to responses in one handler.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import tomllib
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from common.errors import FedGuardError, StoreError
from server.control import pages
from server.control.audit import AuditEntry, AuditLog
from server.control.auth import Principal, RateLimiter, Sessions, has_role, role_denied
from server.control.errors import (
    Conflict,
    ControlError,
    FederationFailed,
    Invalid,
    NotFound,
    ReportFailed,
    Unavailable,
)
from server.control.federation import Federation
from server.control.users import User, UserStore, connect
from server.store import RunStore


def _as(cls: type[ControlError], exc: FedGuardError) -> ControlError:
    """``exc``'s message as a ``cls`` (the same what, where and fix; another HTTP status)."""
    return cls(exc.what, where=exc.where, fix=exc.fix)


_TOO_DEEP = (
    "config_toml is nested too deeply to read (a run config has a few levels of tables, not thousands)",
    "see 'Run configuration' in docs/configuration.md",
)


class RunTokens:
    """Run tokens that already started a run, by request id, in ``control.db``: each token starts one run."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS used_run_tokens (
        request_id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL,
        used_at REAL NOT NULL,
        used_by TEXT NOT NULL,
        flower_run_id TEXT
    );
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with connect(workdir) as conn:
            conn.executescript(self._SCHEMA)

    def claim(self, request_id: str, token: str, by: str) -> None:
        """Reserve ``request_id`` for one run; Conflict if a run was already started (or is starting) with it."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        with connect(self.workdir) as conn:
            try:
                conn.execute(
                    "INSERT INTO used_run_tokens (request_id, token_sha256, used_at, used_by) VALUES (?,?,?,?)",
                    (request_id, digest, time.time(), by),
                )
            except sqlite3.IntegrityError:
                row = conn.execute(
                    "SELECT flower_run_id, used_by FROM used_run_tokens WHERE request_id = ?", (request_id,)
                ).fetchone()
                run = f"Flower run {row[0]}" if row and row[0] else "another run"
                raise Conflict(
                    f"this run token was already used to start {run} (by {row[1] if row else 'someone'}): "
                    "a signed run token starts one run",
                    fix="sign the config again with `fedguard run sign --config FILE` for a new run",
                ) from None

    def used(self, request_id: str, flower_run_id: int | str) -> None:
        with connect(self.workdir) as conn:
            conn.execute(
                "UPDATE used_run_tokens SET flower_run_id = ? WHERE request_id = ?", (str(flower_run_id), request_id)
            )

    def release(self, request_id: str) -> None:
        """Free a claim whose run was never submitted (the SuperLink refused it): the admin may retry."""
        with connect(self.workdir) as conn:
            conn.execute("DELETE FROM used_run_tokens WHERE request_id = ?", (request_id,))


class ControlService:
    """State shared by all requests, and every action the API and dashboard offer."""

    def __init__(
        self,
        workdir: Path,
        store_path: Path | None = None,
        federation: Federation | None = None,
        signing_key: ed25519.Ed25519PrivateKey | None = None,
        *,
        login_limit: RateLimiter | None = None,
        bearer_limit: RateLimiter | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_path = Path(store_path or self.workdir / "runs.db").resolve()
        RunStore(self.store_path).close()  # create it (and fail clearly) before the first request
        self.federation = federation
        self.signing_key = signing_key
        self.users = UserStore(self.workdir)
        self.audit = AuditLog(self.workdir)
        self.audit.create()  # the genesis record exists from the service's first start: an empty log is a wiped one
        self.run_tokens = RunTokens(self.workdir)
        self.sessions = Sessions()
        self.login_limit = login_limit or RateLimiter(5, 300.0)
        self.bearer_limit = bearer_limit or RateLimiter(30, 300.0)

    # -- audit ---------------------------------------------------------------------------------------------------
    def record(self, who: Principal | User | None, action: str, target: str, outcome: str) -> AuditEntry:
        user = who.user if isinstance(who, Principal) else who
        return self.audit.append(
            actor=user.name if user else "anonymous",
            role=user.role if user else "-",
            action=action,
            target=target[:300],
            outcome=outcome[:500],
        )

    def authorize(self, p: Principal, needed: str, action: str | None = None, target: str = "") -> Principal:
        """``p`` if its role is ``needed`` or above; else Forbidden, audited when ``action`` names one.

        An allowed audited action first checks that the audit log can take its entry (AuditTampered, 503, if it
        was wiped or truncated): nothing is done that cannot be audited.
        """
        if not has_role(p, needed):
            if action:
                self.record(p, action, target, f"denied: needs {needed}")
            raise role_denied(p, needed)
        if action:
            self.audit.check_appendable()
        return p

    def _fed(self) -> Federation:
        if self.federation is None:
            raise Unavailable(
                "this control service has no SuperLink attached (it only serves the run store)",
                fix="start it with `fedguard server start` to manage nodes and runs",
            )
        return self.federation

    # -- reports -------------------------------------------------------------------------------------------------
    def report(self, p: Principal, kind: str, run_id: int, fmt: str) -> tuple[str, str]:
        """A run's privacy, fairness or cost report (``json`` or ``html``), audited, with the chain head embedded."""
        target = f"run {run_id} ({fmt})"
        try:
            if kind == "privacy":
                from server import privacy_report

                text = privacy_report.render(privacy_report.build_privacy_report(self.store_path, run_id), fmt)
            elif kind == "cost":
                from server import cost_report

                text = cost_report.render(cost_report.build_cost_report(self.store_path, run_id), fmt)
            else:
                from server import fairness_report

                text = fairness_report.render(fairness_report.fairness_report_from_store(self.store_path, run_id), fmt)
        except FedGuardError as exc:  # no such run, or a run whose records cannot make this report
            self.record(p, f"report.{kind}", target, f"failed: {exc.what}")
            raise (exc if isinstance(exc, StoreError) else _as(ReportFailed, exc)) from None
        entry = self.record(p, f"report.{kind}", target, "ok")
        verify = f"fedguard audit verify --server-workdir DIR --expect-head {entry.mac}"
        stamp: dict[str, object] = {"head": entry.mac, "seq": entry.seq, "verify": verify}
        if fmt == "json":
            doc = json.loads(text)
            doc["audit_chain"] = stamp
            return json.dumps(doc, indent=2) + "\n", "application/json"
        footer = pages.render("report_footer", head=entry.mac, seq=entry.seq, verify=verify)
        return (text.replace("</body>", footer + "</body>", 1) if "</body>" in text else text + footer), "text/html"

    # -- runs ----------------------------------------------------------------------------------------------------
    def _load_config(self, config_toml: str) -> tuple[Any, Path]:
        """Validate TOML text as a run config; write it where the ServerApp reads it (the server host)."""
        from common.config import load_config

        try:
            tomllib.loads(config_toml)
        except tomllib.TOMLDecodeError as exc:
            raise Invalid(f"config_toml is not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise Invalid(_TOO_DEEP[0], fix=_TOO_DEEP[1]) from None
        folder = self.workdir / "control-runs"
        folder.mkdir(exist_ok=True)
        path = folder / f"run-{uuid.uuid4().hex[:12]}.toml"
        path.write_text(config_toml, encoding="utf-8")
        try:
            return load_config(path, schema_files=False), path
        except FedGuardError as exc:
            path.unlink(missing_ok=True)
            raise Invalid(exc.render().replace(str(path), "config_toml")) from None
        except RecursionError:  # a deep structure that got past the parser (validation, hashing)
            path.unlink(missing_ok=True)
            raise Invalid(_TOO_DEEP[0], fix=_TOO_DEEP[1]) from None

    def plan_run(self, p: Principal, config_toml: str) -> dict[str, Any]:
        try:
            cfg, path = self._load_config(config_toml)
        except Invalid as exc:
            self.record(p, "run.plan", "(submitted config)", f"rejected: {exc.what[:200]}")
            raise
        path.unlink(missing_ok=True)
        self.record(p, "run.plan", f"config {cfg.digest()[:16]}", "ok")
        return {
            "name": cfg.name,
            "config_hash": cfg.digest(),
            "rounds": cfg.rounds,
            "clients_per_round": cfg.clients_per_round,
            "model": cfg.model.name,
            "dp_enabled": cfg.dp.enabled,
            "target_epsilon": cfg.dp.target_epsilon if cfg.dp.enabled else None,
            "delta": cfg.dp.delta if cfg.dp.enabled else None,
            "accountant": cfg.dp.accountant,
            "secure_aggregation": cfg.secure_aggregation,
            "signing": "the service signs (run-signing key loaded)"
            if self.signing_key
            else "needs a signature from `fedguard run sign`",
            "note": "each node calibrates its own noise from its own size and ledger when the run starts; "
            "a node whose remaining budget cannot cover the run refuses its rounds",
        }

    def start_run(self, p: Principal, config_toml: str, signature: str | None) -> dict[str, Any]:
        """Validate, sign (or check the admin's signature), submit; audit which signature was used."""
        from common.run_signing import fedguard_version, load_verify_key, sign_run, verify_run

        fed = self._fed()
        try:
            cfg, path = self._load_config(config_toml)
        except Invalid as exc:
            self.record(p, "run.start", "(submitted config)", f"rejected: {exc.what[:200]}")
            raise
        target = f"config {cfg.digest()[:16]} ({cfg.name})"
        signature = (signature or "").strip()
        if not signature and cfg.data.evaluation_path is not None:
            path.unlink(missing_ok=True)
            self.record(p, "run.start", target, "rejected: names a server-side held-out file, unsigned")
            raise Invalid(
                "data.evaluation_path names a file on the server host, which the ServerApp would read; the "
                "control service signs only runs that read no server file",
                fix="score on the evaluator node (leave data.evaluation_path out), or have an admin sign this "
                "config with `fedguard run sign` and pass the token",
            )
        if not signature and self.signing_key is None:
            path.unlink(missing_ok=True)
            self.record(p, "run.start", target, "rejected: unsigned")
            raise Invalid(
                "the run is not signed: paste a token from `fedguard run sign --config FILE` (use absolute "
                "data paths: the signature covers them), or start the server with --run-signing-key"
            )
        try:
            if signature:
                request = verify_run(
                    signature, cfg.to_json(), load_verify_key(fed.verify_key_path), version=fedguard_version()
                )
                token, signed_by = signature, "admin signature (fedguard run sign)"
            else:
                assert self.signing_key is not None
                token, signed_by = sign_run(cfg.to_json(), self.signing_key), "signed by the control service"
                request = None  # a fresh token (new request id) for every start: nothing to replay
        except FedGuardError as exc:
            path.unlink(missing_ok=True)
            self.record(p, "run.start", target, f"rejected: {exc.what}")
            raise Invalid(
                exc.render() + "\n(the signature must be made over this exact config, e.g. absolute data paths)"
            ) from None
        request_id = request.request_id if request is not None else None
        if request_id is not None:
            try:
                self.run_tokens.claim(request_id, token, p.user.name)
            except Conflict:
                path.unlink(missing_ok=True)
                self.record(p, "run.start", target, f"rejected: replayed run token {request_id[:12]}")
                raise
        try:
            flower_run = fed.start_run(path, token)
        except FedGuardError as exc:
            if request_id is not None:
                self.run_tokens.release(request_id)
            self.record(p, "run.start", target, f"failed ({signed_by}): {exc.what}")
            raise _as(FederationFailed, exc) from None
        if request_id is not None:
            self.run_tokens.used(request_id, flower_run)
        self.record(p, "run.start", f"flower run {flower_run}, {target}", f"ok ({signed_by})")
        return {"flower_run_id": flower_run, "config_hash": cfg.digest(), "name": cfg.name, "signed_by": signed_by}

    def stop_run(self, p: Principal, run_id: int) -> dict[str, Any]:
        fed = self._fed()
        try:
            with RunStore(self.store_path) as store:
                run = store.run(run_id)
        except StoreError:
            self.record(p, "run.stop", f"run {run_id}", "rejected: no such run")
            raise
        if run["status"] != "running" or not run["flower_run_id"]:
            self.record(p, "run.stop", f"run {run_id}", f"rejected: run is {run['status']}")
            raise Conflict(f"run {run_id} is {run['status']}, not a running deployed run")
        try:
            fed.stop_run(int(run["flower_run_id"]))
        except FedGuardError as exc:
            self.record(p, "run.stop", f"run {run_id}", f"failed: {exc.what}")
            raise _as(FederationFailed, exc) from None
        self.record(p, "run.stop", f"run {run_id} (flower run {run['flower_run_id']})", "ok")
        return {"run_id": run_id, "flower_run_id": run["flower_run_id"], "stopped": True}

    def alarms(self, run_id: int) -> list[dict[str, Any]]:
        """A run's alarms (keys the SuperLink registered that the kit does not enroll), oldest first."""
        with RunStore(self.store_path) as store:
            return store.alarms(run_id)

    # -- nodes and users -----------------------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        fed = self._fed()
        try:
            return [n.as_dict() for n in fed.nodes()]
        except FedGuardError as exc:
            raise _as(FederationFailed, exc) from None

    def revoke_node(self, p: Principal, name: str) -> dict[str, Any]:
        fed = self._fed()
        try:
            node = fed.revoke_node(name)
        except FedGuardError as exc:
            self.record(p, "node.revoke", name, f"failed: {exc.what}")
            raise (exc if isinstance(exc, NotFound) else _as(FederationFailed, exc)) from None
        self.record(p, "node.revoke", f"{name} ({node.fingerprint})", "ok")
        return node.as_dict()

    def add_user(self, p: Principal, name: str, role: str) -> tuple[User, str]:
        try:
            user, token = self.users.add(name, role)
        except ControlError as exc:  # Conflict (the name is taken) or Invalid (name, role)
            self.record(p, "user.add", f"{name[:64]} ({role[:16]})", f"rejected: {exc.what}")
            raise
        self.record(p, "user.add", f"{name} ({role})", "ok")
        return user, token

    def revoke_user(self, p: Principal, name: str) -> User:
        try:
            user = self.users.revoke(name)
        except ControlError as exc:  # NotFound: no such user, or already revoked
            self.record(p, "user.revoke", name[:64], f"rejected: {exc.what}")
            raise
        self.record(p, "user.revoke", f"{name} ({user.role})", "ok")
        return user


def user_dict(u: User) -> dict[str, Any]:
    return asdict(u)
