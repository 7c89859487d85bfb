"""Seal a secret (the HE secret context) to one node's own EC P-384 key, through an untrusted relay.

Key custody (docs/security.md): the evaluator creates the HE key and sends it to each enrolled node via
the server, which must not be able to open it. Every node already has an EC P-384 authentication
key in OpenSSH format (SuperNode authentication); sealing to its public half needs no new key.

Format version 2 (what :func:`seal` writes) is standard HPKE, RFC 9180, base mode, single shot, as
``cryptography`` ships it: DHKEM(P-384, HKDF-SHA384), HKDF-SHA384, AES-256-GCM. The HPKE ``info``
(authenticated, RFC 9180 §8.1 for single-shot use) binds a version label, the blob's header and
the caller's ``aad`` (use :func:`sealing_aad`: federation, node name, HE context fingerprint), so
a blob replayed to another node, federation or context fails to open.

Wire format: ``MAGIC(8) | recipient key id(32) | HPKE enc(97) | ciphertext+tag``, with MAGIC
``FGSEAL02``. The recipient key id (SHA-256 of the OpenSSH public key blob, as ``ssh-keygen -l``
prints it) lets :func:`unseal` say "sealed for another key" instead of a bare authentication failure.

Format version 1 (``FGSEAL01``, a hand-made ECIES: ephemeral ECDH P-384, HKDF-SHA384 with both
points in ``info``, AES-256-GCM with the header and ``aad`` as associated data; layout
``MAGIC | key id(32) | ephemeral point(97) | nonce(12) | ciphertext+tag``) is still opened, so
bundles sealed before the switch keep working; nothing writes it any more.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FedGuardError
from common.kit.keys import load_node_private_key, load_node_public_key

__all__ = [
    "FORMAT_VERSION",
    "SealedForAnotherKeyError",
    "SealingError",
    "SealTamperedError",
    "format_version",
    "key_id",
    "recipient_key_id",
    "seal",
    "sealing_aad",
    "unseal",
]

#: The format :func:`seal` writes; :func:`unseal` opens this and every earlier one.
FORMAT_VERSION = 2
MAGIC_V1 = b"FGSEAL01"
MAGIC_V2 = b"FGSEAL02"
MAGIC = MAGIC_V2
_MAGICS = {MAGIC_V1: 1, MAGIC_V2: 2}
_MAGIC_LEN = 8
_KID_LEN = 32
_POINT_LEN = 97  # uncompressed SEC1 point on P-384 (also the HPKE enc of DHKEM(P-384))
_TAG_LEN = 16

# version 2: RFC 9180 HPKE
_SUITE = Suite(KEM.P384, KDF.HKDF_SHA384, AEAD.AES_256_GCM)
_INFO_V2 = b"fedguard/seal/v2 HPKE DHKEM(P-384,HKDF-SHA384) HKDF-SHA384 AES-256-GCM"

# version 1: the hand-made ECIES, opened for bundles sealed before version 2
_INFO_V1 = b"fedguard/seal/v1 ECDH-P384 HKDF-SHA384 AES-256-GCM"
_NONCE_LEN_V1 = 12


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
    return load_node_public_key(bytes(public_key_openssh), where="node public key", error=SealingError)


def _load_private(private_key_openssh: bytes, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    return load_node_private_key(
        bytes(private_key_openssh), where="node private key", error=SealingError, password=password
    )


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return hashlib.sha256(base64.b64decode(blob)).digest()


def _kid_text(kid: bytes) -> str:
    return "SHA256:" + base64.b64encode(kid).decode("ascii").rstrip("=")


def key_id(public_key_openssh: bytes) -> str:
    """``SHA256:<base64>`` of the key, the same string ``ssh-keygen -l`` prints."""
    return _kid_text(_key_id(_load_public(public_key_openssh)))


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sealing_aad(federation: str, node: str, fingerprint: str) -> bytes:
    """Associated data binding a sealed HE context to its federation, recipient node and context.

    Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
    """
    return _length_prefixed(b"fedguard/he-context", *(s.encode("utf-8") for s in (federation, node, fingerprint)))


def format_version(sealed: bytes) -> int:
    """The format version a sealed blob was written in (1 or 2); SealTamperedError if it is none."""
    version = _MAGICS.get(bytes(sealed[:_MAGIC_LEN]))
    if version is None:
        newer = sealed.startswith(b"FGSEAL")
        raise SealTamperedError(
            f"not a FedGuard sealed blob ({len(sealed)} bytes, "
            + ("a newer format than this FedGuard opens)" if newer else "bad header)"),
            fix="upgrade FedGuard on this node" if newer else "fetch the sealed context again from the server",
        )
    return version


def recipient_key_id(sealed: bytes) -> str:
    """The recipient key ``SHA256:...`` a sealed blob names (unauthenticated until it opens)."""
    format_version(sealed)
    if len(sealed) < _MAGIC_LEN + _KID_LEN:
        raise SealTamperedError("the sealed blob is truncated before its recipient key id")
    return _kid_text(bytes(sealed[_MAGIC_LEN : _MAGIC_LEN + _KID_LEN]))


def seal(public_key_openssh: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` so only the holder of the node's private key can open it (format version 2)."""
    recipient = _load_public(public_key_openssh)
    header = MAGIC_V2 + _key_id(recipient)
    return header + _SUITE.encrypt(plaintext, recipient, info=_INFO_V2 + _length_prefixed(header, aad))


