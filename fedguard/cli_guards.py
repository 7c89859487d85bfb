"""Checks every ``fedguard`` command runs before it touches anything: numeric flags and the CA pin.

Why here: a node flag such as ``--budget-epsilon -5`` must fail in argparse (exit 2, one line),
not after the node has created its workdir and connected; and every command that reads a kit
must pin the federation CA the owner got out of band (a manifest signed by a CA inside the same
kit proves nothing), unless the operator waives it explicitly and loudly.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from common.errors import ConfigError

#: Environment fallback for ``--ca-fingerprint`` (containers pass it from a config map).
CA_FINGERPRINT_ENV = "FEDGUARD_CA_FINGERPRINT"
WAIVE_FLAG = "--insecure-skip-ca-pin"


def number(
    kind: type[int] | type[float] = float,
    *,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
    exclusive_maximum: bool = False,
) -> Callable[[str], int | float]:
    """An argparse ``type``: a finite number in range, else argparse's own one-line error (exit 2)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: it must be {'>' if exclusive_minimum else '>='} {minimum:g}"
            )
        if maximum is not None and (value >= maximum if exclusive_maximum else value > maximum):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: it must be {'<' if exclusive_maximum else '<='} {maximum:g}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_float = number(float, minimum=0, exclusive_minimum=True)
nonnegative_float = number(float, minimum=0)
positive_int = number(int, minimum=1)
#: δ: strictly between 0 and 1.
probability = number(float, minimum=0, exclusive_minimum=True, maximum=1, exclusive_maximum=True)


def add_ca_pin_args(parser: argparse.ArgumentParser, what: str = "the kit") -> None:
    """``--ca-fingerprint`` (default ``$FEDGUARD_CA_FINGERPRINT``) or the explicit ``--insecure-skip-ca-pin``."""
    parser.add_argument(
        "--ca-fingerprint",
        default=os.environ.get(CA_FINGERPRINT_ENV) or None,
        help=f"the federation CA's SHA-256 fingerprint you got out of band: pins {what} "
        f"(default: ${CA_FINGERPRINT_ENV}); required unless {WAIVE_FLAG}",
    )
    parser.add_argument(
        WAIVE_FLAG,
        dest="insecure_skip_ca_pin",
        action="store_true",
        help="trust the kit's own CA without the out-of-band fingerprint (tests only: a replaced kit would pass)",
    )


def ca_pin(args: argparse.Namespace, command: str) -> str | None:
    """The fingerprint to pin the kit to; None only when waived (with a warning on stderr)."""
    fingerprint = getattr(args, "ca_fingerprint", None)
    waived = bool(getattr(args, "insecure_skip_ca_pin", False))
    if fingerprint and waived:
        raise ConfigError(
            f"--ca-fingerprint and {WAIVE_FLAG} contradict each other", where=command, fix="pass only --ca-fingerprint"
        )
    if fingerprint:
        return str(fingerprint)
    if waived:
        print(
            f"fedguard: WARNING: {command}: {WAIVE_FLAG}: the kit's CA is trusted without checking its fingerprint; "
            "anyone who replaced the whole kit would pass",
            file=sys.stderr,
            flush=True,
        )
        return None
    raise ConfigError(
        "the federation CA fingerprint is required to trust the kit",
        where=command,
        fix=f"pass --ca-fingerprint with the fingerprint `fedguard provision init` printed (or set "
        f"${CA_FINGERPRINT_ENV}); {WAIVE_FLAG} waives the check (tests only)",
    )
