"""Readable charts: twelve groups stay distinguishable, no text leaves the chart, charts are half the page or more.

Geometry is checked on the SVG itself with the renderer's text bound, and that bound is checked
against real glyph widths in headless Chromium (the distribution's ``chromium``, driven by
Playwright), which also renders a real fairness report with twelve groups at two page widths.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest

from common.fairness import FairnessConfig, audit
from server import fairness_report
from server.charts import PALETTE, WIDTH, line_chart, style, text_width
from tests.helpers import ROOT
from tests.test_control_api import make_service
from tests.test_control_browser import _ARGS, CHROMIUM, _chromium_or_skip, _login

pytestmark = pytest.mark.timeout(120)

NS = ""  # inline SVG in HTML: the elements carry no namespace
LONG_IDS = [f"node {10**19 + 7919 * i}" for i in range(12)]
#: Labels that break naive width estimates: the widest Latin glyphs, capitals, CJK, Greek, markup.
HARD_LABELS = [
    "WWWWWWWWWWWWWWWWWW",
    "mmmmmmmmmmmmmmmmmm",
    "MÄNNLICH, ÜBER 65",
    "组别：女性，城市",
    "ε ≥ 8 · δ ≤ 1e-5",
    "<b>&amp;</b>",
]


def _lab(color: str) -> tuple[float, float, float]:
    """sRGB hex → CIELAB (D65), to measure how far apart two colours look (CIE76 ΔE)."""
    rgb = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    xyz = (
        (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047,
        0.2126 * r + 0.7152 * g + 0.0722 * b,
        (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883,
    )
    fx, fy, fz = (t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def _series(names: list[str], rounds: int = 4) -> dict[str, list[tuple[int, float]]]:
    return {n: [(r, 0.05 + 0.07 * i + 0.01 * r) for r in range(1, rounds + 1)] for i, n in enumerate(names)}


def _styles(svg: str) -> list[tuple[str, str, str]]:
    """(stroke, dash, first marker fill) per series, read from the rendered SVG."""
    root = ElementTree.fromstring(svg)
    lines = [e for e in root.iter(f"{NS}polyline")]
    circles = list(root.iter(f"{NS}circle"))
    out = []
    for line in lines:
        first = next(c for c in circles if c.get("stroke") == line.get("stroke"))
        out.append((line.get("stroke", ""), line.get("stroke-dasharray", ""), first.get("fill", "")))
    return out


def test_twelve_groups_get_twelve_colours_that_look_different() -> None:
    svg = line_chart("g12", "selection rate", _series(LONG_IDS), ylabel="rate")
    colours = [stroke for stroke, _, _ in _styles(svg)]
    assert len(colours) == 12 and len(set(colours)) == 12
    labs = [_lab(c) for c in colours]
    closest = min(math.dist(a, b) for a, b in itertools.combinations(labs, 2))
    assert closest >= 25  # CIE76 ΔE: clearly different at a glance (a just-noticeable difference is ~2.3)
    assert min(math.dist(lab, _lab("#ffffff")) for lab in labs) >= 40  # no colour fades into the white page
    # neighbours also differ in dash pattern: a greyscale print or a colour-blind reader still tells them apart
    dashes = [dash for _, dash, _ in _styles(svg)]
    assert all(a != b for a, b in itertools.pairwise(dashes))


def test_past_twelve_series_every_line_still_has_its_own_look() -> None:
    names = [f"client-{i}" for i in range(40)]
    looks = _styles(line_chart("g40", "ε", _series(names, 2)))
    assert len(looks) == 40 and len(set(looks)) == 40
    assert len({style(i) for i in range(48)}) == 48
    assert {stroke for stroke, _, _ in looks} == set(PALETTE)


def _boxes(svg: str) -> tuple[float, float, list[tuple[str, float, float, float, float]]]:
    """viewBox size, and each horizontal text's box (text, x0, x1, top, bottom) by the renderer's own bound."""
    root = ElementTree.fromstring(svg)
    _, _, w, h = (float(v) for v in root.get("viewBox", "").split())
    boxes = []
    for t in root.iter(f"{NS}text"):
        if t.get("transform") or not (t.text or "").strip():
            continue
        size = float(t.get("font-size", "10"))
        width = text_width(t.text or "", size, bold=t.get("font-weight") == "bold")
        x, y = float(t.get("x", "0")), float(t.get("y", "0"))
        x0 = {"end": x - width, "middle": x - width / 2}.get(t.get("text-anchor", ""), x)
        boxes.append((t.text or "", x0, x0 + width, y - size, y + 0.25 * size))
    return w, h, boxes


@pytest.mark.parametrize(
    "names",
    [
        LONG_IDS,
        HARD_LABELS + [f"{x[:14]} #{i}" for i, x in enumerate(HARD_LABELS)],
        [f"{a} × {b}" for a, b in itertools.product(["female", "male"], HARD_LABELS)],
    ],
    ids=["node-ids", "hard-labels", "intersections"],
)
@pytest.mark.parametrize("width", [WIDTH, 420])
def test_every_text_lies_inside_the_chart_and_legend_rows_never_collide(names: list[str], width: int) -> None:
    title = "Equalized odds difference per group and round, with a title longer than any chart"
    svg = line_chart("c", title, _series(names), ylabel="difference", width=width, threshold=0.1)
    w, h, boxes = _boxes(svg)
    assert w == width
    for text, x0, x1, top, bottom in boxes:
        assert 0 <= x0 and x1 <= w and 0 <= top and bottom <= h, f"{text!r} leaves the chart: {x0, x1, top, bottom}"
    legend = [b for b in boxes if b[0] in {n if len(n) <= 18 else n[:9] + "…" + n[-8:] for n in names}]
    assert len(legend) == len(names)
    for a, b in itertools.combinations(legend, 2):  # no two legend labels overlap
        assert a[2] <= b[1] or b[2] <= a[1] or a[4] <= b[3] or b[4] <= a[3], (a, b)
    axis_name = next(b for b in boxes if b[0] == "round")
    assert min(b[3] for b in legend) >= axis_name[4]  # the legend sits under the plot and its axis, never on lines
    assert "<title>" + title + "</title>" in svg  # the full title stays, even when the shown one is cut


def _max_width(css: str, selector: str) -> int:
    m = re.search(selector + r"\{[^}]*max-width:(\d+)px", css)
    assert m, f"no max-width for {selector}"
    return int(m.group(1))


def test_charts_are_at_least_half_the_page_wide() -> None:
    report_css = (ROOT / "server" / "templates" / "report.html").read_text(encoding="utf-8")
    dashboard_css = (ROOT / "server" / "control" / "static" / "control.css").read_text(encoding="utf-8")
    for page in (_max_width(report_css, "body"), _max_width(dashboard_css, "main")):
        assert WIDTH >= page / 2
    svg = line_chart("w", "t", _series(["a"]))
    assert f'width="{WIDTH}"' in svg and f'viewBox="0 0 {WIDTH} ' in svg


# -- in a real browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _twelve_group_report() -> str:
    """A real fairness report: twelve regions, three rounds, the model favouring some regions."""
    rng = np.random.default_rng(1)
    n = 2400
    regions = np.array(HARD_LABELS + LONG_IDS[:6])[rng.integers(0, 12, n)]
    bias = {r: 0.08 * i for i, r in enumerate(HARD_LABELS + LONG_IDS[:6])}
    y = rng.integers(0, 2, n)
    score = np.clip(rng.random(n) * 0.6 + np.vectorize(bias.get)(regions), 0, 1)
    cfg = FairnessConfig(min_group_size=10, bootstrap_n=0)
    audits = [(r, audit(y, (score > 0.5 - 0.05 * r).astype(int), score, {"region": regions}, cfg)) for r in (1, 2, 3)]
    report = fairness_report.build_fairness_report(
        1, "twelve regions", audits, {"evaluation_size": n, "sha256": "0" * 64}, cfg=cfg
    )
    return fairness_report.render(report, "html")


_MEASURE = """() => [...document.querySelectorAll('svg.chart')].map(svg => {
  const vb = svg.viewBox.baseVal, page = document.body.getBoundingClientRect().width;
  const texts = [...svg.querySelectorAll('text')].map(t => {
    const b = t.getBBox();
    return {text: t.textContent, x0: b.x, x1: b.x + b.width, y0: b.y, y1: b.y + b.height,
            length: t.getComputedTextLength(), size: parseFloat(t.getAttribute('font-size') || '16'),
            bold: t.getAttribute('font-weight') === 'bold', rotated: t.hasAttribute('transform')};
  });
  return {id: svg.id, w: vb.width, h: vb.height, shown: svg.getBoundingClientRect().width, page, texts,
          series: svg.querySelectorAll('polyline').length};
})"""


@pytest.mark.parametrize("viewport", [1280, 760])
def test_a_twelve_group_report_renders_readably_in_chromium(browser: Any, tmp_path: Path, viewport: int) -> None:
    path = tmp_path / "fairness.html"
    path.write_text(_twelve_group_report(), encoding="utf-8")
    page = browser.new_page(viewport={"width": viewport, "height": 900})
    try:
        page.goto(path.as_uri())
        charts = page.evaluate(_MEASURE)
    finally:
        page.close()
    twelve = [c for c in charts if c["series"] == 12]
    assert len(twelve) >= 2  # selection rate and TPR per region
    for chart in charts:
        assert chart["shown"] >= chart["page"] / 2 - 0.5, chart["id"]  # at least half the page's width
        for t in chart["texts"]:
            if t["rotated"] or not t["text"].strip():
                continue
            where = f"{chart['id']}: {t['text']!r}"
            # inside the viewBox, as the browser lays the glyphs out
            assert t["x0"] >= -0.5 and t["x1"] <= chart["w"] + 0.5, where
            assert t["y0"] >= -0.5 and t["y1"] <= chart["h"] + 0.5, where
            # and the renderer's bound really is an upper bound in this browser's fonts
            assert t["length"] <= text_width(t["text"], t["size"], bold=t["bold"]) + 0.01, where


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The control service as in production (uvicorn, TLS, a free loopback port) over a recorded run."""
    _chromium_or_skip()
    from server.control.app import create_app
    from server.control.serve import ControlServer, self_signed

    tmp = tmp_path_factory.mktemp("charts-dashboard")
    svc, _ = make_service(tmp)
    cert, key = self_signed(tmp / "tls")
    server = ControlServer(create_app(svc), cert, key, host="127.0.0.1", port=0).start()
    try:
        yield {"svc": svc, "url": server.url}
    finally:
        server.stop()


def test_dashboard_charts_fit_and_take_half_the_page(browser: Any, dashboard: dict[str, Any]) -> None:
    """The run page of the control service, as a reviewer sees it in Chromium."""
    page = _login(browser, dashboard, "reviewer")
    try:
        page.goto(dashboard["url"] + "/runs/1")
        charts = page.evaluate(_MEASURE.replace("document.body", "document.querySelector('main')"))
    finally:
        page.context.close()
    assert {"chart-epsilon", "chart-metrics", "chart-fairness-dp"} <= {c["id"] for c in charts}
    for chart in charts:
        assert chart["shown"] >= chart["page"] / 2 - 0.5, chart["id"]
        for t in chart["texts"]:
            if not t["rotated"] and t["text"].strip():
                assert t["x0"] >= -0.5 and t["x1"] <= chart["w"] + 0.5, f"{chart['id']}: {t['text']!r}"
                assert t["y0"] >= -0.5 and t["y1"] <= chart["h"] + 0.5, f"{chart['id']}: {t['text']!r}"
