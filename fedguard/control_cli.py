"""``fedguard user ...`` and ``fedguard audit ...`` (the server host's admin, at the server's shell).

Thin handlers over :mod:`server.control`. Creating and revoking users from the shell is itself audited (actor = the
OS user, role ``cli``), so the log shows every token ever issued, whichever door it came through. Errors are
FedGuardErrors; the CLI main prints them without a trace.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path

from common.errors import FedGuardError
from server.control.audit import AuditLog
from server.control.users import ROLES, User, UserStore, require_workdir

CLI_ROLE = "cli"


def _actor() -> str:
    """Who runs this command: the OS login name (containers without a passwd entry get ``uid:N``)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _workdir(args: argparse.Namespace) -> Path:
    return require_workdir(Path(args.server_workdir))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _user_dict(u: User) -> dict[str, object]:
    return {
        "id": u.id,
        "name": u.name,
        "role": u.role,
        "created_at": u.created_at,
        "revoked_at": u.revoked_at,
        "active": u.revoked_at is None,
    }


def _record(workdir: Path, action: str, target: str, outcome: str) -> None:
    """Audit a shell action the way the service audits its own: target ``name (role)``, outcome ``ok``/``rejected``."""
    AuditLog(workdir).append(actor=_actor(), role=CLI_ROLE, action=action, target=target, outcome=outcome)


def cmd_user_add(args: argparse.Namespace) -> int:
    workdir = _workdir(args)
    AuditLog(workdir).check_appendable()  # a wiped or truncated log: refuse before acting, not after
    try:
        user, token = UserStore(workdir).add(args.name, args.role)
    except FedGuardError as exc:
        _record(workdir, "user.add", f"{args.name[:64]} ({args.role})", f"rejected: {exc.what}")
        raise
    _record(workdir, "user.add", f"{user.name} ({user.role})", "ok")
    if args.json:
        print(json.dumps({**_user_dict(user), "token": token}))
        return 0
    print(f"user {user.name} added (role {user.role}, id {user.id})")
    print("\ntoken — shown ONCE, it is not stored anywhere and cannot be shown again; give it to the user now:")
    print(f"\n    {token}\n")
    print("lost tokens cannot be recovered: `fedguard user revoke` the user and add them again.")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    users = UserStore(_workdir(args)).list()
    if args.json:
        print(json.dumps([_user_dict(u) for u in users]))
        return 0
    if not users:
        print("no users yet: add one with `fedguard user add NAME --role ROLE --server-workdir DIR`")
        return 0
    print(f"{'name':24s} {'role':9s} {'id':12s} {'created':19s}  status")
    for u in users:
        status = "active" if u.revoked_at is None else f"revoked {_when(u.revoked_at)}"
        print(f"{u.name:24s} {u.role:9s} {u.id:12s} {_when(u.created_at):19s}  {status}")
    return 0


def cmd_user_revoke(args: argparse.Namespace) -> int:
    workdir = _workdir(args)
    AuditLog(workdir).check_appendable()
    try:
        user = UserStore(workdir).revoke(args.name)
    except FedGuardError as exc:
        _record(workdir, "user.revoke", args.name[:64], f"rejected: {exc.what}")
        raise
    _record(workdir, "user.revoke", f"{user.name} ({user.role})", "ok")
    if args.json:
        print(json.dumps(_user_dict(user)))
    else:
        print(f"user {user.name} ({user.role}, id {user.id}) revoked: their token no longer works")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    check = AuditLog(_workdir(args)).verify(expect_head=args.expect_head)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": check.ok,
                    "entries": check.entries,
                    "head": check.head,
                    "problem": check.problem,
                    "bad_seq": check.bad_seq,
                    "legacy": check.legacy,
                }
            )
        )
    elif check.ok:
        against = " and contains the expected head" if args.expect_head else ""
        print(f"audit log intact: {check.entries} entries, chain verified with the key{against}")
        print(f"head {check.head}")
        if check.legacy:
            print(
                "note: this log predates the genesis record and the MACed head anchor; the next audited action "
                "upgrades it. Keep the head above off this host and pass it back with --expect-head."
            )
    else:
        print(f"fedguard: AUDIT LOG TAMPERED: {check.problem}", file=sys.stderr)
        note = f"({check.entries} entries present; treat everything from the named entry on as untrusted)"
        print(note, file=sys.stderr)
    return 0 if check.ok else 1


def cmd_audit_show(args: argparse.Namespace) -> int:
    entries = AuditLog(_workdir(args)).entries(limit=args.last)
    if args.json:
        print(json.dumps([e.__dict__ for e in entries]))
        return 0
    for e in reversed(entries):
        print(f"{e.seq:6d}  {_when(e.at)}  {e.actor} ({e.role})  {e.action} {e.target}: {e.outcome}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``user add|list|revoke`` and ``audit verify|show`` to the CLI."""

    def workdir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server-workdir", required=True, help="the server's --workdir (holds control.db)")
        p.add_argument("--json", action="store_true")

    u = sub.add_parser("user", help="people who may use the control service (admin, at the server host)")
    usub = u.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add a user and print their token once")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=ROLES, help="reviewer < operator < admin")
    workdir_arg(ua)
    ua.set_defaults(func=cmd_user_add)
    ul = usub.add_parser("list", help="list users and their roles (never their tokens)")
    workdir_arg(ul)
    ul.set_defaults(func=cmd_user_list)
    ur = usub.add_parser("revoke", help="revoke a user's token, effective immediately")
    ur.add_argument("name")
    workdir_arg(ur)
    ur.set_defaults(func=cmd_user_revoke)

    a = sub.add_parser("audit", help="the control service's tamper-evident audit log")
    asub = a.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check the HMAC chain; exit 1 if history was modified, deleted or truncated")
    av.add_argument(
        "--expect-head",
        metavar="HEAD",
        help="a chain head kept off this host (from an exported report, or a previous verify's `head`): it must "
        "still be in the log; catches a rollback of control.db and secrets/ together, or a history forged by "
        "whoever holds the audit key",
    )
    workdir_arg(av)
    av.set_defaults(func=cmd_audit_verify)
    ash = asub.add_parser("show", help="the latest audit entries, oldest first")
    ash.add_argument("--last", type=int, default=50, help="how many entries")
    workdir_arg(ash)
    ash.set_defaults(func=cmd_audit_show)
