"""Provisioning, the federation admin's side: issue the CA, enroll nodes, rotate keys, write kits.

Servers and nodes never import this: they read kits back with :mod:`common.kit`. Modules:
:mod:`~fedguard.provisioning.workflows` (init, add-node, rotate, client init),
:mod:`~fedguard.provisioning.registry` (the admin's registry), :mod:`~fedguard.provisioning.kits`
(writing and signing one kit), :mod:`~fedguard.provisioning.certs` (issuing certificates),
:mod:`~fedguard.provisioning.staging` (atomic swap of kit directories).
"""

from __future__ import annotations

from common.kit.errors import ProvisionError
from fedguard.provisioning.workflows import (
    AddedNode,
    NodeIdentity,
    ProvisionResult,
    RotateResult,
    add_node,
    init_federation,
    init_node_keys,
    rotate,
)

__all__ = [
    "AddedNode",
    "NodeIdentity",
    "ProvisionError",
    "ProvisionResult",
    "RotateResult",
    "add_node",
    "init_federation",
    "init_node_keys",
    "rotate",
]
