"""Homomorphic aggregation building blocks: TenSEAL CKKS contexts, update packing, checked sums.

Roles (docs/homomorphic.md, "Key custody"; docs/security.md):

- the **evaluator** creates the secret context (:func:`create_context`) and derives the *public*
  context for the server (:func:`public_context_bytes`): no secret key, no Galois or relinearization
  keys — the server can only add. Enrolled nodes receive the secret context sealed to their own
  key (``common.sealing``) and check it against the federation's :func:`fingerprint`.
- a **node** encrypts its weighted update (:func:`encrypt_update`): ``w·Δ`` in the value slots and
  ``w`` itself in the spare slot after them, so the decryptor divides by ``Σw`` after decryption
  and no homomorphic multiplication (hence no rescale, no extra modulus) is ever needed.
- the **server** checks every update's structure and adds it (:class:`CiphertextSum`,
  :func:`sum_ciphertexts`); it never sees a plaintext.
- the **evaluator** recomputes the sum itself (:func:`verify_sum`), decrypts it
  (:func:`decrypt_sum`, values rounded before they leave) and checks the aggregate's norm
  (:func:`check_aggregate_norm`): a ciphertext made under another key, or values a dishonest node
  pushed past the bound, decrypt to garbage that the bound catches.

Scheme choice (measured by ``bench/he_aggregation.py``; notes/opacus-tenseal.md): ``fedguard-add``
is CKKS with N=8192, coefficient moduli [60, 60] and scale 2^40. Ciphertexts live on the single
60-bit data prime (the second prime is SEAL's key-switching prime, never stored in a ciphertext):
two polynomials of 8192 64-bit words per 4096 values = 8× float32, plus 0.1% of headers and the
partly filled last ciphertext (8.04× at 1M parameters). A smaller data prime uploads less (58 bits:
7.80×) because SEAL's zstd then Huffman-codes the ciphertexts, but deserializing them costs the
server 2.4× more (0.12 vs 0.05 CPU-s per client per 1M): not worth 3% of bytes. Encryption is
symmetric (every key holder has the secret key anyway; 3.4× faster than public-key encryption,
with less noise). ``tenseal-default`` ([60, 40, 40, 60], public-key encryption) is kept for
comparison.

Overflow bound (:func:`check_capacity`): a slot of the sum holds ``Σ wᵢ·Δᵢⱼ`` with ``wᵢ ≤ 1`` and
``|Δᵢⱼ| ≤ B``, or ``Σ wᵢ ≤ K`` (the weight slot), so ``|slot| ≤ K·max(B, 1)``. CKKS encodes a slot
vector ``z`` as a polynomial with coefficients ``|mᵢ| ≤ 2^s·‖z‖∞`` (the inverse canonical embedding
averages), and decryption is correct while ``|m + e| < q/2`` for the data modulus ``q``. FedGuard
requires ``K·max(B, 1)·2^s ≤ q/4``, leaving ``q/4`` for the noise ``e`` (≤ ~22·K per coefficient
for symmetric encryption). For ``fedguard-add``: ``K·max(B, 1) ≤ 262,143``.

Precision: the error of one decrypted slot is about 1e-9 per summed update at scale 2^40 (measured
in tests/test_he.py and the bench); decrypted sums are rounded to 7 decimals (:func:`round_digits_for`)
before anything leaves the decryptor (CKKS is not IND-CPA^D secure: released exact decryptions
leak the key), so the weighted mean is exact to ``(0.5e-7 + noise)/Σw``.

Parallelism: TenSEAL holds the GIL and, measured here, a context's ``n_threads`` did not speed up
``ckks_tensor`` encryption at all (1.00×; CPU time = wall time), so :func:`encrypt_update` can fan
out to processes (``workers`` or a reusable :class:`EncryptPool`). On this shared 2-core machine
that did not pay off at ≤ 1M parameters (a cold pool adds 0.5-2 s; a warm 2-process pool ran 0.7×
to 1.3× the sequential speed depending on other load), so the default is sequential; use a warm pool
on nodes with idle cores and models well above 1M parameters.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import tenseal as ts  # type: ignore[import-untyped]
import tenseal.sealapi as sealapi  # type: ignore[import-untyped]  # registers seal::Modulus for ts

from common.errors import FedGuardError

if TYPE_CHECKING:  # flwr is imported lazily: encryption worker processes must start fast
    from flwr.app import ArrayRecord

__all__ = [
    "CKKS_DTYPE",
    "CKKS_STYPE",
    "DEFAULT_SCHEME",
    "SCHEMES",
    "AggregateNormError",
    "CiphertextCountError",
    "CiphertextDecodeError",
    "CiphertextError",
    "CiphertextParamsError",
    "CiphertextSizeError",
    "CiphertextSum",
    "EncryptPool",
    "HECapacityError",
    "HEContextError",
    "HEError",
    "HEScheme",
    "SumMismatchError",
    "UpdateBoundError",
    "blobs_to_record",
    "capacity",
    "check_aggregate_norm",
    "check_capacity",
    "context_info",
    "create_context",
    "decrypt_sum",
    "encrypt_update",
    "fingerprint",
    "get_scheme",
    "load_public_context",
    "load_secret_context",
    "load_update",
    "n_ciphertexts",
    "public_context_bytes",
    "record_to_blobs",
    "round_digits_for",
    "secret_context_bytes",
    "sum_ciphertexts",
    "verify_sum",
]

CKKS_DTYPE = "ckks"
CKKS_STYPE = "tenseal.ckks"
_RECORD_KEY = "ct{:05d}"
_PUB_MAGIC = b"FGHEPUB1"  # + 32-byte key id + TenSEAL public context
_SEC_MAGIC = b"FGHESEC1"  # + TenSEAL secret context
_KEY_ID_DOMAIN = b"fedguard/he-key-id/v1\x00"
_BLOB_SLACK = 512  # SEAL header + members + zstd frame + protobuf framing, measured 145 bytes


# --------------------------------------------------------------------------- errors


class HEError(FedGuardError):
    """Homomorphic-encryption problem (context, capacity, ciphertexts or aggregate)."""

    code = "he-error"


class HEContextError(HEError):
    """A context is the wrong kind (public vs secret), corrupt, or not the federation's."""

    code = "he-context-invalid"


