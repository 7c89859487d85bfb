"""Provisioning: what an admin and a node owner notice — kits, key files, refusals, and TLS that works."""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

import fedguard.provisioning.workflows as kitmod
from common.errors import ConfigError, FedGuardError
from common.kit import (
    KitError,
    ProvisionError,
    check_node_private_key,
    fingerprint_cert,
    fingerprint_public_key,
    load_federation,
    verify_kit,
)
from fedguard.provision import add_client_init, add_provision_commands
from fedguard.provisioning import ProvisionResult, add_node, init_federation, init_node_keys, rotate

pytestmark = pytest.mark.timeout(60)

FEDERATION = """\
name = "hospitals"
homomorphic = true
lifetime_days = {lifetime}

[server]
addresses = ["localhost", "127.0.0.1", "fl.example.org", "10.0.0.5"]

[[nodes]]
name = "alpha"
organisation = "Alpha Hospital"
role = "client"

[[nodes]]
name = "eval"
organisation = "Ethics Board"
role = "evaluator"
"""


def write_federation(path: Path, lifetime: int = 365, extra: str = "") -> Path:
    path.write_text(FEDERATION.format(lifetime=lifetime) + extra, encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(argv: list[str]) -> int:
    """What fedguard/cli.py's main does with these commands: FedGuardError → exit 2, no trace."""
    parser = argparse.ArgumentParser(prog="fedguard")
    sub = parser.add_subparsers(dest="command", required=True)
    add_provision_commands(sub)
    client = sub.add_parser("client")
    add_client_init(client.add_subparsers(dest="client_command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedGuardError as exc:
        print(f"fedguard: error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture
def fed_file(tmp_path: Path) -> Path:
    return write_federation(tmp_path / "federation.toml")


@pytest.fixture
def prov(tmp_path: Path, fed_file: Path) -> ProvisionResult:
    return init_federation(fed_file, tmp_path / "out", generate_node_keys=True)


# --- kits and files ---------------------------------------------------------------------------------


def test_init_writes_admin_server_and_node_kits(prov: ProvisionResult) -> None:
    out = prov.out_dir
    assert set(snapshot(out / "admin")) == {"ca.key", "ca.crt", "run-signing.key", "run-signing.pub", "registry.json"}
    assert set(snapshot(out / "server")) == {
        "ca.crt",
        "server.crt",
        "server.key",
        "run-signing.pub",
        "federation.json",
        "nodes.json",
        "enrolled/alpha.pub",
        "enrolled/eval.pub",
        "manifest.json",
        "manifest.sig",
    }
    for name in ("alpha", "eval"):
        assert set(snapshot(out / "nodes" / name)) == {
            "ca.crt",
            "node.key",
            "node.pub",
            "run-signing.pub",
            "federation.json",
            "manifest.json",
            "manifest.sig",
        }
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging leftovers"

    server = verify_kit(out / "server", prov.ca_fingerprint)
    assert server.role == "server" and server.ca_pinned and server.homomorphic
    assert {(n.name, n.role) for n in server.nodes} == {("alpha", "client"), ("eval", "evaluator")}
    assert all(n.public_key_file.read_text().startswith(n.public_key) for n in server.nodes)
    node = verify_kit(out / "nodes" / "eval", prov.ca_fingerprint)
    assert (node.role, node.participant, node.organisation) == ("evaluator", "eval", "Ethics Board")
    assert node.server_addresses == ("localhost", "127.0.0.1", "fl.example.org", "10.0.0.5")
    # the run-signing key is pinned, identically, in every kit; its private half stays in admin/
    pinned = (out / "admin" / "run-signing.pub").read_bytes()
    assert server.run_signing_public_key.read_bytes() == pinned == node.run_signing_public_key.read_bytes()
    assert pinned.startswith(b"ssh-ed25519 ")


def test_ca_and_run_signing_private_keys_never_enter_a_kit(prov: ProvisionResult) -> None:
    out = prov.out_dir
    secrets = [(out / "admin" / "ca.key").read_bytes(), (out / "admin" / "run-signing.key").read_bytes()]
    for kit in [out / "server", *(out / "nodes").iterdir()]:
        for rel, (data, _mode) in snapshot(kit).items():
            assert "ca.key" not in rel and "run-signing.key" not in rel
            assert all(s not in data for s in secrets)


def test_private_key_files_are_0600(prov: ProvisionResult, tmp_path: Path) -> None:
    out = prov.out_dir
    ident = init_node_keys(tmp_path / "nodework")
    keys = [
        out / "admin" / "ca.key",
        out / "admin" / "run-signing.key",
        out / "server" / "server.key",
        out / "nodes" / "alpha" / "node.key",
        out / "nodes" / "eval" / "node.key",
        ident.private_key,
    ]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((out / "admin").stat().st_mode) == 0o700


def test_node_key_is_openssh_p384_and_matches_registration(prov: ProvisionResult, tmp_path: Path) -> None:
    kit = verify_kit(prov.node_kits["alpha"], prov.ca_fingerprint)
    assert kit.node_private_key is not None and kit.node_public_key is not None
    key = load_ssh_private_key(kit.node_private_key.read_bytes(), password=None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    pub = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    assert kit.node_public_key.read_text().split()[:2] == pub.split()
    check_node_private_key(kit, kit.node_private_key)
    # another node's key is refused by name of the problem
    with pytest.raises(KitError, match="not the one registered"):
        check_node_private_key(kit, prov.node_kits["eval"] / "node.key")


def test_server_certificate_sans_usage_and_issuer(prov: ProvisionResult) -> None:
    cert = x509.load_pem_x509_certificate((prov.server_kit / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((prov.server_kit / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"


def test_fingerprints_match_openssl_and_ssh_keygen(prov: ProvisionResult) -> None:
    ca = prov.admin_dir / "ca.crt"
    pub = prov.node_kits["alpha"] / "node.pub"
    assert fingerprint_public_key(pub.read_text()) == prov.node_fingerprints["alpha"]
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "x509", "-in", str(ca), "-noout", "-fingerprint", "-sha256"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        assert out.strip().split("=", 1)[1] == fingerprint_cert(ca) == prov.ca_fingerprint
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True, timeout=10)
        assert out.stdout.split()[1] == fingerprint_public_key(pub.read_text())


# --- never overwrite silently -------------------------------------------------------------------------


def test_second_init_without_force_fails_and_leaves_kits_byte_identical(
    prov: ProvisionResult, fed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(prov.out_dir)
    with pytest.raises(ProvisionError, match="already provisioned"):
        init_federation(fed_file, prov.out_dir, generate_node_keys=True)
    assert run_cli(["provision", "init", str(fed_file), "--out", str(prov.out_dir), "--generate-node-keys"]) == 2
    err = capsys.readouterr().err
    assert "already provisioned" in err and "--force" in err and "Traceback" not in err
    assert snapshot(prov.out_dir) == before


def test_force_replaces_ca_and_all_kits(prov: ProvisionResult, fed_file: Path) -> None:
    (prov.out_dir / "my-notes.txt").write_text("mine")
    again = init_federation(fed_file, prov.out_dir, force=True, generate_node_keys=True)
    assert again.ca_fingerprint != prov.ca_fingerprint
    verify_kit(again.server_kit, again.ca_fingerprint)
    with pytest.raises(KitError, match="not the federation's CA"):
        verify_kit(again.node_kits["alpha"], prov.ca_fingerprint)
    assert (prov.out_dir / "my-notes.txt").read_text() == "mine", "only admin/, server/, nodes/ are replaced"


def test_failed_forced_init_leaves_previous_kits_intact(
    prov: ProvisionResult, fed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(prov.out_dir)
    # a bad input is refused before anything is built ...
    bad = write_federation(fed_file.parent / "bad.toml", extra='\n[[nodes]]\nname = "x"\norganisation = "X"\n')
    bad.write_text(bad.read_text().replace('role = "client"', 'role = "client"\npublic_key = "missing.pub"'))
    with pytest.raises(ConfigError, match="missing.pub"):
        init_federation(bad, prov.out_dir, force=True, generate_node_keys=True)

    # ... and a failure half-way through building leaves the old kits too
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(kitmod, "stage_node_kit", boom)
    with pytest.raises(OSError, match="disk full"):
        init_federation(fed_file, prov.out_dir, force=True, generate_node_keys=True)
    assert snapshot(prov.out_dir) == before
    assert not [p for p in prov.out_dir.iterdir() if p.name.startswith(".")]


def test_rename_failing_mid_swap_rolls_back(
    prov: ProvisionResult, fed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(prov.out_dir)
    real_rename = kitmod.os.rename
    calls = {"n": 0}

    def flaky_rename(src: object, dst: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # admin/ already swapped, server/ moved aside, the new server/ fails to land
            raise OSError("simulated crash")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(kitmod.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated crash"):
        init_federation(fed_file, prov.out_dir, force=True, generate_node_keys=True)
    monkeypatch.undo()
    assert snapshot(prov.out_dir) == before
    verify_kit(prov.server_kit, prov.ca_fingerprint)


def test_client_init_refuses_to_replace_a_key_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wd = tmp_path / "node"
    assert run_cli(["client", "init", "--workdir", str(wd)]) == 0
    out = capsys.readouterr().out
    line = (wd / "node.pub").read_text().split()
    assert " ".join(line[:2]) in out and fingerprint_public_key(" ".join(line[:2])) in out
    first = (wd / "node.key").read_bytes()
    assert run_cli(["client", "init", "--workdir", str(wd)]) == 2
    assert "already has a key" in capsys.readouterr().err
    assert (wd / "node.key").read_bytes() == first
    assert run_cli(["client", "init", "--workdir", str(wd), "--force"]) == 0
    assert (wd / "node.key").read_bytes() != first


# --- verification ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kit", "rel"),
    [
        ("server", "server.crt"),
        ("server", "nodes.json"),
        ("server", "enrolled/alpha.pub"),
        ("nodes/alpha", "node.pub"),
        ("nodes/alpha", "node.key"),
        ("nodes/alpha", "federation.json"),
        ("nodes/alpha", "run-signing.pub"),
    ],
)
def test_tampered_kit_file_is_named(prov: ProvisionResult, kit: str, rel: str) -> None:
    path = prov.out_dir / kit / rel
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(KitError) as exc:
        verify_kit(prov.out_dir / kit, prov.ca_fingerprint)
    assert f"{rel}: modified" in str(exc.value)


def test_missing_and_extra_files_are_named(prov: ProvisionResult) -> None:
    kit = prov.node_kits["alpha"]
    (kit / "run-signing.pub").unlink()
    (kit / "notes.txt").write_text("hi")
    with pytest.raises(KitError) as exc:
        verify_kit(kit, prov.ca_fingerprint)
    msg = str(exc.value)
    assert "run-signing.pub: missing" in msg and "notes.txt: unexpected file" in msg


@pytest.mark.parametrize("rel", ["manifest.json", "manifest.sig"])
def test_tampered_manifest_fails_signature(prov: ProvisionResult, rel: str) -> None:
    kit = prov.server_kit
    path = kit / rel
    if rel == "manifest.json":  # e.g. someone adds a hash for a file they slipped in
        path.write_text(path.read_text().replace('"role": "server"', '"role": "client"'))
    else:
        sig = bytearray(path.read_bytes())
        sig[10] = ord("A") if sig[10] != ord("A") else ord("B")
        path.write_bytes(bytes(sig))
    with pytest.raises(KitError, match="manifest signature does not verify") as exc:
        verify_kit(kit, prov.ca_fingerprint)
    assert "manifest.json" in str(exc.value)


def test_wrong_ca_fingerprint_fails_and_accepted_formats(prov: ProvisionResult, tmp_path: Path) -> None:
    # a complete, self-consistent kit from someone else's CA verifies on its own — only the pin catches it
    other = init_federation(write_federation(tmp_path / "other.toml"), tmp_path / "other", generate_node_keys=True)
    rogue = other.node_kits["alpha"]
    assert not verify_kit(rogue, None).ca_pinned
    with pytest.raises(KitError, match="not the federation's CA") as exc:
        verify_kit(rogue, prov.ca_fingerprint)
    assert other.ca_fingerprint in str(exc.value) and prov.ca_fingerprint in str(exc.value)
    fp = prov.ca_fingerprint
    for form in (fp, fp.lower(), fp.replace(":", ""), f"sha256 Fingerprint={fp}", f"  {fp}\n"):
        assert verify_kit(prov.node_kits["alpha"], form).ca_pinned
    with pytest.raises(KitError, match="not a certificate SHA-256 fingerprint"):
        verify_kit(prov.node_kits["alpha"], "SHA256:abc")


def test_private_key_readable_by_others_is_refused(prov: ProvisionResult) -> None:
    key = prov.server_kit / "server.key"
    key.chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        verify_kit(prov.server_kit, prov.ca_fingerprint)


def test_expired_certificates_and_registrations(tmp_path: Path) -> None:
    fed = write_federation(tmp_path / "f.toml", lifetime=1)
    prov = init_federation(fed, tmp_path / "out", generate_node_keys=True)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with pytest.raises(KitError, match="server certificate expired on") as exc:
        verify_kit(prov.server_kit, prov.ca_fingerprint, now=later)
    msg = str(exc.value)
    assert "fedguard provision rotate" in msg and "--server" in msg and "valid from" in msg
    with pytest.raises(KitError, match="registration of node alpha expired") as exc:
        verify_kit(prov.node_kits["alpha"], prov.ca_fingerprint, now=later)
    assert "rotate --out DIR --node alpha" in str(exc.value)
    with pytest.raises(KitError, match="CA certificate expired"):
        verify_kit(prov.server_kit, prov.ca_fingerprint, now=later + dt.timedelta(days=3650))
    with pytest.raises(ProvisionError, match="CA expired") as exc:
        rotate(prov.out_dir, "server", now=later + dt.timedelta(days=3650))
    assert "--force" in str(exc.value)


def test_kit_issued_in_the_past_is_expired_now_and_rotate_renews_it(tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    prov = init_federation(write_federation(tmp_path / "f.toml"), tmp_path / "out", generate_node_keys=True, now=past)
    with pytest.raises(KitError, match="expired"):
        verify_kit(prov.server_kit, prov.ca_fingerprint)
    rotate(prov.out_dir, "server")
    rotate(prov.out_dir, "alpha")
    assert verify_kit(prov.server_kit, prov.ca_fingerprint).not_after > dt.datetime.now(dt.UTC)
    verify_kit(prov.node_kits["alpha"], prov.ca_fingerprint)


def test_not_yet_valid_certificates(prov: ProvisionResult) -> None:
    with pytest.raises(KitError, match="CA certificate is not valid yet") as exc:
        verify_kit(prov.server_kit, prov.ca_fingerprint, now=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert "clock" in str(exc.value)
    rotate(prov.out_dir, "server", now=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))
    with pytest.raises(KitError, match="server certificate is not valid yet") as exc:
        verify_kit(prov.server_kit, prov.ca_fingerprint)
    assert "fedguard provision rotate" in str(exc.value)


# --- enrolment and rotation ---------------------------------------------------------------------------


def test_add_node_updates_server_list_and_leaves_other_kits_untouched(
    prov: ProvisionResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = prov.out_dir
    untouched = {p: snapshot(p) for p in (out / "nodes" / "alpha", out / "nodes" / "eval")}
    server_cert = (out / "server" / "server.crt").read_bytes()
    ca_key = (out / "admin" / "ca.key").read_bytes()

    ident = init_node_keys(tmp_path / "beta-work")
    argv = ["provision", "add-node", "--out", str(out), "--name", "beta", "--organisation", "Beta Clinic"]
    assert run_cli([*argv, "--public-key", str(ident.public_key)]) == 0
    printed = capsys.readouterr().out
    assert ident.fingerprint in printed and prov.ca_fingerprint in printed

    assert {p: snapshot(p) for p in untouched} == untouched
    assert (out / "server" / "server.crt").read_bytes() == server_cert, "server certificate not re-issued"
    assert (out / "admin" / "ca.key").read_bytes() == ca_key
    server = verify_kit(out / "server", prov.ca_fingerprint)
    beta = {n.name: n for n in server.nodes}["beta"]
    assert (beta.role, beta.organisation, beta.fingerprint) == ("client", "Beta Clinic", ident.fingerprint)
    kit = verify_kit(out / "nodes" / "beta", prov.ca_fingerprint)
    assert kit.node_private_key is None, "a node that made its own key gets no private key in its kit"
    check_node_private_key(kit, ident.private_key)

    assert run_cli([*argv, "--public-key", str(ident.public_key)]) == 2
    assert "already enrolled" in capsys.readouterr().err
    with pytest.raises(ProvisionError, match="already has an evaluator"):
        add_node(out, "eval2", "Other", "evaluator")
    with pytest.raises(ProvisionError, match="already registered to node 'beta'"):
        add_node(out, "gamma", "G", public_key=ident.public_key)


def test_rotate_node_revokes_old_key_and_keeps_other_kits(prov: ProvisionResult, tmp_path: Path) -> None:
    out = prov.out_dir
    eval_kit = snapshot(out / "nodes" / "eval")
    old_fp = prov.node_fingerprints["alpha"]
    assert run_cli(["provision", "rotate", "--out", str(out), "--node", "alpha"]) == 0
    server = verify_kit(out / "server", prov.ca_fingerprint)
    alpha = {n.name: n for n in server.nodes}["alpha"]
    assert alpha.fingerprint != old_fp
    assert [(r.name, r.fingerprint) for r in server.revoked] == [("alpha", old_fp)]
    kit = verify_kit(out / "nodes" / "alpha", prov.ca_fingerprint)
    assert kit.node_private_key is not None
    check_node_private_key(kit, kit.node_private_key)
    assert snapshot(out / "nodes" / "eval") == eval_kit

    # a node that owns its key must send a new one; a revoked key can't come back
    ident = init_node_keys(tmp_path / "beta")
    add_node(out, "beta", "Beta", public_key=ident.public_key)
    with pytest.raises(ProvisionError, match="must come from the node"):
        rotate(out, "beta")
    new = init_node_keys(tmp_path / "beta", force=True)
    rotate(out, "beta", public_key=new.public_key)
    with pytest.raises(ProvisionError, match="was revoked"):
        add_node(out, "beta2", "Beta", public_key=ident.openssh)  # the old key line
    with pytest.raises(ProvisionError, match="no enrolled node named 'nobody'"):
        rotate(out, "nobody")


def test_rotate_server_reissues_certificate_only(prov: ProvisionResult) -> None:
    out = prov.out_dir
    nodes_before = snapshot(out / "nodes")
    old = (out / "server" / "server.crt").read_bytes()
    old_key = (out / "server" / "server.key").read_bytes()
    assert run_cli(["provision", "rotate", "--out", str(out), "--server"]) == 0
    assert (out / "server" / "server.crt").read_bytes() != old
    assert (out / "server" / "server.key").read_bytes() != old_key
    assert snapshot(out / "nodes") == nodes_before
    assert len(verify_kit(out / "server", prov.ca_fingerprint).nodes) == 2
    with pytest.raises(SystemExit):
        run_cli(["provision", "rotate", "--out", str(out)])  # one of --server / --node is required


def test_failed_add_node_changes_nothing(prov: ProvisionResult, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(prov.out_dir)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(kitmod, "swap_in", boom)
    with pytest.raises(OSError, match="rename failed"):
        add_node(prov.out_dir, "beta", "Beta")
    assert snapshot(prov.out_dir) == before, "registry and kits unchanged"


def test_add_node_refuses_a_tampered_server_kit(prov: ProvisionResult) -> None:
    nodes = prov.server_kit / "nodes.json"
    nodes.write_text(nodes.read_text().replace("Alpha Hospital", "Mallory"))
    with pytest.raises(KitError, match="nodes.json: modified"):
        add_node(prov.out_dir, "beta", "Beta")
    assert not (prov.out_dir / "nodes" / "beta").exists()


# --- the federation file -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('role = "evaluator"', 'role = "admin"'), "nodes.1.role: Input should be 'client' or 'evaluator'"),
        (('role = "evaluator"', 'role = "client"'), "nodes: exactly one node must have role = 'evaluator' (found 0)"),
        (('"10.0.0.5"', '"https://fl.example.org:8000"'), "server.addresses: 'https://fl.example.org:8000' is not"),
        (('name = "alpha"', 'name = "../alpha"'), "nodes.0.name: node name '../alpha' must be"),
        (("homomorphic = true", "homomorphic = true\ncolour = 1"), "colour: Extra inputs are not permitted"),
        (("lifetime_days = 365", "lifetime_days = 0"), "lifetime_days: Input should be greater than or equal to 1"),
    ],
)
def test_bad_federation_file_names_file_and_field(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write_federation(tmp_path / "fed.toml")
    path.write_text(path.read_text().replace(*change))
    with pytest.raises(ConfigError) as exc:
        load_federation(path)
    assert f"{path}: {expected}" in str(exc.value)


def test_federation_public_keys_from_files_and_lines(tmp_path: Path) -> None:
    alpha = init_node_keys(tmp_path / "alpha")
    evaluator = init_node_keys(tmp_path / "eval")
    fed = write_federation(tmp_path / "fed.toml")
    text = fed.read_text()
    text = text.replace('role = "client"', 'role = "client"\npublic_key = "alpha/node.pub"')  # relative to the file
    text = text.replace('role = "evaluator"', f'role = "evaluator"\npublic_key = "{evaluator.openssh}"')
    fed.write_text(text)
    prov = init_federation(fed, tmp_path / "out")
    assert prov.node_fingerprints == {"alpha": alpha.fingerprint, "eval": evaluator.fingerprint}
    assert prov.generated_keys == ()
    assert not (prov.node_kits["alpha"] / "node.key").exists()

    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    fed.write_text(text.replace(evaluator.openssh, ed.decode()))
    with pytest.raises(ConfigError, match=r"nodes\.1\.public_key: node keys must be EC P-384"):
        load_federation(fed)


def test_init_without_node_keys_explains_client_init(fed_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="no public key for node") as exc:
        init_federation(fed_file, tmp_path / "out")
    assert "fedguard client init" in str(exc.value) and "--generate-node-keys" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_cli_init_prints_fingerprint_and_kit_locations(
    fed_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(["provision", "init", str(fed_file), "--out", str(out), "--generate-node-keys"]) == 0
    printed = capsys.readouterr().out
    assert fingerprint_cert(out / "admin" / "ca.crt") in printed
    assert "OUT OF BAND" in printed
    for where in (out / "server", out / "nodes" / "alpha", out / "nodes" / "eval", out / "admin"):
        assert str(where) in printed


# --- TLS ------------------------------------------------------------------------------------------------


def _handshake(server_kit: Path, cafile: Path, hostname: str) -> None:
    """Serve one TLS connection with the server kit's cert/key; connect trusting only ``cafile``."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server_kit / "server.crt", server_kit / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(5)
        port = srv.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = srv.accept()
                with sctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        cctx = ssl.create_default_context(cafile=str(cafile))
        cctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13+ does by default
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with cctx.wrap_socket(raw, server_hostname=hostname) as tls:
                    assert tls.recv(2) == b"ok"
        finally:
            thread.join(5)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_with_server_kit(prov: ProvisionResult, hostname: str) -> None:
    _handshake(prov.server_kit, prov.node_kits["alpha"] / "ca.crt", hostname)


def test_tls_handshake_fails_for_other_ca_or_name(prov: ProvisionResult, tmp_path: Path) -> None:
    other = init_federation(write_federation(tmp_path / "o.toml"), tmp_path / "other", generate_node_keys=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(prov.server_kit, other.admin_dir / "ca.crt", "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(prov.server_kit, prov.admin_dir / "ca.crt", "not-in-the-sans.example")
