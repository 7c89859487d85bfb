"""Small JSON files FedGuard writes and reads back (threshold policies, calibrations): one parser, so a bad
file gets the same clear error whichever it is — the file, the field, and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def parse_json_file(text: str | bytes, where: str, model: type[M], fmt: str, what: str, fix: str) -> M:
    """``text`` as ``model``, whose ``format`` field must be ``fmt``; anything else is a ConfigError."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a JSON file: {exc}", where=where, fix=fix) from None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"not a {what} (format {got!r}, expected {fmt!r})", where=where, fix=fix)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"invalid {what}: {field}: {err['msg']}", where=where, fix=fix) from None


def read_json_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of a file the user named; a missing or unreadable one is a ConfigError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror or exc}", where=str(path), fix=fix) from None
