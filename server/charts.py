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

from server.templates import render

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
        height=total_height,
        empty=False,
        shown_title=_fit(title, width - left, _TITLE_FONT, bold=True),
        left=left,
        top=top,
        right_edge=left + pw,
        bottom_edge=top + ph,
        mid_x=f"{left + pw / 2:.1f}",
        mid_y=f"{top + ph / 2:.1f}",
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
