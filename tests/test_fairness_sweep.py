"""`fedguard fairness sweep` and the reviewer's view of mitigation in the fairness report.

Report rendering is checked on hand-made sweeps whose Pareto front is known, and on a real run
store with a mitigation config; one real sweep (three tiny simulated federations) checks the
command end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from common.fairness import FairnessConfig, Finding, audit
from fedguard.cli import main
from server import fairness_report as fr
from server import mitigation_report as mr
from server.checkpoint import checkpoint_dir
from server.store import RunStore
from tests.helpers import ROOT, make_tabular, small_sim_toml, tabular_config, toml_features
from tests.test_charts import _boxes

pytestmark = pytest.mark.timeout(300)


def _finding(kind: str, attribute: str = "group", value: float = 0.6) -> Finding:
    return Finding(
        kind=kind,  # type: ignore[arg-type]
        severity="warning",
        attribute=attribute,
        groups=["g1", "g2"],
        value=value,
        threshold=0.8,
        message=f"{kind} for {attribute}",
    )


DP, EO = "demographic_parity_ratio", "equalized_odds_difference"


def _option(label: str, strength: float | None, acc: float, gap: float, found: list[Finding], **kw: object):
    return mr.SweepOption(
        label=label,
        method="none" if strength is None else "fairfed",
        strength=strength,
        baseline=strength is None,
        run_id=1,
        store="/tmp/none.db",
        status="finished",
        accuracy=acc,
        dp_ratio=1 - gap,
        dp_difference=gap,
        eo_difference=gap / 2,
        measured_on="held-out set",
        findings=found,
        epsilon={"node-0": 3.9, "node-1": 4.0},
        wall_s=10.0,
        **kw,  # type: ignore[arg-type]
    )


def _sweep() -> mr.FairnessSweep:
    """Baseline and three strengths; 0.5 is dominated by 1 (less accurate *and* a larger gap)."""
    options = [
        _option("baseline (no mitigation)", None, 0.850, 0.30, [_finding(DP), _finding(EO)]),
        _option("fairfed 0.5", 0.5, 0.800, 0.14, [_finding(EO)]),
        _option("fairfed 1", 1.0, 0.840, 0.10, [_finding(EO)], configured=True),
        _option("fairfed 2", 2.0, 0.780, 0.02, [_finding(DP, "other")]),
    ]
    sweep = mr.FairnessSweep(
        generated_at=time.time(),
        config_path="run.toml",
        config_hash="a" * 64,
        run_name="sweep test",
        method="fairfed",
        attribute="group",
        constraint="demographic_parity",
        gap_metric="demographic_parity_difference",
        values=[0.5, 1.0, 2.0],
        configured_strength=1.0,
        options=options,
    )
    return mr.mark_sweep(sweep)


def _audits() -> list:
    rng = np.random.default_rng(0)
    n = 400
    groups = {"group": rng.choice(["g1", "g2"], n)}
    y = rng.integers(0, 2, n)
    score = np.clip(rng.random(n) + 0.3 * (groups["group"] == "g1"), 0, 1)
    cfg = FairnessConfig(min_group_size=10, bootstrap_n=0)
    return [(r, audit(y, (score > 0.5).astype(int), score, groups, cfg)) for r in (1, 2)]


def test_pareto_marks_the_dominated_option_and_clears_are_per_option() -> None:
    sweep = _sweep()
    by = {o.label: o for o in sweep.options}
    assert [o.pareto for o in sweep.options] == [True, False, True, True]
    assert by["fairfed 1"].configured and sum(o.configured for o in sweep.options) == 1
    assert by["fairfed 0.5"].clears == ["demographic_parity_ratio: group"]
    assert by["fairfed 2"].clears == ["demographic_parity_ratio: group", "equalized_odds_difference: group"]
    assert by["fairfed 2"].introduces == ["demographic_parity_ratio: other"]
    assert by["baseline (no mitigation)"].clears == []
    # ties: the same point twice is optimal twice; a missing number is never optimal
    assert mr.pareto_flags([(0.8, 0.1), (0.8, 0.1), (0.7, 0.1), (None, 0.0)]) == [True, True, False, False]


def test_an_option_measured_on_one_attribute_clears_nothing_else() -> None:
    sweep = _sweep()
    narrow = _option("thresholds 1", 1.0, 0.83, 0.05, [], scope=["other"])
    marked = mr.mark_sweep(sweep.model_copy(update={"options": [*sweep.options, narrow]}))
    assert marked.options[-1].clears == []  # its findings say nothing about "group"


def test_report_shows_the_sweep_as_a_pareto_chart_and_a_table_in_every_format() -> None:
    sweep = _sweep()
    report = fr.build_fairness_report(
        4,
        "run",
        _audits(),
        {"evaluation_size": 400, "sha256": "0" * 64},
        cfg=FairnessConfig(bootstrap_n=0),
        sweep=sweep,
    )
    md = fr.render(report, "md")
    assert "## Mitigation options: fairfed over strengths 0.5, 1, 2" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| fairfed")}
    assert "configured, Pareto" in rows["fairfed 1"] and "Pareto" not in rows["fairfed 0.5"]
    assert "| -1.0 |" in rows["fairfed 1"]  # accuracy against the baseline, in points
    assert "demographic parity ratio (group)" in rows["fairfed 0.5"]

    html = fr.render(report, "html")
    svg = html[html.index('<svg id="sweep-pareto"') : html.index("</svg>", html.index('id="sweep-pareto"')) + 6]
    root = ElementTree.fromstring(svg)
    points = {g.get("data-label"): g for g in root.iter("g") if g.get("class") == "point"}
    assert set(points) == {o.label for o in sweep.options}
    assert [label for label, g in points.items() if g.get("data-pareto") == "true"] == [
        "baseline (no mitigation)",
        "fairfed 1",
        "fairfed 2",
    ]
    assert [label for label, g in points.items() if g.get("data-configured") == "true"] == ["fairfed 1"]
    assert points["baseline (no mitigation)"].find("rect") is not None  # the baseline has its own marker
    front = next(e for e in root.iter("polyline") if e.get("class") == "pareto-front")
    xs = [float(p.split(",")[0]) for p in front.get("points", "").split()]
    assert len(xs) == 3 and xs == sorted(xs)  # through the three optimal points, by gap
    width, _, boxes = _boxes(svg)
    assert width >= 640 / 2
    for text, x0, x1, top, _ in boxes:
        assert 0 <= x0 and x1 <= width and 0 <= top, f"{text!r} leaves the chart"

    data = json.loads(fr.render(report, "json"))
    assert mr.FairnessSweep.model_validate(data["sweep"]) == sweep


def test_chart_labels_stay_inside_at_the_right_edge() -> None:
    from server.charts import TradeoffPoint, tradeoff_chart

    points = [TradeoffPoint(f"a long option label number {i}", 0.05 * i, 0.9 - 0.01 * i) for i in range(8)]
    svg = tradeoff_chart("edge", "t", points, xlabel="gap", ylabel="accuracy", width=420)
    w, h, boxes = _boxes(svg)
    for text, x0, x1, top, bottom in boxes:
        assert 0 <= x0 and x1 <= w and 0 <= top and bottom <= h, f"{text!r} leaves the chart"


@pytest.mark.parametrize("viewport", [1280, 760])
def test_the_pareto_chart_is_readable_in_chromium(tmp_path: Path, viewport: int) -> None:
    """Half the page wide or more, and every label inside the chart as Chromium lays out the glyphs."""
    from playwright.sync_api import sync_playwright

    from tests.test_charts import _MEASURE
    from tests.test_control_browser import _ARGS, CHROMIUM, _chromium_or_skip

    _chromium_or_skip()
    report = fr.build_fairness_report(
        4, "run", _audits(), {"evaluation_size": 400, "sha256": "0" * 64}, cfg=FairnessConfig(bootstrap_n=0),
        sweep=_sweep(),
    )  # fmt: skip
    path = tmp_path / "fairness.html"
    path.write_text(fr.render(report, "html"), encoding="utf-8")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": viewport, "height": 900})
            page.goto(path.as_uri())
            charts = {c["id"]: c for c in page.evaluate(_MEASURE)}
        finally:
            browser.close()
    chart = charts["sweep-pareto"]
    assert chart["shown"] >= chart["page"] / 2 - 0.5
    for t in chart["texts"]:
        if t["rotated"] or not t["text"].strip():
            continue
        assert t["x0"] >= -0.5 and t["x1"] <= chart["w"] + 0.5, t["text"]
        assert t["y0"] >= -0.5 and t["y1"] <= chart["h"] + 0.5, t["text"]


def _recorded_run(tmp_path: Path, mitigation: dict) -> tuple[Path, int]:
    """A run store as a mitigation run leaves it: rounds with the mitigation meta, replies with ε, audits."""
    cfg = tabular_config(tmp_path / "data.csv", mitigation=mitigation)
    store_path = tmp_path / "runs.db"
    with RunStore(store_path) as store:
        run_id = store.create_run(cfg.name, cfg.to_json(), cfg.digest(), None)
        store.record_node_names(run_id, {11: "node-0", 12: "node-1"}, "simulation")
        for rnd, a in _audits():
            outcomes = [
                {"node_id": n, "status": "accepted", "weight": 100, "values": {"epsilon": 1.5 * rnd + i}}
                for i, n in enumerate((11, 12))
            ]
            meta = {"mitigation": {"method": mitigation["method"], "weights": {"node-0": 1.1, "node-1": 0.9},
                                   "spread": {"clients": 2, "worst": 0.7, "best": 0.8}}}  # fmt: skip
            store.record_round(run_id, rnd, time.time(), outcomes, True, meta if mitigation["method"] != "thresholds"
                               else None)  # fmt: skip
            store.record_evaluation(run_id, rnd, {"accuracy": 0.8, "loss": 0.5}, a.model_dump_json(),
                                    {"evaluation_size": 400, "sha256": "0" * 64})  # fmt: skip
        store.finish_run(run_id, "finished")
    return store_path, run_id


def test_report_of_a_fairfed_run_states_method_cost_and_weights(tmp_path: Path, capsys) -> None:
    store_path, run_id = _recorded_run(tmp_path, {"method": "fairfed", "strength": 0.5})
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(_sweep().model_dump_json(), encoding="utf-8")
    rc = main(["report", "fairness", str(run_id), "--store", str(store_path), "--format", "md", "--sweep",
               str(sweep_file)])  # fmt: skip
    md = capsys.readouterr().out
    assert rc == 0
    section = md[md.index("## Mitigation\n") : md.index("## Overall metrics")]
    assert "fairfed" in section and "Attribute: group" in section and "Strength: 0.5" in section
    assert "one release per node per round" in section  # which releases it costs
    assert "node-0 3.000, node-1 4.000" in section  # each node's ε (its latest reply's: every release included)
    assert "| 1 | 1.100 | 0.900 |" in section  # each round's multipliers, by node name
    assert "| round | clients | worst | best |" in section and "| 2 | 2 | 0.700 | 0.800 |" in section  # the spread
    assert "## Mitigation options: fairfed" in md  # --sweep adds the options


def test_report_of_a_thresholds_run_shows_the_policy_and_that_the_attribute_is_needed(tmp_path: Path) -> None:
    from common.fairness.thresholds import fit_and_measure

    store_path, run_id = _recorded_run(tmp_path, {"method": "thresholds", "strength": 1.0})
    rng = np.random.default_rng(3)
    n = 2000
    group = rng.choice(["g1", "g2"], n)
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 * y + 0.4 * rng.random(n) + 0.25 * (group == "g1"), 0, 1)
    policy = fit_and_measure(score, y, {"group": group}, attribute="group", strength=1.0, seed=1)
    folder = checkpoint_dir(store_path, run_id)
    folder.mkdir(parents=True)
    (folder / "thresholds.json").write_text(policy.model_dump_json(), encoding="utf-8")
    md = fr.render(fr.fairness_report_from_store(store_path, run_id), "md")
    section = md[md.index("## Mitigation\n") : md.index("## Overall metrics")]
    assert "nodes release nothing" in section
    assert "needs the sensitive attribute at prediction time" in section.replace("Group thresholds need", "needs")
    assert f"| g1 | {policy.thresholds['g1']:.3f} |" in section
    assert policy.after is not None and f"{policy.after.demographic_parity_difference:.3f}" in section


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "magic", "--values", "1"], "unknown mitigation method 'magic'"),
        (["--method", "fairfed", "--values", "-0.5"], "strength -0.5 is negative"),
        (["--method", "thresholds", "--values", "0.5", "1.5"], "strength 1.5 is above 1 for thresholds"),
        (["--method", "qfedavg", "--values", "1", "1.0"], "strength 1 is given twice"),
    ],
)
def test_bad_sweep_requests_fail_before_anything_runs(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    rc = main(["fairness", "sweep", "--config", str(tmp_path / "missing.toml"), "--workdir", str(tmp_path / "w"),
               *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Fix:" in err
    assert not (tmp_path / "w").exists()


def test_a_method_the_config_cannot_use_fails_before_anything_runs(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.csv"
    make_tabular(200).to_csv(data, index=False)
    toml = tmp_path / "run.toml"
    features = [f.model_dump(exclude_none=True) for f in tabular_config(data).data.schema_.features]
    schema = f'sensitive = ["group"]\n{toml_features(features)}'
    toml.write_text(small_sim_toml("he", seed=1, rounds=1, clients=2, schema=schema,
                                   extra='[server]\naggregation = "median"\n'), encoding="utf-8")  # fmt: skip
    rc = main(["fairness", "sweep", "--config", str(toml), "--method", "fairfed", "--values", "1", "--workdir",
               str(tmp_path / "w")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "fairfed" in err and 'server.aggregation = "fedavg"' in err
    assert not (tmp_path / "w").exists()


def test_a_folder_that_is_not_a_sweep_is_never_cleared(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.csv"
    make_tabular(200).to_csv(data, index=False)
    toml = tmp_path / "run.toml"
    features = [f.model_dump(exclude_none=True) for f in tabular_config(data).data.schema_.features]
    toml.write_text(small_sim_toml("x", seed=1, rounds=1, clients=2, schema=f'sensitive = ["group"]\n'
                                   f"{toml_features(features)}"), encoding="utf-8")  # fmt: skip
    node = tmp_path / "node"
    node.mkdir()
    (node / "ledger.db").write_text("a real node's ledger")
    rc = main(["fairness", "sweep", "--config", str(toml), "--method", "thresholds", "--values", "1", "--workdir",
               str(node)])  # fmt: skip
    assert rc == 2 and "is not a fairness-sweep work dir" in capsys.readouterr().err
    assert (node / "ledger.db").read_text() == "a real node's ledger"


# -- one real sweep ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_thresholds_sweep_runs_marks_and_renders(tmp_path: Path) -> None:
    """Baseline + thresholds 0 and 1: three tiny simulated federations (2 nodes, 1 round, evaluator)."""
    data = tmp_path / "data.csv"
    frame = make_tabular(4000, seed=2)
    # a planted bias: g1's feature a is shifted up but its labels are not, so the model selects g1 more often
    g1 = frame["group"] == "g1"
    frame.loc[g1, "a"] = np.clip(frame.loc[g1, "a"] + 1.5, -3, 3)
    frame.to_csv(data, index=False)
    features = [f.model_dump(exclude_none=True) for f in tabular_config(data).data.schema_.features]
    schema = f'sensitive = ["group"]\n{toml_features(features)}'
    extra = '[mitigation]\nmethod = "thresholds"\nstrength = 1.0\n[simulation]\nholdout_fraction = 0.25\n'
    text = small_sim_toml("sweep", seed=5, rounds=1, clients=2, schema=schema, extra=extra)
    # one round that learns under DP (1,200 training rows a node): bigger batches, more local epochs, ε = 8
    for old, new in [("batch_size = 32", "batch_size = 64\nlocal_epochs = 4"), ("learning_rate = 0.01",
                     "learning_rate = 0.03"), ("target_epsilon = 4.0", "target_epsilon = 8.0"),
                     ("delta = 1e-4", "delta = 1e-5")]:  # fmt: skip
        text = text.replace(old, new)
    toml = tmp_path / "run.toml"
    toml.write_text(text, encoding="utf-8")
    out = tmp_path / "sweep.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "fairness", "sweep", "--config", str(toml), "--method", "thresholds",
         "--values", "0", "1", "--workdir", str(tmp_path / "sweep"), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/3] baseline (no mitigation): done" in proc.stdout and "[3/3] thresholds 1: done" in proc.stdout
    sweep = mr.load_sweep(out)
    assert sweep.complete and [o.strength for o in sweep.options] == [None, 0.0, 1.0]
    base, zero, one = sweep.options
    assert one.configured and not zero.configured and not base.configured
    assert len({o.store for o in sweep.options}) == 3  # every option ran with its own fresh simulated nodes
    for o in sweep.options:
        # each option is its own one-round DP run: its accuracy is what DP noise made it (0.47 was seen)
        assert o.accuracy is not None and 0.0 < o.accuracy <= 1.0
        assert o.epsilon and all(e is not None and 0 < e <= 8.0 for e in o.epsilon.values())
    assert base.scope is None and one.scope == ["group"] and "after group thresholds" in one.measured_on
    # Each option is its own DP run (noise from os.urandom), so gaps are compared within a run, on one
    # model, never across options (a CI run once saw strength 0's model constant: gap 0.0 < 0.12).
    # Strength 0 keeps the model's own decisions: its numbers are the unprocessed ones, exactly.
    assert zero.unprocessed is not None and zero.dp_difference is not None
    assert (zero.accuracy, zero.dp_difference) == (zero.unprocessed["accuracy"], zero.unprocessed["dp_difference"])
    # strength 1 is what the configured run fitted and applied: one threshold per group, moved off the
    # default by the planted bias (how far it closes a gap is tested on fixed scores in test_thresholds.py),
    # and the option's numbers are that policy's measured ones
    zero_policy, one_policy = mr.read_policy(Path(zero.store), zero.run_id), mr.read_policy(Path(one.store), one.run_id)
    assert zero_policy is not None and one_policy is not None
    assert zero_policy.strength == 0.0 and set(zero_policy.thresholds.values()) == {0.5}
    assert one_policy.strength == 1.0 and set(one_policy.thresholds) == {"g1", "g2"}
    assert set(one_policy.thresholds.values()) != {0.5}
    assert one_policy.after is not None and one.dp_difference == one_policy.after.demographic_parity_difference
    fairest = min(sweep.options, key=lambda o: o.dp_difference if o.dp_difference is not None else 1.0)
    assert fairest.pareto  # nothing is both fairer and at least as accurate
    # the report of the configured run shows its policy and the sweep
    md = fr.render(fr.fairness_report_from_store(one.store, one.run_id, sweep), "md")
    assert "### Threshold policy" in md and "## Mitigation options: thresholds over strengths 0, 1" in md
    print(f"sweep wall time {wall:.0f}s")
