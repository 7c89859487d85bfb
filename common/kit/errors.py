"""Errors of the kit package: one class per audience, so the CLI can say who must act."""

from __future__ import annotations

from common.errors import FedGuardError


class KitError(FedGuardError):
    """A kit is missing, tampered with, not from the expected CA, or outside its validity window."""

    code = "kit-invalid"


class ProvisionError(FedGuardError):
    """Provisioning refused (existing kits, unknown node, missing key...); nothing was changed."""

    code = "provision-refused"


class NodeKeyError(FedGuardError, ValueError):
    """A node key file or key line is not the EC P-384 key FedGuard registers.

    Also a ``ValueError`` so callers that treat "unreadable key" as a bad input (the server's
    reply checks) keep working.
    """

    code = "node-key-invalid"
