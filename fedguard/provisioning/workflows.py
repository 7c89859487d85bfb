"""The admin's provisioning workflows — create a federation, enroll a node, rotate a key — and the
node owner's ``client init``.

Each builds everything in a scratch directory and renames it into place at the end, so a failure
leaves the earlier kits exactly as they were. The formats written here are defined in
:mod:`common.kit`, which is what servers and nodes read back.
"""

from __future__ import annotations

import datetime as dt
import os  # noqa: F401  (tests patch os.rename through this module to simulate a crash mid-swap)
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import ValidationError

from common.errors import ConfigError
from common.files import atomic_write
from common.kit.certs import cert_fingerprint, pem_cert
from common.kit.errors import ProvisionError
from common.kit.federation import Federation, NodeSpec, load_federation
from common.kit.keys import (
    fingerprint_public_key,
    generate_node_key,
    node_private_bytes,
    parse_node_public_key,
    public_line,
)
from common.kit.names import (
    ADMIN_DIR,
    CA_CERT,
    CA_KEY,
    NODE_KEY,
    NODE_PUB,
    NODES_DIR,
    REGISTRY,
    RUN_SIGNING_KEY,
    RUN_SIGNING_PUB,
    SERVER_DIR,
    utc_now,
)
from common.schema import format_validation_error
from fedguard.provisioning.certs import make_ca, make_server_cert, pem_private
from fedguard.provisioning.kits import current_server_material, stage_node_kit, stage_server_kit
from fedguard.provisioning.registry import (
    Admin,
    Registry,
    Revoked,
    check_ca_current,
    check_key_unused,
    enroll,
    load_admin,
    save_registry,
)
from fedguard.provisioning.staging import staging, swap_in, write_json

__all__ = [
    "AddedNode",
    "NodeIdentity",
    "ProvisionResult",
    "RotateResult",
    "add_node",
    "init_federation",
    "init_node_keys",
    "rotate",
]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProvisionResult:
    out_dir: Path
    admin_dir: Path
    server_kit: Path
    node_kits: dict[str, Path]
    ca_fingerprint: str
    #: Node name → fingerprint of its registered public key (to read back to each owner).
    node_fingerprints: dict[str, str]
    generated_keys: tuple[str, ...]


@dataclass(frozen=True)
class AddedNode:
    name: str
    role: Literal["client", "evaluator"]
    kit_dir: Path
    server_kit: Path
    fingerprint: str
    key_generated: bool
    ca_fingerprint: str


@dataclass(frozen=True)
class RotateResult:
    target: str
    kit_dir: Path
    server_kit: Path
    #: New server certificate fingerprint, or the node's new key fingerprint.
    fingerprint: str
    revoked_fingerprint: str | None
    not_after: dt.datetime


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Path
    public_key: Path
    openssh: str
    fingerprint: str


def _quiet(_msg: str) -> None:
    pass


