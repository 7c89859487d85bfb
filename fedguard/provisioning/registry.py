"""The admin's registry (``admin/registry.json``): federation settings, enrolled nodes, revoked keys.

Only the admin's tools read it; what participants see of it is the signed ``nodes.json`` in the
server kit. Enrolling checks here that a key is P-384, unused and never revoked.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.kit.certs import cert_fingerprint, load_cert, load_ec_private_pem
from common.kit.errors import ProvisionError
from common.kit.keys import fingerprint_public_key, generate_node_key, node_private_bytes, public_line
from common.kit.names import ADMIN_DIR, CA_CERT, CA_KEY, REGISTRY, REGISTRY_FORMAT, RUN_SIGNING_PUB, day
from common.schema import format_validation_error
from fedguard.provisioning.staging import write_json

__all__ = [
    "Admin",
    "Enrolled",
    "Registry",
    "Revoked",
    "check_ca_current",
    "check_key_unused",
    "enroll",
    "load_admin",
    "save_registry",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Enrolled(_Strict):
    name: str
    organisation: str
    role: Literal["client", "evaluator"]
    public_key: str
    fingerprint: str
    #: "generated": the key pair was made by provisioning (demo); "node": the node made it and sent the public key.
    key_source: Literal["node", "generated"]
    registered_at: dt.datetime
    not_after: dt.datetime


class Revoked(_Strict):
    name: str
    public_key: str
    fingerprint: str
    revoked_at: dt.datetime
    reason: str


class Registry(_Strict):
    format: Literal["fedguard-registry/1"] = REGISTRY_FORMAT
    federation: str
    server_addresses: list[str]
    homomorphic: bool
    lifetime_days: int
    ca_lifetime_days: int
    nodes: list[Enrolled] = Field(default_factory=list)
    revoked: list[Revoked] = Field(default_factory=list)

    def node(self, name: str) -> Enrolled | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclass(frozen=True)
class Admin:
    """The admin directory, loaded and cross-checked (CA key matches CA certificate)."""

    out: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_fp: str
    run_signing_pub: bytes
    registry: Registry


def load_admin(out: Path) -> Admin:
    admin = out / ADMIN_DIR
    reg_path = admin / REGISTRY
    if not reg_path.is_file():
        raise ProvisionError(
            "no provisioned federation here (admin/registry.json missing)",
            where=str(out),
            fix="pass the --out directory used with `fedguard provision init`, or run init first",
        )
    try:
        registry = Registry.model_validate_json(reg_path.read_bytes())
    except ValidationError as exc:
        raise ProvisionError(
            "admin registry is corrupt:\n" + format_validation_error(exc, str(reg_path)),
            fix="restore admin/ from your backup",
        ) from None
    try:
        ca_key = load_ec_private_pem(admin / CA_KEY)
        run_pub = (admin / RUN_SIGNING_PUB).read_bytes()
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"cannot read the admin keys: {exc.__class__.__name__}", where=str(admin), fix="restore admin/ from backup"
        ) from None
    ca_cert = load_cert(admin / CA_CERT)
    if ca_cert.public_key() != ca_key.public_key():
        raise ProvisionError("admin/ca.key does not match admin/ca.crt", where=str(admin), fix="restore from backup")
    return Admin(out, ca_key, ca_cert, cert_fingerprint(ca_cert), run_pub, registry)


def save_registry(out: Path, reg: Registry) -> None:
    """Written after the kits are swapped in: a failed (rolled-back) swap leaves the registry matching them."""
    write_json(out / ADMIN_DIR / REGISTRY, reg.model_dump(mode="json"))


def check_ca_current(adm: Admin, now: dt.datetime) -> None:
    if now > adm.ca_cert.not_valid_after_utc:
        raise ProvisionError(
            f"the federation CA expired on {day(adm.ca_cert.not_valid_after_utc)}; it cannot issue anything",
            where=str(adm.out / ADMIN_DIR / CA_CERT),
            fix="make a new CA and re-provision every kit: `fedguard provision init FEDERATION_FILE --out DIR --force`",
        )


def enroll(
    reg: Registry,
    ca_cert: x509.Certificate,
    name: str,
    organisation: str,
    role: Literal["client", "evaluator"],
    public_key: str | None,
    now: dt.datetime,
) -> tuple[Enrolled, bytes | None]:
    """A registry entry for a node; generates its key pair when no public key is given."""
    private: bytes | None = None
    if public_key is None:
        key = generate_node_key()
        private = node_private_bytes(key)
        public_key = public_line(key)
    not_after = min(now + dt.timedelta(days=reg.lifetime_days), ca_cert.not_valid_after_utc)
    entry = Enrolled(
        name=name,
        organisation=organisation,
        role=role,
        public_key=public_key,
        fingerprint=fingerprint_public_key(public_key),
        key_source="generated" if private is not None else "node",
        registered_at=now,
        not_after=not_after,
    )
    return entry, private


def check_key_unused(reg: Registry, public_key: str, name: str, where: str) -> None:
    for n in reg.nodes:
        if n.public_key == public_key and n.name != name:
            raise ProvisionError(
                f"this public key is already registered to node {n.name!r}",
                where=where,
                fix="every node generates its own key with `fedguard client init`",
            )
    for r in reg.revoked:
        if r.public_key == public_key:
            raise ProvisionError(
                f"this public key was revoked ({r.reason}, {day(r.revoked_at)}) and may not be registered again",
                where=where,
                fix="the node generates a new key with `fedguard client init --force`",
            )
