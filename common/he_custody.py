"""Custody of the homomorphic key: who creates it, who may hold it, and what proves a global model.

Key custody in homomorphic mode: docs/homomorphic.md. ``common.he`` has the CKKS building blocks and
``common.sealing`` seals bytes to one node's key; this module is the protocol around them:

- **keygen at the evaluator** (:func:`keygen`, :func:`write_bundle`): the evaluator creates the
  secret CKKS context on its own machine — never the server operator — and seals it to every
  enrolled client and to itself. It keeps ``he-secret.ctx`` (0600) in its work directory and hands
  the server a *bundle* directory holding only what the server may hold: the public context (no
  secret, Galois or relinearization key: add-only), the sealed blobs it relays but cannot open,
  and ``he-keys.json`` (federation, scheme, fingerprint, capacity limits, recipient key
  fingerprints). :func:`load_server_bundle` checks that bundle before the server serves it.
- **opening at a node** (:func:`open_context`): a node opens only the blob sealed to its own key,
  for its own federation and node name, holding the context whose fingerprint the admin-signed run
  config names. Each refusal has its own error class and code (see below) so the node's log says
  exactly why.
- **signed global models** (:func:`sign_global`, :func:`verify_global`): a client decrypts a global
  model only if the evaluator signed it for this run and round. Without that, the server — which
  sees every client's ciphertext — could hand one client's encrypted update back as "the
  aggregate", and every key holder would decrypt it: an individual update leaked without any
  collusion.
- **update layout** (:func:`flatten_state`, :func:`unflatten`): the trainable tensors of a model
  state as the one flat vector ``he.encrypt_update`` takes, and back; both sides must agree on it.

Sealed blob format (what ``KeyBundle.sealed`` and ``sealed/<name>.bin`` hold)::

    MAGIC "FGHECTX1" | len|federation | len|node | len|fingerprint | common.sealing blob

The three names are in the clear so a node can say *which* federation, node or context a blob is
for instead of a bare authentication failure; they are bound by the sealing's associated data
(:func:`common.sealing.sealing_aad`), so changing any of them makes the blob fail to open.

Error codes: ``sealed-for-another-key`` and ``sealed-data-tampered`` (from ``common.sealing``),
``sealed-context-mismatch`` (another federation or node), ``he-context-fingerprint-mismatch``,
``he-bundle-invalid`` / ``he-bundle-exists``, ``global-model-unsigned``,
``global-model-signature-invalid``, ``global-model-wrong-signer``, ``he-update-layout``.

What this does not fix (say it in reports): every key holder shares one secret key, so the server
colluding with any one client or the evaluator can read individual updates; DP-SGD still bounds
what an update reveals about a record. Threshold HE would remove that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import he
from common.errors import FedGuardError
from common.files import atomic_write, group_or_world_readable
from common.kit.keys import fingerprint_public_key, load_node_private_key, load_node_public_key
from common.sealing import SealTamperedError, key_id, recipient_key_id, seal, sealing_aad, unseal

__all__ = [
    "KEY_INFO_FILE",
    "PUBLIC_CONTEXT_FILE",
    "SEALED_DIR",
    "SECRET_CONTEXT_FILE",
    "BundlePaths",
    "ContextFingerprintMismatchError",
    "EvaluatorKey",
    "GlobalModelSignatureError",
    "GlobalModelSignerError",
    "GlobalModelUnsignedError",
    "HECustodyError",
    "HEKeyInfo",
    "KeyBundle",
    "KeyBundleError",
    "KeyBundleExistsError",
    "SealedContextMismatchError",
    "ServerBundle",
    "UpdateLayoutError",
    "flatten_state",
    "global_digest",
    "keygen",
    "load_evaluator_key",
    "load_server_bundle",
    "open_context",
    "sealed_header",
    "sign_global",
    "unflatten",
    "verify_global",
    "write_bundle",
]

SECRET_CONTEXT_FILE = "he-secret.ctx"
PUBLIC_CONTEXT_FILE = "he-public.ctx"
KEY_INFO_FILE = "he-keys.json"
SEALED_DIR = "sealed"
KEY_INFO_FORMAT: Literal["fedguard-he-keys/1"] = "fedguard-he-keys/1"

_ENVELOPE_MAGIC = b"FGHECTX1"
_GLOBAL_DOMAIN = b"fedguard/global-model/v1\x00"
# Same rule as kit node names: a node name becomes a file name (sealed/<name>.bin), so no paths.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


# --------------------------------------------------------------------------- errors


class HECustodyError(FedGuardError):
    """The HE key cannot be created, stored, delivered or used as the custody rules require."""

    code = "he-custody"


class KeyBundleError(HECustodyError):
    """A key bundle (server or evaluator side) is missing a file, inconsistent or tampered with."""

    code = "he-bundle-invalid"


class KeyBundleExistsError(KeyBundleError):
    """Writing a bundle would replace an existing key; refused without ``force``."""

    code = "he-bundle-exists"


class SealedContextMismatchError(HECustodyError):
    """A sealed context is addressed to another federation or another node."""

    code = "sealed-context-mismatch"


class ContextFingerprintMismatchError(he.HEContextError):
    """A sealed or loaded context is not the one the federation's signed run config names."""

    code = "he-context-fingerprint-mismatch"


