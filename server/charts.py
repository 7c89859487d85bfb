"""The one SVG chart renderer: line charts over rounds for the dashboard and every HTML report.

Rendered on the server (no scripts, readable offline). :func:`line_chart` computes the geometry
and ``templates/chart.svg`` draws it. Every series is a ``<polyline>`` whose ``data-series`` names
it and every point a ``<circle>`` whose ``<title>`` gives its exact value, so a reviewer can hover
a point and a test can find the data.

Readable by construction: charts are :data:`WIDTH` wide by default (at least half of the report
page, whose body is at most 1200 px, and of the dashboard's); twelve series get twelve colours
chosen to stay apart (CIE ΔE ≥ 25 between any two, none pale on white) and dash patterns that
differ between neighbours, so colour-blind readers and greyscale prints can tell them apart too;
past twelve, colours come back with another dash and hollow markers. The legend sits under the
plot in as many columns as fit, and text is measured with an upper bound of common sans-serif
fonts' glyph widths, so no label is ever cut off at the chart's edge; long labels keep their
distinguishing end, with the full name on hover.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import cache

from jinja2 import Template

from server.templates import environment, render

Series = dict[str, list[tuple[int, float]]]

#: Default chart width in px: ≥ half the report page (max 1200 px) and the dashboard (max 1150 px).
WIDTH = 640
#: Twelve colours for twelve groups: matplotlib's tab10, then black and navy (min pairwise CIE76 ΔE 27.7).
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
    "#000000",
    "#0b3d91",
)
_DASHES = ("", "6 3", "2 3", "8 3 2 3")
_LABEL_CHARS = 18  # legend labels longer than this keep their distinguishing end
_LEGEND_ROW = 16
_SWATCH = 26  # legend line sample, then the label
_COLUMN_GAP = 14
_FONT = 10
_TITLE_FONT = 12
_MOST_X_TICKS = 12
#: Glyphs at least as wide as the font size in some common sans-serif font (DejaVu Sans ``m`` is 0.97 em).
_WIDE = frozenset("mwMW@%&…—‰×½¼¾")


@dataclass(frozen=True)
class _Drawn:
    name: str
    label: str
    color: str
    dash: str
    hollow: bool
    points: str
    circles: list[tuple[str, str, str]]  # (cx, cy, title)
    legend_x: float
    legend_y: float


def _short(name: str, width: int = _LABEL_CHARS) -> str:
    """A legend label: long names (uint64 node ids) keep their distinguishing end."""
    return name if len(name) <= width else name[: width - 9] + "…" + name[-8:]


def text_width(text: str, size: float = _FONT, *, bold: bool = False) -> float:
    """An upper bound of how wide ``text`` renders at font ``size`` in common sans-serif fonts.

    Per glyph, the widest of DejaVu Sans (the Linux default), Liberation Sans and Arial/Helvetica:
    wide (CJK) characters and the widest Latin glyphs 1 em, other capitals and non-ASCII letters
    0.86 em, everything else (lower case, digits, punctuation) 0.66 em; bold 12 % wider.
    Combining marks take no room.
    """
    em = 0.0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        if unicodedata.east_asian_width(ch) in "WF" or ch in _WIDE:
            em += 1.0
        elif ch.isupper() or (ord(ch) > 127 and ch.isalpha()):
            em += 0.86
        else:
            em += 0.66
    return em * size * (1.12 if bold else 1.0)


def style(i: int) -> tuple[str, str, bool]:
    """Colour, dash pattern and hollow marker of series ``i``: unique for the first 48 series.

    Neighbours differ in dash as well as colour; after twelve series the colours come back with
    the dash pattern shifted and hollow markers.
    """
    lap = i // len(PALETTE)
    return PALETTE[i % len(PALETTE)], _DASHES[(i + lap) % len(_DASHES)], lap % 2 == 1


def _fit(text: str, room: float, size: float, *, bold: bool = False) -> str:
    """``text`` as it fits in ``room`` px: cut with an ellipsis when it does not (the full text is on hover)."""
    if text_width(text, size, bold=bold) <= room:
        return text
    while text and text_width(text + "…", size, bold=bold) > room:
        text = text[:-1]
    return text + "…"


def _plot_area(title: str, width: int, left: float, top: float, pw: float, ph: float) -> dict[str, object]:
    """What every chart template needs about its plot area: edges, centre and the fitted title."""
    return {
        "empty": False,
        "shown_title": _fit(title, width - left, _TITLE_FONT, bold=True),
        "left": left,
        "top": top,
        "right_edge": left + pw,
        "bottom_edge": top + ph,
        "mid_x": f"{left + pw / 2:.1f}",
        "mid_y": f"{top + ph / 2:.1f}",
    }


def _y_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _x_ticks(rounds: list[int]) -> list[int]:
    """Every round while they fit, else an even step: labels never overlap on long runs."""
    if len(rounds) <= _MOST_X_TICKS:
        return rounds
    step = math.ceil((rounds[-1] - rounds[0]) / (_MOST_X_TICKS - 1))
    return list(range(rounds[0], rounds[-1] + 1, step))


def line_chart(
    chart_id: str,
    title: str,
    series: Series,
    *,
    ylabel: str = "",
    width: int = WIDTH,
    height: int = 240,
    y_min: float | None = None,
    y_max: float | None = None,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    series_class: str = "series",
) -> str:
    """An SVG chart of ``series`` (name → [(round, value)]); an empty chart says there is no data.

    ``height`` is the plot's (axes and title included); the legend adds its rows below.
    ``threshold`` draws a dashed horizontal line (e.g. the target ε); ``series_class`` is the class
    of every series' polyline, for pages that tell their charts' series apart.
    """
    drawable = {
        name: sorted((r, v) for r, v in pts if math.isfinite(v))
        for name, pts in series.items()
        if any(math.isfinite(v) for _, v in pts)
    }
    points = [p for pts in drawable.values() for p in pts]
    base = {"id": chart_id, "title": title, "width": width}
    if not points:
        return render("chart.svg", **base, height=height, empty=True)

    values = [v for _, v in points] + ([threshold] if threshold is not None else [])
    lo = min(values) if y_min is None else y_min
    hi = max(values) if y_max is None else y_max
    if hi - lo < 1e-9:  # one value: give the axis a unit of room, never below a fixed floor
        lo, hi = (lo, lo + 1.0) if y_min is not None else (lo - 0.5, hi + 0.5)
    y_ticks = [(t, f"{t:.3g}") for t in _y_ticks(lo, hi)]
    rounds = sorted({r for r, _ in points})
    x_ticks = _x_ticks(rounds)
    # margins sized to what they hold: the widest tick label left, half the last round label right
    left = max(52, 26 + math.ceil(max(text_width(text) for _, text in y_ticks)))
    right = max(16, 4 + math.ceil(text_width(str(x_ticks[-1])) / 2))
    top, axis = 24, 34  # title above the plot; round labels and the axis name below it
    pw, ph = width - left - right, height - top - axis
    x_lo, x_hi = rounds[0], rounds[-1]

    # the legend: columns as wide as the widest label, as many as fit under the plot
    labels = [_short(name) for name in drawable]
    column = _SWATCH + max(text_width(label) for label in labels) + _COLUMN_GAP
    columns = max(1, min(len(labels), int((width - 8 + _COLUMN_GAP) // column)))
    rows = math.ceil(len(labels) / columns)
    legend_top = top + ph + axis + 6
    total_height = legend_top + rows * _LEGEND_ROW + 4

    def x(r: float) -> float:
        return left + (pw * (r - x_lo) / (x_hi - x_lo) if x_hi > x_lo else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    drawn = []
    for i, ((name, pts), label) in enumerate(zip(drawable.items(), labels, strict=True)):
        color, dash, hollow = style(i)
        row, col = divmod(i, columns)
        drawn.append(
            _Drawn(
                name=name,
                label=label,
                color=color,
                dash=dash,
                hollow=hollow,
                points=" ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in pts),
                circles=[(f"{x(r):.1f}", f"{y(v):.1f}", f"{name} round {r}: {v:.4g}") for r, v in pts],
                legend_x=round(8 + col * column, 1),
                legend_y=legend_top + _LEGEND_ROW * row + 11,
            )
        )
    threshold_text = f"{threshold_label} {threshold:g}" if threshold is not None else ""
    return render(
        "chart.svg",
        **base,
        **_plot_area(title, width, left, top, pw, ph),
        height=total_height,
        ylabel=_fit(ylabel, ph, _FONT),
        y_ticks=[(f"{y(t):.1f}", f"{y(t) + 4:.1f}", text) for t, text in y_ticks],
        x_ticks=[(f"{x(r):.1f}", str(r)) for r in x_ticks],
        threshold=None
        if threshold is None
        else {
            "y": f"{y(threshold):.1f}",
            "label_y": f"{y(threshold) - 3:.1f}",
            "title": threshold_text,
            "shown": _fit(threshold_text, pw - 4, 9),
        },
        series_class=series_class,
        series=drawn,
    )


# -- trade-off scatter (fairness sweep) --------------------------------------------------------

#: One scatter chart: drawn from the same environment as chart.svg (autoescaped), kept here because
#: only :func:`tradeoff_chart` uses it.
_SCATTER_SVG = """{% macro marker(kind, x, y) %}
{% if kind == "baseline" %}<rect x="{{ x - 4.5 }}" y="{{ y - 4.5 }}" width="9" height="9" fill="#7f7f7f" stroke="#000"/>
{% elif kind == "configured" %}<circle cx="{{ x }}" cy="{{ y }}" r="8" fill="none" stroke="#d62728" stroke-width="2"/>
{% elif kind == "front" %}<line x1="{{ x - 6 }}" y1="{{ y }}" x2="{{ x + 6 }}" y2="{{ y }}" {{ front_style }}/>
{% elif kind == "pareto" %}<circle cx="{{ x }}" cy="{{ y }}" r="4.5" fill="#2ca02c" stroke="#2ca02c" stroke-width="2"/>
{% else %}<circle cx="{{ x }}" cy="{{ y }}" r="4.5" fill="#fff" stroke="#1f77b4" stroke-width="2"/>
{% endif %}
{% endmacro %}
{% set front_style = 'stroke="#2ca02c" stroke-width="2" stroke-dasharray="6 3"' | safe %}
<svg id="{{ id }}" class="chart scatter" role="img" aria-label="{{ title }}" width="{{ width }}" height="{{ height }}"
 viewBox="0 0 {{ width }} {{ height }}">
