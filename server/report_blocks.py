"""Reports as neutral blocks, so Markdown and HTML always say the same thing.

A block is ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("ul", [items])`` or
``("table", (header, rows))``; each report builds its blocks once and renders them here.
"""

from __future__ import annotations

import html
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


def to_html(blocks: Iterable[Block], title: str, data_json: str, after_title: str = "") -> str:
    """One self-contained page (no scripts run, no external resources) readable offline.

    ``data_json`` (the report as JSON) is embedded for tools; ``after_title`` is raw HTML placed
    under the first heading (e.g. an inline SVG chart).
    """
    esc = html.escape
    body: list[str] = []
    for i, (kind, value) in enumerate(blocks):
        if kind.startswith("h"):
            body.append(f"<{kind}>{esc(str(value))}</{kind}>")
            if i == 0 and after_title:
                body.append(after_title)
        elif kind == "p":
            body.append(f"<p>{esc(str(value))}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in cast(list[str], value)) + "</ul>")
        else:
            header, rows = cast(Table, value)
            head = "".join(f"<th>{esc(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    body.append(f'<script type="application/json" id="report-data">{esc(data_json, quote=False)}</script>')
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}"
        "th{background:#f3f3f3}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