class GlobalModelSignatureError(HECustodyError):
    """A global model's signature does not verify: not the evaluator's, or another run/round/model."""

    code = "global-model-signature-invalid"


class GlobalModelUnsignedError(GlobalModelSignatureError):
    """A global model arrived without an evaluator signature."""

    code = "global-model-unsigned"


class GlobalModelSignerError(GlobalModelSignatureError):
    """A global model is signed by a key other than the federation's evaluator key."""

    code = "global-model-wrong-signer"


class UpdateLayoutError(HECustodyError):
    """A model state does not match the agreed layout of trainable tensors."""

    code = "he-update-layout"


# --------------------------------------------------------------------------- key info and bundles


class HEKeyInfo(BaseModel):
    """``he-keys.json``: everything about the key that is not secret (server and evaluator both keep it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedguard-he-keys/1"] = KEY_INFO_FORMAT
    federation: str
    scheme: str
    #: ``he.fingerprint`` of the public context: what the run config, nodes and server compare.
    fingerprint: str
    max_clients: int = Field(ge=1)
    #: Per-coordinate bound B on ``|Δ|`` that every node enforces before encrypting.
    bound: float = Field(gt=0)
    #: Node name → ``SHA256:...`` fingerprint of the key its context was sealed to.
    recipients: dict[str, str]


@dataclass(frozen=True)
class KeyBundle:
    """What :func:`keygen` makes. ``secret_context`` stays with the evaluator; the rest may go to the server.

    The bytes fields are left out of ``repr`` so that a log line or a traceback never prints the key.
    """

    federation: str
    scheme: str
    max_clients: int
    bound: float
    secret_context: bytes = field(repr=False)
    #: ``he.public_context_bytes``: parameters, scale, key id; no secret/Galois/relinearization keys.
    public_context: bytes = field(repr=False)
    fingerprint: str
    #: Node name → the secret context sealed to that node's key (envelope format in the module doc).
    sealed: dict[str, bytes] = field(repr=False)
    #: Node name → fingerprint of the key it was sealed to.
    recipients: dict[str, str]

    @property
    def info(self) -> HEKeyInfo:
        return HEKeyInfo(
            federation=self.federation,
            scheme=self.scheme,
            fingerprint=self.fingerprint,
            max_clients=self.max_clients,
            bound=self.bound,
            recipients=dict(self.recipients),
        )


@dataclass(frozen=True)
class BundlePaths:
    """Where :func:`write_bundle` put each file."""

    secret_context: Path
    evaluator_info: Path
    public_context: Path
    server_info: Path
    sealed: dict[str, Path]


@dataclass(frozen=True)
class ServerBundle:
    """A checked server-side bundle (:func:`load_server_bundle`): relays sealed contexts, never opens them."""

    path: Path
    public_context: bytes = field(repr=False)
    fingerprint: str
    sealed: dict[str, bytes] = field(repr=False)
    info: HEKeyInfo

    def load_context(self) -> Any:
        """The public TenSEAL context for :class:`common.he.CiphertextSum` (add-only)."""
        return he.load_public_context(self.public_context, expected_fingerprint=self.fingerprint)

    def sealed_for(self, node: str, key_fingerprint: str) -> bytes:
        """The blob to relay to ``node``, whose registered key has ``key_fingerprint``.

        Refuses a node that is not a recipient, or whose key changed since keygen (rotated): that
        node could not open its blob anyway, and the fix is on the evaluator's side.
        """
        if node not in self.sealed:
            raise KeyBundleError(
                f"no HE context was sealed to node {node!r} (recipients: {', '.join(sorted(self.sealed))})",
                where=str(self.path),
                fix="the evaluator re-runs `fedguard evaluator keygen` with the current server kit",
            )
        sealed_to = self.info.recipients[node]
        if sealed_to != key_fingerprint.strip():
            raise SealedContextMismatchError(
                f"node {node}'s HE context was sealed to key {sealed_to}, but its registered key is now "
                f"{key_fingerprint.strip()} (rotated since keygen?)",
                where=str(self.path),
                fix="the evaluator re-runs `fedguard evaluator keygen --force` with the current server kit",
            )
        return self.sealed[node]


@dataclass(frozen=True)
class EvaluatorKey:
    """The evaluator's own key material, from its work directory (:func:`load_evaluator_key`)."""

    context: Any = field(repr=False)
    info: HEKeyInfo