<title>{{ title }}</title>
{% if empty %}
<text x="{{ width // 2 }}" y="{{ height // 2 }}" text-anchor="middle">no data</text>
{% else %}
<text class="chart-title" x="{{ left }}" y="15" font-size="12" font-weight="bold">{{ shown_title }}</text>
<line x1="{{ left }}" y1="{{ bottom_edge }}" x2="{{ right_edge }}" y2="{{ bottom_edge }}" stroke="#444"/>
<line x1="{{ left }}" y1="{{ top }}" x2="{{ left }}" y2="{{ bottom_edge }}" stroke="#444"/>
{% for ty, label_y, label in y_ticks %}
<line x1="{{ left }}" y1="{{ ty }}" x2="{{ right_edge }}" y2="{{ ty }}" stroke="#eee"/>
<text x="{{ left - 4 }}" y="{{ label_y }}" font-size="10" text-anchor="end">{{ label }}</text>
{% endfor %}
{% for tx, label in x_ticks %}
<line x1="{{ tx }}" y1="{{ top }}" x2="{{ tx }}" y2="{{ bottom_edge }}" stroke="#f3f3f3"/>
<text x="{{ tx }}" y="{{ bottom_edge + 14 }}" font-size="10" text-anchor="middle">{{ label }}</text>
{% endfor %}
<text x="{{ mid_x }}" y="{{ bottom_edge + 30 }}" font-size="10" text-anchor="middle">{{ xlabel }}</text>
<text x="12" y="{{ mid_y }}" font-size="10" text-anchor="middle"
 transform="rotate(-90 12 {{ mid_y }})">{{ ylabel }}</text>
{% if front %}
<polyline class="pareto-front" fill="none" {{ front_style }} points="{{ front }}"/>
{% endif %}
{% for p in points %}
<g class="point" data-label="{{ p.name }}" data-pareto="{{ p.pareto | lower }}"
 data-baseline="{{ p.baseline | lower }}" data-configured="{{ p.configured | lower }}"><title>{{ p.tip }}</title>
{% if p.configured %}{{ marker("configured", p.cx, p.cy) }}{% endif %}
{{ marker("baseline" if p.baseline else ("pareto" if p.pareto else "dominated"), p.cx, p.cy) }}
<text x="{{ p.lx }}" y="{{ p.ly }}" font-size="10" text-anchor="{{ p.anchor }}">{{ p.label }}</text></g>
{% endfor %}
{% for item in legend %}
<g class="legend-entry"><title>{{ item.text }}</title>{{ marker(item.kind, item.x + 6, item.y - 4) }}
<text x="{{ item.x + 16 }}" y="{{ item.y }}" font-size="10">{{ item.text }}</text></g>
{% endfor %}
{% endif %}
</svg>
"""


@cache
def _scatter_template() -> Template:
    return environment().from_string(_SCATTER_SVG)


@dataclass(frozen=True)
class TradeoffPoint:
    """One option of a trade-off chart: ``x`` the cost (lower is better), ``y`` the benefit (higher is better)."""

    name: str
    x: float
    y: float
    pareto: bool = False
    baseline: bool = False
    configured: bool = False


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Evenly spaced ticks on a round step (0.01, 0.02, 0.05, …) covering [lo, hi]."""
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < hi - 1e-9:
        ticks.append(ticks[-1] + step)
    return [round(t, 10) for t in ticks]


