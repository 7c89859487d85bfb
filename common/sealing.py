"""Seal a secret (the HE secret context) to one node's own EC P-384 key, through an untrusted relay.

DESIGN §5, key custody: the evaluator creates the HE key and sends it to each enrolled node via
the server, which must not be able to open it. Every node already has an EC P-384 authentication
key in OpenSSH format (SuperNode authentication); sealing to its public half needs no new key.

Construction (ECIES, one-pass, like HPKE's base mode with DHKEM(P-384, HKDF-SHA384)):

- an ephemeral P-384 key pair per sealed message; ECDH with the recipient's public key;
- HKDF-SHA384 over the shared secret, with ``info`` = a version label + the ephemeral public point
  + the recipient's public point (binds the key to both ends) → a 256-bit AES key;
- AES-256-GCM with a random 96-bit nonce; the associated data is the caller's ``aad`` (use
  :func:`sealing_aad`: federation, node name, HE context fingerprint) plus the whole header, so a
  sealed blob replayed to another node, federation or context fails to open.

Wire format: ``MAGIC(8) | recipient key id(32) | ephemeral point(97, uncompressed) | nonce(12) |
ciphertext+tag``. The recipient key id (SHA-256 of the OpenSSH public key blob, as ``ssh-keygen -l``
prints it) lets :func:`unseal` say "sealed for another key" instead of a bare authentication failure.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FedGuardError

__all__ = [
    "SealedForAnotherKeyError",
    "SealingError",
    "SealTamperedError",
    "key_id",
    "seal",
    "sealing_aad",
    "unseal",
]

MAGIC = b"FGSEAL01"
_INFO = b"fedguard/seal/v1 ECDH-P384 HKDF-SHA384 AES-256-GCM"
_POINT_LEN = 97  # uncompressed SEC1 point on P-384
_NONCE_LEN = 12
_HEADER_LEN = len(MAGIC) + 32 + _POINT_LEN + _NONCE_LEN
_TAG_LEN = 16


class SealingError(FedGuardError):
    """A secret cannot be sealed or opened (bad key, wrong recipient, tampering)."""

    code = "sealing-failed"


class SealedForAnotherKeyError(SealingError):
    """The sealed blob names a different recipient key than the one given to open it."""

    code = "sealed-for-another-key"


class SealTamperedError(SealingError):
    """Authentication failed: the blob, or the associated data (federation/node/fingerprint), differs."""

    code = "sealed-data-tampered"


def _load_public(public_key_openssh: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(public_key_openssh)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SealingError(
            f"not an OpenSSH public key ({exc})",
            where="node public key",
            fix="pass the node's registered key file content (ecdsa-sha2-nistp384 AAAA...)",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SealingError(
            f"node key is {type(key).__name__}, expected an EC P-384 key (ecdsa-sha2-nistp384)",
            where="node public key",
            fix="nodes authenticate with `ssh-keygen -t ecdsa -b 384` keys; use that key",
        )
    return key


def _load_private(private_key_openssh: bytes, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_ssh_private_key(private_key_openssh, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SealingError(
            f"cannot load the node's OpenSSH private key ({exc})",
            where="node private key",
            fix="pass the content of the node's authentication key file (-----BEGIN OPENSSH PRIVATE KEY-----)",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SealingError(f"node key is {type(key).__name__}, expected an EC P-384 key", where="node private key")
    return key


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return hashlib.sha256(base64.b64decode(blob)).digest()


def key_id(public_key_openssh: bytes) -> str:
    """``SHA256:<base64>`` of the key, the same string ``ssh-keygen -l`` prints."""
    digest = _key_id(_load_public(public_key_openssh))
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _derive(shared: bytes, eph_point: bytes, recipient_point: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=_INFO + eph_point + recipient_point)
    return hkdf.derive(shared)


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sealing_aad(federation: str, node: str, fingerprint: str) -> bytes:
    """Associated data binding a sealed HE context to its federation, recipient node and context.

    Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
    """
    return _length_prefixed(b"fedguard/he-context", *(s.encode("utf-8") for s in (federation, node, fingerprint)))


def seal(public_key_openssh: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` so only the holder of the node's private key can open it (see module doc)."""
    recipient = _load_public(public_key_openssh)
    eph = ec.generate_private_key(ec.SECP384R1())
    eph_point, recipient_point = _point(eph.public_key()), _point(recipient)
    key = _derive(eph.exchange(ec.ECDH(), recipient), eph_point, recipient_point)
    nonce = os.urandom(_NONCE_LEN)
    header = MAGIC + _key_id(recipient) + eph_point + nonce
    return header + AESGCM(key).encrypt(nonce, plaintext, header + aad)


def unseal(private_key_openssh: bytes, sealed: bytes, aad: bytes, *, password: bytes | None = None) -> bytes:
    """Open a blob from :func:`seal` with the node's own private key and the same ``aad``.

    Raises :class:`SealedForAnotherKeyError` when the blob was sealed to a different key, and
    :class:`SealTamperedError` when the blob or the associated data was changed.
    """
    me = _load_private(private_key_openssh, password)
    if len(sealed) < _HEADER_LEN + _TAG_LEN or not sealed.startswith(MAGIC):
        raise SealTamperedError(
            f"not a FedGuard sealed blob ({len(sealed)} bytes, bad header or truncated)",
            fix="fetch the sealed context again from the server",
        )
    header = sealed[:_HEADER_LEN]
    kid = header[len(MAGIC) : len(MAGIC) + 32]
    eph_point = header[len(MAGIC) + 32 : len(MAGIC) + 32 + _POINT_LEN]
    nonce = header[-_NONCE_LEN:]
    mine = me.public_key()
    if kid != _key_id(mine):
        raise SealedForAnotherKeyError(
            "this blob was sealed to another node's key",
            fix="the evaluator must seal the HE context to this node's registered public key",
        )
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), eph_point)
    except ValueError:
        raise SealTamperedError("the ephemeral key in the sealed blob is not a P-384 point") from None
    key = _derive(me.exchange(ec.ECDH(), eph), eph_point, _point(mine))
    try:
        return AESGCM(key).decrypt(nonce, sealed[_HEADER_LEN:], header + aad)
    except InvalidTag:
        raise SealTamperedError(
            "the sealed blob does not authenticate: it was modified, or the federation / node / context "
            "fingerprint it is bound to differs from the one given",
            fix="check the federation name, node name and context fingerprint; fetch the blob again",
        ) from None
