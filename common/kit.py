"""Provisioning of federation kits: one federation CA, a server kit and one kit per node.

Layout of a provisioning directory ``OUT`` (made by :func:`init_federation`)::

    OUT/admin/            stays with the federation admin, offline; never copied anywhere
        ca.key ca.crt     the federation CA (EC P-384); ca.key signs certificates and kit manifests
        run-signing.key   Ed25519 key that signs runs (a later issue); its .pub is pinned in every kit
        run-signing.pub
        registry.json     source of truth: federation settings, enrolled nodes, revoked node keys
    OUT/server/           copied to the server host
        ca.crt server.crt server.key  TLS for the SuperLink (SANs = the federation's server addresses)
        nodes.json        enrolled nodes (name, organisation, role, OpenSSH key, fingerprint) and revoked keys
        enrolled/NAME.pub each enrolled key as a file, ready for ``flwr supernode register``
        run-signing.pub federation.json manifest.json manifest.sig
    OUT/nodes/NAME/       copied to node NAME
        ca.crt node.pub   the CA and the node's registered authentication key
        node.key          only when the key was generated here (demo); normally it never leaves the node
        run-signing.pub federation.json manifest.json manifest.sig

Every kit carries a manifest (each file's SHA-256, who the kit is for, its validity) signed by the CA key.
A manifest signed by a CA that travels in the same kit proves nothing on its own: whoever swaps the kit
swaps the CA too. Only the CA fingerprint the node owner received out of band (phone, in person) anchors
trust — pass it to :func:`verify_kit`.

Fingerprint formats (one each, both what the usual tools print, so owners can cross-check):

- certificates: SHA-256 of the DER encoding as upper-case hex pairs joined by colons, ``AB:CD:...``
  (``openssl x509 -in ca.crt -noout -fingerprint -sha256``). Colons and case are ignored when comparing.
- public keys: ``SHA256:`` + unpadded base64 of the SHA-256 of the OpenSSH key blob
  (``ssh-keygen -lf node.pub``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError, FedGuardError
from common.files import atomic_write, fsync_dir, group_or_world_readable
from common.schema import format_validation_error

__all__ = [
    "ADMIN_DIR",
    "NODES_DIR",
    "SERVER_DIR",
    "NODE_KEY",
    "NODE_PUB",
    "AddedNode",
    "EnrolledNode",
    "Federation",
    "Kit",
    "KitError",
    "NodeIdentity",
    "NodeSpec",
    "ProvisionError",
    "ProvisionResult",
    "RevokedKey",
    "RotateResult",
    "ServerSection",
    "add_node",
    "check_node_private_key",
    "fingerprint_cert",
    "fingerprint_public_key",
    "init_federation",
    "init_node_keys",
    "load_federation",
    "parse_federation",
    "parse_node_public_key",
    "rotate",
    "verify_kit",
]


class KitError(FedGuardError):
    """A kit is missing, tampered with, not from the expected CA, or outside its validity window."""

    code = "kit-invalid"


class ProvisionError(FedGuardError):
    """Provisioning refused (existing kits, unknown node, missing key...); nothing was changed."""

    code = "provision-refused"


# --- names --------------------------------------------------------------------------------------

ADMIN_DIR = "admin"
SERVER_DIR = "server"
NODES_DIR = "nodes"

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
RUN_SIGNING_KEY = "run-signing.key"
RUN_SIGNING_PUB = "run-signing.pub"
REGISTRY = "registry.json"
NODES_JSON = "nodes.json"
FEDERATION_JSON = "federation.json"
ENROLLED_DIR = "enrolled"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"

MANIFEST_FORMAT: Literal["fedguard-kit/1"] = "fedguard-kit/1"
REGISTRY_FORMAT: Literal["fedguard-registry/1"] = "fedguard-registry/1"

#: Certificates are back-dated this much so a node whose clock is slightly behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RESERVED = {"server", "admin"}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

Progress = Callable[[str], None]


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names a directory and the Flower node)"
        )
    return value


# --- the federation file ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    #: Host names and IP addresses nodes use to reach the server; all go into the server certificate's SANs.
    addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"], min_length=1)

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for raw in value:
            addr = _check_address(raw)
            if addr not in out:
                out.append(addr)
        return out


def _check_address(raw: str) -> str:
    addr = raw.strip()
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        pass
    host = addr.rstrip(".").lower()
    if len(host) > 253 or not _HOST_RE.fullmatch(host):
        raise ValueError(
            f"{raw!r} is not a host name or IP address (no scheme, port or path: e.g. 'fl.example.org', '10.0.0.5')"
        )
    return host


class NodeSpec(_Strict):
    """One participant of the federation file's ``[[nodes]]`` list."""

    name: str
    organisation: str = Field(min_length=1, max_length=128)
    role: Literal["client", "evaluator"] = "client"
    #: The node's OpenSSH EC P-384 public key (from ``fedguard client init``): the key line itself, or
    #: the path of a .pub file relative to the federation file. None only with generated node keys.
    public_key: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        _check_name(value, "node name")
        if value.lower() in _RESERVED:
            raise ValueError(f"node name {value!r} is reserved")
        return value