# --------------------------------------------------------------------------- keygen (evaluator)


def _check_node_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise HECustodyError(
            f"recipient name {name!r} is not a node name (1-63 letters, digits, '.', '_' or '-')",
            fix="use the node names of the server kit",
        )


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _envelope(federation: str, node: str, fingerprint: str, sealed: bytes) -> bytes:
    head = _length_prefixed(*(s.encode("utf-8") for s in (federation, node, fingerprint)))
    return _ENVELOPE_MAGIC + head + sealed


def sealed_header(blob: bytes) -> tuple[str, str, str, str]:
    """(federation, node, context fingerprint, recipient key ``SHA256:...``) a sealed context claims.

    Unauthenticated until :func:`open_context` opens it (the names are bound by the associated
    data); the server uses it to check its bundle is self-consistent. Raises ``SealTamperedError``.
    """
    names, sealed = _split_envelope(blob)
    try:
        return (*names, recipient_key_id(sealed))  # any sealing format version
    except SealTamperedError:
        raise SealTamperedError("the sealed HE context has no sealing header (truncated or corrupt)") from None


def _split_envelope(blob: bytes) -> tuple[tuple[str, str, str], bytes]:
    bad = SealTamperedError(
        f"not a FedGuard sealed HE context ({len(blob)} bytes, bad header or truncated)",
        fix="fetch the sealed context again from the server",
    )
    if not isinstance(blob, bytes | bytearray) or not bytes(blob).startswith(_ENVELOPE_MAGIC):
        raise bad
    pos, names = len(_ENVELOPE_MAGIC), []
    for _ in range(3):
        if pos + 4 > len(blob):
            raise bad
        n = int.from_bytes(blob[pos : pos + 4], "big")
        if n > 1024 or pos + 4 + n > len(blob):
            raise bad
        try:
            names.append(bytes(blob[pos + 4 : pos + 4 + n]).decode("utf-8"))
        except UnicodeDecodeError:
            raise bad from None
        pos += 4 + n
    return (names[0], names[1], names[2]), bytes(blob[pos:])


def keygen(
    federation: str,
    recipients: Mapping[str, str | bytes],
    *,
    max_clients: int,
    bound: float,
    scheme: str = he.DEFAULT_SCHEME,
) -> KeyBundle:
    """Create the federation's CKKS key and seal it to each recipient; writes nothing to disk.

    Run this on the evaluator: the secret key must never exist on the server operator's machine.
    ``recipients`` maps node name → OpenSSH EC P-384 public key line, for the enrolled client
    nodes and the evaluator itself (the keys they already authenticate with: no new keys to
    distribute). ``max_clients`` and ``bound`` are checked against the scheme's capacity first
    (:func:`common.he.check_capacity`): a sum that can wrap around decrypts to garbage.
    """
    if not federation:
        raise HECustodyError("the federation name is empty", fix="pass the name from the server kit")
    if not recipients:
        raise HECustodyError(
            "no recipients: the HE context must be sealed to the enrolled nodes",
            fix="pass the server kit, whose nodes.json lists the enrolled clients and the evaluator",
        )
    key_fps: dict[str, str] = {}
    for name, line in recipients.items():
        _check_node_name(name)
        key_fps[name] = key_id(line.encode() if isinstance(line, str) else line)  # also checks P-384
    seen: dict[str, str] = {}
    for name, fp in key_fps.items():
        if fp in seen:
            raise HECustodyError(
                f"nodes {seen[fp]!r} and {name!r} have the same key {fp}",
                fix="every node has its own key; check the node list",
            )
        seen[fp] = name

    ctx = he.create_context(scheme, max_clients=max_clients, bound=bound)
    secret = he.secret_context_bytes(ctx)
    public = he.public_context_bytes(ctx)
    fp = he.fingerprint(public)
    he.load_public_context(public, expected_fingerprint=fp)  # self-check: refuses any secret/Galois key
    sealed = {
        name: _envelope(
            federation,
            name,
            fp,
            seal(line.encode() if isinstance(line, str) else line, secret, sealing_aad(federation, name, fp)),
        )
        for name, line in recipients.items()
    }
    return KeyBundle(
        federation=federation,
        scheme=scheme,
        max_clients=max_clients,
        bound=float(bound),
        secret_context=secret,
        public_context=public,
        fingerprint=fp,
        sealed=sealed,
        recipients=key_fps,
    )


