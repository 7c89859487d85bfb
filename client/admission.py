"""Admission: who asked for this run, and does it fit the owner's policy? Checked before data is read.

In deployment every message must carry a run token signed by the federation's run-signing key
(pinned in the node's kit, ``common.run_signing``); a token's request id is accepted for one
Flower run only. The owner's ``policy.toml`` (``common.policy``) then decides whether the run
may train, evaluate or count groups here. Every decision, accepted or refused, is appended to
the node's request log (``workdir/requests.jsonl``) that ``fedguard client inspect`` shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Message

from client.node import NodeSettings, node_logger
from common import records as R
from common.config import RunConfig
from common.errors import FedGuardError
from common.policy import Purpose, check_run
from common.privacy import DPPlan
from common.run_signing import RunSignatureError, fedguard_version, load_verify_key, verify_run

REQUESTS = "requests.jsonl"


class PolicyViolation(FedGuardError):
    """The run breaks a rule of the owner's policy; ``rule`` names it (it leaves the node)."""

    code = "policy-violation"

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message, fix=f"the node's owner decides; see rule {rule!r} in the node's policy.toml")
        self.rule = rule


class RunReplayed(RunSignatureError):
    code = "run-signature-replayed"


def check_request(msg: Message, cfg: RunConfig, settings: NodeSettings) -> str | None:
    """The run token's request id after verifying it (None where no key is pinned: simulation)."""
    if settings.run_signing_pub is None:
        return None
    config = msg.content[R.CONFIG]
    token = str(config.get(R.RUN_SIGNATURE, ""))
    request = verify_run(
        token, str(config[R.RUN_CONFIG]), load_verify_key(settings.run_signing_pub), version=fedguard_version()
    )
    bound = _bound_run(settings.workdir, request.request_id)
    if bound is not None and bound != int(msg.metadata.run_id):
        raise RunReplayed(f"this signed request was already used by Flower run {bound}; each approval is for one run")
    return request.request_id


def check_policy(
    cfg: RunConfig,
    settings: NodeSettings,
    purpose: Purpose,
    *,
    plan: DPPlan | None = None,
    epsilon_run: float | None = None,
) -> None:
    if settings.policy is None:
        return
    violation = check_run(settings.policy, cfg, purpose=purpose, plan=plan, epsilon_run=epsilon_run)
    if violation is not None:
        raise PolicyViolation(violation.message, violation.rule)


def ledger_run_key(msg: Message) -> str:
    """The key this node's ledger files the run's releases under: the server's run uid (the run summary's
    "nodes' ledgers key this run as …"), else Flower's run id."""
    config = msg.content[R.CONFIG] if R.CONFIG in msg.content else {}
    return str(config.get(R.RUN_UID, f"flower-{msg.metadata.run_id}"))


def record(
    settings: NodeSettings, msg: Message, purpose: str, *, accepted: bool, code: str = "", reason: str = ""
) -> None:
    """Append one decision to the request log and the node log, with the run's ledger key so an owner can
    match a request to its releases in `fedguard client budget`."""
    config = msg.content[R.CONFIG] if R.CONFIG in msg.content else {}
    entry = {
        "time": time.time(),
        "flower_run": int(msg.metadata.run_id),
        "ledger_run": ledger_run_key(msg),
        "request_id": _request_id(str(config.get(R.RUN_SIGNATURE, ""))),
        "run_name": _run_name(str(config.get(R.RUN_CONFIG, ""))),
        "purpose": purpose,
        "round": config.get(R.ROUND),
        "accepted": accepted,
        "code": code,
        "reason": reason,
    }
    settings.workdir.mkdir(parents=True, exist_ok=True)
    with open(settings.workdir / REQUESTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    log = node_logger(settings.workdir)
    where = f"run {entry['flower_run']} ({entry['run_name']}, ledger key {entry['ledger_run']}) {purpose}" + (
        f" round {entry['round']}" if entry["round"] is not None else ""
    )
    if accepted:
        log.info("accepted %s", where)
    else:
        log.warning("refused %s: %s %s", where, code, reason)


def read_requests(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / REQUESTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log still counts
    return out


def _bound_run(workdir: Path, request_id: str) -> int | None:
    """The Flower run this request id was first accepted for, if any."""
    for entry in read_requests(workdir):
        if entry.get("accepted") and entry.get("request_id") == request_id:
            return int(entry["flower_run"])
    return None


def _request_id(token: str) -> str | None:
    import base64

    try:
        return str(json.loads(base64.urlsafe_b64decode(token.encode()))["request_id"]) if token else None
    except (ValueError, KeyError, TypeError):
        return None


def _run_name(config_json: str) -> str:
    try:
        return str(json.loads(config_json).get("name", "?"))
    except (ValueError, AttributeError):
        return "?"
