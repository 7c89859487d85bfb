"""``fedguard provision ...`` (federation admin) and ``fedguard client init`` (node owner).

Thin handlers over :mod:`fedguard.provisioning`: parse flags, print progress, and end with what the person must do next
(which directory goes where, which fingerprint to pass on out of band). Errors are FedGuardErrors; the CLI
main prints them without a trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedguard.provisioning import add_node, init_federation, init_node_keys, rotate


def _progress(msg: str) -> None:
    print(f"  {msg}", flush=True)


def _print_fingerprint(fp: str) -> None:
    print("\nCA fingerprint (SHA-256) — give it to every node owner and the server operator OUT OF BAND")
    print("(phone, in person, a signed letter), never in the same message as the kit:")
    print(f"\n    {fp}\n")
    print("They check it with `openssl x509 -in ca.crt -noout -fingerprint -sha256`; FedGuard checks it at start.")


def cmd_provision_init(args: argparse.Namespace) -> int:
    print(f"provisioning federation kits from {args.federation_file} into {args.out}")
    res = init_federation(
        Path(args.federation_file),
        Path(args.out),
        force=args.force,
        generate_node_keys=args.generate_node_keys,
        progress=_progress,
    )
    print(f"\nadmin directory (CA key, run-signing key, registry): {res.admin_dir}")
    print("  keep it offline and backed up; never copy it to the server or a node")
    print(f"server kit → copy to the server host: {res.server_kit}")
    for name, path in res.node_kits.items():
        print(f"node kit {name} → copy to that node: {path}  (key {res.node_fingerprints[name]})")
    if res.generated_keys:
        print(
            f"\nnote: the keys of {', '.join(res.generated_keys)} were generated here (--generate-node-keys) and "
            "their kits hold the private key (node.key). Fine for a demo; in production each node runs "
            "`fedguard client init` and only its public key travels."
        )
    _print_fingerprint(res.ca_fingerprint)
    return 0


def cmd_provision_add_node(args: argparse.Namespace) -> int:
    print(f"enrolling node {args.name} ({args.role}) in {args.out}")
    res = add_node(
        Path(args.out),
        args.name,
        args.organisation,
        args.role,
        Path(args.public_key) if args.public_key else None,
        progress=_progress,
    )
    print(f"\nnode kit → copy to {res.name}: {res.kit_dir}  (key {res.fingerprint})")
    print(f"server kit updated (node list re-signed) → copy it to the server host again: {res.server_kit}")
    if res.key_generated:
        print(
            "note: the node's key was generated here and its kit holds the private key; in production the node "
            "runs `fedguard client init` and you pass its public key with --public-key."
        )
    print(f"the node owner checks the kit against the CA fingerprint {res.ca_fingerprint} (tell them out of band)")
    return 0


def cmd_provision_rotate(args: argparse.Namespace) -> int:
    target = "server" if args.server else args.node
    print(f"rotating {'the server certificate' if args.server else 'the registration of node ' + args.node}")
    res = rotate(
        Path(args.out),
        target,
        public_key=Path(args.public_key) if args.public_key else None,
        progress=_progress,
    )
    if args.server:
        print(f"\nnew server certificate {res.fingerprint}, valid until {res.not_after:%Y-%m-%d}")
        print(f"copy the server kit to the server host and restart the server: {res.server_kit}")
        print("node kits are unchanged (they trust the CA, not the certificate)")
    else:
        print(f"\nnode {target}: key {res.fingerprint}, registered until {res.not_after:%Y-%m-%d}")
        if res.revoked_fingerprint:
            print(f"old key {res.revoked_fingerprint} is listed as revoked in the server kit")
        print(f"node kit → copy to {target}: {res.kit_dir}")
        print(f"server kit updated → copy it to the server host again: {res.server_kit}")
    return 0


def cmd_client_init(args: argparse.Namespace) -> int:
    ident = init_node_keys(Path(args.workdir), force=args.force)
    print(f"node authentication key (EC P-384) written to {args.workdir}")
    print(f"  private key: {ident.private_key}  (mode 0600; it never leaves this machine)")
    print(f"  public key:  {ident.public_key}")
    print("\nsend this public key to the federation admin (it is not secret):\n")
    print(f"    {ident.openssh}\n")
    print(f"and confirm its fingerprint with them by another channel (phone, in person):\n\n    {ident.fingerprint}\n")
    print("Keep the kit you get back in its own directory (e.g. WORKDIR/kit), unchanged.")
    return 0


def add_provision_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``provision`` group (init, add-node, rotate) to the top-level subparsers."""
    p = subparsers.add_parser("provision", help="federation admin: CA, server kit and node kits")
    psub = p.add_subparsers(dest="provision_command", required=True)

    i = psub.add_parser("init", help="create the CA and every kit from a federation file")
    i.add_argument("federation_file", metavar="FEDERATION_FILE", help="federation TOML (see deploy/PROVISIONING.md)")
    i.add_argument("--out", required=True, metavar="DIR", help="where admin/, server/ and nodes/ go")
    i.add_argument("--force", action="store_true", help="replace existing kits (makes a NEW CA: all kits change)")
    i.add_argument(
        "--generate-node-keys",
        action="store_true",
        help="make node keys here for nodes without public_key (demo; private keys end up in the node kits)",
    )
    i.set_defaults(func=cmd_provision_init)

    a = psub.add_parser("add-node", help="enroll one more node without re-issuing other kits")
    a.add_argument("--out", required=True, metavar="DIR", help="the provisioning directory used with init")
    a.add_argument("--name", required=True, help="node name (letters, digits, . _ -)")
    a.add_argument("--organisation", required=True, help="who runs the node")
    a.add_argument("--role", choices=["client", "evaluator"], default="client")
    a.add_argument(
        "--public-key",
        metavar="FILE",
        help="the node's node.pub from `fedguard client init` (without it a key pair is generated here: demo only)",
    )
    a.set_defaults(func=cmd_provision_add_node)

    r = psub.add_parser("rotate", help="re-issue the server certificate or one node's registration")
    r.add_argument("--out", required=True, metavar="DIR", help="the provisioning directory used with init")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--server", action="store_true", help="new server key and certificate")
    which.add_argument("--node", metavar="NAME", help="new key/registration for this node (old key revoked)")
    r.add_argument(
        "--public-key",
        metavar="FILE",
        help="with --node: the node's new node.pub (required when the node generated its own key)",
    )
    r.set_defaults(func=cmd_provision_rotate)


def add_client_init(client_subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``init`` to the ``client`` group: the node owner makes the node's own authentication key."""
    c = client_subparsers.add_parser("init", help="generate this node's authentication key (prints the public key)")
    c.add_argument("--workdir", required=True, metavar="DIR", help="the node's work directory")
    c.add_argument("--force", action="store_true", help="replace an existing key (the admin must rotate it)")
    c.set_defaults(func=cmd_client_init)
