"""``--json`` on a command that runs a federation: stdout carries its one JSON document, nothing else.

A run prints progress as it goes — partition sizes, round lines, each node's DP plan (forwarded by Ray
from its workers), findings — and a script reading ``fedguard simulate --json | jq`` must not have to
pick the document out of that. While a command runs in ``json_mode``, everything printed to stdout goes
to stderr, and ``print_json`` writes the document to the real stdout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

_documents: list[TextIO] = []  # the real stdout of each active json_mode (innermost last)


@contextlib.contextmanager
def json_mode(enabled: bool) -> Iterator[None]:
    """Send whatever the command prints to stderr (when ``enabled``); ``print_json`` still reaches stdout."""
    if not enabled:
        yield
        return
    _documents.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _documents.pop()


def print_json(document: str) -> None:
    """Print a command's JSON document on its real stdout (inside ``json_mode`` or not)."""
    print(document, file=_documents[-1] if _documents else sys.stdout, flush=True)