def tradeoff_chart(
    chart_id: str,
    title: str,
    points: list[TradeoffPoint],
    *,
    xlabel: str,
    ylabel: str,
    width: int = WIDTH,
    height: int = 320,
) -> str:
    """An SVG scatter of options (cost on x, benefit on y) with the Pareto front drawn through the marked points.

    The baseline is a grey square, the configured option is ringed in red, Pareto-optimal options are
    filled green and dominated ones hollow blue; every point carries its exact values on hover and a
    short label beside it, placed on whichever side keeps it inside the chart.
    """
    drawable = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    base = {"id": chart_id, "title": title, "width": width}
    if not drawable:
        return _scatter_template().render(**base, height=height, empty=True)

    xs, ys = [p.x for p in drawable], [p.y for p in drawable]
    x_pad = max(0.02, 0.08 * (max(xs) - min(xs)))
    y_pad = max(0.005, 0.08 * (max(ys) - min(ys)))
    x_ticks = _nice_ticks(max(0.0, min(xs) - x_pad), max(xs) + x_pad)
    y_ticks = _nice_ticks(max(0.0, min(ys) - y_pad), min(1.0, max(ys) + y_pad) if max(ys) <= 1 else max(ys) + y_pad)
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    y_text = [f"{t:.3g}" for t in y_ticks]
    x_text = [f"{t:.3g}" for t in x_ticks]
    left = max(52, 26 + math.ceil(max(text_width(t) for t in y_text)))
    right = max(16, 4 + math.ceil(text_width(x_text[-1]) / 2))
    top, axis = 24, 34
    pw, ph = width - left - right, height - top - axis

    def x(v: float) -> float:
        return left + pw * (v - x_lo) / (x_hi - x_lo)

    def y(v: float) -> float:
        return top + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    drawn = []
    for p in drawable:
        cx, cy = x(p.x), y(p.y)
        label = _short(p.name, 24)
        room_right = left + pw - (cx + 8)
        anchor, lx = ("start", cx + 8) if text_width(label) <= room_right else ("end", cx - 8)
        if anchor == "end":
            label = _fit(label, cx - 8 - 2, _FONT)
        # the front runs down-left and up-right of an optimal point: below-right and above-left stay clear of it
        below, above = cy + 5 + _FONT, cy - 7
        want_below = p.pareto and anchor == "start"
        ly = below if (want_below and below <= top + ph) or above - _FONT < top else above
        drawn.append(
            {
                "name": p.name,
                "pareto": p.pareto,
                "baseline": p.baseline,
                "configured": p.configured,
                "cx": round(cx, 1),
                "cy": round(cy, 1),
                "lx": f"{lx:.1f}",
                "ly": f"{ly:.1f}",
                "anchor": anchor,
                "label": label,
                "tip": f"{p.name}: {ylabel} {p.y:.4g}, {xlabel} {p.x:.4g}"
                + (" (Pareto-optimal)" if p.pareto else "")
                + (" (baseline)" if p.baseline else "")
                + (" (configured)" if p.configured else ""),
            }
        )
    front = sorted((p for p in drawable if p.pareto), key=lambda p: p.x)
    legend_items = [
        ("pareto", "Pareto-optimal option"),
        ("dominated", "dominated option"),
        ("baseline", "baseline (no mitigation)"),
        ("configured", "configured"),
        ("front", "Pareto front"),
    ]
    column = 16 + max(text_width(text) for _, text in legend_items) + _COLUMN_GAP
    columns = max(1, min(len(legend_items), int((width - 8 + _COLUMN_GAP) // column)))
    legend_top = top + ph + axis + 6
    legend = []
    for i, (kind, text) in enumerate(legend_items):
        row, col = divmod(i, columns)
        legend.append(
            {"kind": kind, "text": text, "x": round(8 + col * column, 1), "y": legend_top + _LEGEND_ROW * row + 11}
        )
    total_height = legend_top + math.ceil(len(legend_items) / columns) * _LEGEND_ROW + 4
    return _scatter_template().render(
        **base,
        **_plot_area(title, width, left, top, pw, ph),
        height=total_height,
        xlabel=_fit(xlabel, pw, _FONT),
        ylabel=_fit(ylabel, ph, _FONT),
        y_ticks=[(f"{y(t):.1f}", f"{y(t) + 4:.1f}", text) for t, text in zip(y_ticks, y_text, strict=True)],
        x_ticks=[(f"{x(t):.1f}", text) for t, text in zip(x_ticks, x_text, strict=True)],
        front=" ".join(f"{x(p.x):.1f},{y(p.y):.1f}" for p in front) if len(front) > 1 else "",
        points=drawn,
        legend=legend,
    )