class HECapacityError(HEError):
    """(max_clients, bound) could overflow the scheme's modulus: the sum would wrap around."""

    code = "he-capacity-exceeded"


class UpdateBoundError(HEError):
    """An update to encrypt is non-finite or exceeds the federation's per-coordinate bound."""

    code = "he-update-out-of-bound"


class CiphertextError(HEError):
    """An encrypted update failed the structural check (base class; subclasses name the reason)."""

    code = "ciphertext-invalid"


class CiphertextCountError(CiphertextError):
    """Wrong number of ciphertexts for the model size, or a malformed ArrayRecord."""

    code = "ciphertext-count"


class CiphertextSizeError(CiphertextError):
    """A ciphertext's byte length cannot belong to this context (truncated or other parameters)."""

    code = "ciphertext-size"


class CiphertextDecodeError(CiphertextError):
    """A ciphertext does not deserialize (truncated or corrupt bytes)."""

    code = "ciphertext-decode"


class CiphertextParamsError(CiphertextError):
    """A ciphertext deserializes but was made with other parameters, scale, level or layout."""

    code = "ciphertext-params"


class SumMismatchError(HEError):
    """The server's sum differs from the sum the evaluator recomputed from the signed updates."""

    code = "he-sum-mismatch"


class AggregateNormError(HEError):
    """A decrypted aggregate is non-finite or outside its bound: garbage (foreign key, overflow)."""

    code = "aggregate-out-of-bound"


# --------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class HEScheme:
    """Named CKKS parameters. ``coeff_mod_bit_sizes[-1]`` is SEAL's key-switching prime."""

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    symmetric: bool
    description: str

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_modulus(self) -> int:
        """The exact ciphertext modulus q (product of the data primes) SEAL picks for these sizes."""
        return _data_modulus(self.poly_modulus_degree, self.coeff_mod_bit_sizes)


SCHEMES: dict[str, HEScheme] = {
    s.name: s
    for s in (
        HEScheme(
            name="fedguard-add",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 60),
            scale_bits=40,
            symmetric=True,
            description="add-only, symmetric: 8.0x float32, K*max(B,1) <= 262,143",
        ),
        HEScheme(
            name="tenseal-default",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40, 60),
            scale_bits=40,
            symmetric=False,
            description="TenSEAL tutorial defaults, public-key encryption: 20x float32 (comparison)",
        ),
    )
}
DEFAULT_SCHEME = "fedguard-add"


