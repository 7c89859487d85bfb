"""Node keys: the one place that loads, checks, makes and fingerprints a node's EC P-384 key.

Every node authenticates to the SuperLink, signs its replies, seals the HE key and signs ledger
exports with one EC P-384 key in OpenSSH format (``flower-supernode`` reads it with
``load_ssh_private_key``). Loading it anywhere else let each caller decide what to accept; here
every load refuses the same things with the same message: which file, what the key is instead
(an RSA key, a P-256 key, garbage), and how to make the right one.

Fingerprints are ``SHA256:`` + unpadded base64 of the SHA-256 of the OpenSSH key blob, exactly
what ``ssh-keygen -lf node.pub`` prints, so owners can cross-check with the usual tool.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from common.errors import FedGuardError
from common.files import group_or_world_readable
from common.kit.errors import NodeKeyError, ProvisionError

__all__ = [
    "NodeKeyError",
    "describe_key",
    "fingerprint_public_key",
    "generate_node_key",
    "load_node_private_key",
    "load_node_public_key",
    "load_run_signing_key",
    "load_run_verify_key",
    "looks_like_key_line",
    "node_private_bytes",
    "node_public_line",
    "parse_node_public_key",
    "public_line",
]

_KEYGEN_FIX = "generate one with `fedguard client init` (or `ssh-keygen -t ecdsa -b 384 -N ''`)"
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}

Source = bytes | str | Path


def describe_key(key: object) -> str:
    """What a key is, for messages: ``an RSA key``, ``a P-256 key``, ``an Ed25519 key``."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"a {_CURVES.get(key.curve.name, key.curve.name)} key"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "an Ed448 key"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "a DSA key"
    return f"a {type(key).__name__}"


def _is_p384(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP384R1
    )


def _read(path: Path, what: str, where: str, error: type[FedGuardError]) -> bytes:
    """The file's bytes; a message that names the file even when ``where`` is a config field."""
    named = what if where == str(path) else f"{what} {path}"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{named} not found", where=where, fix=f"pass the right file, or {_KEYGEN_FIX}") from None
    except OSError as exc:
        raise error(f"{named} not readable ({exc.strerror or type(exc).__name__})", where=where) from None


def looks_like_key_line(value: str) -> bool:
    """True for an OpenSSH key line or PEM text, False for what is probably a file path."""
    return value.lstrip().startswith(("ecdsa-sha2-", "ssh-", "sk-", "-----BEGIN"))


def load_node_private_key(
    source: bytes | Path | str,
    *,
    where: str | None = None,
    error: type[FedGuardError] = NodeKeyError,
    password: bytes | None = None,
    private_file: bool = False,
) -> ec.EllipticCurvePrivateKey:
    """A node's private key: an (unencrypted) OpenSSH private key on EC P-384, or ``error``.

    ``source`` is the key file (a ``Path`` or a path string) or its content (bytes). With
    ``private_file`` the file must also be unreadable by group and others, like ssh requires.
    ``error`` lets a caller keep its own error class (every message is the same).
    """
    if isinstance(source, bytes | bytearray):
        data, where = bytes(source), where or "node private key"
    else:
        path = Path(source)
        where = where or str(path)
        data = _read(path, "node private key", where, error)
        if private_file and (mode := group_or_world_readable(path)):
            raise error(f"private key readable by other users (mode {mode})", where=where, fix=f"chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(data, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        hint = " (it is a PEM key, not OpenSSH)" if b"-----BEGIN OPENSSH" not in data and b"-----BEGIN" in data else ""
        raise error(
            f"not an unencrypted OpenSSH private key{hint}: {exc}",
            where=where,
            fix=f"use the node's own key file (-----BEGIN OPENSSH PRIVATE KEY-----); {_KEYGEN_FIX}",
        ) from None
    _require_p384(key, where, error)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _require_p384(key: object, where: str, error: type[FedGuardError]) -> None:
    if not _is_p384(key):
        raise error(
            f"node keys must be EC P-384 (ecdsa-sha2-nistp384); this is {describe_key(key)}",
            where=where,
            fix=_KEYGEN_FIX,
        )


def load_node_public_key(
    source: Source,
    *,
    where: str | None = None,
    error: type[FedGuardError] = NodeKeyError,
) -> ec.EllipticCurvePublicKey:
    """A node's public key on EC P-384: an OpenSSH line, PEM SubjectPublicKeyInfo (as the SuperLink
    reports keys), or the path of a file holding either; anything else raises ``error``."""
    if isinstance(source, Path) or (isinstance(source, str) and not looks_like_key_line(source)):
        path = Path(source)
        where = where or str(path)
        data = _read(path, "public key file", where, error)
    else:
        data = source.encode() if isinstance(source, str) else bytes(source)
        where = where or "node public key"
    text = data.strip()
    try:
        if text.startswith(b"-----"):
            key: object = serialization.load_pem_public_key(text)
        else:
            key = serialization.load_ssh_public_key(text.split(b"\n")[0].strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise error(
            "not an OpenSSH public key (nor a PEM public key)",
            where=where,
            fix="use the node.pub printed by `fedguard client init` (it starts with 'ecdsa-sha2-nistp384 ')",
        ) from None
    _require_p384(key, where, error)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def public_line(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """The canonical OpenSSH line (no comment) of a key, as kits and registries store it."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def node_public_line(source: Source, *, where: str | None = None, error: type[FedGuardError] = NodeKeyError) -> str:
    """Canonical OpenSSH line of a P-384 node key given as a line, PEM or file (see :func:`load_node_public_key`)."""
    return public_line(load_node_public_key(source, where=where, error=error))


def parse_node_public_key(value: str | Path, where: str = "public key") -> str:
    """An OpenSSH key line or the path of a .pub file → canonical P-384 key line (raises ProvisionError)."""
    return node_public_line(value if isinstance(value, Path) else value.strip(), where=where, error=ProvisionError)


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


def generate_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh node key (EC P-384), the only kind the SuperLink registers for FedGuard."""
    return ec.generate_private_key(ec.SECP384R1())


def node_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as ``flower-supernode`` reads it: unencrypted OpenSSH PEM (the file is written 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


# --- the admin's run-signing key (Ed25519; not a node key, but loaded here so all key rules live in one file) ---


def load_run_signing_key(path: str | Path, *, error: type[FedGuardError]) -> ed25519.Ed25519PrivateKey:
    """The admin's run-signing key, ``admin/run-signing.key``: PKCS#8 PEM, Ed25519, unencrypted."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise error("run-signing key not found", where=str(p), fix="pass admin/run-signing.key") from None
    except OSError as exc:
        raise error(f"run-signing key not readable ({exc.strerror or type(exc).__name__})", where=str(p)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise error(
            f"not a PEM private key: {exc}", where=str(p), fix="use the federation's admin/run-signing.key"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise error(
            f"not an Ed25519 key; this is {describe_key(key)}",
            where=str(p),
            fix="use the federation's admin/run-signing.key",
        )
    return key


def load_run_verify_key(path: str | Path, *, error: type[FedGuardError]) -> ed25519.Ed25519PublicKey:
    """The run-signing public key pinned in every kit, ``run-signing.pub`` (OpenSSH, Ed25519)."""
    p = Path(path)
    try:
        key = serialization.load_ssh_public_key(p.read_bytes().split(b"\n")[0])
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise error(f"cannot read the pinned run-signing key: {exc}", where=str(p)) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise error(f"the pinned run-signing key is not Ed25519; it is {describe_key(key)}", where=str(p))
    return key
