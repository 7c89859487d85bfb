"""Certificates and the PEM keys next to them: load, fingerprint, compare.

Fingerprints are the SHA-256 of the DER encoding as upper-case hex pairs joined by colons,
``AB:CD:...``, what ``openssl x509 -in ca.crt -noout -fingerprint -sha256`` prints; colons, case
and an ``sha256 Fingerprint=`` prefix are ignored when comparing, so owners can paste either.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.kit.errors import KitError

__all__ = [
    "cert_fingerprint",
    "fingerprint_cert",
    "load_cert",
    "load_ec_private_pem",
    "normalize_cert_fingerprint",
    "pem_cert",
]


def cert_fingerprint(cert: x509.Certificate) -> str:
    """``AB:CD:...`` SHA-256 fingerprint of a loaded certificate."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_cert(path: Path) -> x509.Certificate:
    """A PEM certificate, or a KitError naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KitError("certificate file missing", where=str(path)) from None
    except ValueError:
        raise KitError("not a PEM certificate", where=str(path)) from None


def fingerprint_cert(path: str | Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, ``AB:CD:...`` (as ``openssl x509 -fingerprint -sha256``)."""
    return cert_fingerprint(load_cert(Path(path)))


def normalize_cert_fingerprint(value: str) -> str:
    """64 lower-case hex digits of a fingerprint however it was written; KitError if it is not one."""
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


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ec_private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    """The CA or server TLS key (PKCS#8 PEM, EC). Raises ValueError/OSError for callers to word."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError("expected an EC private key", where=str(path))
    return key
