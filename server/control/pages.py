"""The dashboard's renderer: Jinja2 templates and static CSS shipped as package data of ``server.control``.

Templates live in ``server/control/templates/`` (autoescaped), the stylesheet in
``server/control/static/``; both are read through the installed package (``importlib.resources``),
never through the source tree, so a wheel install renders the same pages.
"""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from server.control.auth import Principal, has_role
from server.cost_report import fmt_bytes

CSS_PATH = "/static/control.css"


def _fmt_time(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _num(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


@cache
def environment() -> Environment:
    """One Jinja2 environment for every page (built on first use: importing this module reads no files)."""
    env = Environment(
        loader=PackageLoader("server.control", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default=True, default_for_string=True),
    )
    env.globals.update(fmt_time=_fmt_time, num=_num, pct=_pct, nbytes=fmt_bytes)
    return env


def render(name: str, **ctx: Any) -> str:
    """``templates/<name>.html`` rendered with ``ctx``."""
    return environment().get_template(f"{name}.html").render(**ctx)


def render_page(name: str, p: Principal | None, **ctx: Any) -> str:
    """A dashboard page: the template plus what the header needs (who is logged in, which links to show)."""
    operator = bool(p and has_role(p, "operator"))
    admin = bool(p and has_role(p, "admin"))
    return render(name, p=p, operator=operator, admin=admin, **ctx)


@cache
def stylesheet() -> bytes:
    """The dashboard's CSS (``static/control.css``), read once from the installed package."""
    return resources.files("server.control").joinpath("static", "control.css").read_bytes()
