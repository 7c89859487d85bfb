"""The control service's service layer: every action the API and the dashboard offer, implemented once.

``ControlService`` holds what every request needs (run store, users, audit log, sessions, the
federation door) and implements each action once, so the API and the dashboard behave and audit
identically. Every state-changing action and every report download, allowed or denied, is
appended to the HMAC-chained audit log, and every exported report embeds the chain head after its
own download entry, so ``fedguard audit verify --expect-head`` can later prove that history up to
the export is intact.

Nothing here knows about HTTP: failures are the domain errors of ``server.control.errors``,
which ``server.control.app`` maps to responses in one handler.
"""

from __future__ import annotations

import json
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
from server.control.users import User, UserStore
from server.store import RunStore


def _as(cls: type[ControlError], exc: FedGuardError) -> ControlError:
    """``exc``'s message as a ``cls`` (the same what, where and fix; another HTTP status)."""
    return cls(exc.what, where=exc.where, fix=exc.fix)


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
        """``p`` if its role is ``needed`` or above; else Forbidden, audited when ``action`` names one."""
        if not has_role(p, needed):
            if action:
                self.record(p, action, target, f"denied: needs {needed}")
            raise role_denied(p, needed)
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
        folder = self.workdir / "control-runs"
        folder.mkdir(exist_ok=True)
        path = folder / f"run-{uuid.uuid4().hex[:12]}.toml"
        path.write_text(config_toml, encoding="utf-8")
        try:
            return load_config(path), path
        except FedGuardError as exc:
            path.unlink(missing_ok=True)
            raise Invalid(exc.render().replace(str(path), "config_toml")) from None

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
        if not signature and self.signing_key is None:
            path.unlink(missing_ok=True)
            self.record(p, "run.start", target, "rejected: unsigned")
            raise Invalid(
                "the run is not signed: paste a token from `fedguard run sign --config FILE` (use absolute "
                "data paths: the signature covers them), or start the server with --run-signing-key"
            )
        try:
            if signature:
                verify_run(signature, cfg.to_json(), load_verify_key(fed.verify_key_path), version=fedguard_version())
                token, signed_by = signature, "admin signature (fedguard run sign)"
            else:
                assert self.signing_key is not None
                token, signed_by = sign_run(cfg.to_json(), self.signing_key), "signed by the control service"
        except FedGuardError as exc:
            path.unlink(missing_ok=True)
            self.record(p, "run.start", target, f"rejected: {exc.what}")
            raise Invalid(
                exc.render() + "\n(the signature must be made over this exact config, e.g. absolute data paths)"
            ) from None
        try:
            flower_run = fed.start_run(path, token)
        except FedGuardError as exc:
            self.record(p, "run.start", target, f"failed ({signed_by}): {exc.what}")
            raise _as(FederationFailed, exc) from None
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