class Federation(_Strict):
    """A federation file (TOML): who takes part and how the server is reached."""

    name: str
    server: ServerSection = Field(default_factory=ServerSection)
    nodes: list[NodeSpec]
    #: Updates are encrypted (TenSEAL) and summed by the server; the evaluator holds the key.
    homomorphic: bool = False
    #: Lifetime of server certificates and node registrations; renew with ``fedguard provision rotate``.
    lifetime_days: int = Field(365, ge=1, le=3650)
    #: Lifetime of the CA itself; when it ends, every kit must be re-provisioned.
    ca_lifetime_days: int = Field(3650, ge=1, le=36500)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "federation name")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, nodes: list[NodeSpec]) -> list[NodeSpec]:
        seen: set[str] = set()
        for n in nodes:
            if n.name in seen:
                raise ValueError(f"node name {n.name!r} appears twice")
            seen.add(n.name)
        evaluators = [n.name for n in nodes if n.role == "evaluator"]
        if len(evaluators) != 1:
            raise ValueError(
                f"exactly one node must have role = 'evaluator' (found {len(evaluators)}"
                + (f": {', '.join(evaluators)})" if evaluators else ")")
            )
        return nodes


def parse_federation(raw: dict[str, Any], source: str = "federation file", base_dir: Path | None = None) -> Federation:
    """Validate a federation dict; public-key paths resolve against ``base_dir`` and are replaced by the key."""
    try:
        fed = Federation.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            "invalid federation file:\n" + format_validation_error(exc, source),
            fix="correct the fields above; see deploy/PROVISIONING.md for an example",
        ) from None
    keys: dict[str, str] = {}
    for i, node in enumerate(fed.nodes):
        if node.public_key is None:
            continue
        where = f"{source}: nodes.{i}.public_key"
        value = node.public_key.strip()
        if not _looks_like_key(value):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            value = _read_pub_file(path, where, ConfigError)
        node.public_key = _parse_pub(value, where, ConfigError)
        if node.public_key in keys:
            raise ConfigError(
                f"nodes {keys[node.public_key]!r} and {node.name!r} have the same public key",
                where=where,
                fix="every node generates its own key with `fedguard client init`",
            )
        keys[node.public_key] = node.name
    return fed