def init_federation(
    federation: Federation | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    generate_node_keys: bool = False,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> ProvisionResult:
    """Create the CA, run-signing key, server kit and every node kit under ``out_dir``.

    Everything is built in a scratch directory and renamed into place at the end, so a failure leaves any
    earlier kits exactly as they were. Existing kits are replaced only with ``force`` — which makes a new CA:
    every node then needs its new kit and the new fingerprint.
    """
    say = progress or _quiet
    source = "federation"
    if not isinstance(federation, Federation):
        source = str(federation)
        say(f"reading {source}")
        federation = load_federation(federation)
    fed = federation
    out = Path(out_dir)
    t = utc_now(now)
    if out.exists() and not out.is_dir():
        raise ProvisionError("not a directory", where=str(out), fix="pass a directory for --out")
    existing = [out / d for d in (ADMIN_DIR, SERVER_DIR, NODES_DIR) if (out / d).exists()]
    if existing and not force:
        raise ProvisionError(
            "kits were already provisioned here; refusing to overwrite them",
            where=str(existing[0]),
            fix="choose another --out, use `provision add-node`/`rotate` to change this federation, or pass "
            "--force to replace the CA and ALL kits (every node then needs a new kit and the new CA fingerprint)",
        )
    missing = [n.name for n in fed.nodes if n.public_key is None]
    if missing and not generate_node_keys:
        raise ProvisionError(
            f"no public key for node(s) {', '.join(missing)}",
            where=source,
            fix="each node owner runs `fedguard client init --workdir DIR` and sends you the printed public key; "
            "set it as the node's public_key (the key line or a .pub path) — or pass --generate-node-keys for a "
            "demo where every key is made on this machine",
        )
    # canonical key lines (a Federation built in code has skipped parse_federation's checks)
    keys = {
        n.name: parse_node_public_key(n.public_key, f"{source}: node {n.name} public_key")
        for n in fed.nodes
        if n.public_key is not None
    }

    with staging(out) as stage:
        say("creating the federation CA (EC P-384) and the run-signing key (Ed25519)")
        ca_key, ca_cert = make_ca(fed.name, t, fed.ca_lifetime_days)
        run_key = ed25519.Ed25519PrivateKey.generate()
        run_pub = (
            run_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" fedguard-run-signing:{fed.name}\n".encode()
        )
        reg = Registry(
            federation=fed.name,
            server_addresses=fed.server.addresses,
            homomorphic=fed.homomorphic,
            lifetime_days=fed.lifetime_days,
            ca_lifetime_days=fed.ca_lifetime_days,
        )
        privates: dict[str, bytes] = {}
        for n in fed.nodes:
            entry, private = enroll(reg, ca_cert, n.name, n.organisation, n.role, keys.get(n.name), t)
            check_key_unused(reg, entry.public_key, n.name, f"{source}: node {n.name}")
            reg.nodes.append(entry)
            if private is not None:
                privates[n.name] = private
        adm = Admin(out, ca_key, ca_cert, cert_fingerprint(ca_cert), run_pub, reg)

        admin = stage / ADMIN_DIR
        admin.mkdir(mode=0o700)
        atomic_write(admin / CA_KEY, pem_private(ca_key), private=True)
        atomic_write(admin / CA_CERT, pem_cert(ca_cert))
        atomic_write(admin / RUN_SIGNING_KEY, pem_private(run_key), private=True)
        atomic_write(admin / RUN_SIGNING_PUB, run_pub)
        write_json(admin / REGISTRY, reg.model_dump(mode="json"))

        say(f"issuing the server certificate for {', '.join(reg.server_addresses)}")
        server_key, server_cert = make_server_cert(
            fed.name, reg.server_addresses, ca_key, ca_cert, t, reg.lifetime_days
        )
        stage_server_kit(stage / SERVER_DIR, adm, pem_private(server_key), server_cert, t)
        (stage / NODES_DIR).mkdir(mode=0o700)
        for entry in reg.nodes:
            say(f"writing the kit of node {entry.name} ({entry.role})")
            stage_node_kit(stage / NODES_DIR / entry.name, adm, entry, privates.get(entry.name), t)
        if existing:
            say("replacing the previous CA and kits (--force)")
        swap_in(stage, [(stage / d, out / d) for d in (ADMIN_DIR, SERVER_DIR, NODES_DIR)])

    return ProvisionResult(
        out_dir=out,
        admin_dir=out / ADMIN_DIR,
        server_kit=out / SERVER_DIR,
        node_kits={n.name: out / NODES_DIR / n.name for n in reg.nodes},
        ca_fingerprint=adm.ca_fp,
        node_fingerprints={n.name: n.fingerprint for n in reg.nodes},
        generated_keys=tuple(privates),
    )


def add_node(
    out_dir: str | Path,
    name: str,
    organisation: str,
    role: Literal["client", "evaluator"] = "client",
    public_key: str | Path | None = None,
    *,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> AddedNode:
    """Enroll one more node: writes its kit and re-signs the server kit's node list; other kits stay untouched.

    ``public_key`` is the node's OpenSSH key line or .pub path; None generates the pair here (demo only).
    """
    say = progress or _quiet
    out = Path(out_dir)
    try:
        spec = NodeSpec(name=name, organisation=organisation, role=role)
    except ValidationError as exc:
        raise ConfigError("invalid node:\n" + format_validation_error(exc, "add-node")) from None
    adm = load_admin(out)
    reg = adm.registry
    t = utc_now(now)
    check_ca_current(adm, t)
    if reg.node(spec.name) is not None:
        raise ProvisionError(
            f"node {spec.name!r} is already enrolled",
            where=str(out / ADMIN_DIR / REGISTRY),
            fix=f"pick another name, or `fedguard provision rotate --out {out} --node {spec.name}` for a new key",
        )
    kit_dir = out / NODES_DIR / spec.name
    if kit_dir.exists():
        raise ProvisionError(
            "a kit directory with this name already exists (not in the registry)",
            where=str(kit_dir),
            fix="move it away, then run add-node again",
        )
    if spec.role == "evaluator":
        current = [n.name for n in reg.nodes if n.role == "evaluator"]
        if current:
            raise ProvisionError(
                f"the federation already has an evaluator ({current[0]}); there is exactly one",
                fix="enroll this node as a client",
            )
    key_line = None if public_key is None else parse_node_public_key(public_key, f"public key of {spec.name}")
    server_key_pem, server_cert = current_server_material(adm)
    with staging(out) as stage:
        entry, private = enroll(reg, adm.ca_cert, spec.name, spec.organisation, spec.role, key_line, t)
        check_key_unused(reg, entry.public_key, spec.name, f"public key of {spec.name}")
        reg.nodes.append(entry)
        say(f"writing the kit of node {spec.name} ({spec.role})")
        stage_node_kit(stage / "node", adm, entry, private, t)
        say("re-signing the server kit with the new node list")
        stage_server_kit(stage / SERVER_DIR, adm, server_key_pem, server_cert, t)
        swap_in(stage, [(stage / "node", kit_dir), (stage / SERVER_DIR, out / SERVER_DIR)])
        save_registry(out, reg)
    return AddedNode(
        name=spec.name,
        role=spec.role,
        kit_dir=kit_dir,
        server_kit=out / SERVER_DIR,
        fingerprint=entry.fingerprint,
        key_generated=private is not None,
        ca_fingerprint=adm.ca_fp,
    )


def rotate(
    out_dir: str | Path,
    target: str,
    *,
    public_key: str | Path | None = None,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> RotateResult:
    """Re-issue the server certificate (``target="server"``) or one node's registration (``target=NODE``).

    A node gets a new key pair when its key was generated here, else the new ``public_key`` it sent (the
    same key renews the registration without revoking it). The old key is listed as revoked in the server
    kit so the server unregisters it. Other node kits are never touched: they trust the CA, not the leaf.
    """
    say = progress or _quiet
    out = Path(out_dir)
    adm = load_admin(out)
    reg = adm.registry
    t = utc_now(now)
    check_ca_current(adm, t)
    with staging(out) as stage:
        if target == "server":
            if public_key is not None:
                raise ProvisionError("a public key applies only to rotating a node", fix="drop --public-key")
            say(f"issuing a new server key and certificate for {', '.join(reg.server_addresses)}")
            key, cert = make_server_cert(
                reg.federation, reg.server_addresses, adm.ca_key, adm.ca_cert, t, reg.lifetime_days
            )
            stage_server_kit(stage / SERVER_DIR, adm, pem_private(key), cert, t)
            swap_in(stage, [(stage / SERVER_DIR, out / SERVER_DIR)])
            return RotateResult(
                target="server",
                kit_dir=out / SERVER_DIR,
                server_kit=out / SERVER_DIR,
                fingerprint=cert_fingerprint(cert),
                revoked_fingerprint=None,
                not_after=cert.not_valid_after_utc,
            )

        old = reg.node(target)
        if old is None:
            known = ", ".join(n.name for n in reg.nodes) or "none"
            raise ProvisionError(
                f"no enrolled node named {target!r} (enrolled: {known})",
                fix="use `--server` for the server certificate, or `provision add-node` for a new node",
            )
        key_line = None if public_key is None else parse_node_public_key(public_key, f"public key of {target}")
        if key_line is None and old.key_source == "node":
            raise ProvisionError(
                f"node {target!r} owns its key, so its new public key must come from the node",
                fix="the node owner runs `fedguard client init --workdir DIR --force` and sends the new key; "
                "pass it with --public-key FILE",
            )
        server_key_pem, server_cert = current_server_material(adm)
        entry, private = enroll(reg, adm.ca_cert, old.name, old.organisation, old.role, key_line, t)
        check_key_unused(reg, entry.public_key, old.name, f"public key of {target}")
        revoked_fp: str | None = None
        if entry.public_key != old.public_key:
            reg.revoked.append(
                Revoked(
                    name=old.name,
                    public_key=old.public_key,
                    fingerprint=old.fingerprint,
                    revoked_at=t,
                    reason="rotated",
                )
            )
            revoked_fp = old.fingerprint
        reg.nodes = [entry if n.name == old.name else n for n in reg.nodes]
        say(f"writing the new kit of node {target}")
        stage_node_kit(stage / "node", adm, entry, private, t)
        say("re-signing the server kit with the updated node list")
        stage_server_kit(stage / SERVER_DIR, adm, server_key_pem, server_cert, t)
        kit_dir = out / NODES_DIR / old.name
        swap_in(stage, [(stage / "node", kit_dir), (stage / SERVER_DIR, out / SERVER_DIR)])
        save_registry(out, reg)
    return RotateResult(
        target=target,
        kit_dir=kit_dir,
        server_kit=out / SERVER_DIR,
        fingerprint=entry.fingerprint,
        revoked_fingerprint=revoked_fp,
        not_after=entry.not_after,
    )


def init_node_keys(workdir: str | Path, *, force: bool = False) -> NodeIdentity:
    """Generate the node's EC P-384 authentication key in its work directory (``node.key`` 0600, ``node.pub``).

    Only the public key travels to the admin; the private key never leaves the node.
    """
    wd = Path(workdir)
    priv, pub = wd / NODE_KEY, wd / NODE_PUB
    if priv.exists() and not force:
        raise ProvisionError(
            "this node already has a key; refusing to overwrite it",
            where=str(priv),
            fix="keep using it (its public key is in node.pub), or pass --force and have the admin rotate "
            "this node's registration with the new public key",
        )
    if wd.exists() and not wd.is_dir():
        raise ProvisionError("not a directory", where=str(wd), fix="pass a directory for --workdir")
    wd.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_node_key()
    line = public_line(key)
    atomic_write(priv, node_private_bytes(key), private=True)
    atomic_write(pub, f"{line} fedguard-node\n".encode())
    return NodeIdentity(private_key=priv, public_key=pub, openssh=line, fingerprint=fingerprint_public_key(line))
