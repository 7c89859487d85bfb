"""Reports as neutral blocks, so Markdown and HTML always say the same thing.

A block is ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("ul", [items])`` or
``("table", (header, rows))``; each report builds its blocks once and renders them here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

Block = tuple[str, object]
Table = tuple[list[str], list[list[str]]]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Iterable[Block]) -> str:
    out: list[str] = []
    for kind, value in blocks:
        if kind.startswith("h"):
            out += ["#" * int(kind[1]) + f" {value}", ""]
        elif kind == "p":
            out += [str(value), ""]
        elif kind == "ul":
            out += [f"- {item}" for item in cast(list[str], value)] + [""]
        elif kind == "table":
            header, rows = cast(Table, value)
            out += ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]
    return "\n".join(out)
