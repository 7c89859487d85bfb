"""Signed ledger exports: what a reviewer needs to recompute a node's ε without trusting it.

The node signs the export with its own authentication key (EC P-384, OpenSSH format, the key
the federation registered), so a reviewer who knows the node's public-key fingerprint can
check that the releases came from that node and recompute ε with Opacus's accountant.

Format 2 adds each release's ``extra_delta`` (δ spent outside the accountant: a count release's group
selection); the dataset's ε is at its δ less their sum. Format 1 exports (without it) still verify.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import FedGuardError
from common.kit.keys import fingerprint_public_key, load_node_private_key, load_node_public_key, public_line
from common.privacy import epsilon_within

_V1, _V2 = "fedguard-ledger-export/1", "fedguard-ledger-export/2"


class ExportError(FedGuardError):
    code = "ledger-export-invalid"


class ExportedRelease(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    round: int
    message_id: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str
    status: Literal["pending", "confirmed"]
    created_at: float
    extra_delta: float = 0.0  # format 2: δ spent outside the accountant (a count release's group selection)


class ExportedDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    budget_epsilon: float | None
    budget_delta: float | None
    #: ε the node computed with ``accountant`` over every release below, within a total δ of ``delta``:
    #: the accountant gets ``delta`` less ``extra_delta`` (the releases' sum; format 2).
    epsilon: float
    delta: float
    accountant: str
    extra_delta: float = 0.0
    releases: list[ExportedRelease]


class LedgerExport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["fedguard-ledger-export/1", "fedguard-ledger-export/2"] = "fedguard-ledger-export/2"
    ledger_id: str
    created_at: float
    #: The node's public key (OpenSSH) and its fingerprint, ``SHA256:<base64>`` like ssh-keygen.
    public_key: str
    public_key_fingerprint: str
    datasets: list[ExportedDataset]


def ssh_fingerprint(public_openssh: str | bytes) -> str:
    """``SHA256:...`` fingerprint of an OpenSSH public key line, as ``ssh-keygen -lf`` prints it."""
    return fingerprint_public_key(public_openssh.decode() if isinstance(public_openssh, bytes) else public_openssh)


def _canonical(body: LedgerExport) -> bytes:
    doc = body.model_dump(mode="json")
    if body.format == _V1:  # signed before extra_delta existed
        for ds in doc["datasets"]:
            ds.pop("extra_delta")
            for r in ds["releases"]:
                r.pop("extra_delta")
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign_export(body: LedgerExport, private_key_openssh: bytes) -> dict[str, object]:
    key = load_node_private_key(private_key_openssh, where="node key", error=ExportError)
    sig = key.sign(_canonical(body), ec.ECDSA(hashes.SHA384()))
    return {"export": body.model_dump(mode="json"), "signature": base64.b64encode(sig).decode()}


def public_openssh(private_key_openssh: bytes) -> str:
    return public_line(load_node_private_key(private_key_openssh, where="node key", error=ExportError))


def verify_export(path: str | Path, expected_fingerprint: str | None = None) -> LedgerExport:
    """Check the signature (and the key's fingerprint if given) and recompute every dataset's ε.

    Raises ExportError naming what did not match; returns the verified export.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        body = LedgerExport.model_validate(doc["export"])
        sig = base64.b64decode(doc["signature"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ExportError(f"not a FedGuard ledger export ({type(exc).__name__})", where=str(p)) from None
    if ssh_fingerprint(body.public_key) != body.public_key_fingerprint:
        raise ExportError("the embedded public key does not match its fingerprint", where=str(p))
    if expected_fingerprint is not None and body.public_key_fingerprint != expected_fingerprint:
        raise ExportError(
            f"signed by {body.public_key_fingerprint}, not the expected node key {expected_fingerprint}",
            where=str(p),
            fix="compare with the node's registered key fingerprint (server kit)",
        )
    key = load_node_public_key(body.public_key.encode(), where=f"{p}: public_key", error=ExportError)
    try:
        key.verify(sig, _canonical(body), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise ExportError("bad signature: the export was modified or not signed by this key", where=str(p)) from None
    for ds in body.datasets:
        history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in ds.releases]
        extra = sum(r.extra_delta for r in ds.releases)
        if abs(extra - ds.extra_delta) > 1e-12 or extra >= ds.delta or (extra and body.format == _V1):
            raise ExportError(
                f"dataset {ds.dataset_id!r}: its releases spend δ={extra:g} outside the accountant, "
                f"but the export states {ds.extra_delta:g} of its δ={ds.delta:g}",
                where=str(p),
            )
        recomputed = epsilon_within(history, ds.delta, extra, ds.accountant)
        if abs(recomputed - ds.epsilon) > 1e-6 * max(1.0, ds.epsilon):
            raise ExportError(
                f"dataset {ds.dataset_id!r}: reported ε={ds.epsilon} but its releases give ε={recomputed}",
                where=str(p),
            )
    return body
