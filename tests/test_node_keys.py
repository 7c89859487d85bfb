"""One loader for node keys: only EC P-384 in OpenSSH form, and every refusal names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from client.supernode import SuperNodeError, check_private_key
from common.errors import FedGuardError
from common.kit import KitError, NodeKeyError, check_node_private_key
from common.kit.keys import (
    fingerprint_public_key,
    load_node_private_key,
    load_node_public_key,
    node_public_line,
    public_line,
)
from common.ledger_export import ExportError, public_openssh
from common.reply_signing import key_fingerprint
from common.sealing import SealingError, seal, unseal
from tests.helpers import node_keypair

pytestmark = pytest.mark.timeout(60)

_OPENSSH = (serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def wrong_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Private key files that are not node keys, with what the message must call them."""
    d = tmp_path_factory.mktemp("keys")
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(*_OPENSSH)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(*_OPENSSH)
    pem384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "p256": (_write(d / "p256.key", p256), "a P-256 key"),
        "rsa": (_write(d / "rsa.key", rsa_key), "an RSA key"),
        "garbage": (_write(d / "garbage.key", b"\x00\x01 not a key at all \xff"), "not an unencrypted OpenSSH"),
        "pem": (_write(d / "pkcs8.key", pem384), "PEM key, not OpenSSH"),
    }


@pytest.mark.parametrize("kind", ["p256", "rsa", "garbage", "pem"])
def test_every_node_key_load_refuses_the_wrong_key_naming_the_file(wrong_keys, kind: str) -> None:
    path, what = wrong_keys[kind]
    with pytest.raises(NodeKeyError) as exc:
        load_node_private_key(path)
    msg = str(exc.value)
    assert str(path) in msg and what in msg and "fedguard client init" in msg
    if kind in ("p256", "rsa"):
        assert "must be EC P-384" in msg
    # the same rule, the same words, through each place a node key is used
    with pytest.raises(SuperNodeError, match=what) as sn:
        check_private_key(path)
    assert str(path) in str(sn.value)
    _, pub = node_keypair()
    with pytest.raises(KitError, match=what) as kit:
        check_node_private_key(pub.decode(), path)
    assert str(path) in str(kit.value)
    with pytest.raises(SealingError, match=what):
        unseal(path.read_bytes(), b"", b"")
    with pytest.raises(ExportError, match=what):
        public_openssh(path.read_bytes())


def test_wrong_public_keys_are_refused_with_what_they_are(tmp_path: Path) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    cases = {
        "a P-256 key": p256.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "an Ed25519 key": ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "an RSA key": rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "not an OpenSSH public key": b"ecdsa-sha2-nistp384 AAAA-garbage",
    }
    for what, data in cases.items():
        f = tmp_path / "node.pub"
        f.write_bytes(data)
        with pytest.raises(NodeKeyError, match=what) as exc:
            load_node_public_key(f)
        assert str(f) in str(exc.value)
        with pytest.raises(SealingError, match=what):
            seal(data, b"x", b"")
        with pytest.raises(ValueError, match=what):  # the server's reply checks treat it as a bad input
            key_fingerprint(data)
    with pytest.raises(NodeKeyError, match="public key file .*missing.pub not found"):
        node_public_line(str(tmp_path / "missing.pub"), where="federation.toml: nodes.0.public_key")


def test_a_p384_node_key_loads_the_same_everywhere(tmp_path: Path) -> None:
    priv, pub = node_keypair()
    key_file = _write(tmp_path / "node.key", priv)
    key = load_node_private_key(key_file, private_file=True)
    assert public_line(key) == node_public_line(pub) == public_openssh(priv)
    pem = load_node_public_key(pub).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key_fingerprint(pem) == key_fingerprint(pub) == fingerprint_public_key(pub.decode())
    check_private_key(key_file)
    check_node_private_key(pub.decode().strip(), key_file)
    key_file.chmod(0o644)
    with pytest.raises(FedGuardError, match="readable by other users"):
        load_node_private_key(key_file, private_file=True)
    with pytest.raises(NodeKeyError, match="node private key not found"):
        load_node_private_key(tmp_path / "nope.key")


_ROOT = Path(__file__).resolve().parents[1]
_KEY_PARSERS = {"load_ssh_private_key", "load_ssh_public_key", "load_pem_private_key", "load_pem_public_key"}


def test_keys_are_parsed_only_in_the_kit_package() -> None:
    """A new key load elsewhere would bring back its own rules; it must go through common/kit/keys.py."""
    import ast

    allowed = {"common/kit/keys.py", "common/kit/certs.py"}  # node + run-signing keys; CA/TLS keys
    offenders = []
    for package in ("common", "client", "server", "fedguard"):
        for path in sorted((_ROOT / package).rglob("*.py")):
            rel = path.relative_to(_ROOT).as_posix()
            if rel in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
                if isinstance(node, ast.alias):
                    name = node.name
                if name in _KEY_PARSERS:
                    offenders.append(f"{rel}:{node.lineno}: {name}")
    assert not offenders, "parse keys with common.kit.keys instead:\n" + "\n".join(offenders)


def test_nodes_and_the_server_never_import_the_admins_provisioning() -> None:
    import ast

    offenders = []
    for package in ("common", "client", "server"):
        for path in sorted((_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [f"{path.relative_to(_ROOT)}: {m}" for m in mods if m.startswith("fedguard.provisioning")]
    assert not offenders, "\n".join(offenders)
