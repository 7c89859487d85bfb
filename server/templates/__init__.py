"""The templates of the HTML reports and SVG charts, and the one Jinja environment that renders them.

Templates are package data (``server/templates/*.html``, ``*.svg``) loaded through the package,
so an installed wheel renders exactly what the source tree does. Autoescaping is always on:
a value reaches the page raw only when the caller marks it :class:`markupsafe.Markup`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined


@cache
def environment() -> Environment:
    """One environment per process: templates compile once and are reused by every report and chart."""
    return Environment(
        loader=PackageLoader("server", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt name fails loudly instead of rendering nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """``name`` rendered with ``context`` (autoescaped)."""
    return environment().get_template(name).render(**context)
