"""The HTML reports and the one chart renderer: embedded JSON round-trips, text is escaped, charts stay readable.

Reports are built in memory (no federation): what is checked is the rendering, which every
report (privacy, fairness, cost) shares through ``server/report_blocks.py`` and its templates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest
from markupsafe import escape
from pydantic import BaseModel

from common.fairness import FairnessConfig, audit
from server import cost_report, fairness_report, privacy_report
from server.charts import line_chart
from server.report_blocks import Plot, to_html, to_markdown

pytestmark = pytest.mark.timeout(60)

#: Every character that HTML escaping or a script element could mangle, plus an attempt to end the script.
NASTY = "A&B <i>x</i> \"q\" 'a' </script><!-- & -->"
_SCRIPT = re.compile(r'<script type="application/json" id="report-data">(.*?)</script>', re.S)


def _privacy() -> privacy_report.PrivacyReport:
    rounds = [
        {"round": r, "status": "accepted", "reason": None, "epsilon_run": 0.4 * r, "epsilon_total": 1 + 0.4 * r}
        for r in (1, 2, 3)
    ]
    client = {
        "node_id": "12345678901234567890",
        "mechanism": "DP-SGD",
        "noise_multiplier": 1.1,
        "clipping_norm": 1.0,
        "sample_rate": 0.01,
        "steps_per_round": 100,
        "delta": 1e-5,
        "accountant": "rdp",
        "rounds": rounds,
        "epsilon_run": 1.2,
        "epsilon_total": 2.2,
        "budget_epsilon": 10.0,
        "budget_delta": 1e-5,
        "budget_remaining": 7.8,
        "unit_cap": None,
        "unit_epsilon": None,
        "unit_delta": None,
        "refusals": 0,
        "sent": [{"key": "metrics.loss", "privacy_class": "DP accounting"}],
    }
    return privacy_report.PrivacyReport.model_validate(
        {
            "generated_at": 1.5,
            "run_id": 4,
            "run_name": NASTY,
            "status": "finished",
            "config_hash": "ab" * 32,
            "seed": 7,
            "seed_note": "splits only",
            "rounds_planned": 3,
            "target_epsilon": 2.0,
            "target_delta": 1e-5,
            "engine": "deployment",
            "transport": "grpc-rere",
            "secure_aggregation": "none",
            "threat_model": NASTY,
            "central_dp": None,
            "versions": {"flwr": "1.42.0"},
            "clients": [client, {**client, "node_id": "7"}],
        }
    )


def _fairness() -> fairness_report.FairnessReport:
    rng = np.random.default_rng(0)
    n = 400
    groups = {"sex": rng.choice([NASTY, "m"], n), "age": rng.choice(["<30", "30&up"], n)}
    y = rng.integers(0, 2, n)
    score = rng.random(n)
    cfg = FairnessConfig(min_group_size=10, bootstrap_n=0)
    audits = [(r, audit(y, (score > 0.3 + 0.1 * r).astype(int), score, groups, cfg)) for r in (1, 2)]
    prov = {"evaluation_size": n, "sha256": "0" * 64, "source": NASTY}
    return fairness_report.build_fairness_report(3, NASTY, audits, prov, cfg=cfg)


def _cost() -> cost_report.CostReport:
    rnd = {
        "wall_seconds": 2.0,
        "aggregation_seconds": 0.1,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "server_energy_wh": 0.5,
        "server_emissions_g": 0.1,
        "clients_trained": 2,
        "clients_reporting": 2,
        "client_cpu_seconds": 3.0,
        "client_energy_wh": 1.0,
        "client_emissions_g": 0.2,
        "energy_wh": 1.5,
        "emissions_g": 0.3,
        "cumulative_bytes": 3000,
        "cumulative_seconds": 2.0,
        "accuracy": None,
        "accuracy_gain_points": None,
    }
    rounds = [{**rnd, "round": r, "cumulative_energy_wh": 1.5 * (r + 1), "cumulative_emissions_g": 0.3} for r in (0, 1)]
    totals = {
        "wall_seconds": 4.0,
        "aggregation_seconds": 0.2,
        "bytes_sent": 2000,
        "bytes_received": 4000,
        "server_energy_wh": 1.0,
        "client_energy_wh": 2.0,
        "energy_wh": 3.0,
        "emissions_g": 0.6,
        "energy_label": "estimated",
        "clients_not_reporting": 0,
    }
    return cost_report.CostReport.model_validate(
        {
            "run_id": 5,
            "run_name": NASTY,
            "status": "finished",
            "totals": totals,
            "accuracy_start": None,
            "accuracy_end": None,
            "accuracy_gain_points": None,
            "wh_per_point": None,
            "emissions_g_per_point": None,
            "bytes_per_point": None,
            "seconds_per_point": None,
            "server_energy_source": None,
            "rounds": rounds,
            "clients": [],
            "notes": [NASTY],
        }
    )


REPORTS: dict[str, tuple[Callable[[], Any], Callable[[Any, str], str]]] = {
    "privacy": (_privacy, privacy_report.render),
    "fairness": (_fairness, fairness_report.render),
    "cost": (_cost, cost_report.render),
}


@pytest.mark.parametrize("kind", sorted(REPORTS))
def test_embedded_report_json_is_the_report(kind: str) -> None:
    build, render = REPORTS[kind]
    rep: BaseModel = build()
    page = render(rep, "html")
    scripts = _SCRIPT.findall(page)
    assert len(scripts) == 1  # the run name's "</script>" did not end the element early
    assert json.loads(scripts[0]) == rep.model_dump(mode="json")  # & < > " ' survive as themselves
    assert type(rep).model_validate_json(scripts[0]) == rep
    assert "&amp;" not in scripts[0] and "<!--" not in scripts[0]
    assert page.count("</script>") == 1 and page.count("</body>") == 1
    # the same name as page text is escaped, once
    assert str(escape(NASTY)) in page and NASTY not in page
    assert "&amp;amp;" not in page


@pytest.mark.parametrize("kind", sorted(REPORTS))
def test_report_charts_come_from_the_one_renderer(kind: str) -> None:
    build, render = REPORTS[kind]
    page = render(build(), "html")
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert svgs, "every HTML report has at least one chart"
    ids = [re.match(r'<svg id="([^"]+)" class="chart"', svg).group(1) for svg in svgs]  # type: ignore[union-attr]
    assert len(set(ids)) == len(ids)
    for svg in svgs:
        ElementTree.fromstring(svg)  # well-formed XML: every name in it was escaped
    assert "data-series" in page
    assert "<svg" not in render(build(), "md")  # Markdown carries the same numbers as tables


def test_privacy_chart_has_one_series_per_client_from_zero_and_the_target() -> None:
    page = privacy_report.render(_privacy(), "html")
    series = re.findall(r'<polyline class="eps-series" data-series="([^"]+)"', page)
    assert series == ["node 12345678901234567890", "node 7"]
    assert "node 7 round 0: 0<" in page and "node 7 round 3: 1.2<" in page
    assert "<title>target ε 2</title>" in page


def _legend(svg: str) -> tuple[int, int, list[tuple[float, str]]]:
    root = ElementTree.fromstring(svg)
    width, height = int(root.get("width", "0")), int(root.get("height", "0"))
    rows = []
    for g in root.iter("g"):
        text = g.find("text")
        assert text is not None and text.text
        rows.append((float(text.get("y", "0")), text.text))
    return width, height, rows


def test_a_chart_with_many_long_series_keeps_every_legend_row_and_tells_series_apart() -> None:
    series = {f"node {10**19 + i}": [(1, 0.1 * i), (2, 0.1 * i + 0.05)] for i in range(30)}
    series["组别：女性，城市"] = [(1, 0.5), (2, 0.6)]  # wide characters
    svg = line_chart("many", "ε per client", series, ylabel="ε")
    width, height, rows = _legend(svg)
    assert len(rows) == len(series)
    assert all(y <= height - 4 for y, _ in rows)  # no legend row below the chart's edge
    assert len({label for _, label in rows}) == len(series)  # truncated labels still differ
    styles = re.findall(
        r'<polyline class="series" data-series="[^"]+" fill="none" stroke="([^"]+)" '
        r'stroke-width="2"(?: stroke-dasharray="([^"]+)")?',
        svg,
    )
    assert len(styles) == len(series) and len(set(styles)) == len(series)  # colour or dash differs
    # the full name is on the legend entry even when the label is shortened
    assert f"<title>node {10**19 + 29}</title>" in svg and "node 1000…00000029" in svg
    # the widest label fits: its box starts after the plot and ends inside the chart
    text_x = [float(x) for x in re.findall(r'<text x="([0-9.]+)" y="[0-9.]+" font-size="10">组别', svg)]
    assert text_x and text_x[0] + 10 * len("组别：女性，城市") <= width


def test_long_runs_get_sparse_round_labels() -> None:
    svg = line_chart("long", "loss", {"loss": [(r, 1 / r) for r in range(1, 201)]})
    labels = re.findall(r'text-anchor="middle">(\d+)</text>', svg)
    assert 2 <= len(labels) <= 12 and labels[0] == "1"


def test_an_empty_chart_says_so() -> None:
    svg = line_chart("none", "nothing", {"a": [(1, float("nan"))]})
    assert "no data yet" in svg and "<polyline" not in svg
    ElementTree.fromstring(svg)


def test_blocks_render_the_same_content_in_markdown_and_html() -> None:
    blocks = [
        ("h1", "T & t"),
        ("plot", Plot(title="p", series={"s": [(1, 1.0)]})),
        ("p", "a | b"),
        ("ul", ["x < y"]),
        ("table", (["h"], [["suppressed"], ["1"]])),
    ]
    md, page = to_markdown(blocks), to_html(blocks, "title", json.dumps({"k": "</script>"}))
    assert md == "# T & t\n\na | b\n\n- x < y\n\n| h |\n|---|\n| suppressed |\n| 1 |\n"
    assert "<h1>T &amp; t</h1>" in page and "<li>x &lt; y</li>" in page and '<td class="suppressed">' in page
    assert 'id="plot-1"' in page and json.loads(_SCRIPT.findall(page)[0]) == {"k": "</script>"}
    with pytest.raises(ValueError, match="block"):
        to_html([("marquee", "x")], "t", "{}")
