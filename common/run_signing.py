"""Signed run requests: a node trains only for runs the federation admin approved.

The admin signs the run's configuration and the FedGuard version with the federation's
run-signing key (Ed25519, made at provisioning; its public half is pinned in every kit). The
token travels with every message of the run; a node checks it against its pinned key before it
touches data. A process that reaches the SuperLink's control API by other means cannot produce
a token, and each token binds one request id that a node accepts for one Flower run only, so a
captured token cannot start a second run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.errors import FedGuardError
from common.kit.keys import load_run_signing_key, load_run_verify_key

_FORMAT = "fedguard-run-request/1"


class RunSignatureError(FedGuardError):
    """A run request is unsigned, signed by another key, or does not match its run."""

    code = "run-signature-invalid"


class RunUnsigned(RunSignatureError):
    code = "run-unsigned"


@dataclass(frozen=True)
class RunRequest:
    """What the admin approved: this config (by hash), for this FedGuard version, at this time."""

    request_id: str
    config_sha256: str
    fedguard_version: str
    issued_at: float


def fedguard_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("fedguard")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode("utf-8")).hexdigest()


def _signed_bytes(fields: dict[str, object]) -> bytes:
    return (_FORMAT + "\n" + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode("utf-8")


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """The admin's run-signing key (``admin/run-signing.key`` from ``fedguard provision init``)."""
    return load_run_signing_key(path, error=RunSignatureError)


def load_verify_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """The pinned public key (``run-signing.pub`` in every kit, OpenSSH format)."""
    return load_run_verify_key(path, error=RunSignatureError)


def sign_run(config_json: str, key: ed25519.Ed25519PrivateKey, *, version: str | None = None) -> str:
    """A token approving ``config_json`` (the run config's canonical JSON) for one run."""
    fields = {
        "request_id": uuid.uuid4().hex,
        "config_sha256": config_hash(config_json),
        "fedguard_version": version or fedguard_version(),
        "issued_at": round(time.time(), 3),
    }
    sig = key.sign(_signed_bytes(fields))
    token = {**fields, "signature": base64.b64encode(sig).decode()}
    return base64.urlsafe_b64encode(json.dumps(token, sort_keys=True).encode()).decode()


def verify_run(token: str, config_json: str, key: ed25519.Ed25519PublicKey, *, version: str) -> RunRequest:
    """Check ``token`` against the pinned key, the run config actually sent, and this node's version."""
    if not token:
        raise RunUnsigned(
            "the run is not signed",
            fix="submit runs with `fedguard run start --signing-key admin/run-signing.key` (or --signature)",
        )
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        fields = {k: raw[k] for k in ("request_id", "config_sha256", "fedguard_version", "issued_at")}
        key.verify(base64.b64decode(raw["signature"]), _signed_bytes(fields))
    except InvalidSignature:
        raise RunSignatureError("the run is signed by a key this node does not trust") from None
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise RunSignatureError("the run's signature token is malformed") from None
    if fields["config_sha256"] != config_hash(config_json):
        raise RunSignatureError("the run config differs from the one the admin signed")
    if fields["fedguard_version"] != version:
        raise RunSignatureError(
            f"the run was signed for FedGuard {fields['fedguard_version']}; this node runs {version}"
        )
    return RunRequest(
        request_id=str(fields["request_id"]),
        config_sha256=str(fields["config_sha256"]),
        fedguard_version=str(fields["fedguard_version"]),
        issued_at=float(fields["issued_at"]),  # type: ignore[arg-type]
    )