def unseal(private_key_openssh: bytes, sealed: bytes, aad: bytes, *, password: bytes | None = None) -> bytes:
    """Open a blob from :func:`seal` (any format version) with the node's own private key and the same ``aad``.

    Raises :class:`SealedForAnotherKeyError` when the blob was sealed to a different key, and
    :class:`SealTamperedError` when the blob or the associated data was changed.
    """
    me = _load_private(private_key_openssh, password)
    sealed = bytes(sealed)
    version = format_version(sealed)
    if len(sealed) < _MAGIC_LEN + _KID_LEN + _POINT_LEN + _TAG_LEN + (_NONCE_LEN_V1 if version == 1 else 0):
        raise SealTamperedError(
            f"not a FedGuard sealed blob ({len(sealed)} bytes, truncated)",
            fix="fetch the sealed context again from the server",
        )
    if sealed[_MAGIC_LEN : _MAGIC_LEN + _KID_LEN] != _key_id(me.public_key()):
        raise SealedForAnotherKeyError(
            "this blob was sealed to another node's key",
            fix="the evaluator must seal the HE context to this node's registered public key",
        )
    try:
        if version == 1:
            return _open_v1(me, sealed, aad)
        header, body = sealed[: _MAGIC_LEN + _KID_LEN], sealed[_MAGIC_LEN + _KID_LEN :]
        return _SUITE.decrypt(body, me, info=_INFO_V2 + _length_prefixed(header, aad))
    except (InvalidTag, ValueError):
        raise SealTamperedError(
            "the sealed blob does not authenticate: it was modified, or the federation / node / context "
            "fingerprint it is bound to differs from the one given",
            fix="check the federation name, node name and context fingerprint; fetch the blob again",
        ) from None


def _open_v1(me: ec.EllipticCurvePrivateKey, sealed: bytes, aad: bytes) -> bytes:
    """Format version 1 (hand-made ECIES), kept only to open bundles sealed before HPKE."""
    header_len = _MAGIC_LEN + _KID_LEN + _POINT_LEN + _NONCE_LEN_V1
    header = sealed[:header_len]
    eph_point = header[_MAGIC_LEN + _KID_LEN : _MAGIC_LEN + _KID_LEN + _POINT_LEN]
    nonce = header[-_NONCE_LEN_V1:]
    eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), eph_point)  # ValueError: tampered
    hkdf = HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=_INFO_V1 + eph_point + _point(me.public_key()))
    key = hkdf.derive(me.exchange(ec.ECDH(), eph))
    return AESGCM(key).decrypt(nonce, sealed[header_len:], header + aad)
