"""Resource and carbon accounting: what each round, client and run cost, on a real simulated federation.

One simulation (its own process, Ray) runs FedGuard's real ClientApp behind a thin wrapper that
writes, on the node, the serialized size of every message the node received and every reply it
returned, computed here with Flower's own serializer; the server's recorded bytes must equal them.
Policy rules run in process on the real ClientApp. ``python -m tests.test_accounting WORKDIR CONFIG``
runs that simulation.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client.sent_log import read_usage
from common import records as R
from common.errors import ConfigError
from common.resources import EnergyModel, Meter, coarsen, energy_available
from server.cost_report import CostReport, build_cost_report, render, summary_lines
from server.store import RunStore
from tests.helpers import ROOT, global_state, make_tabular, node_context, tabular_config, train_message

WIRE_LOG = "wire.jsonl"


def _wire_size(msg: Message) -> int:
    """Flower 1.42 ships a message as its object tree, each object deflated (the test's own count)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def _logged(handler_name: str):  # type: ignore[no-untyped-def]
    from client import app as real

    handler = getattr(real, handler_name)

    def run(msg: Message, context: Context) -> Message:
        received = _wire_size(msg)
        reply = handler(msg, context)
        config = msg.content[R.CONFIG]
        line = {
            "node": int(context.node_id),
            "round": int(config.get(R.ROUND, 0)),
            "type": msg.metadata.message_type,
            "received": received,
            "sent": _wire_size(reply),
        }
        with open(Path(str(config[R.SIM_DATA_DIR])) / WIRE_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return reply

    return run


def wire_logged_app() -> ClientApp:
    app = ClientApp()
    app.train()(_logged("train"))
    app.evaluate()(_logged("evaluate"))
    for name in ("role", "plan", "fairness"):
        app.query(name)(_logged(name))
    return app


# -- one simulated federation, shared by the tests below ---------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("accounting")
    data = tmp / "data.csv"
    make_tabular(500).to_csv(data, index=False)
    cfg = tabular_config(data, server={"min_replies": 2, "round_timeout": 120, "wait_for_nodes": 60})
    (tmp / "run.json").write_text(cfg.to_json(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_accounting", str(tmp / "work"), str(tmp / "run.json")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0 and "RUN_ID=" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = int(proc.stdout.split("RUN_ID=")[1].split()[0])
    return {"tmp": tmp, "work": tmp / "work", "store": tmp / "work" / "runs.db", "run_id": run_id}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_client_and_round_records_cpu_time_bytes_and_labelled_energy(federation: dict) -> None:
    label = energy_available()  # "estimated" on a machine without a readable RAPL counter (this one)
    with RunStore(federation["store"]) as store:
        clients = store.client_rounds(federation["run_id"])
        traffic = {(t["round"], t["node_id"]): t for t in store.node_traffic(federation["run_id"])}
        costs = store.round_costs(federation["run_id"])
    assert len(clients) == 4 and all(c["status"] == "accepted" for c in clients)
    for c in clients:
        v = c["values"]
        assert v[R.CPU_SECONDS] > 0 and v[R.WALL_SECONDS] > 0 and v[R.ENERGY_WH] > 0 and v[R.EMISSIONS_G] > 0
        assert v[R.ENERGY_MEASURED] == int(label == "measured")
        assert v[R.EXAMPLES_PROCESSED] > 0 and v[R.PEAK_RAM_MB] > 0
        t = traffic[(c["round"], c["node_id"])]
        assert t["bytes_sent"] > 0 and t["bytes_received"] > 0 and t["role"] == "client"
        assert {f"metrics.{k}" for k in (R.CPU_SECONDS, R.ENERGY_WH)} <= set(c["received"])
    assert [c["round"] for c in costs] == [0, 1, 2]
    for c in costs:
        assert c["server"]["cpu_seconds"] > 0 and c["server"]["energy_label"] == label
        assert c["bytes_sent"] > 0 and c["bytes_received"] > 0
    assert all(c["aggregation_seconds"] > 0 for c in costs[1:])
    # Each node keeps its exact figures; what left is the same figure rounded up to 2 significant digits.
    for node_dir in sorted((federation["work"] / "partitions").glob("node-*")):
        trains = [u for u in read_usage(node_dir) if u["purpose"] == "train"]
        if not trains:
            continue  # the evaluator never trains
        assert len(trains) == 2
        for u in trains:
            exact, sent = u["usage"], u["sent"]
            assert exact["cpu_seconds"] > 0 and exact["bytes_received"] > 0 and exact["bytes_sent"] > 0
            assert exact["energy_label"] == label
            assert sent[R.CPU_SECONDS] == coarsen(exact["cpu_seconds"]) >= exact["cpu_seconds"]
            assert sent[R.EXAMPLES_PROCESSED] == coarsen(exact["examples"])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bytes_recorded_per_round_equal_the_serialized_messages_sent(federation: dict) -> None:
    expected: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for line in (federation["work"] / "partitions" / WIRE_LOG).read_text().splitlines():
        e = json.loads(line)
        cell = expected[(e["round"], e["node"])]
        cell[0] += e["received"]  # what the server sent to the node
        cell[1] += e["sent"]
        cell[2] += 2
    with RunStore(federation["store"]) as store:
        recorded = {
            (t["round"], t["node_id"]): [t["bytes_sent"], t["bytes_received"], t["messages"]]
            for t in store.node_traffic(federation["run_id"])
        }
        costs = {c["round"]: c for c in store.round_costs(federation["run_id"])}
    assert recorded == dict(expected)
    assert len({node for _, node in recorded}) == 3  # two clients and the evaluator
    for rnd, c in costs.items():
        assert c["bytes_sent"] == sum(v[0] for (r, _), v in expected.items() if r == rnd)
        assert c["bytes_received"] == sum(v[1] for (r, _), v in expected.items() if r == rnd)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_cost_report_has_per_round_cumulative_and_per_client_figures(federation: dict) -> None:
    rep = build_cost_report(federation["store"], federation["run_id"])
    rep = CostReport.model_validate_json(render(rep, "json"))
    assert [r.round for r in rep.rounds] == [0, 1, 2]
    cum = [r.cumulative_energy_wh for r in rep.rounds]
    assert cum == sorted(cum) and cum[-1] == pytest.approx(rep.totals.energy_wh) and rep.totals.energy_wh > 0
    assert rep.rounds[-1].cumulative_bytes == rep.totals.bytes_sent + rep.totals.bytes_received
    assert all(r.clients_reporting == r.clients_trained == 2 for r in rep.rounds[1:])
    assert rep.totals.energy_label == energy_available() and rep.totals.clients_not_reporting == 0
    clients = [c for c in rep.clients if c.role == "client"]
    assert len(clients) == 2 and all(c.rounds_trained == 2 and c.energy_share for c in clients)
    assert sum(c.bytes_share for c in rep.clients) == pytest.approx(1.0)
    assert rep.totals.client_energy_wh == pytest.approx(sum(c.energy_wh or 0 for c in clients))
    page = render(rep, "html")
    assert "Per round" in page and "Per node" in page and "cum. energy Wh" in page
    assert "http://" not in page and "<script src" not in page
    md = render(rep, "md")
    assert f"| 2 | {rep.rounds[2].wall_seconds:.1f} |" in md
    lines = summary_lines(federation["store"], federation["run_id"])
    assert "Wh" in lines[0] and "gCO2e" in lines[0] and "sent to nodes" in lines[0]


# -- the owner's policy decides what leaves, on the real ClientApp in process ----------------


@pytest.mark.usefixtures("server_identity")
@pytest.mark.timeout(120)
def test_resource_figures_stay_local_unless_the_owner_allows_them(tabular_csv: Path, tmp_path: Path) -> None:
    from client.app import app as client_app

    cfg = tabular_config(rounds=1)
    state = global_state(cfg)
    allow = tmp_path / "allow.toml"
    allow.write_text('allow_values = ["resource-figures"]\n', encoding="utf-8")
    replies = {}
    for name, policy in (("default", "default"), ("allowed", str(allow))):
        ctx = node_context(tabular_csv, tmp_path / name, policy_path=policy, carbon_intensity=100.0)
        replies[name] = client_app(train_message(cfg, state), ctx)
    default = dict(replies["default"].content[R.METRICS])
    assert R.NUM_EXAMPLES in default and not set(default) & set(R.RESOURCE_KEYS)
    sent = dict(replies["allowed"].content[R.METRICS])
    assert set(sent) >= set(R.RESOURCE_KEYS) - {R.GPU_SECONDS, R.GPU_PEAK_MB}
    assert sent[R.CARBON_INTENSITY] == 100.0
    # Both nodes keep their exact figures; the allowed one sent them rounded up to 2 significant digits.
    for name in ("default", "allowed"):
        (entry,) = read_usage(tmp_path / name)
        exact = entry["usage"]
        assert exact["cpu_seconds"] > 0 and exact["bytes_received"] > 0 and exact["examples"] > 0
        assert entry["sent"] == ({} if name == "default" else {k: sent[k] for k in entry["sent"]})
    exact = read_usage(tmp_path / "allowed")[0]["usage"]
    for key, value in ((R.CPU_SECONDS, exact["cpu_seconds"]), (R.EXAMPLES_PROCESSED, exact["examples"])):
        assert sent[key] == coarsen(value) >= value and len(f"{sent[key]:e}".split("e")[0].rstrip("0")) <= 4
    assert sent[R.EMISSIONS_G] == coarsen(exact["energy_joules"] / 3.6e6 * 100.0)
    logged = json.loads((tmp_path / "allowed" / "sent.jsonl").read_text().splitlines()[-1])
    assert logged["records"][R.METRICS][R.CPU_SECONDS]["class"] == "resource"


def test_energy_model_estimates_from_cpu_time_and_rejects_bad_values() -> None:
    meter = Meter(EnergyModel.from_config({"watts-per-core": 20, "carbon-intensity": 500}))
    sum(i * i for i in range(300_000))
    usage = meter.stop()
    assert usage.cpu_seconds > 0 and usage.peak_ram_bytes > 0
    if usage.energy_label == "estimated":
        assert usage.energy_joules == pytest.approx(usage.cpu_seconds * 20)
        assert "20 W per busy core" in usage.energy_source
    assert usage.emissions_g == pytest.approx(usage.energy_joules / 3.6e6 * 500)
    with pytest.raises(ConfigError) as err:
        EnergyModel.from_config({"carbon-intensity": "lots"})
    assert "carbon-intensity" in err.value.where and err.value.fix
    assert coarsen(1234) == 1300 and coarsen(0.01234) == 0.013 and coarsen(1300) == 1300


def test_an_older_run_store_opens_and_records_costs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, status TEXT NOT NULL,"
        " config_json TEXT NOT NULL, config_hash TEXT NOT NULL, flower_run_id TEXT, started_at REAL NOT NULL,"
        " finished_at REAL, error TEXT);"
        "INSERT INTO runs(name, status, config_json, config_hash, started_at) VALUES ('old', 'finished', '{}', 'h', 0);"
    )
    db.commit()
    db.close()
    with RunStore(path) as store:
        store.record_costs(1, 1, {7: {"sent": 10, "received": 20, "messages": 2}}, {7: "client"}, wall_seconds=1.5)
        store.record_costs(1, 1, {7: {"sent": 1, "received": 2, "messages": 2}}, {})
        assert store.node_traffic(1) == [
            {"run_id": 1, "round": 1, "node_id": 7, "role": "client", "bytes_sent": 11, "bytes_received": 22,
             "messages": 4}
        ]  # fmt: skip
        assert store.round_costs(1)[0]["wall_seconds"] == 1.5 and store.round_costs(1)[0]["bytes_received"] == 22


if __name__ == "__main__":
    from common.config import config_from_json
    from fedguard.simulate import simulate

    workdir, cfg_json = Path(sys.argv[1]), Path(sys.argv[2]).read_text(encoding="utf-8")
    result = simulate(config_from_json(cfg_json), workdir, client_app=wire_logged_app())
    print(f"RUN_ID={result.run_id}")


@pytest.mark.parametrize("batches", [92, 93, 99, 105, 186])
def test_the_plan_takes_exactly_the_steps_opacus_samples(batches: int) -> None:
    """93 batches per epoch: Opacus's sampler takes int(1/q) = 92 steps; a plan of 93 made every round refuse."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from common.privacy import poisson_schedule

    q, steps = poisson_schedule(batches * 32, 32)
    assert steps == len(UniformWithReplacementSampler(num_samples=batches * 32, sample_rate=q))


@pytest.mark.parametrize(("final_classes", "majority_share"), [(1.0, 0.8), (2.0, 0.8), (2.0, 0.75), (2.0, 0.6)])
def test_no_cost_per_accuracy_point_for_a_final_model_no_better_than_the_majority_class(
    tmp_path: Path, final_classes: float, majority_share: float
) -> None:
    """Collapsing to the majority class lifts accuracy from 0.70 to its share, 0.80, and a model that varies its
    decisions but scores no more than that share has learned no more: no learning to put a price on. Above the
    share, only the points above it are priced (from 0.75: 5 of the 10), never those up to it."""
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        run = store.create_run("r", "{}", "h", None)
        for rnd in (0, 1):
            store.record_costs(run, rnd, {7: {"sent": 1000, "received": 1000, "messages": 2}}, {7: "client"},
                               server={"energy_wh": 0.5, "emissions_g": 0.1}, wall_seconds=2.0)  # fmt: skip
        summary = {"true_classes": 2.0, "majority_share": majority_share, "majority_class": 0.0}
        store.record_evaluation(run, 0, {"accuracy": 0.7, "predicted_classes": 2.0} | summary)
        store.record_evaluation(run, 1, {"accuracy": 0.8, "predicted_classes": final_classes} | summary)
    rep = build_cost_report(path, run)
    assert rep.accuracy_gain_points == pytest.approx(10.0)
    lines = "\n".join(summary_lines(path, run))
    md = render(rep, "md")
    if final_classes == 1.0:
        assert rep.wh_per_point is None and rep.bytes_per_point is None and "cost per accuracy point" not in lines
        assert "predicts one class for every held-out row" in md and "Cost per accuracy point: n/a" in md
    elif majority_share >= 0.8:
        assert rep.wh_per_point is None and "cost per accuracy point" not in lines
        assert "not above what always predicting the majority class scores" in md
    elif majority_share == 0.75:  # 1.0 Wh over the 5 points above the majority class, not the 10 from 0.70
        assert rep.priced_points == pytest.approx(5.0) and rep.wh_per_point == pytest.approx(0.2)
        assert "cost per accuracy point: 0.2 Wh, 800 B (+5.0 points above the majority class's 0.750)" in lines
        assert "counts the 5.0 point(s) above always predicting the majority class (0.750)" in md
    else:  # the initial model already beat the majority class: all 10 points are learned
        assert rep.priced_points == pytest.approx(10.0) and rep.wh_per_point == pytest.approx(0.1)
        assert "cost per accuracy point: 0.1 Wh, 400 B (+10.0 points)" in lines and "majority" not in lines
