"""File names, format labels and time rules of a kit: what the admin's tools and every participant agree on."""

from __future__ import annotations

import datetime as dt
from typing import Literal

ADMIN_DIR = "admin"
SERVER_DIR = "server"
NODES_DIR = "nodes"

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
RUN_SIGNING_KEY = "run-signing.key"
RUN_SIGNING_PUB = "run-signing.pub"
REGISTRY = "registry.json"
NODES_JSON = "nodes.json"
FEDERATION_JSON = "federation.json"
ENROLLED_DIR = "enrolled"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"

MANIFEST_FORMAT: Literal["fedguard-kit/1"] = "fedguard-kit/1"
REGISTRY_FORMAT: Literal["fedguard-registry/1"] = "fedguard-registry/1"

#: Certificates are back-dated this much so a node whose clock is slightly behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


def utc_now(now: dt.datetime | None = None) -> dt.datetime:
    """``now`` as an aware UTC time (naive values are taken as UTC); the current time when None."""
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def day(t: dt.datetime) -> str:
    """A time as people read it in error messages: ``2026-12-03 06:40 UTC``."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
