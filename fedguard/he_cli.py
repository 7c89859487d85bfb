"""``fedguard evaluator keygen``: the evaluator creates the federation's HE key and seals it to every node.

Thin handler over :mod:`common.he_custody` (docs/homomorphic.md, key custody): read the enrolled nodes from the
server kit, make the key on this (the evaluator's) machine, keep the secret context in the evaluator's
work directory and write a bundle for the server that holds nothing it could decrypt with. Errors are
FedGuardErrors; the CLI main prints them without a trace.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from common.errors import FedGuardError
from common.kit import NODE_KEY, KitError, check_node_private_key, fingerprint_public_key, verify_kit
from fedguard.cli_guards import add_ca_pin_args, ca_pin, positive_float, positive_int

DEFAULT_MAX_CLIENTS = 100
#: Per-coordinate bound on |Δ| (weights are ≤ 1, so also on |w·Δ|). fedguard-add allows
#: max_clients · max(bound, 1) ≤ 262,143 (he.check_capacity): 100 × 1000 = 100,000 leaves room for
#: up to 262 clients at this bound. Precision does not depend on it (the scale is fixed at 2^40).
DEFAULT_BOUND = 1000.0


class _Entry(NamedTuple):
    name: str
    role: str
    public_key: str
    fingerprint: str
    not_after: dt.datetime | None


@dataclass(frozen=True)
class Recipient:
    name: str
    role: str
    public_key: str
    fingerprint: str


def _say(msg: str) -> None:
    print(msg, flush=True)


def _read_raw_nodes(path: Path, federation: str | None) -> tuple[str, list[_Entry], set[str]]:
    """A bare nodes.json (no signed kit around it): parsed, fingerprints recomputed, nothing trusted."""
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
        nodes: list[_Entry] = []
        for n in listing["nodes"]:
            fp = fingerprint_public_key(n["public_key"])
            if n.get("fingerprint", fp) != fp:
                raise FedGuardError(
                    f"node {n['name']}: listed fingerprint {n['fingerprint']} is not its key's ({fp})", where=str(path)
                )
            end = dt.datetime.fromisoformat(n["not_after"]) if n.get("not_after") else None
            nodes.append(_Entry(str(n["name"]), str(n["role"]), str(n["public_key"]), fp, end))
        revoked_fps = {str(r["fingerprint"]) for r in listing.get("revoked", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedGuardError(
            f"not a server kit's nodes.json ({type(exc).__name__}: {exc})",
            where=str(path),
            fix="pass the server kit directory, or its nodes.json unchanged",
        ) from None
    if federation is None:
        fed_file = path.parent / "federation.json"
        if not fed_file.is_file():
            raise FedGuardError(
                "the federation name is unknown: no federation.json next to nodes.json",
                where=str(path),
                fix="pass --federation NAME (as in the federation file)",
            )
        federation = str(json.loads(fed_file.read_text(encoding="utf-8"))["name"])
    return federation, nodes, revoked_fps


def read_recipients(
    kit_path: Path, *, ca_fingerprint: str | None, federation: str | None = None
) -> tuple[str, list[Recipient], list[str]]:
    """(federation, recipients, notes): the enrolled clients and the evaluator, revoked and expired keys left out.

    ``kit_path`` is the server kit directory (verified against its CA-signed manifest, pinned to
    ``ca_fingerprint`` when given) or a ``nodes.json``; a nodes.json outside a kit cannot be verified,
    which the notes say.
    """
    notes: list[str] = []
    kit_dir = kit_path if kit_path.is_dir() else kit_path.parent
    if kit_path.is_dir() or (kit_path.is_file() and (kit_dir / "manifest.json").is_file()):
        kit = verify_kit(kit_dir, ca_fingerprint)
        if kit.role != "server":
            raise KitError(
                f"this is the kit of node {kit.participant} ({kit.role}); the node list is in the SERVER kit",
                where=str(kit.path),
                fix="pass the server kit directory (or its nodes.json)",
            )
        if federation is not None and federation != kit.federation:
            raise FedGuardError(f"--federation {federation!r} but the kit is for {kit.federation!r}")
        federation = kit.federation
        nodes = [_Entry(n.name, n.role, n.public_key, n.fingerprint, n.not_after) for n in kit.nodes]
        revoked = {r.fingerprint for r in kit.revoked}
        notes.append(
            f"node list verified against the kit's CA-signed manifest (CA {kit.ca_fingerprint}"
            + (", pinned)" if kit.ca_pinned else "; NOT pinned: pass --ca-fingerprint to check it is the federation's)")
        )
    elif kit_path.is_file():
        federation, nodes, revoked = _read_raw_nodes(kit_path, federation)
        notes.append(
            "WARNING: this nodes.json is not inside a signed kit, so nothing proves these are the enrolled keys: "
            "confirm each fingerprint below with its node owner before anyone uses this key"
        )
    else:
        raise KitError(
            "server kit not found", where=str(kit_path), fix="pass the server kit directory from `provision init`"
        )

    now = dt.datetime.now(dt.UTC)
    out: list[Recipient] = []
    for n in nodes:
        if n.fingerprint in revoked:
            notes.append(f"skipped {n.name}: key {n.fingerprint} is revoked")
            continue
        if n.not_after is not None and n.not_after < now:
            notes.append(f"skipped {n.name}: registration expired on {n.not_after:%Y-%m-%d}")
            continue
        if n.role not in ("client", "evaluator"):
            raise FedGuardError(f"node {n.name} has role {n.role!r}", where=str(kit_path))
        out.append(Recipient(n.name, n.role, n.public_key, n.fingerprint))
    evaluators = [r.name for r in out if r.role == "evaluator"]
    if len(evaluators) != 1:
        raise FedGuardError(
            f"the node list has {len(evaluators)} current evaluator(s); exactly one is needed",
            where=str(kit_path),
            fix="the federation admin enrolls one evaluator (`fedguard provision add-node --role evaluator`)",
        )
    if not any(r.role == "client" for r in out):
        raise FedGuardError("the node list has no current client node", where=str(kit_path))
    return federation, out, notes


def cmd_keygen(args: argparse.Namespace) -> int:
    from common import he
    from common.he_custody import keygen, open_context, write_bundle

    workdir, out = Path(args.workdir), Path(args.out)
    kit_path = Path(args.kit)
    signed = kit_path.is_dir() or (kit_path.is_file() and (kit_path.parent / "manifest.json").is_file())
    # A signed kit is trusted only when pinned to the CA fingerprint (or the pin is waived, loudly); a
    # bare nodes.json has nothing to pin and says so in its notes.
    pin = ca_pin(args, "evaluator keygen") if signed else args.ca_fingerprint
    _say(f"reading the enrolled nodes from {args.kit}")
    federation, recipients, notes = read_recipients(kit_path, ca_fingerprint=pin, federation=args.federation)
    for note in notes:
        _say(f"  {note}")
    for r in recipients:
        _say(f"  recipient {r.name:20s} {r.role:9s} key {r.fingerprint}")
    evaluator = next(r for r in recipients if r.role == "evaluator")

    key_path = Path(args.key) if args.key else workdir / NODE_KEY
    own_key: bytes | None = None
    if args.key or key_path.is_file():  # this must be the evaluator's machine: its key must be the enrolled one
        check_node_private_key(evaluator.public_key, key_path)
        own_key = key_path.read_bytes()

    scheme = he.get_scheme(args.scheme)
    he.check_capacity(scheme, args.max_clients, args.bound)
    _say(
        f"creating the HE key on this machine ({scheme.name}: N={scheme.poly_modulus_degree}, moduli "
        f"{list(scheme.coeff_mod_bit_sizes)}, scale 2^{scheme.scale_bits}; up to {args.max_clients} clients, "
        f"|update| <= {args.bound:g})"
    )
    bundle = keygen(
        federation,
        {r.name: r.public_key for r in recipients},
        max_clients=args.max_clients,
        bound=args.bound,
        scheme=scheme.name,
    )
    _say(f"sealed the secret context to {len(bundle.sealed)} node(s), each with its own key")
    if own_key is not None:
        open_context(
            bundle.sealed[evaluator.name],
            own_key,
            federation=federation,
            node=evaluator.name,
            expected_fingerprint=bundle.fingerprint,
        )
        _say(f"checked: {key_path} opens the evaluator's own sealed context")
    paths = write_bundle(bundle, workdir, out, force=args.force)

    _say(f"\nHE context fingerprint of federation {federation}:\n\n    {bundle.fingerprint}\n")
    _say("evaluator (this machine; keep it here, never copy it):")
    _say(f"  secret context (0600): {paths.secret_context}")
    _say(f"  key description:       {paths.evaluator_info}")
    _say(f"server bundle (nothing in it can decrypt): {paths.public_context.parent}")
    _say(f"  public context (add-only: no secret or Galois keys): {paths.public_context}")
    _say(f"  key description: {paths.server_info}")
    for name, path in paths.sealed.items():
        _say(f"  sealed to {name}: {path}")
    _say(
        f"\nnext: copy {paths.public_context.parent} to the server host; `fedguard server start` serves the "
        "sealed contexts from it. "
        "The server cannot open them: each opens only with its node's own private key."
    )
    _say(
        "The run config must name the fingerprint above (the admin signs it); nodes refuse any other context. "
        "Re-run with --force only to replace the key: every node then gets a new sealed context."
    )
    return 0


def add_command(evaluator_subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``keygen`` to the ``evaluator`` group."""
    k = evaluator_subparsers.add_parser(
        "keygen", help="create the federation's HE key on this evaluator and seal it to every enrolled node"
    )
    k.add_argument(
        "--kit",
        required=True,
        metavar="SERVER_KIT",
        help="the server kit directory (or its nodes.json): the enrolled nodes and their keys",
    )
    k.add_argument(
        "--workdir", required=True, metavar="DIR", help="the evaluator's work directory (gets he-secret.ctx)"
    )
    k.add_argument("--out", required=True, metavar="DIR", help="the bundle for the server host (nothing secret)")
    k.add_argument(
        "--max-clients",
        type=positive_int,
        default=DEFAULT_MAX_CLIENTS,
        help=f"most updates summed in one round (default {DEFAULT_MAX_CLIENTS})",
    )
    k.add_argument(
        "--bound",
        type=positive_float,
        default=DEFAULT_BOUND,
        help=f"per-coordinate bound every node enforces on its update before encrypting (default {DEFAULT_BOUND:g}); "
        "max-clients x max(bound, 1) must fit the scheme's capacity (262,143 for fedguard-add)",
    )
    k.add_argument("--scheme", default="fedguard-add", help="CKKS parameter set (default fedguard-add)")
    add_ca_pin_args(k, "the server kit")
    k.add_argument("--key", help="the evaluator's node private key (default: <workdir>/node.key, checked if present)")
    k.add_argument("--federation", help="the federation name, only for a nodes.json outside its kit")
    k.add_argument("--force", action="store_true", help="replace an existing HE key (every node needs the new one)")
    k.set_defaults(func=cmd_keygen)
