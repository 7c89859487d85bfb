"""Threshold secure aggregation (SecAgg, Bell et al. 2020) on Flower's own primitives: what both sides share.

Each round every sampled node makes two fresh EC P-384 key pairs (``pk1`` for pairwise masks,
``pk2`` to encrypt shares) and a self-mask seed ``b``; it Shamir-shares (t of n) ``b`` and the
mask key ``sk1`` among the round's nodes, each share encrypted for its peer with a key from ECDH
agreement, so the server only routes ciphertexts. A node's upload is its quantized, weighted
update plus its integer weight, masked with ``PRG(b)`` and ``±PRG(s_ij)`` for every peer ``j``
(mod 2^32): pairwise masks cancel in the sum. To unmask, the survivors reveal ``b`` shares of the
nodes whose vectors arrived and ``sk1`` shares of those that dropped before sending, never both
kinds for one node, and only when at least t nodes (and the run's minimum) contributed.

Flower's primitives: Shamir sharing (``crypto.shamir``), ECDH + HKDF key agreement and Fernet
encryption (``crypto.symmetric_encryption``), the share framing (``share_keys_plaintext_*``),
key pairs (``supercore.primitives.asymmetric``), quantization. One deliberate exception: masks
are expanded with AES-256-CTR (``cryptography``), not Flower's ``pseudo_rand_gen``, which folds
the seed to 32 bits and draws from MT19937: 2^32 seeds can be searched, and MT19937's state
follows from its outputs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common import records as R
from common.config import RunConfig
from common.errors import ConfigError, FedGuardError
from common.flower_internals import (  # Flower's SecAgg+ building blocks, through the one Flower adapter
    bytes_to_private_key,
    bytes_to_public_key,
    combine_shares,
    create_shares,
    decrypt,
    dequantize,
    encrypt,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    public_key_to_bytes,
    quantize,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from common.he_custody import unflatten

# -- record and key names -----------------------------------------------------------------------
#: Node → server: advertised keys, encrypted shares, revealed shares (a ConfigRecord).
SECAGG = R.SECAGG
#: Node → server: the masked, quantized, weighted update (an ArrayRecord holding one uint32 vector).
SECAGG_MASKED = R.SECAGG_MASKED
MASKED_VECTOR = "masked"

# Keys of the SECAGG record (node → server).
PK1 = "pk1"  # public mask key (PEM)
PK2 = "pk2"  # public share-encryption key (PEM)
WEIGHT = "weight"  # the declared public FedAvg weight, announced before training
DSTS = "dsts"  # share step: the peer each ciphertext is for
CIPHERTEXTS = "ciphertexts"
SHARE_NODES = "share-nodes"  # unmask step: whose share each entry is
SHARE_KINDS = "share-kinds"  # "b" (self-mask seed of a contributor) or "sk" (mask key of a dropout)
SHARES = "shares"

# Keys of the CONFIG record (server → node).
SESSION = "secagg-session"  # random per round attempt: a node's secrets belong to one session
THRESHOLD = "secagg-threshold"
PEERS = "secagg-peers"  # node ids, in the order shares are indexed
PEER_PK1 = "secagg-pk1"
PEER_PK2 = "secagg-pk2"
SRCS = "secagg-srcs"  # train: who each forwarded ciphertext is from
FORWARDED = "secagg-ciphertexts"
WEIGHT_MAX = "secagg-weight-max"  # train: the largest announced weight (updates are scaled by w / w_max)
SURVIVORS = "secagg-survivors"  # unmask: nodes whose masked vectors arrived
DROPPED = "secagg-dropped"  # unmask: nodes that shared keys but sent no vector

#: The allow-list entries of the secagg replies, with their privacy classes (common/records.py, docs/privacy.md).
ALLOWLIST: dict[str, dict[str, R.PrivacyClass]] = {n: R.REPLY_ALLOWLIST[n] for n in (SECAGG, SECAGG_MASKED)}

#: Masked vectors live in Z_(2^32): uint32 arithmetic wraps exactly there.
MODULUS = 2**32


class SecAggError(FedGuardError):
    """A secure-aggregation step was refused (by a node: nothing is revealed; by the server: the round is discarded)."""

    code = "secagg-refused"


# -- configuration --------------------------------------------------------------------------------
def threshold(cfg: RunConfig, sampled: int) -> int:
    """t for a round of ``sampled`` nodes: the config's, else a strict majority ⌊n/2⌋+1 (at least 2).

    A strict majority is what makes asking for both kinds of share useless: the server would need
    t ``b`` shares and t ``sk1`` shares of one node from disjoint sets of nodes, 2t > n of them.
    """
    if cfg.secagg.threshold is not None:
        return cfg.secagg.threshold
    return max(2, min(sampled, sampled // 2 + 1))  # never 1: the "sum" of one update is that update


def check_config(cfg: RunConfig) -> None:
    """Refuse a secagg config that could not run, or could reveal fewer contributions than the run demands."""
    n, sa = cfg.clients_per_round, cfg.secagg
    if n < 2:
        raise ConfigError(
            "secure aggregation needs at least 2 nodes per round: the sum of one update is the update",
            where="clients_per_round",
            fix="set clients_per_round ≥ 3",
        )
    t = threshold(cfg, n)
    if t > n:
        raise ConfigError(
            f"secagg.threshold {t} exceeds clients_per_round {n}: no round could unmask",
            where="secagg.threshold",
            fix=f"set secagg.threshold ≤ {n}, or leave it unset for a majority of each round's nodes",
        )
    if sa.threshold is not None and 2 * sa.threshold <= n:
        raise ConfigError(
            f"secagg.threshold {sa.threshold} is not a majority of {n} nodes: a server could obtain both the "
            "self-mask and the mask-key shares of one node from two disjoint sets of nodes",
            where="secagg.threshold",
            fix=f"set secagg.threshold ≥ {n // 2 + 1}",
        )
    if n * sa.quantization_range >= MODULUS:
        raise ConfigError(
            f"{n} nodes × quantization_range {sa.quantization_range} overflows the 2^32 masking ring",
            where="secagg.quantization_range",
            fix=f"set secagg.quantization_range < {MODULUS // n}",
        )
    if n * cfg.server.max_weight >= MODULUS:
        raise ConfigError(
            f"{n} nodes × server.max_weight {cfg.server.max_weight:g} overflows the 2^32 masking ring",
            where="server.max_weight",
            fix=f"set server.max_weight < {MODULUS // n}",
        )


def error_bound(cfg: RunConfig, contributors: int, weight_ratio_sum: float) -> float:
    """Largest quantization error of one coordinate of the weighted mean update (clipping aside).

    Each node's stochastic rounding errs by less than one step 2c/Q per value; the sum of m nodes
    by less than m steps; the mean divides by Σ w_i / w_max (≥ the largest contributor's share).
    """
    step = 2 * cfg.secagg.clipping_range / cfg.secagg.quantization_range
    return contributors * step / weight_ratio_sum


# -- keys, shares and their encryption (Flower's primitives) --------------------------------------
@dataclass
class KeyPairs:
    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes


def new_key_pairs() -> KeyPairs:
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return KeyPairs(
        private_key_to_bytes(sk1), public_key_to_bytes(pk1), private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    )


def check_public_key(pem: bytes, what: str) -> None:
    """A peer's advertised key must be an EC P-384 public key (the curve Flower's key pairs use)."""
    try:
        key = bytes_to_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"{what} is not a PEM public key ({type(exc).__name__})") from None
    if getattr(key, "curve", None) is None or key.curve.name != "secp384r1":
        raise SecAggError(f"{what} is not an EC P-384 key")


def shared_key(own_private_pem: bytes, peer_public_pem: bytes) -> bytes:
    """ECDH + HKDF (Flower's ``generate_shared_key``): the same 32-byte key on both sides."""
    return generate_shared_key(bytes_to_private_key(own_private_pem), bytes_to_public_key(peer_public_pem))


def seal_share(key: bytes, src: int, dst: int, b_share: bytes, sk_share: bytes) -> bytes:
    return encrypt(key, share_keys_plaintext_concat(src, dst, b_share, sk_share))


def open_share(key: bytes, src: int, dst: int, ciphertext: bytes) -> tuple[bytes, bytes]:
    """The (b, sk1) shares ``src`` sealed for ``dst``; refuses one sealed by or for another node."""
    try:
        actual_src, actual_dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
    except Exception as exc:  # noqa: BLE001 - Fernet's InvalidToken and framing errors alike
        raise SecAggError(
            f"the share from node {src} does not open with our agreed key ({type(exc).__name__})"
        ) from None
    if (actual_src, actual_dst) != (src, dst):
        raise SecAggError(f"a share relayed as {src}→{dst} was sealed for {actual_src}→{actual_dst}")
    return b_share, sk_share


def split(secret: bytes, t: int, n: int) -> list[bytes]:
    """``n`` Shamir shares of ``secret``, any ``t`` of which rebuild it (share i goes to the i-th peer)."""
    return create_shares(secret, t, n)


def reconstruct(shares: Sequence[bytes], t: int, what: str) -> bytes:
    """The secret from at least ``t`` shares (Flower's Shamir over GF(2^128))."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} share(s) of {what}; {t} are needed")
    try:
        return combine_shares(list(shares))
    except ValueError:
        raise SecAggError(f"the shares of {what} do not combine (a node sent a wrong share)") from None


# -- masks (AES-256-CTR) ----------------------------------------------------------------------------
def expand(seed: bytes, length: int, label: bytes) -> np.ndarray:
    """``length`` uint32 values of AES-256-CTR keystream under SHA-256(domain, label, seed)."""
    key = hashlib.sha256(b"fedguard-secagg-mask/1\n" + label + b"\n" + bytes(seed)).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def pair_mask(shared: bytes, session: str, length: int) -> np.ndarray:
    return expand(shared, length, b"pair:" + session.encode())


def self_mask(b: bytes, session: str, length: int) -> np.ndarray:
    return expand(b, length, b"self:" + session.encode())


def _sign(own: int, peer: int) -> int:
    """The node with the larger id adds the pair's mask, the other subtracts it: they cancel."""
    return 1 if own > peer else -1


# -- encode, mask, unmask, decode -------------------------------------------------------------------
def encode(
    delta: np.ndarray, ratio: float, weight: int, clipping_range: float, quantization_range: int
) -> tuple[np.ndarray, int]:
    """``[quantize(ratio·Δ), weight]`` as uint32, and how many values were clipped to ±c."""
    scaled = np.asarray(delta, dtype=np.float64) * ratio
    clipped = int(np.count_nonzero(np.abs(scaled) > clipping_range))
    q = quantize([scaled], clipping_range, quantization_range)[0]
    vector = np.empty(q.size + 1, dtype=np.uint32)
    vector[:-1] = q.astype(np.uint32)
    vector[-1] = np.uint32(weight)
    return vector, clipped


def mask(vector: np.ndarray, own: int, b: bytes, sk1: bytes, peer_pk1: Mapping[int, bytes], session: str) -> np.ndarray:
    """``vector + PRG(b) + Σ_j ±PRG(s_ij)`` mod 2^32, over every peer ``j`` that shared keys this round."""
    out = vector.astype(np.uint32) + self_mask(b, session, vector.size)
    for peer, pk1 in peer_pk1.items():
        if peer == own:
            continue
        m = pair_mask(shared_key(sk1, pk1), session, vector.size)
        out = out + m if _sign(own, peer) > 0 else out - m
    return out


def unmask(
    total: np.ndarray,
    session: str,
    seeds: Mapping[int, bytes],
    dropped_keys: Mapping[int, bytes],
    survivor_pk1: Mapping[int, bytes],
) -> np.ndarray:
    """Remove the survivors' self masks and the masks they shared with nodes that dropped before sending."""
    out = total.astype(np.uint32, copy=True)
    for b in seeds.values():
        out -= self_mask(b, session, out.size)
    for gone, sk1 in dropped_keys.items():
        for node, pk1 in survivor_pk1.items():
            m = pair_mask(shared_key(sk1, pk1), session, out.size)
            out = out - m if _sign(node, gone) > 0 else out + m  # undo what the survivor applied
    return out


def decode(
    plain_sum: np.ndarray, contributors: int, weight_max: float, clipping_range: float, quantization_range: int
) -> tuple[np.ndarray, int]:
    """(the weighted mean update Σ r_iΔ_i / Σ r_i with r_i = w_i / w_max, Σ w_i) from the unmasked sum."""
    weight_sum = int(plain_sum[-1])
    if weight_sum <= 0:
        raise SecAggError("the unmasked weight sum is 0: the masks did not cancel")
    summed = dequantize([plain_sum[:-1].astype(np.int64)], clipping_range, quantization_range)[0]
    summed = summed - (contributors - 1) * clipping_range  # dequantize removes one node's offset
    return summed / (weight_sum / weight_max), weight_sum


def ratio(weight: int, weight_max: float) -> float:
    return float(weight) / float(weight_max)


def mean_state(
    current: Mapping[str, np.ndarray], mean_delta: np.ndarray, keys: Sequence[str]
) -> OrderedDict[str, np.ndarray]:
    """The clients' weighted mean model: the current global model moved by the mean update."""
    delta = unflatten(mean_delta, current, keys)
    return OrderedDict((k, (v + delta[k]).astype(v.dtype) if k in delta else v) for k, v in current.items())


def describe_trust(cfg: RunConfig) -> list[str]:
    """Who could learn what with whom in this run's aggregation mode: for the privacy report and dashboard."""
    if cfg.secure_aggregation != "secagg":
        return []
    sa, n = cfg.secagg, cfg.clients_per_round
    t = threshold(cfg, n)
    step = 2 * sa.clipping_range / sa.quantization_range
    return [
        f"Aggregation: threshold secure aggregation (SecAgg on Flower's primitives), t = {t} of {n} sampled "
        + ("nodes (secagg.threshold)" if sa.threshold is not None else "nodes (a majority of each round's nodes)"),
        "The server and the evaluator learn only the sum of the round's contributions (at least "
        f"max(t, server.min_replies) = {max(t, cfg.server.min_replies)} signed updates) and the declared weights.",
        f"No single party — server, evaluator or node — can read an individual update; the server with fewer than "
        f"t = {t} nodes cannot either (each node reveals, per peer, either the self-mask share or the mask-key "
        "share, never both, and only when enough nodes contributed).",
        f"The server with t = {t} or more colluding nodes can unmask a node's update; "
        + (
            "DP-SGD on the node still bounds what that update reveals about any record."
            if cfg.dp.enabled
            else "DP is disabled in this run, so nothing bounds what that update reveals about any record."
        ),
        "As with any sum, colluding nodes can subtract their own updates: if all contributors but one collude with "
        "the server, the sum reveals that one's update.",
        "Peers' keys reach a node through the server, which routes them honestly in this version: nodes do not yet "
        "check peers against the enrolled set, so a server that invents nodes is outside this guarantee.",
        f"Quantization: each weighted value is clipped to ±{sa.clipping_range:g} and rounded stochastically to steps "
        f"of {step:.3g}; the mean's error per value is below m·{step:.3g} / Σ(w_i / w_max) for m contributors.",
    ]
