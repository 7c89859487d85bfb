"""Inline SVG line charts for the dashboard and the HTML reports: rendered on the server, no scripts, readable offline.

One function, :func:`line_chart`, draws several named series over rounds. Every series is a
``<polyline>`` with ``data-series`` naming it and every point a ``<circle>`` with a ``<title>``
giving its exact value, so a reviewer can hover a point and a test can find the data.
"""

from __future__ import annotations

import html
import math

Series = dict[str, list[tuple[int, float]]]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def _short(name: str, width: int = 18) -> str:
    """A legend label: long names (uint64 node ids) keep their distinguishing end."""
    return name if len(name) <= width else name[: width - 9] + "…" + name[-8:]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


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
) -> str:
    """An SVG chart of ``series`` (name → [(round, value)]); an empty chart says there is no data."""
    esc = html.escape
    points = [(r, v) for pts in series.values() for r, v in pts if math.isfinite(v)]
    head = (
        f'<svg id="{esc(chart_id)}" class="chart" role="img" aria-label="{esc(title)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f"<title>{esc(title)}</title>"
    )
    if not points:
        return head + f'<text x="{width // 2}" y="{height // 2}" text-anchor="middle">no data yet</text></svg>'
    left, right, top, bottom = 52, 130, 22, 34
    pw, ph = width - left - right, height - top - bottom
    rounds = sorted({r for r, _ in points})
    x_lo, x_hi = rounds[0], rounds[-1]
    values = [v for _, v in points] + ([threshold] if threshold is not None else [])
    lo = min(values) if y_min is None else y_min
    hi = max(values) if y_max is None else y_max
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def x(r: float) -> float:
        return left + (pw * (r - x_lo) / (x_hi - x_lo) if x_hi > x_lo else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    parts = [head, f'<text x="{left}" y="14" font-size="12" font-weight="bold">{esc(title)}</text>']
    parts.append(
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#444"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#444"/>'
    )
    for t in _ticks(lo, hi):
        parts.append(
            f'<line x1="{left}" y1="{y(t):.1f}" x2="{left + pw}" y2="{y(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.3g}</text>'
        )
    for r in rounds:
        parts.append(f'<text x="{x(r):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{r}</text>')
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">round</text>'
        f'<text x="12" y="{top + ph / 2:.1f}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + ph / 2:.1f})">{esc(ylabel)}</text>'
    )
    if threshold is not None:
        parts.append(
            f'<line class="threshold" x1="{left}" y1="{y(threshold):.1f}" x2="{left + pw}" y2="{y(threshold):.1f}" '
            f'stroke="#999" stroke-dasharray="4 3"><title>threshold {threshold:g}</title></line>'
        )
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted((r, v) for r, v in pts if math.isfinite(v))
        if not pts:
            continue
        color = _PALETTE[i % len(_PALETTE)]
        coords = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in pts)
        parts.append(
            f'<polyline class="series" data-series="{esc(name)}" fill="none" stroke="{color}" '
            f'stroke-width="2" points="{coords}"/>'
        )
        for r, v in pts:
            parts.append(
                f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="{color}">'
                f"<title>{esc(name)} round {r}: {v:.4g}</title></circle>"
            )
        ly = top + 12 + 14 * i
        parts.append(
            f'<rect x="{left + pw + 8}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{left + pw + 22}" y="{ly + 1}" font-size="10">{esc(_short(name))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
