"""The one SVG chart renderer: line charts over rounds for the dashboard and every HTML report.

Rendered on the server (no scripts, readable offline). :func:`line_chart` computes the geometry
and ``templates/chart.svg`` draws it. Every series is a ``<polyline>`` whose ``data-series`` names
it and every point a ``<circle>`` whose ``<title>`` gives its exact value, so a reviewer can hover
a point and a test can find the data. Series differ in colour and, past the palette, in dash
pattern; the legend grows the chart rather than being cut off.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from server.templates import render

Series = dict[str, list[tuple[int, float]]]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
_DASHES = ("", "6 3", "2 3", "8 3 2 3")  # after the palette runs out, the same colours come back dashed
_LABEL_CHARS = 18  # legend labels longer than this keep their distinguishing end
_LEGEND_ROW = 14
_MOST_X_TICKS = 12


@dataclass(frozen=True)
class _Drawn:
    name: str
    label: str
    color: str
    dash: str
    points: str
    circles: list[tuple[str, str, str]]  # (cx, cy, title)
    legend_y: int


def _short(name: str, width: int = _LABEL_CHARS) -> str:
    """A legend label: long names (uint64 node ids) keep their distinguishing end."""
    return name if len(name) <= width else name[: width - 9] + "…" + name[-8:]


def _text_width(text: str, size: int = 10) -> float:
    """Roughly how wide ``text`` is at font ``size``: wide (CJK) characters count double."""
    return sum(size if unicodedata.east_asian_width(ch) in "WF" else 0.62 * size for ch in text)


def _style(i: int) -> tuple[str, str]:
    return _PALETTE[i % len(_PALETTE)], _DASHES[(i // len(_PALETTE)) % len(_DASHES)]


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
    width: int = 520,
    height: int = 240,
    y_min: float | None = None,
    y_max: float | None = None,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    series_class: str = "series",
) -> str:
    """An SVG chart of ``series`` (name → [(round, value)]); an empty chart says there is no data.

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
    labels = [_short(name) for name in drawable]
    # margins sized to what they hold: the widest tick label left, the widest legend label right
    left = max(52, 26 + round(max(_text_width(text) for _, text in y_ticks)))
    right = 36 + round(max(_text_width(label) for label in labels))
    top, bottom = 22, 34
    height = max(height, top + _LEGEND_ROW * len(drawable) + 8)  # every legend row inside the chart
    pw, ph = width - left - right, height - top - bottom
    rounds = sorted({r for r, _ in points})
    x_lo, x_hi = rounds[0], rounds[-1]

    def x(r: float) -> float:
        return left + (pw * (r - x_lo) / (x_hi - x_lo) if x_hi > x_lo else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    drawn = []
    for i, ((name, pts), label) in enumerate(zip(drawable.items(), labels, strict=True)):
        color, dash = _style(i)
        drawn.append(
            _Drawn(
                name=name,
                label=label,
                color=color,
                dash=dash,
                points=" ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in pts),
                circles=[(f"{x(r):.1f}", f"{y(v):.1f}", f"{name} round {r}: {v:.4g}") for r, v in pts],
                legend_y=top + 12 + _LEGEND_ROW * i,
            )
        )
    return render(
        "chart.svg",
        **base,
        height=height,
        empty=False,
        left=left,
        top=top,
        right_edge=left + pw,
        bottom_edge=top + ph,
        mid_x=f"{left + pw / 2:.1f}",
        mid_y=f"{top + ph / 2:.1f}",
        ylabel=ylabel,
        y_ticks=[(f"{y(t):.1f}", f"{y(t) + 4:.1f}", text) for t, text in y_ticks],
        x_ticks=[(f"{x(r):.1f}", str(r)) for r in _x_ticks(rounds)],
        threshold=None
        if threshold is None
        else {
            "y": f"{y(threshold):.1f}",
            "label_y": f"{y(threshold) - 3:.1f}",
            "title": f"{threshold_label} {threshold:g}",
        },
        series_class=series_class,
        series=drawn,
        legend_x=left + pw + 8,
    )
