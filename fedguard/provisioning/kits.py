"""Writing one kit (server or node) into a staging directory and signing its manifest with the CA key."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from common.files import atomic_write
from common.kit.certs import load_cert, pem_cert
from common.kit.errors import ProvisionError
from common.kit.manifest import Manifest, Participant, kit_files, manifest_body, sha256_file
from common.kit.names import (
    CA_CERT,
    CLOCK_SKEW,
    ENROLLED_DIR,
    FEDERATION_JSON,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_SIG,
    NODE_KEY,
    NODE_PUB,
    NODES_JSON,
    RUN_SIGNING_PUB,
    SERVER_CERT,
    SERVER_DIR,
    SERVER_KEY,
)
from common.kit.verify import verify_kit
from fedguard.provisioning.registry import Admin, Enrolled, Registry
from fedguard.provisioning.staging import write_json

__all__ = ["current_server_material", "federation_json", "sign_kit", "stage_node_kit", "stage_server_kit"]


def sign_kit(
    kit: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_fp: str,
    federation: str,
    participant: Participant,
    now: dt.datetime,
    not_before: dt.datetime,
    not_after: dt.datetime,
    private_files: list[str],
) -> None:
    files, _ = kit_files(kit)
    manifest = Manifest(
        format=MANIFEST_FORMAT,
        federation=federation,
        participant=participant,
        ca_fingerprint=ca_fp,
        issued_at=now,
        not_before=not_before,
        not_after=not_after,
        files={rel: sha256_file(kit / rel) for rel in files},
        private_files=sorted(private_files),
    )
    body = manifest_body(manifest)
    signature = ca_key.sign(body, ec.ECDSA(hashes.SHA384()))
    atomic_write(kit / MANIFEST, body)
    atomic_write(kit / MANIFEST_SIG, base64.b64encode(signature) + b"\n")


def federation_json(reg: Registry) -> dict[str, Any]:
    return {"name": reg.federation, "server_addresses": reg.server_addresses, "homomorphic": reg.homomorphic}


def stage_server_kit(
    kit: Path,
    adm: Admin,
    server_key_pem: bytes,
    server_cert: x509.Certificate,
    now: dt.datetime,
) -> None:
    reg = adm.registry
    kit.mkdir(parents=True, mode=0o700)
    atomic_write(kit / CA_CERT, pem_cert(adm.ca_cert))
    atomic_write(kit / SERVER_CERT, pem_cert(server_cert))
    atomic_write(kit / SERVER_KEY, server_key_pem, private=True)
    atomic_write(kit / RUN_SIGNING_PUB, adm.run_signing_pub)
    write_json(kit / FEDERATION_JSON, federation_json(reg))
    nodes = []
    for n in reg.nodes:
        rel = f"{ENROLLED_DIR}/{n.name}.pub"
        atomic_write(kit / rel, f"{n.public_key} fedguard:{reg.federation}/{n.name}\n".encode())
        nodes.append(
            {
                "name": n.name,
                "organisation": n.organisation,
                "role": n.role,
                "public_key": n.public_key,
                "public_key_file": rel,
                "fingerprint": n.fingerprint,
                "not_after": n.not_after.isoformat(),
            }
        )
    revoked = [r.model_dump(mode="json") for r in reg.revoked]
    write_json(kit / NODES_JSON, {"nodes": nodes, "revoked": revoked})
    sign_kit(
        kit,
        adm.ca_key,
        adm.ca_fp,
        reg.federation,
        Participant(name="server", role="server"),
        now,
        server_cert.not_valid_before_utc,
        server_cert.not_valid_after_utc,
        [SERVER_KEY],
    )


def stage_node_kit(kit: Path, adm: Admin, node: Enrolled, private_key: bytes | None, now: dt.datetime) -> None:
    reg = adm.registry
    kit.mkdir(parents=True, mode=0o700)
    atomic_write(kit / CA_CERT, pem_cert(adm.ca_cert))
    atomic_write(kit / NODE_PUB, f"{node.public_key} fedguard:{reg.federation}/{node.name}\n".encode())
    private = []
    if private_key is not None:
        atomic_write(kit / NODE_KEY, private_key, private=True)
        private.append(NODE_KEY)
    atomic_write(kit / RUN_SIGNING_PUB, adm.run_signing_pub)
    write_json(kit / FEDERATION_JSON, federation_json(reg))
    sign_kit(
        kit,
        adm.ca_key,
        adm.ca_fp,
        reg.federation,
        Participant(name=node.name, role=node.role, organisation=node.organisation),
        now,
        node.registered_at - CLOCK_SKEW,
        node.not_after,
        private,
    )


def current_server_material(adm: Admin) -> tuple[bytes, x509.Certificate]:
    """The server key and certificate of the existing server kit, after checking the kit is intact."""
    kit = verify_kit(adm.out / SERVER_DIR, adm.ca_fp, None, check_time=False)
    if kit.server_key is None or kit.server_cert is None:
        raise ProvisionError("the server kit holds no server certificate", where=str(kit.path))
    return kit.server_key.read_bytes(), load_cert(kit.server_cert)