def load_federation(path: str | Path) -> Federation:
    """Read and validate a federation TOML file; errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("federation file not found", where=str(p), fix="pass the path of an existing TOML file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(p)) from None
    return parse_federation(raw, str(p), p.resolve().parent)


# --- keys and fingerprints ----------------------------------------------------------------------


def _looks_like_key(value: str) -> bool:
    return value.startswith(("ecdsa-sha2-", "ssh-", "sk-"))


def _read_pub_file(path: Path, where: str, err: type[FedGuardError]) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise err(
            f"cannot read public key file {path}: {exc.__class__.__name__}",
            where=where,
            fix="pass the .pub file printed by `fedguard client init` (or the key line itself)",
        ) from None


def _parse_pub(text: str, where: str, err: type[FedGuardError]) -> str:
    """Canonical OpenSSH line (no comment) of an EC P-384 key, the only kind FedGuard registers."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, UnicodeEncodeError):
        raise err(
            "not an OpenSSH public key",
            where=where,
            fix="use the key printed by `fedguard client init` (it starts with 'ecdsa-sha2-nistp384 ')",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise err(
            "node keys must be EC P-384 (ecdsa-sha2-nistp384)",
            where=where,
            fix="generate one with `fedguard client init` or `ssh-keygen -t ecdsa -b 384`",
        )
    return _ssh_pub_line(key)


def parse_node_public_key(value: str | Path, where: str = "public key") -> str:
    """An OpenSSH key line or the path of a .pub file → canonical P-384 key line (raises ProvisionError)."""
    text = str(value).strip()
    if isinstance(value, Path) or not _looks_like_key(text):
        text = _read_pub_file(Path(value), where, ProvisionError)
    return _parse_pub(text, where, ProvisionError)


def fingerprint_public_key(openssh_pub: str) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key line, exactly as ``ssh-keygen -lf`` prints it."""
    parts = openssh_pub.strip().split()
    if len(parts) < 2:
        raise ProvisionError("not an OpenSSH public key line", where=openssh_pub[:40])
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ProvisionError("not an OpenSSH public key line", where=openssh_pub[:40]) from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _cert_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def fingerprint_cert(path: str | Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, ``AB:CD:...`` (as ``openssl x509 -fingerprint -sha256``)."""
    return _cert_fingerprint(_load_cert(Path(path)))


def _normalize_cert_fingerprint(value: str) -> str:
    v = value.strip()
    for prefix in ("sha256 fingerprint=", "sha256:", "sha256 "):
        if v.lower().startswith(prefix):
            v = v[len(prefix) :]
    v = re.sub(r"[\s:]", "", v).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise KitError(
            f"{value!r} is not a certificate SHA-256 fingerprint",
            where="expected CA fingerprint",
            fix="pass the 64 hex digits (colons optional) the federation admin gave you out of band",
        )
    return v


def _ssh_pub_line(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_private(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: flower-supernode loads it with load_ssh_private_key(password=None). File mode 0600.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KitError("certificate file missing", where=str(path)) from None
    except ValueError:
        raise KitError("not a PEM certificate", where=str(path)) from None


def _load_ec_private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError("expected an EC private key", where=str(path))
    return key


# --- time ---------------------------------------------------------------------------------------


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _day(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- certificates -------------------------------------------------------------------------------


def _make_ca(federation: str, now: dt.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_ec_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"FedGuard federation {federation}"[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"FedGuard CA {federation}"[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # the CA key also signs kit manifests
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    federation: str,
    addresses: list[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_ec_key()
    sans: list[x509.GeneralName] = []
    for a in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            sans.append(x509.DNSName(a))
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"FedGuard federation {federation}"[:64]),
                    x509.NameAttribute(NameOID.COMMON_NAME, addresses[0][:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


# --- atomic files and directories ---------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch directory inside ``out`` (same file system, so renames are atomic), always removed."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename each staged directory over its target; old targets go to the stage's trash (removed with it).

    Each rename is atomic; if one fails, the ones already made are rolled back so the old kits stay.
    """
    trash = stage / ".old"
    trash.mkdir(exist_ok=True)
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for i, (src, dst) in enumerate(moves):
            old: Path | None = None
            if dst.exists():
                old = trash / f"{i}-{dst.name}"
                os.rename(dst, old)
            dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.rename(src, dst)
            except BaseException:
                if old is not None:
                    os.rename(old, dst)
                raise
            done.append((src, dst, old))
    except BaseException:
        for src, dst, old in reversed(done):
            with contextlib.suppress(OSError):
                os.rename(dst, src)
                if old is not None:
                    os.rename(old, dst)
        raise
    for _src, dst, _old in done:
        fsync_dir(dst.parent)


# --- registry, manifest -------------------------------------------------------------------------


class _Enrolled(_Strict):
    name: str
    organisation: str
    role: Literal["client", "evaluator"]
    public_key: str
    fingerprint: str
    #: "generated": the key pair was made by provisioning (demo); "node": the node made it and sent the public key.
    key_source: Literal["node", "generated"]
    registered_at: dt.datetime
    not_after: dt.datetime


class _Revoked(_Strict):
    name: str
    public_key: str
    fingerprint: str
    revoked_at: dt.datetime
    reason: str


class _Registry(_Strict):
    format: Literal["fedguard-registry/1"] = REGISTRY_FORMAT
    federation: str
    server_addresses: list[str]
    homomorphic: bool
    lifetime_days: int
    ca_lifetime_days: int
    nodes: list[_Enrolled] = Field(default_factory=list)
    revoked: list[_Revoked] = Field(default_factory=list)

    def node(self, name: str) -> _Enrolled | None:
        return next((n for n in self.nodes if n.name == name), None)


class _Participant(_Strict):
    name: str
    role: Literal["server", "client", "evaluator"]
    organisation: str | None = None


class _Manifest(_Strict):
    format: Literal["fedguard-kit/1"]
    federation: str
    participant: _Participant
    ca_fingerprint: str
    issued_at: dt.datetime
    #: Registration (node kits) or server certificate (server kit) validity.
    not_before: dt.datetime
    not_after: dt.datetime
    #: Relative POSIX path → SHA-256 hex of every file in the kit except the manifest and its signature.
    files: dict[str, str]
    private_files: list[str]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _kit_files(kit: Path) -> tuple[list[str], list[str]]:
    """(regular files, symlinks or other non-regular entries) as relative POSIX paths, manifest excluded."""
    files: list[str] = []
    odd: list[str] = []
    for root, dirs, names in os.walk(kit):
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                odd.append((Path(root) / d).relative_to(kit).as_posix())
                dirs.remove(d)
        for n in names:
            p = Path(root) / n
            rel = p.relative_to(kit).as_posix()
            if rel in (MANIFEST, MANIFEST_SIG):
                continue
            if p.is_symlink() or not stat.S_ISREG(p.lstat().st_mode):
                odd.append(rel)
            else:
                files.append(rel)
    return sorted(files), sorted(odd)


def _sign_kit(
    kit: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_fp: str,
    federation: str,
    participant: _Participant,
    now: dt.datetime,
    not_before: dt.datetime,
    not_after: dt.datetime,
    private_files: list[str],
) -> None:
    files, _ = _kit_files(kit)
    manifest = _Manifest(
        format=MANIFEST_FORMAT,
        federation=federation,
        participant=participant,
        ca_fingerprint=ca_fp,
        issued_at=now,
        not_before=not_before,
        not_after=not_after,
        files={rel: _sha256_file(kit / rel) for rel in files},
        private_files=sorted(private_files),
    )
    body = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()
    signature = ca_key.sign(body, ec.ECDSA(hashes.SHA384()))
    atomic_write(kit / MANIFEST, body)
    atomic_write(kit / MANIFEST_SIG, base64.b64encode(signature) + b"\n")


@dataclass(frozen=True)
class _Admin:
    out: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_fp: str
    run_signing_pub: bytes
    registry: _Registry


def _load_admin(out: Path) -> _Admin:
    admin = out / ADMIN_DIR
    reg_path = admin / REGISTRY
    if not reg_path.is_file():
        raise ProvisionError(
            "no provisioned federation here (admin/registry.json missing)",
            where=str(out),
            fix="pass the --out directory used with `fedguard provision init`, or run init first",
        )
    try:
        registry = _Registry.model_validate_json(reg_path.read_bytes())
    except ValidationError as exc:
        raise ProvisionError(
            "admin registry is corrupt:\n" + format_validation_error(exc, str(reg_path)),
            fix="restore admin/ from your backup",
        ) from None
    try:
        ca_key = _load_ec_private_pem(admin / CA_KEY)
        run_pub = (admin / RUN_SIGNING_PUB).read_bytes()
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"cannot read the admin keys: {exc.__class__.__name__}", where=str(admin), fix="restore admin/ from backup"
        ) from None
    ca_cert = _load_cert(admin / CA_CERT)
    if ca_cert.public_key() != ca_key.public_key():
        raise ProvisionError("admin/ca.key does not match admin/ca.crt", where=str(admin), fix="restore from backup")
    return _Admin(out, ca_key, ca_cert, _cert_fingerprint(ca_cert), run_pub, registry)


def _save_registry(out: Path, reg: _Registry) -> None:
    """Written after the kits are swapped in: a failed (rolled-back) swap leaves the registry matching them."""
    _write_json(out / ADMIN_DIR / REGISTRY, reg.model_dump(mode="json"))


def _check_ca_current(adm: _Admin, now: dt.datetime) -> None:
    if now > adm.ca_cert.not_valid_after_utc:
        raise ProvisionError(
            f"the federation CA expired on {_day(adm.ca_cert.not_valid_after_utc)}; it cannot issue anything",
            where=str(adm.out / ADMIN_DIR / CA_CERT),
            fix="make a new CA and re-provision every kit: `fedguard provision init FEDERATION_FILE --out DIR --force`",
        )


def _federation_json(reg: _Registry) -> dict[str, Any]:
    return {"name": reg.federation, "server_addresses": reg.server_addresses, "homomorphic": reg.homomorphic}


def _stage_server_kit(
    kit: Path,
    adm: _Admin,
    server_key_pem: bytes,
    server_cert: x509.Certificate,
    now: dt.datetime,
) -> None:
    reg = adm.registry
    kit.mkdir(parents=True, mode=0o700)
    atomic_write(kit / CA_CERT, _pem_cert(adm.ca_cert))
    atomic_write(kit / SERVER_CERT, _pem_cert(server_cert))
    atomic_write(kit / SERVER_KEY, server_key_pem, private=True)
    atomic_write(kit / RUN_SIGNING_PUB, adm.run_signing_pub)
    _write_json(kit / FEDERATION_JSON, _federation_json(reg))
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
    _write_json(kit / NODES_JSON, {"nodes": nodes, "revoked": revoked})
    _sign_kit(
        kit,
        adm.ca_key,
        adm.ca_fp,
        reg.federation,
        _Participant(name="server", role="server"),
        now,
        server_cert.not_valid_before_utc,
        server_cert.not_valid_after_utc,
        [SERVER_KEY],
    )


def _stage_node_kit(kit: Path, adm: _Admin, node: _Enrolled, private_key: bytes | None, now: dt.datetime) -> None:
    reg = adm.registry
    kit.mkdir(parents=True, mode=0o700)
    atomic_write(kit / CA_CERT, _pem_cert(adm.ca_cert))
    atomic_write(kit / NODE_PUB, f"{node.public_key} fedguard:{reg.federation}/{node.name}\n".encode())
    private = []
    if private_key is not None:
        atomic_write(kit / NODE_KEY, private_key, private=True)
        private.append(NODE_KEY)
    atomic_write(kit / RUN_SIGNING_PUB, adm.run_signing_pub)
    _write_json(kit / FEDERATION_JSON, _federation_json(reg))
    _sign_kit(
        kit,
        adm.ca_key,
        adm.ca_fp,
        reg.federation,
        _Participant(name=node.name, role=node.role, organisation=node.organisation),
        now,
        node.registered_at - CLOCK_SKEW,
        node.not_after,
        private,
    )


def _enroll(
    reg: _Registry,
    ca_cert: x509.Certificate,
    name: str,
    organisation: str,
    role: Literal["client", "evaluator"],
    public_key: str | None,
    now: dt.datetime,
) -> tuple[_Enrolled, bytes | None]:
    """A registry entry for a node; generates its key pair when no public key is given."""
    private: bytes | None = None
    if public_key is None:
        key = _new_ec_key()
        private = _ssh_private(key)
        public_key = _ssh_pub_line(key.public_key())
    not_after = min(now + dt.timedelta(days=reg.lifetime_days), ca_cert.not_valid_after_utc)
    entry = _Enrolled(
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


def _check_key_unused(reg: _Registry, public_key: str, name: str, where: str) -> None:
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
                f"this public key was revoked ({r.reason}, {_day(r.revoked_at)}) and may not be registered again",
                where=where,
                fix="the node generates a new key with `fedguard client init --force`",
            )


def _current_server_material(adm: _Admin) -> tuple[bytes, x509.Certificate]:
    """The server key and certificate of the existing server kit, after checking the kit is intact."""
    kit = _verify(adm.out / SERVER_DIR, adm.ca_fp, None, check_time=False)
    if kit.server_key is None or kit.server_cert is None:
        raise ProvisionError("the server kit holds no server certificate", where=str(kit.path))
    return kit.server_key.read_bytes(), _load_cert(kit.server_cert)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolledNode:
    """A node the server must register with the SuperLink (and accept replies from, in its role)."""

    name: str
    organisation: str
    role: Literal["client", "evaluator"]
    #: OpenSSH line, as ``flwr supernode register`` reads it from ``public_key_file``.
    public_key: str
    public_key_file: Path
    fingerprint: str
    #: The registration ends here; the server should refuse the node afterwards.
    not_after: dt.datetime


@dataclass(frozen=True)
class RevokedKey:
    """A node key that must be unregistered from the SuperLink and never accepted again."""

    name: str
    public_key: str
    fingerprint: str
    revoked_at: dt.datetime
    reason: str


@dataclass(frozen=True)
class Kit:
    """A verified kit: what ``server start`` / ``client start`` need, with absolute paths."""

    path: Path
    role: Literal["server", "client", "evaluator"]
    #: "server" for the server kit, else the node name (its Flower/registry name).
    participant: str
    organisation: str | None
    federation: str
    server_addresses: tuple[str, ...]
    homomorphic: bool
    ca_cert: Path
    ca_fingerprint: str
    #: True only when the CA matched the fingerprint given out of band; False means "trusted the kit's own CA".
    ca_pinned: bool
    not_before: dt.datetime
    not_after: dt.datetime
    run_signing_public_key: Path
    server_cert: Path | None = None
    server_key: Path | None = None
    node_public_key: Path | None = None
    #: Present only for kits whose key was generated by provisioning; otherwise the key is in the node's workdir.
    node_private_key: Path | None = None
    nodes: tuple[EnrolledNode, ...] = ()
    revoked: tuple[RevokedKey, ...] = ()


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


# --- provisioning -------------------------------------------------------------------------------


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
    t = _now(now)
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

    with _staging(out) as stage:
        say("creating the federation CA (EC P-384) and the run-signing key (Ed25519)")
        ca_key, ca_cert = _make_ca(fed.name, t, fed.ca_lifetime_days)
        run_key = ed25519.Ed25519PrivateKey.generate()
        run_pub = (
            run_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" fedguard-run-signing:{fed.name}\n".encode()
        )
        reg = _Registry(
            federation=fed.name,
            server_addresses=fed.server.addresses,
            homomorphic=fed.homomorphic,
            lifetime_days=fed.lifetime_days,
            ca_lifetime_days=fed.ca_lifetime_days,
        )
        privates: dict[str, bytes] = {}
        for n in fed.nodes:
            entry, private = _enroll(reg, ca_cert, n.name, n.organisation, n.role, keys.get(n.name), t)
            _check_key_unused(reg, entry.public_key, n.name, f"{source}: node {n.name}")
            reg.nodes.append(entry)
            if private is not None:
                privates[n.name] = private
        adm = _Admin(out, ca_key, ca_cert, _cert_fingerprint(ca_cert), run_pub, reg)

        admin = stage / ADMIN_DIR
        admin.mkdir(mode=0o700)
        atomic_write(admin / CA_KEY, _pem_private(ca_key), private=True)
        atomic_write(admin / CA_CERT, _pem_cert(ca_cert))
        atomic_write(admin / RUN_SIGNING_KEY, _pem_private(run_key), private=True)
        atomic_write(admin / RUN_SIGNING_PUB, run_pub)
        _write_json(admin / REGISTRY, reg.model_dump(mode="json"))

        say(f"issuing the server certificate for {', '.join(reg.server_addresses)}")
        server_key, server_cert = _make_server_cert(
            fed.name, reg.server_addresses, ca_key, ca_cert, t, reg.lifetime_days
        )
        _stage_server_kit(stage / SERVER_DIR, adm, _pem_private(server_key), server_cert, t)
        (stage / NODES_DIR).mkdir(mode=0o700)
        for entry in reg.nodes:
            say(f"writing the kit of node {entry.name} ({entry.role})")
            _stage_node_kit(stage / NODES_DIR / entry.name, adm, entry, privates.get(entry.name), t)
        if existing:
            say("replacing the previous CA and kits (--force)")
        _swap_in(stage, [(stage / d, out / d) for d in (ADMIN_DIR, SERVER_DIR, NODES_DIR)])

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
    adm = _load_admin(out)
    reg = adm.registry
    t = _now(now)
    _check_ca_current(adm, t)
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
    server_key_pem, server_cert = _current_server_material(adm)
    with _staging(out) as stage:
        entry, private = _enroll(reg, adm.ca_cert, spec.name, spec.organisation, spec.role, key_line, t)
        _check_key_unused(reg, entry.public_key, spec.name, f"public key of {spec.name}")
        reg.nodes.append(entry)
        say(f"writing the kit of node {spec.name} ({spec.role})")
        _stage_node_kit(stage / "node", adm, entry, private, t)
        say("re-signing the server kit with the new node list")
        _stage_server_kit(stage / SERVER_DIR, adm, server_key_pem, server_cert, t)
        _swap_in(stage, [(stage / "node", kit_dir), (stage / SERVER_DIR, out / SERVER_DIR)])
        _save_registry(out, reg)
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
    adm = _load_admin(out)
    reg = adm.registry
    t = _now(now)
    _check_ca_current(adm, t)
    with _staging(out) as stage:
        if target == "server":
            if public_key is not None:
                raise ProvisionError("a public key applies only to rotating a node", fix="drop --public-key")
            say(f"issuing a new server key and certificate for {', '.join(reg.server_addresses)}")
            key, cert = _make_server_cert(
                reg.federation, reg.server_addresses, adm.ca_key, adm.ca_cert, t, reg.lifetime_days
            )
            _stage_server_kit(stage / SERVER_DIR, adm, _pem_private(key), cert, t)
            _swap_in(stage, [(stage / SERVER_DIR, out / SERVER_DIR)])
            return RotateResult(
                target="server",
                kit_dir=out / SERVER_DIR,
                server_kit=out / SERVER_DIR,
                fingerprint=_cert_fingerprint(cert),
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
        server_key_pem, server_cert = _current_server_material(adm)
        entry, private = _enroll(reg, adm.ca_cert, old.name, old.organisation, old.role, key_line, t)
        _check_key_unused(reg, entry.public_key, old.name, f"public key of {target}")
        revoked_fp: str | None = None
        if entry.public_key != old.public_key:
            reg.revoked.append(
                _Revoked(
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
        _stage_node_kit(stage / "node", adm, entry, private, t)
        say("re-signing the server kit with the updated node list")
        _stage_server_kit(stage / SERVER_DIR, adm, server_key_pem, server_cert, t)
        kit_dir = out / NODES_DIR / old.name
        _swap_in(stage, [(stage / "node", kit_dir), (stage / SERVER_DIR, out / SERVER_DIR)])
        _save_registry(out, reg)
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
    key = _new_ec_key()
    line = _ssh_pub_line(key.public_key())
    atomic_write(priv, _ssh_private(key), private=True)
    atomic_write(pub, f"{line} fedguard-node\n".encode())
    return NodeIdentity(private_key=priv, public_key=pub, openssh=line, fingerprint=fingerprint_public_key(line))


# --- verification -------------------------------------------------------------------------------


def verify_kit(kit_dir: str | Path, expected_ca_fingerprint: str | None, now: dt.datetime | None = None) -> Kit:
    """Check a kit before using it; raise KitError naming what is wrong and how to fix it.

    In order: the CA certificate against ``expected_ca_fingerprint`` (the one the owner received out of
    band), the CA signature over ``manifest.json``, every file's SHA-256 (tampered, missing and unexpected
    files are all named), private key permissions, key/certificate consistency, and the validity windows of
    the CA, the server certificate and the node registration at ``now``.

    With ``expected_ca_fingerprint=None`` the kit's own CA is trusted; that proves nothing against someone
    who replaced the whole kit (they sign their manifest with their own CA). ``server start`` / ``client
    start`` must pass the pinned fingerprint; None is for tools that only inspect a kit.
    """
    return _verify(Path(kit_dir), expected_ca_fingerprint, now, check_time=True)


def _verify(kit: Path, expected: str | None, now: dt.datetime | None, *, check_time: bool) -> Kit:
    t = _now(now)
    if not kit.is_dir():
        raise KitError("kit directory not found", where=str(kit), fix="pass the directory the admin gave you")
    kit = kit.resolve()
    ca_path = kit / CA_CERT
    if not ca_path.is_file():
        raise KitError("CA certificate missing from the kit", where=str(ca_path), fix="get the kit again")
    ca_cert = _load_cert(ca_path)
    ca_fp = _cert_fingerprint(ca_cert)
    if expected is not None and _normalize_cert_fingerprint(expected) != _normalize_cert_fingerprint(ca_fp):
        raise KitError(
            f"the kit's CA is not the federation's CA: its fingerprint is {ca_fp}, expected {expected.strip()}",
            where=str(ca_path),
            fix="do not use this kit — it may have been replaced; get the kit again from the federation admin and "
            "confirm the CA fingerprint with them over a separate channel (phone, in person)",
        )

    man_path, sig_path = kit / MANIFEST, kit / MANIFEST_SIG
    for p in (man_path, sig_path):
        if not p.is_file():
            raise KitError("kit manifest missing", where=str(p), fix="get the kit again from the federation admin")
    body = man_path.read_bytes()
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
        ca_pub = ca_cert.public_key()
        if not isinstance(ca_pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        ca_pub.verify(signature, body, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise KitError(
            "the manifest signature does not verify with the kit's CA: manifest.json or manifest.sig was changed",
            where=str(man_path),
            fix="get the kit again from the federation admin",
        ) from None
    try:
        man = _Manifest.model_validate_json(body)
    except ValidationError as exc:
        raise KitError("manifest.json is not a kit manifest:\n" + format_validation_error(exc, str(man_path))) from None
    if _normalize_cert_fingerprint(man.ca_fingerprint) != _normalize_cert_fingerprint(ca_fp):
        raise KitError("the manifest names a different CA than ca.crt", where=str(man_path), fix="get the kit again")

    files, odd = _kit_files(kit)
    problems: list[str] = []
    for rel in sorted(man.files):
        if rel.startswith("/") or ".." in Path(rel).parts:
            problems.append(f"{rel}: invalid path in manifest")
        elif rel not in files:
            problems.append(f"{rel}: missing")
        elif _sha256_file(kit / rel) != man.files[rel]:
            problems.append(f"{rel}: modified (SHA-256 differs from the signed manifest)")
    problems += [f"{rel}: unexpected file (not in the signed manifest)" for rel in files if rel not in man.files]
    problems += [f"{rel}: not a regular file (kits hold only plain files)" for rel in odd]
    if problems:
        raise KitError(
            "the kit does not match its signed manifest:\n  " + "\n  ".join(problems),
            where=str(kit),
            fix="get the kit again from the federation admin; keep your own files (node.key, data) outside the kit",
        )
    if os.name == "posix":
        for rel in man.private_files:
            mode = (kit / rel).stat().st_mode
            if mode & 0o077:
                raise KitError(
                    f"private key readable by other users (mode {stat.S_IMODE(mode):04o})",
                    where=str(kit / rel),
                    fix=f"chmod 600 {kit / rel}",
                )

    role = man.participant.role
    fed_info = json.loads((kit / FEDERATION_JSON).read_text(encoding="utf-8"))
    ca_basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not ca_basic.ca:
        raise KitError("ca.crt is not a CA certificate", where=str(ca_path))
    if check_time:
        _check_window("CA certificate", ca_path, ca_cert.not_valid_before_utc, ca_cert.not_valid_after_utc, t, "ca")

    kw: dict[str, Any] = {}
    if role == "server":
        cert_path, key_path = kit / SERVER_CERT, kit / SERVER_KEY
        cert = _load_cert(cert_path)
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise KitError("server.crt was not issued by the kit's CA", where=str(cert_path)) from None
        try:
            key = _load_ec_private_pem(key_path)
        except ValueError:
            raise KitError("server.key is not a PEM private key", where=str(key_path)) from None
        if key.public_key() != cert.public_key():
            raise KitError("server.key does not match server.crt", where=str(key_path))
        if check_time:
            _check_window(
                "server certificate", cert_path, cert.not_valid_before_utc, cert.not_valid_after_utc, t, "server"
            )
        listing = json.loads((kit / NODES_JSON).read_text(encoding="utf-8"))
        kw["server_cert"], kw["server_key"] = cert_path, key_path
        kw["nodes"] = tuple(
            EnrolledNode(
                name=n["name"],
                organisation=n["organisation"],
                role=n["role"],
                public_key=n["public_key"],
                public_key_file=kit / n["public_key_file"],
                fingerprint=n["fingerprint"],
                not_after=dt.datetime.fromisoformat(n["not_after"]),
            )
            for n in listing["nodes"]
        )
        kw["revoked"] = tuple(
            RevokedKey(
                name=r["name"],
                public_key=r["public_key"],
                fingerprint=r["fingerprint"],
                revoked_at=dt.datetime.fromisoformat(r["revoked_at"]),
                reason=r["reason"],
            )
            for r in listing["revoked"]
        )
    else:
        pub_path = kit / NODE_PUB
        pub_line = _parse_pub(pub_path.read_text(encoding="utf-8"), str(pub_path), KitError)
        kw["node_public_key"] = pub_path
        if NODE_KEY in man.files:
            check_node_private_key(pub_line, kit / NODE_KEY)
            kw["node_private_key"] = kit / NODE_KEY
        if check_time:
            _check_window(
                f"registration of node {man.participant.name}",
                man_path,
                man.not_before,
                man.not_after,
                t,
                f"node {man.participant.name}",
            )

    return Kit(
        path=kit,
        role=role,
        participant=man.participant.name,
        organisation=man.participant.organisation,
        federation=man.federation,
        server_addresses=tuple(fed_info["server_addresses"]),
        homomorphic=bool(fed_info["homomorphic"]),
        ca_cert=ca_path,
        ca_fingerprint=ca_fp,
        ca_pinned=expected is not None,
        not_before=man.not_before,
        not_after=man.not_after,
        run_signing_public_key=kit / RUN_SIGNING_PUB,
        **kw,
    )


def _check_window(
    what: str, where: Path, not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, target: str
) -> None:
    if target == "ca":
        fix = (
            "the federation needs a new CA: the admin runs `fedguard provision init FEDERATION_FILE --out DIR "
            "--force` and every participant installs its new kit (see deploy/PROVISIONING.md)"
        )
    else:
        flag = "--server" if target == "server" else f"--node {target.removeprefix('node ')}"
        fix = f"the federation admin must run `fedguard provision rotate --out DIR {flag}` and send the new kit"
    span = f"valid from {_day(not_before)} to {_day(not_after)}; now is {_day(now)}"
    if now > not_after:
        raise KitError(f"{what} expired on {_day(not_after)} ({span})", where=str(where), fix=fix)
    if now < not_before:
        raise KitError(
            f"{what} is not valid yet ({span})",
            where=str(where),
            fix="check this machine's clock; if it is right, " + fix,
        )


def check_node_private_key(kit_or_public_key: Kit | str, key_path: str | Path) -> None:
    """Check a node private key before ``flower-supernode`` uses it: 0600, EC P-384, and the registered key.

    ``kit_or_public_key``: a verified node Kit (its ``node.pub``) or the registered OpenSSH line.
    """
    path = Path(key_path)
    if isinstance(kit_or_public_key, Kit):
        if kit_or_public_key.node_public_key is None:
            raise KitError("not a node kit", where=str(kit_or_public_key.path))
        expected = _parse_pub(kit_or_public_key.node_public_key.read_text(encoding="utf-8"), "node.pub", KitError)
    else:
        expected = kit_or_public_key
    if not path.is_file():
        raise KitError(
            "node private key not found",
            where=str(path),
            fix="pass the node.key made by `fedguard client init` on this node",
        )
    if mode := group_or_world_readable(path):
        raise KitError(
            f"private key readable by other users (mode {mode})",
            where=str(path),
            fix=f"chmod 600 {path}",
        )
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KitError(
            "not an unencrypted OpenSSH private key", where=str(path), fix="use the key from `fedguard client init`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise KitError("node keys must be EC P-384", where=str(path))
    if _ssh_pub_line(key.public_key()) != expected:
        raise KitError(
            "this private key is not the one registered for this node "
            f"(key {fingerprint_public_key(_ssh_pub_line(key.public_key()))}, "
            f"registered {fingerprint_public_key(expected)})",
            where=str(path),
            fix="use the key whose public half you sent to the admin, or ask the admin to rotate your registration",
        )
