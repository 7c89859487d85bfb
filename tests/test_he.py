"""Homomorphic aggregation (common/he.py) and key sealing (common/sealing.py).

Small vectors (≤ 3 ciphertexts) keep the whole file to a few seconds; bench/he_aggregation.py
measures speed and precision at 100k and 1M parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from common import he
from common.sealing import SealedForAnotherKeyError, SealingError, SealTamperedError, key_id, seal, sealing_aad, unseal
from tests.helpers import node_keypair

B = 1.0  # per-coordinate update bound used throughout
N_PARAMS = 5000  # 5000 values + weight slot = 2 ciphertexts of 4096 slots
# Tolerance of the decrypted weighted mean vs float64 numpy: rounding to 7 decimals (≤ 0.5e-7 per
# slot of the sum) plus CKKS noise (~1e-9 per update at scale 2^40), divided by Σw.
ROUND_TOL = 0.5e-7
NOISE_PER_UPDATE = 2e-9


@pytest.fixture(scope="module")
def ctx():
    return he.create_context(max_clients=10, bound=B)


@pytest.fixture(scope="module")
def pub_bytes(ctx) -> bytes:
    return he.public_context_bytes(ctx)


@pytest.fixture(scope="module")
def pub_ctx(pub_bytes):
    return he.load_public_context(pub_bytes)


@pytest.fixture(scope="module")
def updates() -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(7)
    ups = [rng.uniform(-B, B, N_PARAMS).astype(np.float32) for _ in range(4)]
    ups[0][:10] = [B, -B, 0, 1e-6, -1e-6, 0.5, 0.25, 1e-3, 3e-7, -0.999]  # edges of the range
    return ups, [0.3, 1.0, 0.55, 0.8]


@pytest.fixture(scope="module")
def encrypted(ctx, updates) -> list[list[bytes]]:
    ups, ws = updates
    return [he.encrypt_update(ctx, u, w, bound=B) for u, w in zip(ups, ws, strict=True)]


def _fedavg(ups: list[np.ndarray], ws: list[float]) -> np.ndarray:
    return sum(w * u.astype(np.float64) for u, w in zip(ups, ws, strict=True)) / sum(ws)


# --------------------------------------------------------------------------- correctness


def test_decrypted_sum_is_weighted_fedavg(ctx, pub_ctx, updates, encrypted) -> None:
    ups, ws = updates
    total = he.sum_ciphertexts(pub_ctx, encrypted, n_params=N_PARAMS, max_clients=10)
    assert len(total) == he.n_ciphertexts(N_PARAMS) == 2
    mean, sum_w = he.decrypt_sum(ctx, total, N_PARAMS, max_weight=len(ws))
    ref = _fedavg(ups, ws)
    assert sum_w == pytest.approx(sum(ws), abs=1e-7)
    err = np.abs(mean - ref).max()
    assert err <= (ROUND_TOL + NOISE_PER_UPDATE * len(ws)) / sum(ws)
    # Before rounding the CKKS error itself is ~1e-9: 1e-9 relative to the update magnitude B.
    exact, _ = he.decrypt_sum(ctx, total, N_PARAMS, round_digits=15)
    assert np.abs(exact - ref).max() <= NOISE_PER_UPDATE * len(ws) / sum(ws)
    # Released values sit on the 1e-7 grid (×Σw): the low, noise-carrying digits are gone.
    grid = mean * sum_w * 1e7
    assert np.abs(grid - np.round(grid)).max() < 1e-3
    he.check_aggregate_norm(mean, B)


def test_n_params_inferred_and_labels_name_the_update(pub_ctx, encrypted) -> None:
    assert he.sum_ciphertexts(pub_ctx, encrypted) == he.sum_ciphertexts(pub_ctx, encrypted, n_params=N_PARAMS)
    bad = [*encrypted[:2], encrypted[2][:1]]
    with pytest.raises(he.CiphertextCountError, match="update node-c"):
        he.sum_ciphertexts(pub_ctx, bad, n_params=N_PARAMS, labels=["node-a", "node-b", "node-c"])


def test_evaluator_recomputes_and_compares_the_servers_sum(ctx, pub_ctx, encrypted) -> None:
    server_sum = he.sum_ciphertexts(pub_ctx, encrypted[::-1], n_params=N_PARAMS)  # order does not matter
    assert he.verify_sum(ctx, encrypted, server_sum, n_params=N_PARAMS) == server_sum
    partial = he.sum_ciphertexts(pub_ctx, encrypted[:3], n_params=N_PARAMS)  # server dropped one update
    with pytest.raises(he.SumMismatchError):
        he.verify_sum(ctx, encrypted, partial, n_params=N_PARAMS)


def test_running_sum_rejects_a_bad_update_and_keeps_the_others(ctx, pub_ctx, updates, encrypted) -> None:
    total = he.CiphertextSum(pub_ctx, N_PARAMS, max_clients=4)
    total.add(encrypted[0], where="node 1")
    with pytest.raises(he.CiphertextSizeError, match="node 2, ciphertext 1"):
        total.add([encrypted[1][0], encrypted[1][1][:1000]], where="node 2")
    for blobs in encrypted[1:]:
        total.add(blobs)
    with pytest.raises(he.HECapacityError):
        total.add(encrypted[0])  # a 5th update could overflow a federation sized for 4
    mean, _ = he.decrypt_sum(ctx, total.result(), N_PARAMS)
    assert np.abs(mean - _fedavg(*updates)).max() < 1e-7


def test_flower_record_round_trip(encrypted) -> None:
    record = he.blobs_to_record(encrypted[0])
    arr = record["ct00000"]
    assert (arr.dtype, arr.stype, arr.shape) == ("ckks", "tenseal.ckks", (len(encrypted[0][0]),))
    assert he.record_to_blobs(record) == encrypted[0]
    from flwr.app import Array, ArrayRecord

    numpy_record = ArrayRecord(array_dict={"ct00000": Array(np.zeros(3, dtype=np.float32))})
    with pytest.raises(he.CiphertextDecodeError):
        he.record_to_blobs(numpy_record)
    gap = ArrayRecord(array_dict={"ct00001": record["ct00001"]})
    with pytest.raises(he.CiphertextCountError):
        he.record_to_blobs(gap)


def test_process_pool_encrypts_the_same_update(ctx) -> None:
    x = np.linspace(-B, B, 4096 * 4)
    with he.EncryptPool(ctx, workers=2) as pool:
        blobs = he.encrypt_update(ctx, x, 0.5, bound=B, pool=pool)
    assert len(blobs) == 5
    mean, sum_w = he.decrypt_sum(ctx, blobs, x.size)
    assert sum_w == pytest.approx(0.5) and np.abs(mean - x).max() < 1e-6


# --------------------------------------------------------------------------- contexts and keys


def test_public_context_holds_no_secret_and_cannot_decrypt(ctx, pub_bytes, pub_ctx, encrypted) -> None:
    assert not pub_ctx.is_private() and pub_ctx.is_public()
    assert not pub_ctx.has_secret_key() and not pub_ctx.has_galois_keys() and not pub_ctx.has_relin_keys()
    # The serialized bytes themselves, loaded raw by TenSEAL, carry no secret key either.
    raw = ts.context_from(pub_bytes[len(b"FGHEPUB1") + 32 :])
    assert not raw.is_private() and not raw.has_secret_key()
    secret_tenseal = he.secret_context_bytes(ctx)[len(b"FGHESEC1") :]
    assert len(pub_bytes) < 1024 < len(secret_tenseal)  # N=8192 secret key alone is ~128 KB
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL itself refuses
        ts.ckks_vector_from(pub_ctx, encrypted[0][0]).decrypt()
    with pytest.raises(he.HEContextError):
        he.decrypt_sum(pub_ctx, encrypted[0], N_PARAMS)
    with pytest.raises(he.HEContextError):
        he.encrypt_update(pub_ctx, np.zeros(3), 1.0, bound=B)
    info = he.context_info(pub_ctx)
    assert info["coeff_mod_bit_sizes"] == [60, 60] and info["scale_bits"] == 40 and not info["private"]


def test_public_key_scheme_public_context_has_no_secret() -> None:
    ctx = he.create_context("tenseal-default", max_clients=10, bound=B)
    pub = he.load_public_context(he.public_context_bytes(ctx))
    assert pub.has_public_key() and not pub.is_private() and not pub.has_galois_keys()
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector(pub, [1.0, 2.0]).decrypt()


def test_context_kinds_and_fingerprints(ctx, pub_bytes) -> None:
    fp = he.fingerprint(pub_bytes)
    secret = he.secret_context_bytes(ctx)
    node_ctx = he.load_secret_context(secret, expected_fingerprint=fp)  # what a node does after unsealing
    assert he.fingerprint(he.public_context_bytes(node_ctx)) == fp
    other = he.create_context(max_clients=10, bound=B)  # same parameters, another key
    other_fp = he.fingerprint(he.public_context_bytes(other))
    assert other_fp != fp  # the key id makes symmetric-scheme fingerprints key-specific
    with pytest.raises(he.HEContextError, match="fingerprint"):
        he.load_secret_context(he.secret_context_bytes(other), expected_fingerprint=fp)
    with pytest.raises(he.HEContextError, match="fingerprint"):
        he.load_public_context(he.public_context_bytes(other), expected_fingerprint=fp)
    with pytest.raises(he.HEContextError, match="SECRET"):
        he.load_public_context(secret)
    with pytest.raises(he.HEContextError):
        he.load_secret_context(pub_bytes)
    with pytest.raises(he.HEContextError, match="deserialize"):
        he.load_public_context(pub_bytes[:-20])


# --------------------------------------------------------------------------- structural checks


def _ctx(bits: list[int], n: int = 8192, scale_bits: int = 40):
    c = ts.context(
        ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=bits, encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1
    )
    c.global_scale = 2.0**scale_bits
    return c


def test_truncated_ciphertexts_are_rejected(pub_ctx, encrypted) -> None:
    good = encrypted[0]
    with pytest.raises(he.CiphertextSizeError, match="truncated"):
        he.load_update(pub_ctx, [good[0][: len(good[0]) // 2], good[1]], N_PARAMS)
    with pytest.raises(he.CiphertextDecodeError, match="truncated or corrupt"):
        he.load_update(pub_ctx, [good[0][:-1], good[1]], N_PARAMS)
    with pytest.raises(he.CiphertextCountError, match="expected 2"):
        he.load_update(pub_ctx, good[:1], N_PARAMS)
    with pytest.raises(he.CiphertextCountError):
        he.load_update(pub_ctx, good[0], N_PARAMS)  # type: ignore[arg-type]  # bytes, not a list
    with pytest.raises(he.CiphertextParamsError, match="expected 1 / 905"):
        he.load_update(pub_ctx, [good[0], good[0]], N_PARAMS)  # a full chunk where the last belongs


def test_ciphertexts_with_other_parameters_are_rejected(ctx, pub_ctx) -> None:
    def blobs_from(other) -> list[bytes]:
        return [ts.ckks_vector(other, [0.1] * 4096).serialize(), ts.ckks_vector(other, [0.1] * 905).serialize()]

    # Same N and prime count, other moduli: deserializes structurally, SEAL refuses it for this context.
    with pytest.raises(he.CiphertextParamsError, match="not a ciphertext of this federation"):
        he.load_update(pub_ctx, blobs_from(_ctx([58, 60])), N_PARAMS)
    with pytest.raises(he.CiphertextSizeError, match="other HE parameters"):  # N=16384
        he.load_update(pub_ctx, blobs_from(_ctx([60, 60], n=16384)), N_PARAMS)
    with pytest.raises(he.CiphertextSizeError, match="other HE parameters"):  # TenSEAL defaults: 3 data primes
        he.load_update(pub_ctx, blobs_from(_ctx([60, 40, 40, 60])), N_PARAMS)
    wrong_scale = [ts.ckks_vector(ctx, [0.1] * 4096, scale=2.0**30).serialize(), blobs_from(ctx)[1]]
    with pytest.raises(he.CiphertextParamsError, match="scale 2\\^30"):
        he.load_update(pub_ctx, wrong_scale, N_PARAMS)


def test_foreign_key_sums_but_decrypts_to_garbage_the_norm_check_catches(ctx, pub_ctx, encrypted) -> None:
    foreign = he.create_context(max_clients=10, bound=B)  # same scheme, another secret key
    rogue = he.encrypt_update(foreign, np.full(N_PARAMS, 0.01), 1.0, bound=B)
    total = he.sum_ciphertexts(pub_ctx, [*encrypted, rogue], n_params=N_PARAMS)  # structurally fine
    with pytest.raises(he.AggregateNormError):
        mean, _ = he.decrypt_sum(ctx, total, N_PARAMS)
        he.check_aggregate_norm(mean, B)
    # Even without the weight-slot check, the values alone are far outside ±B.
    raw = np.concatenate([ts.ckks_vector_from(ctx, b).decrypt() for b in total])[:N_PARAMS]
    with pytest.raises(he.AggregateNormError, match="exceeds the bound"):
        he.check_aggregate_norm(raw, B)


def test_oversized_values_wrap_around_and_are_caught(ctx, pub_ctx) -> None:
    # Dishonest nodes bypass encrypt_update's bound. SEAL encodes at most |x| = 2^18 here (2^58 < q/2
    # = 2^59), but three such values sum past q/2 and wrap around: the aggregate decrypts to garbage.
    v = 2.0**18
    huge = [ts.ckks_vector(ctx, [v] * 4096).serialize(), ts.ckks_vector(ctx, [v] * 905).serialize()]
    total = he.sum_ciphertexts(pub_ctx, [huge, huge, huge], n_params=N_PARAMS)
    raw = np.concatenate([ts.ckks_vector_from(ctx, b).decrypt() for b in total])
    assert raw.max() < 0  # 3·2^18 wrapped to 3·2^18 - q/2^40 ≈ -262,144
    with pytest.raises(he.AggregateNormError):
        he.decrypt_sum(ctx, total, N_PARAMS, max_weight=3)
    with pytest.raises(he.AggregateNormError):
        he.check_aggregate_norm(raw[:N_PARAMS], B)


def test_check_aggregate_norm() -> None:
    he.check_aggregate_norm(np.array([B, -B, 0.0]), B)
    with pytest.raises(he.AggregateNormError, match="non-finite"):
        he.check_aggregate_norm(np.array([0.0, np.nan]), B)
    with pytest.raises(he.AggregateNormError, match="L2"):
        he.check_aggregate_norm(np.full(100, 0.5), B, l2_bound=1.0)


# --------------------------------------------------------------------------- bounds and capacity


def test_capacity_refuses_combinations_that_could_overflow() -> None:
    scheme = he.get_scheme("fedguard-add")
    assert he.capacity(scheme) == 262143  # floor(q / 2^42), q the 60-bit data prime
    he.check_capacity(scheme, 262143, 1.0)
    he.check_capacity(scheme, 1000, 262.0)
    he.check_capacity(scheme, 10, 0.01)  # the weight slot needs max(B, 1)
    for max_clients, bound in [(262144, 1.0), (262144, 0.01), (1000, 263.0), (1, 1e6)]:
        with pytest.raises(he.HECapacityError, match="capacity 262,143"):
            he.check_capacity(scheme, max_clients, bound)
    with pytest.raises(he.HECapacityError):
        he.create_context(max_clients=1000, bound=300.0)
    with pytest.raises(he.HECapacityError):
        he.check_capacity(scheme, 0, 1.0)
    with pytest.raises(he.HECapacityError):
        he.check_capacity(scheme, 10, float("inf"))
    assert he.capacity(he.get_scheme("tenseal-default")) > 2**90
    with pytest.raises(he.HEError, match="unknown HE scheme"):
        he.get_scheme("bfv")


def test_capacity_of_a_loaded_context_matches_its_scheme(pub_ctx) -> None:
    assert he.capacity(pub_ctx) == he.capacity(he.get_scheme("fedguard-add"))


def test_encrypt_refuses_out_of_bound_updates(ctx) -> None:
    with pytest.raises(he.UpdateBoundError, match="exceeds the federation's bound"):
        he.encrypt_update(ctx, np.array([0.0, 1.5]), 1.0, bound=B)
    with pytest.raises(he.UpdateBoundError, match="non-finite"):
        he.encrypt_update(ctx, np.array([0.0, np.inf]), 1.0, bound=B)
    for w in (0.0, 1.5, float("nan")):
        with pytest.raises(he.UpdateBoundError, match="weight"):
            he.encrypt_update(ctx, np.array([0.0]), w, bound=B)
    with pytest.raises(he.UpdateBoundError, match="empty"):
        he.encrypt_update(ctx, np.array([]), 1.0, bound=B)


# --------------------------------------------------------------------------- sealing


@pytest.fixture(scope="module")
def node_keys() -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    return node_keypair(), node_keypair()


def test_sealed_he_context_round_trip(ctx, pub_bytes, node_keys) -> None:
    (priv, pub), _ = node_keys
    fp = he.fingerprint(pub_bytes)
    aad = sealing_aad("fed-1", "hospital-a", fp)
    sealed = seal(pub, he.secret_context_bytes(ctx), aad)
    opened = unseal(priv, sealed, aad)
    node_ctx = he.load_secret_context(opened, expected_fingerprint=fp)
    assert he.secret_context_bytes(node_ctx) == he.secret_context_bytes(ctx)
    assert seal(pub, b"x", aad) != seal(pub, b"x", aad)  # fresh ephemeral key and nonce each time
    assert key_id(pub).startswith("SHA256:")


def test_unseal_fails_with_another_nodes_key(node_keys) -> None:
    (_, pub_a), (priv_b, _) = node_keys
    aad = sealing_aad("fed-1", "hospital-a", "sha256:00")
    with pytest.raises(SealedForAnotherKeyError):
        unseal(priv_b, seal(pub_a, b"secret", aad), aad)


@pytest.mark.parametrize(
    "change", ["federation", "node", "fingerprint", "ciphertext", "tag", "ephemeral key", "truncated"]
)
def test_unseal_detects_tampering(node_keys, change: str) -> None:
    (priv, pub), _ = node_keys
    aad = sealing_aad("fed-1", "hospital-a", "sha256:ab")
    sealed = bytearray(seal(pub, b"the HE secret context", aad))
    other_aad = {
        "federation": sealing_aad("fed-2", "hospital-a", "sha256:ab"),
        "node": sealing_aad("fed-1", "hospital-b", "sha256:ab"),
        "fingerprint": sealing_aad("fed-1", "hospital-a", "sha256:ac"),
    }
    if change in other_aad:
        aad = other_aad[change]
    elif change == "ciphertext":
        sealed[-20] ^= 1
    elif change == "tag":
        sealed[-1] ^= 1
    elif change == "ephemeral key":
        sealed[8 + 32 + 50] ^= 1
    else:
        sealed = sealed[:100]
    with pytest.raises(SealTamperedError):
        unseal(priv, bytes(sealed), aad)


def test_sealing_aad_is_unambiguous() -> None:
    assert sealing_aad("ab", "c", "f") != sealing_aad("a", "bc", "f")


def test_seal_refuses_keys_that_are_not_p384(node_keys) -> None:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ed_pub = ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(SealingError, match="P-384"):
        seal(ed_pub, b"x", b"")
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SealingError, match="P-384"):
        seal(p256.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH), b"x", b"")
    with pytest.raises(SealingError, match="OpenSSH public key"):
        seal(b"not a key", b"x", b"")
    with pytest.raises(SealingError, match="private key"):
        unseal(b"-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n", b"", b"")
