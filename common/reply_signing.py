"""Signed replies: a node signs every reply with its authentication key; the server verifies.

Flower's SuperNode authentication signs a timestamp per request, not the message body, and a
TLS-terminating gateway sees plaintext. So each node signs, with the same EC P-384 key the
SuperLink registered, a digest over the Flower run id, the round, the id of the message it
answers and the content hash (Flower's ``object_id``) of every record. A reply replayed for
another message, altered in transit or sent by another key fails verification.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

from common.kit.keys import fingerprint_public_key, load_node_private_key, public_line
from common.kit.keys import load_node_public_key as _load_public
from common.records import SIGNATURE, SIGNATURE_VALUE

_DOMAIN = b"fedguard-reply/1"


def reply_digest(run_id: int, round_: int | None, reply_to: str, content: RecordDict) -> bytes:
    """SHA-384 over the run, round, answered message and every record except the signature."""
    h = hashlib.sha384(_DOMAIN)
    for part in (str(int(run_id)), "-" if round_ is None else str(int(round_)), reply_to):
        h.update(b"\n" + part.encode())
    for name in sorted(k for k in content.keys() if k != SIGNATURE):
        h.update(b"\n" + name.encode() + b"=" + content[name].object_id.encode())
    return h.digest()


def _private_key(private_openssh: bytes) -> ec.EllipticCurvePrivateKey:
    return load_node_private_key(bytes(private_openssh), where="node authentication key")


def sign_reply(content: RecordDict, private_openssh: bytes, run_id: int, round_: int | None, reply_to: str) -> None:
    """Add the signature record to ``content`` (in place)."""
    digest = reply_digest(run_id, round_, reply_to, content)
    sig = _private_key(private_openssh).sign(digest, ec.ECDSA(hashes.SHA384()))
    content[SIGNATURE] = ConfigRecord({SIGNATURE_VALUE: base64.b64encode(sig).decode()})


def load_node_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """The key as the SuperLink reports it (PEM SubjectPublicKeyInfo) or as an OpenSSH line.

    Raises :class:`~common.kit.errors.NodeKeyError` (also a ``ValueError``) unless it is EC P-384.
    """
    return _load_public(bytes(data))


def key_fingerprint(public_key: bytes) -> str:
    """``SHA256:...`` (ssh-keygen style) of a node key as the SuperLink reports it, to match kit entries."""
    return fingerprint_public_key(public_line(load_node_public_key(public_key)))


def verify_reply(content: RecordDict, public_key: bytes, run_id: int, round_: int | None, reply_to: str) -> str | None:
    """None if the reply is signed by ``public_key`` for this run, round and message; else why not."""
    if SIGNATURE not in content:
        return "unsigned reply"
    try:
        sig = base64.b64decode(str(content[SIGNATURE][SIGNATURE_VALUE]), validate=True)
        key = load_node_public_key(public_key)
    except (KeyError, ValueError, TypeError) as exc:
        return f"unreadable signature or node key ({type(exc).__name__})"
    try:
        key.verify(sig, reply_digest(run_id, round_, reply_to, content), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return "bad reply signature (altered, replayed for another message, or signed by another key)"
    return None
