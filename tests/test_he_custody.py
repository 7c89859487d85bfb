"""HE key custody (common/he_custody.py, fedguard/he_cli.py): real CKKS, real ECIES, real kits, no mocks.

One key bundle is made per module (a CKKS context costs ~0.1 s); updates are 100 parameters (one
ciphertext), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import shutil
import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization

from common import he
from common import he_custody as hc
from common.errors import FedGuardError
from common.kit import Federation, KitError, NodeSpec, fingerprint_public_key, verify_kit
from common.sealing import SealedForAnotherKeyError, SealTamperedError
from fedguard import he_cli
from fedguard.cli import main
from fedguard.provisioning import init_federation
from tests.helpers import node_keypair

pytestmark = pytest.mark.timeout(60)

FED = "hospitals"
B = 1.0
N_PARAMS = 100
NAMES = ("alpha", "beta", "eval")


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, bytes]]:
    return {name: node_keypair() for name in NAMES}


@pytest.fixture(scope="module")
def bundle(keys) -> hc.KeyBundle:
    return hc.keygen(FED, {n: pub.decode() for n, (_, pub) in keys.items()}, max_clients=10, bound=B)


@pytest.fixture(scope="module")
def dirs(bundle, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("custody")
    ev, srv = root / "evaluator", root / "server-bundle"
    hc.write_bundle(bundle, ev, srv)
    return ev, srv


def _open(bundle: hc.KeyBundle, keys, name: str, **kw):
    args = {"federation": FED, "node": name, "expected_fingerprint": bundle.fingerprint, **kw}
    return hc.open_context(bundle.sealed[name], keys[name][0], **args)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- what the server gets


def test_server_bundle_holds_no_secret_key_material(bundle, dirs, keys) -> None:
    ev, srv = dirs
    assert set(snapshot(srv)) == {
        "he-public.ctx",
        "he-keys.json",
        "sealed/alpha.bin",
        "sealed/beta.bin",
        "sealed/eval.bin",
    }
    assert set(snapshot(ev)) == {"he-secret.ctx", "he-keys.json"}
    assert (ev / "he-secret.ctx").read_bytes() == bundle.secret_context
    assert stat.S_IMODE((ev / "he-secret.ctx").stat().st_mode) == 0o600
    assert all(
        f"{f}=" not in repr(bundle) for f in ("secret_context", "public_context", "sealed")
    )  # no key bytes in logs

    info = json.loads((srv / "he-keys.json").read_text())
    assert info == json.loads((ev / "he-keys.json").read_text())
    assert info["federation"] == FED and info["scheme"] == he.DEFAULT_SCHEME
    assert info["fingerprint"] == bundle.fingerprint == he.fingerprint((srv / "he-public.ctx").read_bytes())
    assert (info["max_clients"], info["bound"]) == (10, B)
    assert info["recipients"] == {n: fingerprint_public_key(pub.decode()) for n, (_, pub) in keys.items()}

    public = (srv / "he-public.ctx").read_bytes()
    with pytest.raises(he.HEContextError):
        he.load_secret_context(public)
    pub_ctx = he.load_public_context(public, expected_fingerprint=bundle.fingerprint)
    assert not pub_ctx.is_private() and not pub_ctx.has_galois_keys() and not pub_ctx.has_relin_keys()
    node_ctx = _open(bundle, keys, "alpha")
    blobs = he.encrypt_update(node_ctx, np.full(N_PARAMS, 0.5), 1.0, bound=B)
    with pytest.raises(he.HEContextError):
        he.decrypt_sum(pub_ctx, blobs, N_PARAMS)
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL itself cannot decrypt with it
        ts.ckks_vector_from(pub_ctx, blobs[0]).decrypt()

    # Not the secret context, nor its raw TenSEAL part, nor any 64-byte piece of it, in any server file.
    secret = bundle.secret_context
    pieces = [secret, secret[8:]] + [
        secret[i : i + 64] for i in range(len(secret) // 10, len(secret) - 64, len(secret) // 10)
    ]
    assert len(secret) > 100_000  # N=8192: the secret key alone is ~128 KB
    for rel, (data, _mode) in snapshot(srv).items():
        for piece in pieces:
            assert piece not in data, f"secret key material in {rel}"


def test_load_server_bundle_checks_every_file(bundle, dirs, keys, tmp_path) -> None:
    _, srv = dirs
    loaded = hc.load_server_bundle(srv)
    assert loaded.fingerprint == bundle.fingerprint and loaded.sealed == bundle.sealed
    assert loaded.info == bundle.info
    loaded.load_context()
    fp_alpha = fingerprint_public_key(keys["alpha"][1].decode())
    assert loaded.sealed_for("alpha", fp_alpha) == bundle.sealed["alpha"]
    with pytest.raises(hc.SealedContextMismatchError, match="rotated"):
        loaded.sealed_for("alpha", fingerprint_public_key(keys["beta"][1].decode()))
    with pytest.raises(hc.KeyBundleError, match="no HE context was sealed"):
        loaded.sealed_for("gamma", fp_alpha)

    other = he.create_context(max_clients=10, bound=B)

    def broken(change) -> Path:
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(srv, d)
        change(d)
        return d

    cases = {
        "fingerprint": lambda d: (d / "he-public.ctx").write_bytes(he.public_context_bytes(other)),
        "SECRET": lambda d: (d / "he-public.ctx").write_bytes(he.secret_context_bytes(other)),
        "sealed for federation": lambda d: shutil.copy(d / "sealed/beta.bin", d / "sealed/alpha.bin"),
        "no sealed context": lambda d: (d / "sealed/beta.bin").unlink(),
        "unexpected": lambda d: (d / "sealed/gamma.bin").write_bytes(b"x"),
        "he-keys.json missing": lambda d: (d / "he-keys.json").unlink(),
        "not an HE key description": lambda d: (d / "he-keys.json").write_text('{"federation": 1}'),
        "truncated": lambda d: (d / "sealed/eval.bin").write_bytes(bundle.sealed["eval"][:60]),
    }
    for match, change in cases.items():
        with pytest.raises(hc.KeyBundleError, match=match):
            hc.load_server_bundle(broken(change))


# --------------------------------------------------------------------------- nodes open their own context


def test_each_node_opens_its_own_context_and_decrypts_what_others_encrypted(bundle, dirs, keys) -> None:
    ctxs = {name: _open(bundle, keys, name) for name in NAMES}
    assert all(he.fingerprint(he.public_context_bytes(c)) == bundle.fingerprint for c in ctxs.values())
    rng = np.random.default_rng(3)
    ups = {"alpha": rng.uniform(-B, B, N_PARAMS), "beta": rng.uniform(-B, B, N_PARAMS)}
    ws = {"alpha": 0.4, "beta": 1.0}
    server = hc.load_server_bundle(dirs[1])
    total = he.CiphertextSum(server.load_context(), N_PARAMS, max_clients=server.info.max_clients)
    for name in ups:
        total.add(he.encrypt_update(ctxs[name], ups[name], ws[name], bound=server.info.bound), where=name)
    ref = sum(ws[n] * ups[n] for n in ups) / sum(ws.values())
    tol = (0.5e-7 + 2e-9 * len(ups)) / sum(ws.values())
    for decryptor in (ctxs["eval"], ctxs["alpha"], hc.load_evaluator_key(dirs[0]).context):
        mean, sum_w = he.decrypt_sum(decryptor, total.result(), N_PARAMS, max_weight=2)
        assert sum_w == pytest.approx(1.4, abs=1e-7)
        assert np.abs(mean - ref).max() <= tol
    key = hc.load_evaluator_key(dirs[0], expected_fingerprint=bundle.fingerprint)
    assert key.info == bundle.info
    with pytest.raises(hc.ContextFingerprintMismatchError):
        hc.load_evaluator_key(dirs[0], expected_fingerprint="sha256:" + "0" * 64)


def test_a_node_cannot_open_another_nodes_context(bundle, keys) -> None:
    with pytest.raises(SealedForAnotherKeyError) as exc:  # beta's blob, alpha's key, posing as beta
        hc.open_context(
            bundle.sealed["beta"],
            keys["alpha"][0],
            federation=FED,
            node="beta",
            expected_fingerprint=bundle.fingerprint,
        )
    assert exc.value.code == "sealed-for-another-key"
    with pytest.raises(hc.SealedContextMismatchError, match="sealed for node 'beta'") as exc2:
        hc.open_context(
            bundle.sealed["beta"],
            keys["alpha"][0],
            federation=FED,
            node="alpha",
            expected_fingerprint=bundle.fingerprint,
        )
    assert exc2.value.code == "sealed-context-mismatch"
    with pytest.raises(hc.SealedContextMismatchError, match="federation"):
        _open(bundle, keys, "alpha", federation="banks")


def test_tampered_blobs_and_wrong_fingerprints_are_refused(bundle, keys) -> None:
    blob = bytearray(bundle.sealed["alpha"])
    blob[-30] ^= 1
    with pytest.raises(SealTamperedError) as exc:
        hc.open_context(
            bytes(blob), keys["alpha"][0], federation=FED, node="alpha", expected_fingerprint=bundle.fingerprint
        )
    assert exc.value.code == "sealed-data-tampered"
    for junk in (b"", b"FGHECTX1", bundle.sealed["alpha"][:40], b"x" * 500):
        with pytest.raises(SealTamperedError):
            hc.open_context(
                junk, keys["alpha"][0], federation=FED, node="alpha", expected_fingerprint=bundle.fingerprint
            )

    wrong = "sha256:" + "ab" * 32
    with pytest.raises(hc.ContextFingerprintMismatchError, match="run config names") as exc2:
        _open(bundle, keys, "alpha", expected_fingerprint=wrong)
    assert exc2.value.code == "he-context-fingerprint-mismatch"
    assert isinstance(exc2.value, he.HEContextError)

    # The names in the clear are bound by the sealing: rewriting the fingerprint in the header does not open.
    _names, inner = hc._split_envelope(bundle.sealed["alpha"])
    relabelled = hc._envelope(FED, "alpha", wrong, inner)
    with pytest.raises(SealTamperedError):
        hc.open_context(relabelled, keys["alpha"][0], federation=FED, node="alpha", expected_fingerprint=wrong)

    # An evaluator that seals another context than the one it names is caught after opening.
    from common.sealing import seal, sealing_aad

    other = he.secret_context_bytes(he.create_context(max_clients=10, bound=B))
    lying = hc._envelope(
        FED, "alpha", bundle.fingerprint, seal(keys["alpha"][1], other, sealing_aad(FED, "alpha", bundle.fingerprint))
    )
    with pytest.raises(hc.ContextFingerprintMismatchError):
        hc.open_context(lying, keys["alpha"][0], federation=FED, node="alpha", expected_fingerprint=bundle.fingerprint)


def test_keygen_refuses_bad_recipients_and_capacity(keys) -> None:
    pub = keys["alpha"][1].decode()
    with pytest.raises(hc.HECustodyError, match="same key"):
        hc.keygen(FED, {"a": pub, "b": pub}, max_clients=10, bound=B)
    with pytest.raises(hc.HECustodyError, match="node name"):
        hc.keygen(FED, {"../x": pub}, max_clients=10, bound=B)
    with pytest.raises(hc.HECustodyError, match="no recipients"):
        hc.keygen(FED, {}, max_clients=10, bound=B)
    with pytest.raises(he.HECapacityError):
        hc.keygen(FED, {"a": pub}, max_clients=1000, bound=1000.0)
    he.check_capacity(he.get_scheme(he.DEFAULT_SCHEME), he_cli.DEFAULT_MAX_CLIENTS, he_cli.DEFAULT_BOUND)


def test_write_bundle_never_replaces_a_key_silently(bundle, keys, tmp_path) -> None:
    ev, srv = tmp_path / "ev", tmp_path / "srv"
    hc.write_bundle(bundle, ev, srv)
    before = snapshot(tmp_path)
    with pytest.raises(hc.KeyBundleExistsError, match="refusing"):
        hc.write_bundle(bundle, ev, srv)
    assert snapshot(tmp_path) == before
    with pytest.raises(hc.HECustodyError, match="secret key"):
        hc.write_bundle(bundle, srv / "ev", srv)

    fewer = hc.keygen(FED, {n: keys[n][1].decode() for n in ("alpha", "eval")}, max_clients=10, bound=B)
    paths = hc.write_bundle(fewer, ev, srv, force=True)
    assert set(paths.sealed) == {"alpha", "eval"}
    assert not (srv / "sealed" / "beta.bin").exists()  # the former recipient's blob went with the old key
    assert hc.load_server_bundle(srv).fingerprint == fewer.fingerprint != bundle.fingerprint
    assert (ev / "he-secret.ctx").read_bytes() == fewer.secret_context
    assert not [p for p in srv.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- signed global models


def test_only_the_evaluators_signature_for_this_run_and_round_verifies(bundle, keys) -> None:
    ev_ctx = _open(bundle, keys, "eval")
    global_model = he.encrypt_update(ev_ctx, np.linspace(-B, B, N_PARAMS), 1.0, bound=B)
    client_update = he.encrypt_update(_open(bundle, keys, "alpha"), np.zeros(N_PARAMS), 1.0, bound=B)
    ev_priv, ev_pub = keys["eval"]
    ev_fp = fingerprint_public_key(ev_pub.decode())
    sig = hc.sign_global(global_model, run_uid="run-7", round=3, evaluator_private_key_openssh=ev_priv)
    ok = {"run_uid": "run-7", "round": 3, "evaluator_public_key_openssh": ev_pub, "expected_key_fingerprint": ev_fp}

    hc.verify_global(global_model, sig, **ok)
    pem = serialization.load_ssh_public_key(ev_pub).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hc.verify_global(global_model, sig, **{**ok, "evaluator_public_key_openssh": pem})  # as the SuperLink reports keys
    assert len(hc.global_digest(global_model, run_uid="run-7", round=3)) == 48

    def refused(blobs, signature, code, **change) -> None:
        with pytest.raises(hc.GlobalModelSignatureError) as exc:
            hc.verify_global(blobs, signature, **{**ok, **change})
        assert exc.value.code == code

    invalid = "global-model-signature-invalid"
    refused(client_update, sig, invalid)  # one client's ciphertext passed off as the aggregate
    refused(global_model + client_update, sig, invalid)
    refused(global_model, sig, invalid, round=4)
    refused(global_model, sig, invalid, run_uid="run-8")
    refused(global_model, sig[:-8] + "AAAAAAA=", invalid)
    refused(global_model, "not base64!", invalid)
    refused(global_model, "", "global-model-unsigned")
    refused(global_model, None, "global-model-unsigned")
    # validly signed by another key (a client, or the server's own): refused, whichever key is presented
    a_priv, a_pub = keys["alpha"]
    forged = hc.sign_global(global_model, run_uid="run-7", round=3, evaluator_private_key_openssh=a_priv)
    refused(global_model, forged, "global-model-wrong-signer", evaluator_public_key_openssh=a_pub)
    refused(global_model, forged, invalid)  # the evaluator's key does not verify it either
    refused(global_model, sig, "global-model-wrong-signer", expected_key_fingerprint="")


# --------------------------------------------------------------------------- update layout


def test_flatten_and_unflatten_round_trip() -> None:
    state = OrderedDict(
        w=np.arange(6, dtype=np.float32).reshape(2, 3),
        steps=np.array(5, dtype=np.int64),
        b=np.array([0.5, -1.5], dtype=np.float32),
    )
    flat = hc.flatten_state(state, ["b", "w"])
    assert flat.dtype == np.float64 and flat.tolist() == [0.5, -1.5, 0, 1, 2, 3, 4, 5]
    back = hc.unflatten(flat, state, ["b", "w"])
    assert list(back) == ["b", "w"]
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], state["w"])
    with pytest.raises(hc.UpdateLayoutError, match="expected 8"):
        hc.unflatten(flat[:-1], state, ["b", "w"])
    with pytest.raises(hc.UpdateLayoutError, match="missing"):
        hc.flatten_state(state, ["b", "x"])
    with pytest.raises(hc.UpdateLayoutError, match="int64"):
        hc.flatten_state(state, ["steps"])
    with pytest.raises(hc.UpdateLayoutError, match="twice"):
        hc.flatten_state(state, ["b", "b"])


# --------------------------------------------------------------------------- the CLI on real kits


def run_cli(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    fed = Federation(
        name=FED,
        homomorphic=True,
        nodes=[
            NodeSpec(name="alpha", organisation="Alpha Hospital"),
            NodeSpec(name="beta", organisation="Beta Clinic"),
            NodeSpec(name="eval", organisation="Ethics Board", role="evaluator"),
        ],
    )
    return init_federation(fed, tmp_path_factory.mktemp("prov") / "out", generate_node_keys=True)


def test_evaluator_keygen_cli_on_a_provisioned_federation(provisioned, tmp_path, capsys) -> None:
    workdir, out = tmp_path / "eval-work", tmp_path / "he-bundle"
    argv = ["evaluator", "keygen", "--kit", str(provisioned.server_kit), "--workdir", str(workdir), "--out", str(out)]
    argv += ["--ca-fingerprint", provisioned.ca_fingerprint, "--key", str(provisioned.node_kits["eval"] / "node.key")]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    server = hc.load_server_bundle(out)
    assert server.fingerprint in printed and "pinned" in printed and "opens the evaluator's own" in printed
    assert "The server cannot open them" in printed
    assert (server.info.max_clients, server.info.bound) == (he_cli.DEFAULT_MAX_CLIENTS, he_cli.DEFAULT_BOUND)
    assert set(server.sealed) == {"alpha", "beta", "eval"}
    for name, kit_dir in provisioned.node_kits.items():
        kit = verify_kit(kit_dir, provisioned.ca_fingerprint)
        assert kit.node_private_key is not None
        assert server.info.recipients[name] == provisioned.node_fingerprints[name]
        ctx = hc.open_context(
            server.sealed_for(name, provisioned.node_fingerprints[name]),
            kit.node_private_key.read_bytes(),
            federation=kit.federation,
            node=kit.participant,
            expected_fingerprint=server.fingerprint,
        )
        assert ctx.is_private()
    assert hc.load_evaluator_key(workdir).info == server.info

    before = snapshot(tmp_path)
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedguard: error:") and "refusing to replace" in err and "--force" in err
    assert snapshot(tmp_path) == before

    assert run_cli([*argv, "--force"]) == 0
    capsys.readouterr()
    assert hc.load_server_bundle(out).fingerprint != server.fingerprint


def test_keygen_cli_refusals(provisioned, tmp_path, capsys) -> None:
    base = ["evaluator", "keygen", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    # the CA pin is required for a signed kit (or waived explicitly)
    assert run_cli([*base, "--kit", str(provisioned.server_kit)]) == 2
    assert "--ca-fingerprint" in capsys.readouterr().err
    wrong_ca = "AB:" * 31 + "AB"
    assert run_cli([*base, "--kit", str(provisioned.server_kit), "--ca-fingerprint", wrong_ca]) == 2
    assert "not the federation's CA" in capsys.readouterr().err
    base += ["--ca-fingerprint", provisioned.ca_fingerprint]
    assert run_cli([*base, "--kit", str(provisioned.node_kits["alpha"])]) == 2
    assert "SERVER kit" in capsys.readouterr().err
    # the evaluator's workdir holds another node's key: this is not the evaluator's machine
    assert (
        run_cli(
            [*base, "--kit", str(provisioned.server_kit), "--key", str(provisioned.node_kits["alpha"] / "node.key")]
        )
        == 2
    )
    assert "not the one registered" in capsys.readouterr().err
    assert run_cli([*base, "--kit", str(provisioned.server_kit), "--max-clients", "1000"]) == 2
    assert "capacity" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_bare_nodes_json_leaves_out_revoked_keys_and_warns(provisioned, tmp_path) -> None:
    listing = json.loads((provisioned.server_kit / "nodes.json").read_text())
    beta = next(n for n in listing["nodes"] if n["name"] == "beta")
    listing["revoked"].append(
        {k: beta[k] for k in ("name", "public_key", "fingerprint")}
        | {"revoked_at": "2025-01-01T00:00:00+00:00", "reason": "lost"}
    )
    bare = tmp_path / "nodes.json"
    bare.write_text(json.dumps(listing))
    fed, recipients, notes = he_cli.read_recipients(bare, ca_fingerprint=None, federation=FED)
    assert fed == FED and [r.name for r in recipients] == ["alpha", "eval"]
    assert any("revoked" in n for n in notes) and any(n.startswith("WARNING") for n in notes)
    with pytest.raises(FedGuardError, match="--federation"):
        he_cli.read_recipients(bare, ca_fingerprint=None)
    # inside a signed kit, nodes.json is verified like the kit directory
    fed2, recipients2, notes2 = he_cli.read_recipients(
        provisioned.server_kit / "nodes.json", ca_fingerprint=provisioned.ca_fingerprint
    )
    assert fed2 == FED and len(recipients2) == 3 and "pinned" in notes2[0]
    with pytest.raises(KitError):
        he_cli.read_recipients(tmp_path / "missing", ca_fingerprint=None)
