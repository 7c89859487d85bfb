"""Federation kits: what the admin's tools and every participant must agree on — formats, loading, verification.

Making kits (the CA, enrolling nodes, rotating keys) is the admin's job and lives with the admin's CLI
in :mod:`fedguard.provisioning`; this package holds only what a server or node reads back.

Layout of a provisioning directory ``OUT`` (made by ``fedguard provision init``)::

    OUT/admin/            stays with the federation admin, offline; never copied anywhere
        ca.key ca.crt     the federation CA (EC P-384); ca.key signs certificates and kit manifests
        run-signing.key   Ed25519 key that signs runs; its .pub is pinned in every kit
        run-signing.pub
        registry.json     source of truth: federation settings, enrolled nodes, revoked node keys
    OUT/server/           copied to the server host
        ca.crt server.crt server.key  TLS for the SuperLink (SANs = the federation's server addresses)
        nodes.json        enrolled nodes (name, organisation, role, OpenSSH key, fingerprint) and revoked keys
        enrolled/NAME.pub each enrolled key as a file, ready for ``flwr supernode register``
        run-signing.pub federation.json manifest.json manifest.sig
    OUT/nodes/NAME/       copied to node NAME
        ca.crt node.pub   the CA and the node's registered authentication key
        node.key          only when the key was generated here (demo); normally it never leaves the node
        run-signing.pub federation.json manifest.json manifest.sig

Modules, one concept each:

- :mod:`~common.kit.federation` the federation file (TOML) model;
- :mod:`~common.kit.keys` the one loader of node keys (EC P-384, OpenSSH), fingerprints, key generation;
- :mod:`~common.kit.certs` certificates: load, fingerprint, compare;
- :mod:`~common.kit.manifest` the CA-signed manifest every kit carries;
- :mod:`~common.kit.verify` checking a kit before use (:func:`verify_kit`);
- :mod:`~common.kit.names` file names and format labels; :mod:`~common.kit.errors` the errors.
"""

from __future__ import annotations

from common.kit.certs import fingerprint_cert
from common.kit.errors import KitError, NodeKeyError, ProvisionError
from common.kit.federation import Federation, NodeSpec, ServerSection, load_federation, parse_federation
from common.kit.keys import (
    fingerprint_public_key,
    load_node_private_key,
    load_node_public_key,
    parse_node_public_key,
)
from common.kit.names import ADMIN_DIR, NODE_KEY, NODE_PUB, NODES_DIR, RUN_SIGNING_KEY, RUN_SIGNING_PUB, SERVER_DIR
from common.kit.verify import EnrolledNode, Kit, RevokedKey, check_node_private_key, verify_kit

__all__ = [
    "ADMIN_DIR",
    "NODES_DIR",
    "NODE_KEY",
    "NODE_PUB",
    "RUN_SIGNING_KEY",
    "RUN_SIGNING_PUB",
    "SERVER_DIR",
    "EnrolledNode",
    "Federation",
    "Kit",
    "KitError",
    "NodeKeyError",
    "NodeSpec",
    "ProvisionError",
    "RevokedKey",
    "ServerSection",
    "check_node_private_key",
    "fingerprint_cert",
    "fingerprint_public_key",
    "load_federation",
    "load_node_private_key",
    "load_node_public_key",
    "parse_federation",
    "parse_node_public_key",
    "verify_kit",
]
