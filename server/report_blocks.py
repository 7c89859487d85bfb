"""Reports as neutral blocks, so Markdown and HTML always say the same thing.

A block is ``("h1"…"h4", text)``, ``("p", text)``, ``("ul", [items])``, ``("table", (header, rows))``
or ``("plot", Plot | Tradeoff)``; each report builds its blocks once and renders them here. HTML comes from
``templates/report.html`` (autoescaped) and charts from :mod:`server.charts`; Markdown skips
plots because the same numbers are in a table next to each one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from markupsafe import Markup

from server.charts import Series, TradeoffPoint, line_chart, tradeoff_chart
from server.templates import render

Block = tuple[str, object]
Table = tuple[list[str], list[list[str]]]

#: Table cells with exactly these texts get the class of the same name (styled in the template).
_CELL_CLASSES = frozenset({"suppressed", "critical", "warning"})


@dataclass(frozen=True)
class Plot:
    """A line chart over rounds, as a block; the arguments are :func:`server.charts.line_chart`'s."""

    title: str
    series: Series
    ylabel: str = ""
    y_min: float | None = None
    y_max: float | None = None
    threshold: float | None = None
    threshold_label: str = "threshold"
    series_class: str = "series"
    chart_id: str | None = None  # default: "plot-<block index>", unique within the page

    def svg(self, index: int) -> str:
        return line_chart(
            self.chart_id or f"plot-{index}",
            self.title,
            self.series,
            ylabel=self.ylabel,
            y_min=self.y_min,
            y_max=self.y_max,
            threshold=self.threshold,
            threshold_label=self.threshold_label,
            series_class=self.series_class,
        )


@dataclass(frozen=True)
class Tradeoff:
    """A scatter of options (cost on x, benefit on y) with the Pareto front, as a ``plot`` block."""

    title: str
    points: list[TradeoffPoint]
    xlabel: str
    ylabel: str
    chart_id: str | None = None

    def svg(self, index: int) -> str:
        return tradeoff_chart(
            self.chart_id or f"plot-{index}", self.title, self.points, xlabel=self.xlabel, ylabel=self.ylabel
        )


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


def script_json(data_json: str) -> Markup:
    """JSON text made safe inside ``<script type="application/json">`` and still the same JSON.

    A script element's text is not HTML-decoded, so HTML-escaping it would corrupt the data
    (``&`` → ``&amp;``). Only ``<`` can end the element (``</script>``) or open a comment
    (``<!--``), and in JSON it can only occur inside a string, where ``\\u003c`` means the same.
    """
    return Markup(data_json.replace("<", "\\u003c"))


def _html_block(index: int, kind: str, value: object) -> dict[str, Any]:
    if kind == "ul":
        return {"kind": kind, "items": [str(item) for item in cast(list[str], value)]}
    if kind == "table":
        header, rows = cast(Table, value)
        cells = [[(str(c), str(c) if c in _CELL_CLASSES else "") for c in row] for row in rows]
        return {"kind": kind, "header": [str(h) for h in header], "rows": cells}
    if kind == "plot":
        return {"kind": kind, "svg": Markup(cast(Plot | Tradeoff, value).svg(index))}  # the charts escape their values
    if kind in ("h1", "h2", "h3", "h4", "p"):
        return {"kind": kind, "text": str(value)}
    raise ValueError(f"unknown report block {kind!r}: use h1–h4, p, ul, table or plot")


def to_html(blocks: Iterable[Block], title: str, data_json: str) -> str:
    """One self-contained page readable offline: inline CSS and SVG, no external resources, no executable script.

    ``data_json`` (the report as JSON) is embedded in ``<script type="application/json"
    id="report-data">`` for tools; ``json.loads`` of that element's text gives the report back.
    """
    return render(
        "report.html",
        title=title,
        blocks=[_html_block(i, kind, value) for i, (kind, value) in enumerate(blocks)],
        data_json=script_json(data_json),
    )
