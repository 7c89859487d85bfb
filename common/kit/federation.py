"""The federation file (TOML): who takes part and how the server is reached.

The admin writes it; ``fedguard provision init`` reads it. Node public keys may be given as the
key line or as a .pub path relative to the file; both become the canonical OpenSSH line here.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError
from common.kit.keys import looks_like_key_line, node_public_line
from common.schema import format_validation_error

__all__ = ["Federation", "NodeSpec", "ServerSection", "check_name", "load_federation", "parse_federation"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RESERVED = {"server", "admin"}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names a directory and the Flower node)"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    #: Host names and IP addresses nodes use to reach the server; all go into the server certificate's SANs.
    addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"], min_length=1)

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for raw in value:
            addr = _check_address(raw)
            if addr not in out:
                out.append(addr)
        return out


def _check_address(raw: str) -> str:
    addr = raw.strip()
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        pass
    host = addr.rstrip(".").lower()
    if len(host) > 253 or not _HOST_RE.fullmatch(host):
        raise ValueError(
            f"{raw!r} is not a host name or IP address (no scheme, port or path: e.g. 'fl.example.org', '10.0.0.5')"
        )
    return host


class NodeSpec(_Strict):
    """One participant of the federation file's ``[[nodes]]`` list."""

    name: str
    organisation: str = Field(min_length=1, max_length=128)
    role: Literal["client", "evaluator"] = "client"
    #: The node's OpenSSH EC P-384 public key (from ``fedguard client init``): the key line itself, or
    #: the path of a .pub file relative to the federation file. None only with generated node keys.
    public_key: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        check_name(value, "node name")
        if value.lower() in _RESERVED:
            raise ValueError(f"node name {value!r} is reserved")
        return value


class Federation(_Strict):
    """A federation file (TOML): who takes part and how the server is reached."""

    name: str
    server: ServerSection = Field(default_factory=ServerSection)
    nodes: list[NodeSpec]
    #: Updates are encrypted (TenSEAL) and summed by the server; the evaluator holds the key.
    homomorphic: bool = False
    #: Lifetime of server certificates and node registrations; renew with ``fedguard provision rotate``.
    lifetime_days: int = Field(365, ge=1, le=3650)
    #: Lifetime of the CA itself; when it ends, every kit must be re-provisioned.
    ca_lifetime_days: int = Field(3650, ge=1, le=36500)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "federation name")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, nodes: list[NodeSpec]) -> list[NodeSpec]:
        seen: set[str] = set()
        for n in nodes:
            if n.name in seen:
                raise ValueError(f"node name {n.name!r} appears twice")
            seen.add(n.name)
        evaluators = [n.name for n in nodes if n.role == "evaluator"]
        if len(evaluators) != 1:
            raise ValueError(
                f"exactly one node must have role = 'evaluator' (found {len(evaluators)}"
                + (f": {', '.join(evaluators)})" if evaluators else ")")
            )
        return nodes


def parse_federation(raw: dict[str, Any], source: str = "federation file", base_dir: Path | None = None) -> Federation:
    """Validate a federation dict; public-key paths resolve against ``base_dir`` and are replaced by the key."""
    try:
        fed = Federation.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            "invalid federation file:\n" + format_validation_error(exc, source, Federation),
            fix="correct the fields above; see deploy/PROVISIONING.md for an example",
        ) from None
    keys: dict[str, str] = {}
    for i, node in enumerate(fed.nodes):
        if node.public_key is None:
            continue
        where = f"{source}: nodes.{i}.public_key"
        value = node.public_key.strip()
        key_source: str | Path = value
        if not looks_like_key_line(value):
            path = Path(value)
            key_source = base_dir / path if not path.is_absolute() and base_dir is not None else path
        node.public_key = node_public_line(key_source, where=where, error=ConfigError)
        if node.public_key in keys:
            raise ConfigError(
                f"nodes {keys[node.public_key]!r} and {node.name!r} have the same public key",
                where=where,
                fix="every node generates its own key with `fedguard client init`",
            )
        keys[node.public_key] = node.name
    return fed


def load_federation(path: str | Path) -> Federation:
    """Read and validate a federation TOML file; errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("federation file not found", where=str(p), fix="pass the path of an existing TOML file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(p)) from None
    return parse_federation(raw, str(p), p.resolve().parent)
