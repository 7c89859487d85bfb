"""Sealing the HE key to a node's P-384 key: HPKE (RFC 9180) now, and bundles sealed before still open."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from common import he_custody as hc
from common.kit.keys import load_node_private_key
from common.sealing import (
    FORMAT_VERSION,
    SealedForAnotherKeyError,
    SealTamperedError,
    format_version,
    key_id,
    recipient_key_id,
    seal,
    sealing_aad,
    unseal,
)
from tests.helpers import node_keypair

pytestmark = pytest.mark.timeout(60)

# Sealed with the format-1 code (hand-made ECIES, FGSEAL01) as it was before the switch to HPKE.
V1_PRIVATE = b"""-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAiAAAABNl
Y2RzYS1zaGEyLW5pc3RwMzg0AAAACG5pc3RwMzg0AAAAYQTYKHnhQMs+Y1cysZEH
IosxzdEpYdaywHWFDNXN1S1M70bVLgQiL+UcBEesOwouxP8bFsg3Mbp/5j3BxZap
Bm5iLRAu8AqX6hioghrug5kOsqgtAyeRFmECNUuUxE/k9E4AAADQ6d9na+nfZ2sA
AAATZWNkc2Etc2hhMi1uaXN0cDM4NAAAAAhuaXN0cDM4NAAAAGEE2Ch54UDLPmNX
MrGRByKLMc3RKWHWssB1hQzVzdUtTO9G1S4EIi/lHARHrDsKLsT/GxbINzG6f+Y9
wcWWqQZuYi0QLvAKl+oYqIIa7oOZDrKoLQMnkRZhAjVLlMRP5PROAAAAMH5Ooply
QVRz0ElWJKF759SGNpOL9kf1sN38jwtl4TU9abPjYrc6/ZpeEKwfUUm+1QAAAAAB
AgMEBQYHCA==
-----END OPENSSH PRIVATE KEY-----
"""
V1_PUBLIC = (
    b"ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBNgoeeFAyz5jVzKxkQciizHN0Slh1rLAdYUM"
    b"1c3VLUzvRtUuBCIv5RwER6w7Ci7E/xsWyDcxun/mPcHFlqkGbmItEC7wCpfqGKiCGu6DmQ6yqC0DJ5EWYQI1S5TET+T0Tg=="
)
V1_SEALED = base64.b64decode(
    "RkdTRUFMMDEdVazr9yr8Ym57vg+uHKUeapmkq+mrYibr6RN0Imjn5ARluoIdS5+UcHeBZopSXJ4xLltdUY1+0+4TdMsT66AKV776pYETiwot"
    "OifZPyZIUeNG7lyHjhVCQjRsrrEcLDhuNC+xHwAWDEJgeduqEVEo8I30DKBWSecSHgMJUKWdYVJluCFcEuDw8nwE8YNKmCSP5TP6Y1PHXfSr"
    "MCoxMPBdGtnujocQkvUD2kH20D+xwtBWSR8R1JjgLq2DHg8mz70DUBmKbpwcjWn+E5Fv"
)
V1_AAD = sealing_aad("hospitals", "alpha", "sha256:" + "ab" * 32)
V1_PLAINTEXT = b"HE secret context sealed by FedGuard before HPKE"


def test_a_bundle_sealed_in_format_1_still_opens() -> None:
    assert format_version(V1_SEALED) == 1
    assert unseal(V1_PRIVATE, V1_SEALED, V1_AAD) == V1_PLAINTEXT
    assert recipient_key_id(V1_SEALED) == key_id(V1_PUBLIC)
    # the HE bundle's envelope still names its recipient
    envelope = hc._envelope("hospitals", "alpha", "sha256:" + "ab" * 32, V1_SEALED)
    assert hc.sealed_header(envelope)[3] == key_id(V1_PUBLIC)
    with pytest.raises(SealTamperedError):
        unseal(V1_PRIVATE, V1_SEALED, sealing_aad("hospitals", "beta", "sha256:" + "ab" * 32))
    tampered = bytearray(V1_SEALED)
    tampered[-5] ^= 1
    with pytest.raises(SealTamperedError):
        unseal(V1_PRIVATE, bytes(tampered), V1_AAD)


def test_format_2_is_standard_hpke_and_round_trips() -> None:
    priv, pub = node_keypair()
    aad = sealing_aad("fed", "alpha", "sha256:01")
    sealed = seal(pub, b"the HE secret context", aad)
    assert FORMAT_VERSION == 2 and format_version(sealed) == 2 and sealed.startswith(b"FGSEAL02")
    assert recipient_key_id(sealed) == key_id(pub)
    assert unseal(priv, sealed, aad) == b"the HE secret context"
    # what follows the header is a plain RFC 9180 single-shot ciphertext (enc || ct): any HPKE
    # implementation with DHKEM(P-384, HKDF-SHA384), HKDF-SHA384, AES-256-GCM opens it with the same info
    header, body = sealed[:40], sealed[40:]
    info = b"fedguard/seal/v2 HPKE DHKEM(P-384,HKDF-SHA384) HKDF-SHA384 AES-256-GCM"
    info += len(header).to_bytes(4, "big") + header + len(aad).to_bytes(4, "big") + aad
    suite = Suite(KEM.P384, KDF.HKDF_SHA384, AEAD.AES_256_GCM)
    assert suite.decrypt(body, load_node_private_key(priv), info=info) == b"the HE secret context"


@pytest.mark.parametrize("where", ["header key id", "enc", "ciphertext", "tag", "magic"])
def test_tampered_format_2_is_refused(where: str) -> None:
    priv, pub = node_keypair()
    aad = sealing_aad("fed", "alpha", "sha256:01")
    sealed = bytearray(seal(pub, b"secret", aad))
    offset = {"header key id": 20, "enc": 40 + 10, "ciphertext": -20, "tag": -1, "magic": 7}[where]
    sealed[offset] ^= 1
    expected = SealedForAnotherKeyError if where == "header key id" else SealTamperedError
    with pytest.raises(expected):
        unseal(priv, bytes(sealed), aad)


def test_a_newer_format_is_named_as_such() -> None:
    priv, pub = node_keypair()
    sealed = b"FGSEAL09" + seal(pub, b"x", b"")[8:]
    with pytest.raises(SealTamperedError, match="newer format"):
        unseal(priv, sealed, b"")