def _atomic_write(path: Path, data: bytes, *, private: bool = False, replace: bool = True) -> None:
    try:
        atomic_write(path, data, private=private, replace=replace)
    except FileExistsError:
        raise KeyBundleExistsError("appeared while writing; refusing to overwrite it", where=str(path)) from None


def _info_bytes(info: HEKeyInfo) -> bytes:
    return (json.dumps(info.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def write_bundle(bundle: KeyBundle, evaluator_dir: Path, server_dir: Path, *, force: bool = False) -> BundlePaths:
    """Write the evaluator's secret and the server's bundle; nothing secret goes to ``server_dir``.

    ``evaluator_dir``: ``he-secret.ctx`` (0600) and ``he-keys.json``. ``server_dir``:
    ``he-public.ctx``, ``sealed/<name>.bin`` and ``he-keys.json``. Existing key files are never
    replaced silently: without ``force`` nothing is written if any target exists (a new key makes
    every sealed context and every update under the old key useless). ``he-keys.json`` is written
    last on the server side, so an interrupted write is caught by :func:`load_server_bundle`.
    """
    ev, srv = Path(evaluator_dir).resolve(), Path(server_dir).resolve()
    if _inside(ev, srv):
        raise HECustodyError(
            "the evaluator's work directory is the server bundle directory or inside it: copying the "
            "bundle to the server would copy the secret key",
            where=str(ev),
            fix="pass a separate --out directory for the server bundle",
        )
    for d, what in ((ev, "evaluator work directory"), (srv, "server bundle directory")):
        if d.exists() and not d.is_dir():
            raise HECustodyError(f"the {what} is not a directory", where=str(d))
    secret_path, public_path = ev / SECRET_CONTEXT_FILE, srv / PUBLIC_CONTEXT_FILE
    ev_info, srv_info, sealed_dir = ev / KEY_INFO_FILE, srv / KEY_INFO_FILE, srv / SEALED_DIR
    existing = [p for p in (secret_path, ev_info, public_path, srv_info, sealed_dir) if p.exists()]
    if existing and not force:
        raise KeyBundleExistsError(
            "an HE key was already generated here; refusing to replace it",
            where=", ".join(str(p) for p in existing),
            fix="keep the existing key, or pass --force to make a NEW key (every node then gets a new sealed "
            "context, and the run config must name the new fingerprint)",
        )
    info = _info_bytes(bundle.info)
    _atomic_write(secret_path, bundle.secret_context, private=True, replace=force)
    _atomic_write(ev_info, info, replace=force)

    srv.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=srv, prefix=".sealed-"))
    try:
        for name, blob in bundle.sealed.items():
            _check_node_name(name)
            _atomic_write(stage / f"{name}.bin", blob)
        os.chmod(stage, 0o755)
        old = None
        if sealed_dir.exists():  # force: stale blobs of former recipients must go too
            old = srv / f".sealed-old-{os.getpid()}"
            os.rename(sealed_dir, old)
        os.rename(stage, sealed_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _atomic_write(public_path, bundle.public_context)
    _atomic_write(srv_info, info)
    return BundlePaths(
        secret_context=secret_path,
        evaluator_info=ev_info,
        public_context=public_path,
        server_info=srv_info,
        sealed={name: sealed_dir / f"{name}.bin" for name in bundle.sealed},
    )


def _read_info(path: Path) -> HEKeyInfo:
    if not path.is_file():
        raise KeyBundleError(
            "he-keys.json missing", where=str(path), fix="copy the whole bundle from `fedguard evaluator keygen`"
        )
    try:
        return HEKeyInfo.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise KeyBundleError(
            f"not an HE key description ({exc.error_count()} problem(s): {exc.errors()[0]['msg']})",
            where=str(path),
            fix="copy the bundle again from the evaluator",
        ) from None


def load_server_bundle(server_dir: str | Path) -> ServerBundle:
    """Check and load the bundle the evaluator made for the server; every problem names its file.

    Checks: ``he-keys.json`` is valid; ``he-public.ctx`` is a public context (a secret one is
    refused outright) whose fingerprint is the one in ``he-keys.json`` and whose capacity allows
    its ``max_clients`` × ``bound``; every recipient has ``sealed/<name>.bin`` addressed to its
    federation, name, context and key fingerprint, and there is no other file in ``sealed/``.
    """
    srv = Path(server_dir)
    if not srv.is_dir():
        raise KeyBundleError(
            "HE key bundle directory not found",
            where=str(srv),
            fix="the evaluator runs `fedguard evaluator keygen --out DIR` and sends DIR to the server host",
        )
    info = _read_info(srv / KEY_INFO_FILE)
    pub_path = srv / PUBLIC_CONTEXT_FILE
    if not pub_path.is_file():
        raise KeyBundleError("he-public.ctx missing", where=str(pub_path), fix="copy the whole bundle again")
    public = pub_path.read_bytes()
    try:
        ctx = he.load_public_context(public)  # refuses a secret context before anything else
    except he.HEContextError as exc:
        raise KeyBundleError(exc.what, where=str(pub_path), fix=exc.fix) from None
    fp = he.fingerprint(public)
    if fp != info.fingerprint:
        raise KeyBundleError(
            f"he-public.ctx has fingerprint {fp}, but he-keys.json names {info.fingerprint}: the files come "
            "from different keygens or were modified",
            where=str(srv),
            fix="copy the whole bundle again from the evaluator",
        )
    he.check_capacity(ctx, info.max_clients, info.bound)
    sealed_dir = srv / SEALED_DIR
    sealed: dict[str, bytes] = {}
    for name, key_fp in info.recipients.items():
        _check_node_name(name)
        path = sealed_dir / f"{name}.bin"
        if not path.is_file():
            raise KeyBundleError(f"no sealed context for node {name}", where=str(path), fix="copy the bundle again")
        blob = path.read_bytes()
        try:
            got = sealed_header(blob)
        except SealTamperedError as exc:
            raise KeyBundleError(exc.what, where=str(path), fix="copy the bundle again") from None
        if got != (info.federation, name, info.fingerprint, key_fp):
            raise KeyBundleError(
                f"sealed for federation {got[0]!r}, node {got[1]!r}, context {got[2]}, key {got[3]}; "
                f"he-keys.json expects {info.federation!r}, {name!r}, {info.fingerprint}, {key_fp}",
                where=str(path),
                fix="copy the whole bundle again from the evaluator",
            )
        sealed[name] = blob
    expected = {f"{name}.bin" for name in info.recipients}
    extra = sorted(p.name for p in sealed_dir.iterdir() if p.name not in expected) if sealed_dir.is_dir() else []
    if extra:
        raise KeyBundleError(
            f"unexpected file(s) not listed in he-keys.json: {', '.join(extra)}",
            where=str(sealed_dir),
            fix="copy the whole bundle again from the evaluator (do not mix bundles)",
        )
    return ServerBundle(path=srv, public_context=public, fingerprint=fp, sealed=sealed, info=info)


def load_evaluator_key(evaluator_dir: str | Path, *, expected_fingerprint: str | None = None) -> EvaluatorKey:
    """The evaluator's secret context and key description from its work directory.

    Refuses a secret file readable by other users, and a context whose fingerprint differs from
    ``he-keys.json`` or from ``expected_fingerprint`` (the run config's).
    """
    ev = Path(evaluator_dir)
    info = _read_info(ev / KEY_INFO_FILE)
    path = ev / SECRET_CONTEXT_FILE
    if not path.is_file():
        raise KeyBundleError(
            "the evaluator's HE secret context is missing",
            where=str(path),
            fix="run `fedguard evaluator keygen` on the evaluator with this --workdir",
        )
    if mode := group_or_world_readable(path):
        raise KeyBundleError(
            f"HE secret context readable by other users (mode {mode})",
            where=str(path),
            fix=f"chmod 600 {path}",
        )
    ctx = he.load_secret_context(path.read_bytes())
    got = he.fingerprint(he.public_context_bytes(ctx))
    for want, source in ((info.fingerprint, str(ev / KEY_INFO_FILE)), (expected_fingerprint, "the run config")):
        if want is not None and got != want:
            raise ContextFingerprintMismatchError(
                f"the evaluator's HE context has fingerprint {got}, but {source} names {want}",
                where=str(path),
                fix="use the run config made for this key, or re-run keygen and update the run config",
            )
    return EvaluatorKey(context=ctx, info=info)


# --------------------------------------------------------------------------- node: open the sealed context


def open_context(
    sealed: bytes,
    node_private_key_openssh: bytes,
    *,
    federation: str,
    node: str,
    expected_fingerprint: str,
) -> Any:
    """Open this node's sealed HE context → the secret TenSEAL context; refuse anything else.

    ``expected_fingerprint`` comes from the admin-signed run config, never from the server that
    relayed the blob. Refusals, each with its own code: another federation or node
    (:class:`SealedContextMismatchError`), another context (:class:`ContextFingerprintMismatchError`),
    another node's key (``SealedForAnotherKeyError``), modified bytes (``SealTamperedError``).
    Pure (no files, no state): callers may cache the result per (blob, key, names).
    """
    (fed, to, fp), inner = _split_envelope(sealed)
    if fed != federation or to != node:
        raise SealedContextMismatchError(
            f"this HE context was sealed for node {to!r} of federation {fed!r}, not node {node!r} of {federation!r}",
            fix="the server relayed the wrong blob; it must send each node its own sealed/<name>.bin",
        )
    if fp != expected_fingerprint:
        raise ContextFingerprintMismatchError(
            f"the sealed HE context is {fp}, but the signed run config names {expected_fingerprint}",
            fix="the evaluator's current key must match the run config: re-run keygen or fix the run config",
        )
    opened = unseal(node_private_key_openssh, inner, sealing_aad(federation, node, expected_fingerprint))
    ctx = he.load_secret_context(opened)
    got = he.fingerprint(he.public_context_bytes(ctx))
    if got != expected_fingerprint:  # the evaluator sealed a context other than the one it named
        raise ContextFingerprintMismatchError(
            f"the sealed HE context is {got}, but the signed run config names {expected_fingerprint}",
            fix="ask the evaluator to re-run keygen; do not use this context",
        )
    return ctx


# --------------------------------------------------------------------------- signed global models


def global_digest(blobs: Sequence[bytes], *, run_uid: str, round: int) -> bytes:
    """SHA-384 over a domain tag, the run uid, the round and the SHA-384 of each ciphertext, in order.

    Hashing each blob first keeps the message small and the order significant; the length prefix
    and fixed-width integers make the encoding unambiguous.
    """
    if not isinstance(run_uid, str) or not run_uid:
        raise HECustodyError("a global model signature needs the run's uid")
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise HECustodyError(f"round must be a non-negative integer, got {round!r}")
    if isinstance(blobs, bytes | bytearray) or not blobs:
        raise HECustodyError("a global model is a non-empty list of ciphertexts")
    h = hashlib.sha384(_GLOBAL_DOMAIN)
    h.update(_length_prefixed(run_uid.encode("utf-8")))
    h.update(round.to_bytes(8, "big") + len(blobs).to_bytes(8, "big"))
    for blob in blobs:
        h.update(hashlib.sha384(bytes(blob)).digest())
    return h.digest()


def sign_global(
    blobs: Sequence[bytes],
    *,
    run_uid: str,
    round: int,
    evaluator_private_key_openssh: bytes,
) -> str:
    """The evaluator's base64 ECDSA-P384-SHA384 signature over :func:`global_digest`."""
    key = load_node_private_key(evaluator_private_key_openssh, where="evaluator private key", error=HECustodyError)
    digest = global_digest(blobs, run_uid=run_uid, round=round)
    return base64.b64encode(key.sign(digest, ec.ECDSA(hashes.SHA384()))).decode("ascii")


def _load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    return load_node_public_key(bytes(data), where="evaluator key", error=GlobalModelSignatureError)


def verify_global(
    blobs: Sequence[bytes],
    signature: str | None,
    *,
    run_uid: str,
    round: int,
    evaluator_public_key_openssh: bytes,
    expected_key_fingerprint: str,
) -> None:
    """Refuse a global model unless the federation's evaluator signed exactly these ciphertexts for this run and round.

    ``expected_key_fingerprint`` (``SHA256:...``, as in the kit and the run config) pins the
    evaluator: a key the server supplies is checked against it first, so a validly signed model
    from any other key is refused. The public key may be an OpenSSH line or PEM (as the SuperLink
    reports node keys).
    """
    if not signature:
        raise GlobalModelUnsignedError(
            f"the global model of round {round} carries no evaluator signature",
            fix="do not decrypt it; only models the evaluator signed may be decrypted",
        )
    if not expected_key_fingerprint:
        raise GlobalModelSignerError("no evaluator key is pinned for this run", fix="the run config must name it")
    key = _load_public(evaluator_public_key_openssh)
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    got = fingerprint_public_key(line)
    if got != expected_key_fingerprint.strip():
        raise GlobalModelSignerError(
            f"the global model is signed with key {got}, not the federation's evaluator key {expected_key_fingerprint}",
            fix="do not decrypt it: only the enrolled evaluator may sign global models",
        )
    try:
        sig = base64.b64decode(signature, validate=True)
        key.verify(sig, global_digest(blobs, run_uid=run_uid, round=round), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise GlobalModelSignatureError(
            f"the evaluator's signature does not match this global model (run {run_uid}, round {round}): "
            "other ciphertexts, another round or another run",
            fix="do not decrypt it; the server may be passing off another ciphertext as the aggregate",
        ) from None


# --------------------------------------------------------------------------- update layout


def _layout(template: Mapping[str, np.ndarray], trainable: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(trainable, str):
        raise UpdateLayoutError("trainable must be a list of tensor names, not one string")
    if len(set(trainable)) != len(trainable):
        raise UpdateLayoutError("a tensor name appears twice in the trainable list")
    missing = [k for k in trainable if k not in template]
    if missing:
        raise UpdateLayoutError(
            f"{len(missing)} trainable tensor(s) missing from the model state, e.g. {missing[0]!r}",
            fix="the node and the server must use the same model architecture",
        )
    out = []
    for k in trainable:
        arr = np.asarray(template[k])
        if not np.issubdtype(arr.dtype, np.floating):
            raise UpdateLayoutError(f"tensor {k!r} is {arr.dtype}; only floating-point tensors can be trained")
        out.append((k, tuple(arr.shape)))
    return out


def trainable_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors that travel encrypted and are averaged: every floating-point one, in order."""
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def flatten_state(state: Mapping[str, np.ndarray], trainable: Sequence[str]) -> np.ndarray:
    """The ``trainable`` tensors of ``state``, in that order, as one float64 vector for ``he.encrypt_update``.

    Only trainable tensors travel encrypted: buffers (e.g. counters) are not averaged. Both sides
    must pass the same ordered list (e.g. the model's ``named_parameters`` with ``requires_grad``).
    """
    layout = _layout(state, trainable)
    if not layout:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k, _ in layout])


def unflatten(
    flat: np.ndarray, template: Mapping[str, np.ndarray], trainable: Sequence[str]
) -> OrderedDict[str, np.ndarray]:
    """Inverse of :func:`flatten_state`: each trainable tensor in ``template``'s shape and dtype."""
    layout = _layout(template, trainable)
    x = np.asarray(flat).reshape(-1)
    need = sum(int(np.prod(s)) for _, s in layout)
    if x.size != need:
        raise UpdateLayoutError(f"{x.size:,} values, expected {need:,} for {len(layout)} trainable tensors")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = 0
    for k, shape in layout:
        n = int(np.prod(shape))
        out[k] = x[pos : pos + n].reshape(shape).astype(np.asarray(template[k]).dtype)
        pos += n
    return out