def get_scheme(name: str) -> HEScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise HEError(
            f"unknown HE scheme {name!r}", where="he-scheme", fix=f"use one of {', '.join(SCHEMES)}"
        ) from None


@lru_cache(maxsize=16)
def _data_modulus(n: int, bits: tuple[int, ...]) -> int:
    primes = [m.value() for m in sealapi.CoeffModulus.Create(n, list(bits))]
    data = primes[:-1] if len(primes) > 1 else primes
    return math.prod(data)


def _context_modulus(ctx: Any) -> int:
    return int(ctx.data.seal_context().first_context_data().total_coeff_modulus())


def _scale_of(ctx: Any) -> float:
    try:
        return float(ctx.global_scale)
    except ValueError:
        raise HEContextError(
            "the HE context has no global scale", fix="create contexts with common.he.create_context"
        ) from None


def capacity(scheme: HEScheme | Any) -> int:
    """Largest allowed ``max_clients · max(bound, 1)``: ``floor(q / 2^(scale_bits + 2))``."""
    if isinstance(scheme, HEScheme):
        q, scale = scheme.data_modulus, float(2**scheme.scale_bits)
    else:
        q, scale = _context_modulus(scheme), _scale_of(scheme)
    return int(q // int(scale * 4))


def check_capacity(scheme: HEScheme | Any, max_clients: int, bound: float) -> None:
    """Refuse (max_clients, bound) unless ``max_clients · max(bound, 1) · 2^s ≤ q/4`` (module doc).

    ``bound`` is the per-coordinate bound ``|Δ| ≤ B`` every node enforces before encrypting; weights
    are ≤ 1, so the weight slot contributes the ``max(·, 1)``. ``scheme`` is an :class:`HEScheme`
    or a loaded context (its actual modulus and scale are used).
    """
    if not (isinstance(max_clients, int) and max_clients >= 1):
        raise HECapacityError(f"max_clients must be a positive integer, got {max_clients!r}", where="he-max-clients")
    if not (math.isfinite(bound) and bound > 0):
        raise HECapacityError(f"the update bound must be finite and > 0, got {bound!r}", where="he-bound")
    cap = capacity(scheme)
    need = max_clients * max(float(bound), 1.0)
    if need > cap:
        name = scheme.name if isinstance(scheme, HEScheme) else "this context"
        raise HECapacityError(
            f"{max_clients} clients x max(bound {bound:g}, 1) = {need:,.0f} exceeds {name}'s capacity {cap:,}: "
            "the encrypted sum could wrap around the ciphertext modulus and decrypt to garbage",
            where="he-max-clients / he-bound",
            fix=f"lower max_clients or the per-coordinate bound so that max_clients*max(bound,1) <= {cap:,}",
        )


def n_ciphertexts(n_params: int, slots: int = SCHEMES[DEFAULT_SCHEME].slots) -> int:
    """Ciphertexts per update: ``n_params`` values plus the weight slot, ``slots`` per ciphertext."""
    return -(-(n_params + 1) // slots)


def _chunk_sizes(n_params: int, slots: int) -> list[int]:
    total = n_params + 1
    k = n_ciphertexts(n_params, slots)
    return [slots] * (k - 1) + [total - slots * (k - 1)]


# --------------------------------------------------------------------------- contexts


def create_context(scheme: str | HEScheme = DEFAULT_SCHEME, *, max_clients: int, bound: float) -> Any:
    """A fresh secret context (the evaluator's): checks capacity first, sets the global scale.

    No Galois keys are generated and relinearization keys are never serialized: aggregation only adds.
    """
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    check_capacity(sch, max_clients, bound)
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if sch.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        sch.poly_modulus_degree,
        coeff_mod_bit_sizes=list(sch.coeff_mod_bit_sizes),
        encryption_type=enc,
        n_threads=1,  # measured: TenSEAL's thread pool gave no speed-up; don't start idle threads
    )
    ctx.global_scale = float(2**sch.scale_bits)
    return ctx


def _is_symmetric(ctx: Any) -> bool:
    try:
        ctx.has_public_key()
    except ValueError:  # "has_public_key is not supported for symmetric encryption"
        return True
    return False


def _tenseal_bytes(ctx: Any, *, secret: bool) -> bytes:
    pub = not _is_symmetric(ctx) and ctx.has_public_key()
    return bytes(
        ctx.serialize(save_public_key=pub, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False)
    )


def _require_secret(ctx: Any, what: str) -> None:
    if not ctx.is_private():
        raise HEContextError(
            f"{what} needs the secret HE context, but this context holds no secret key",
            fix="load the secret context delivered (sealed) to this node, not the server's public context",
        )


def secret_context_bytes(ctx: Any) -> bytes:
    """The secret context for sealing to enrolled nodes: secret key, parameters, scale; no Galois keys."""
    _require_secret(ctx, "secret_context_bytes")
    return _SEC_MAGIC + _tenseal_bytes(ctx, secret=True)


def public_context_bytes(ctx: Any) -> bytes:
    """The server's context: parameters and scale (+ public key for public-key schemes), no secret,
    Galois or relinearization keys, and a key id (SHA-256 commitment to the secret context).

    The key id matters for symmetric schemes, whose public context otherwise holds only parameters:
    without it every federation using the scheme would share one fingerprint.
    """
    _require_secret(ctx, "public_context_bytes")
    key_id = hashlib.sha256(_KEY_ID_DOMAIN + _tenseal_bytes(ctx, secret=True)).digest()
    return _PUB_MAGIC + key_id + _tenseal_bytes(ctx, secret=False)


def fingerprint(public_bytes: bytes) -> str:
    """``sha256:<hex>`` of the serialized public context: what nodes, server and evaluator compare."""
    if not public_bytes.startswith(_PUB_MAGIC):
        raise HEContextError(
            "fingerprint() takes the serialized public context (public_context_bytes)",
            fix="call fingerprint(public_context_bytes(ctx))",
        )
    return "sha256:" + hashlib.sha256(public_bytes).hexdigest()


def _load_tenseal(data: bytes, what: str) -> Any:
    try:
        return ts.context_from(data, n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError with terse messages
        raise HEContextError(
            f"the {what} HE context does not deserialize ({type(exc).__name__}: {exc})",
            fix="re-fetch the context from the evaluator; it may be truncated or from another TenSEAL version",
        ) from None


def load_public_context(data: bytes, *, expected_fingerprint: str | None = None) -> Any:
    """Load the server's public context; refuse a secret one and check the fingerprint if given."""
    if data.startswith(_SEC_MAGIC):
        raise HEContextError(
            "this is the SECRET HE context; the server must only ever hold the public one",
            fix="give the server public_context_bytes(ctx) and delete this copy from the server host",
        )
    if not data.startswith(_PUB_MAGIC) or len(data) < len(_PUB_MAGIC) + 32:
        raise HEContextError("not a FedGuard public HE context (bad header)")
    if expected_fingerprint is not None and fingerprint(data) != expected_fingerprint:
        raise HEContextError(
            f"public HE context fingerprint {fingerprint(data)} != federation's {expected_fingerprint}",
            fix="fetch the public context the evaluator published for this federation",
        )
    ctx = _load_tenseal(data[len(_PUB_MAGIC) + 32 :], "public")
    if ctx.is_private() or ctx.has_galois_keys():
        raise HEContextError("the public HE context carries a secret key or Galois keys; refusing it")
    _scale_of(ctx)
    return ctx


def load_secret_context(data: bytes, *, expected_fingerprint: str | None = None) -> Any:
    """Load a node's/evaluator's secret context; check it matches the federation's fingerprint."""
    if not data.startswith(_SEC_MAGIC):
        raise HEContextError(
            "not a FedGuard secret HE context (bad header)",
            fix="unseal the context the evaluator sealed to this node (common.sealing.unseal)",
        )
    ctx = _load_tenseal(data[len(_SEC_MAGIC) :], "secret")
    _require_secret(ctx, "load_secret_context")
    _scale_of(ctx)
    if expected_fingerprint is not None:
        got = fingerprint(public_context_bytes(ctx))
        if got != expected_fingerprint:
            raise HEContextError(
                f"secret HE context fingerprint {got} != federation's {expected_fingerprint}",
                fix="this key belongs to another federation or an older key; ask the evaluator to re-seal",
            )
    return ctx


def context_info(ctx: Any) -> dict[str, Any]:
    """Parameters of a loaded context (for logs, reports and scheme checks)."""
    parms = ctx.data.seal_context().key_context_data().parms()
    bits = [m.bit_count() for m in parms.coeff_modulus()]
    scale = _scale_of(ctx)
    return {
        "poly_modulus_degree": parms.poly_modulus_degree(),
        "coeff_mod_bit_sizes": bits,
        "scale_bits": math.log2(scale),
        "symmetric": _is_symmetric(ctx),
        "private": ctx.is_private(),
        "galois_keys": ctx.has_galois_keys(),
        "capacity": capacity(ctx),
        "slots": parms.poly_modulus_degree() // 2,
    }


# --------------------------------------------------------------------------- node: encrypt

_WORKER_CTX: Any = None


def _worker_init(secret_tenseal: bytes) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ts.context_from(secret_tenseal, n_threads=1)


def _encrypt_chunks(ctx: Any, chunks: Sequence[np.ndarray]) -> list[bytes]:
    # The raw binding skips ts.ckks_vector's list→numpy→list round trips (~6% of encryption time).
    return [bytes(ts._ts_cpp.CKKSVector(ctx.data, c.tolist()).serialize()) for c in chunks]


def _worker_encrypt(chunks: list[np.ndarray]) -> list[bytes]:
    return _encrypt_chunks(_WORKER_CTX, chunks)


class EncryptPool:
    """Worker processes holding the secret context for :func:`encrypt_update`; close it when done.

    Reuse one across rounds in a long-lived node process: a cold pool costs 0.5-2 s to start
    (forkserver + imports), more than the whole gain at 1M parameters on 2 cores. forkserver, not
    fork: the node process has torch's thread pools running. The caller's main module must be
    import-safe (the usual ``if __name__ == "__main__":`` idiom).
    """

    def __init__(self, ctx: Any, workers: int) -> None:
        _require_secret(ctx, "EncryptPool")
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_worker_init,
            initargs=(_tenseal_bytes(ctx, secret=True),),
        )

    def map(self, chunks: Sequence[np.ndarray]) -> list[bytes]:
        parts = np.array_split(np.arange(len(chunks)), self.workers)
        futures = [self.executor.submit(_worker_encrypt, [chunks[i] for i in idx]) for idx in parts]
        return [blob for f in futures for blob in f.result()]

    def close(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> EncryptPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encrypt_update(
    ctx: Any,
    flat: np.ndarray,
    weight: float,
    *,
    bound: float,
    workers: int = 1,
    pool: EncryptPool | None = None,
) -> list[bytes]:
    """Encrypt ``weight·flat`` plus ``weight`` in the spare slot after it; one blob per ciphertext.

    ``bound`` is the federation's per-coordinate bound B (see :func:`check_capacity`): values with
    ``|x| > B`` are refused, not clipped — clipping is the caller's decision (it is post-processing
    of a DP output, so allowed). ``weight`` is the node's declared public weight in (0, 1].
    ``pool`` (an :class:`EncryptPool` of the same context) or ``workers > 1`` (a temporary pool)
    encrypts in processes; TenSEAL holds the GIL, so threads would not help.
    """
    _require_secret(ctx, "encrypt_update")
    x = np.asarray(flat, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise UpdateBoundError("the update to encrypt is empty")
    if not (math.isfinite(weight) and 0.0 < weight <= 1.0):
        raise UpdateBoundError(
            f"update weight must be in (0, 1], got {weight!r}", fix="normalize declared weights by the config cap"
        )
    if not np.isfinite(x).all():
        raise UpdateBoundError(f"the update has {int((~np.isfinite(x)).sum())} non-finite values (NaN/inf)")
    peak = float(np.abs(x).max())
    if peak > bound:
        raise UpdateBoundError(
            f"the update's largest |value| {peak:.6g} exceeds the federation's bound {bound:g}",
            fix="clip the update to ±bound before encrypting, or raise the bound (within check_capacity)",
        )
    slots = ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2
    values = np.empty(x.size + 1)
    np.multiply(x, weight, out=values[:-1])
    values[-1] = weight
    chunks = [values[i : i + slots] for i in range(0, values.size, slots)]
    n_jobs = pool.workers if pool is not None else workers
    if n_jobs <= 1 or len(chunks) < 2 * n_jobs:
        return _encrypt_chunks(ctx, chunks)
    if pool is not None:
        return pool.map(chunks)
    with EncryptPool(ctx, workers) as tmp:
        return tmp.map(chunks)


# --------------------------------------------------------------------------- server: check and add


def _blob_bounds(ctx: Any) -> tuple[int, int]:
    """Byte-length range of one serialized ciphertext: entropy floor .. uncompressed ceiling.

    Both polynomials of a fresh or summed ciphertext are uniform mod each data prime, so zstd can
    not shrink them below ``2·N·Σlog2(qᵢ)/8`` bytes; uncompressed they are ``2·N·L·8`` bytes.
    """
    cd = ctx.data.seal_context().first_context_data()
    parms = cd.parms()
    n = parms.poly_modulus_degree()
    primes = [m.value() for m in parms.coeff_modulus()]
    floor = int(0.98 * 2 * n * sum(math.log2(p) for p in primes) / 8)
    return floor, 2 * n * len(primes) * 8 + _BLOB_SLACK


def _describe(ctx: Any) -> str:
    info = context_info(ctx)
    return f"N={info['poly_modulus_degree']}, moduli {info['coeff_mod_bit_sizes']}, scale 2^{info['scale_bits']:g}"


def load_update(ctx: Any, blobs: Sequence[bytes], n_params: int, *, where: str = "update") -> list[Any]:
    """Structural check of one encrypted update; returns its deserialized ciphertexts.

    Checks, each with its own error: the number of ciphertexts for ``n_params`` (+1 weight slot);
    each blob's byte length; that it deserializes; that it holds exactly one 2-polynomial
    ciphertext at the context's top level, with the context's parameters and scale, and the
    expected number of values. It cannot check the key: a ciphertext under a foreign key passes and
    decrypts to garbage, caught by :func:`check_aggregate_norm` at the evaluator.
    """
    if isinstance(blobs, bytes | bytearray) or not isinstance(blobs, Sequence):
        raise CiphertextCountError("an encrypted update must be a list of ciphertext byte strings", where=where)
    seal_ctx = ctx.data.seal_context()
    slots = seal_ctx.first_context_data().parms().poly_modulus_degree() // 2
    sizes = _chunk_sizes(n_params, slots)
    if len(blobs) != len(sizes):
        raise CiphertextCountError(
            f"{len(blobs)} ciphertexts, expected {len(sizes)} for {n_params:,} parameters + 1 weight slot "
            f"at {slots} slots per ciphertext",
            where=where,
            fix="the node and the server must agree on the model (same architecture and parameter count)",
        )
    lo, hi = _blob_bounds(ctx)
    top = seal_ctx.first_parms_id()
    scale = _scale_of(ctx)
    out = []
    for j, (blob, size) in enumerate(zip(blobs, sizes, strict=True)):
        here = f"{where}, ciphertext {j}"
        if not isinstance(blob, bytes | bytearray):
            raise CiphertextDecodeError(f"expected bytes, got {type(blob).__name__}", where=here)
        if not lo <= len(blob) <= hi:
            raise CiphertextSizeError(
                f"{len(blob):,} bytes; a ciphertext of this federation's context ({_describe(ctx)}) is "
                f"{lo:,}-{hi:,} bytes: truncated, or made with other HE parameters",
                where=here,
            )
        try:
            vec = ts.ckks_vector_from(ctx, bytes(blob))
        except ValueError as exc:  # "failed to parse CKKS stream"
            raise CiphertextDecodeError(f"does not deserialize ({exc}): truncated or corrupt", where=here) from None
        except Exception as exc:  # SEAL: "ciphertext data is invalid" = not valid for this context
            raise CiphertextParamsError(
                f"not a ciphertext of this federation's HE context ({_describe(ctx)}): {exc}",
                where=here,
                fix="the node must encrypt with the federation's context (check its fingerprint)",
            ) from None
        cts = vec.ciphertext()
        if len(cts) != 1 or vec.size() != size:
            raise CiphertextParamsError(
                f"holds {len(cts)} ciphertexts / {vec.size()} values, expected 1 / {size}", where=here
            )
        ct = cts[0]
        if ct.size() != 2 or ct.parms_id() != top or not ct.is_ntt_form():
            raise CiphertextParamsError(
                f"ciphertext of {ct.size()} polynomials at another modulus level; expected a fresh 2-polynomial "
                "ciphertext at the top level (add-only aggregation)",
                where=here,
            )
        if ct.scale != scale:
            raise CiphertextParamsError(
                f"scale 2^{math.log2(ct.scale):g}, expected the context's 2^{math.log2(scale):g}", where=here
            )
        out.append(vec)
    return out


class CiphertextSum:
    """Running sum of encrypted updates; each :meth:`add` is checked first and all-or-nothing.

    The ServerApp adds replies as they arrive and rejects a bad one without losing the others;
    only one update is deserialized at a time besides the sum.
    """

    def __init__(self, ctx: Any, n_params: int, *, max_clients: int | None = None) -> None:
        self.ctx = ctx
        self.n_params = n_params
        self.max_clients = max_clients
        self.count = 0
        self._acc: list[Any] | None = None

    def add(self, blobs: Sequence[bytes], *, where: str = "update") -> None:
        if self.max_clients is not None and self.count >= self.max_clients:
            raise HECapacityError(
                f"already summed {self.count} updates, the federation's max_clients; more could overflow",
                where=where,
                fix="raise max_clients in the run config (within check_capacity) or sample fewer nodes",
            )
        vecs = load_update(self.ctx, blobs, self.n_params, where=where)
        if self._acc is None:
            self._acc = vecs
        else:
            for acc, v in zip(self._acc, vecs, strict=True):
                acc.add_(v)
        self.count += 1

    def result(self) -> list[bytes]:
        if self._acc is None:
            raise HEError("no encrypted update was added; nothing to aggregate")
        return [bytes(v.serialize()) for v in self._acc]


def sum_ciphertexts(
    public_ctx: Any,
    updates: Sequence[Sequence[bytes]],
    *,
    n_params: int | None = None,
    max_clients: int | None = None,
    labels: Sequence[str] | None = None,
) -> list[bytes]:
    """Server side: check every update (see :func:`load_update`) and return the ciphertext sum.

    Pass ``n_params`` (the server knows the model): without it the size is read from the first
    update, which then sets the layout for the rest. ``labels`` name updates in errors (node ids).
    Raises the first :class:`CiphertextError`; use :class:`CiphertextSum` to skip bad updates instead.
    """
    if not updates:
        raise HEError("no encrypted update to sum")
    if n_params is None:
        slots = public_ctx.data.seal_context().first_context_data().parms().poly_modulus_degree() // 2
        n_params = _infer_n_params(public_ctx, updates[0], slots)
    total = CiphertextSum(public_ctx, n_params, max_clients=max_clients)
    for i, blobs in enumerate(updates):
        total.add(blobs, where=f"update {labels[i] if labels else i}")
    return total.result()


def _infer_n_params(ctx: Any, blobs: Sequence[bytes], slots: int) -> int:
    try:
        last = ts.ckks_vector_from(ctx, bytes(blobs[-1]))
    except Exception:
        raise CiphertextDecodeError("cannot infer the parameter count: the last ciphertext does not load") from None
    return (len(blobs) - 1) * slots + last.size() - 1


def verify_sum(
    ctx: Any, updates: Sequence[Sequence[bytes]], server_sum: Sequence[bytes], *, n_params: int
) -> list[bytes]:
    """Evaluator side: recompute the sum from the individual (signed) updates and compare bytes.

    Ciphertext addition is exact modular arithmetic and serialization is deterministic, so an honest
    server's sum is byte-identical in any order. Returns the recomputed sum (decrypt that one).
    """
    mine = sum_ciphertexts(ctx, updates, n_params=n_params)
    if len(mine) != len(server_sum) or any(a != bytes(b) for a, b in zip(mine, server_sum, strict=True)):
        raise SumMismatchError(
            f"the server's sum of {len(updates)} updates differs from the evaluator's recomputation",
            fix="do not decrypt it; investigate the aggregation server (bug or tampering)",
        )
    return mine


# --------------------------------------------------------------------------- evaluator: decrypt


def round_digits_for(scale: float) -> int:
    """Decimals kept after decryption: a grid ~1e5 times the encoding step 1/scale (7 at 2^40).

    One update's decryption noise is ~1e3/scale (measured), so the grid is ~100x the noise of a
    10-update sum: rounding removes the noise-carrying low bits of almost every value.
    """
    return max(0, math.floor(math.log10(scale)) - 5)


def decrypt_sum(
    secret_ctx: Any,
    blobs: Sequence[bytes],
    n_params: int,
    *,
    max_weight: float | None = None,
    round_digits: int | None = None,
) -> tuple[np.ndarray, float]:
    """Decrypt a sum of updates; return (weighted mean ``Σwᵢ·Δᵢ / Σwᵢ`` as float64, ``Σwᵢ``).

    Every decrypted slot is rounded to ``round_digits`` decimals (default :func:`round_digits_for`:
    7 at scale 2^40) before anything else, so no exact decryption leaves this function. ``max_weight`` (e.g. the number
    of summed updates, each weight ≤ 1) rejects a garbage weight slot.
    """
    _require_secret(secret_ctx, "decrypt_sum")
    vecs = load_update(secret_ctx, blobs, n_params, where="aggregate")
    digits = round_digits_for(_scale_of(secret_ctx)) if round_digits is None else round_digits
    raw = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vecs])
    dec = np.round(raw, digits)
    del raw
    sum_w = float(dec[n_params])
    hi = math.inf if max_weight is None else max_weight * (1 + 1e-6)
    if not (math.isfinite(sum_w) and 0.0 < sum_w <= hi):
        raise AggregateNormError(
            f"decrypted weight sum {sum_w:.6g} is outside (0, {hi:g}]: the aggregate is garbage "
            "(a ciphertext under a foreign key, or an overflowing update)",
            fix="discard this round's aggregate; find the offending node by decrypting updates one by one",
        )
    return dec[:n_params] / sum_w, sum_w


def check_aggregate_norm(flat: np.ndarray, bound: float, *, l2_bound: float | None = None) -> None:
    """Refuse a decrypted aggregate that is non-finite, has ``|x| > bound`` or ``‖x‖₂ > l2_bound``.

    A weighted mean of updates with ``|Δ| ≤ B`` has ``|mean| ≤ B`` (convex combination), so ``bound``
    = the federation's B is exact for honest updates; garbage from a foreign key or an overflow is
    uniform over ±q/2^(s+1) (±2^19 for fedguard-add) and fails it.
    """
    x = np.asarray(flat)
    if not np.isfinite(x).all():
        raise AggregateNormError("the decrypted aggregate has non-finite values")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > bound * (1 + 1e-6) + 1e-6:
        raise AggregateNormError(
            f"the decrypted aggregate's largest |value| {peak:.6g} exceeds the bound {bound:g}: garbage "
            "(a ciphertext under a foreign key, or an overflowing update)",
            fix="discard this round's aggregate",
        )
    if l2_bound is not None:
        norm = float(np.linalg.norm(x))
        if norm > l2_bound:
            raise AggregateNormError(f"the decrypted aggregate's L2 norm {norm:.6g} exceeds {l2_bound:g}")


# --------------------------------------------------------------------------- Flower records


def blobs_to_record(blobs: Sequence[bytes]) -> ArrayRecord:
    """Ciphertexts → ArrayRecord of byte Arrays (Flower chunks them at 5 MB and deduplicates)."""
    from flwr.app import Array, ArrayRecord

    arrays = {
        _RECORD_KEY.format(i): Array(dtype=CKKS_DTYPE, shape=(len(b),), stype=CKKS_STYPE, data=bytes(b))
        for i, b in enumerate(blobs)
    }
    return ArrayRecord(array_dict=arrays)


def record_to_blobs(record: ArrayRecord, *, where: str = "record") -> list[bytes]:
    """ArrayRecord → ciphertext bytes in order; refuses non-CKKS arrays and gaps in the keys."""
    keys = list(record.keys())
    expected = [_RECORD_KEY.format(i) for i in range(len(keys))]
    if sorted(keys) != expected:
        raise CiphertextCountError(f"keys {keys[:3]}... are not {expected[:3]}...", where=where)
    out = []
    for key in expected:
        arr = record[key]
        if arr.stype != CKKS_STYPE or arr.dtype != CKKS_DTYPE or tuple(arr.shape) != (len(arr.data),):
            raise CiphertextDecodeError(
                f"array {key} is {arr.dtype}/{arr.stype} shape {arr.shape}, expected {CKKS_DTYPE}/{CKKS_STYPE}",
                where=where,
            )
        out.append(bytes(arr.data))
    return out
