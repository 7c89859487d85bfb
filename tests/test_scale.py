"""Simulations on an existing Ray cluster (``fedguard simulate --ray-address``), as deploy/ray/README.md describes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.processes import free_port
from fedguard.simulate import _check_ray_address
from tests.helpers import need, write_run_toml

RAY = Path(sys.executable).with_name("ray")


def test_an_unreachable_cluster_is_a_clear_error_at_once() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        _check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10  # Ray itself would retry for minutes
    assert err.value.where == "--ray-address" and "ray start --head" in (err.value.fix or "")
    with pytest.raises(ConfigError, match="cannot attach"):
        _check_ray_address("no-port-here")


#: Inside a fresh network namespace (only loopback): Ray binds every interface, so the cluster this
#: test starts can be reached from nowhere else. The operator's recipe from deploy/ray/README.md.
_CLUSTER = """
set -e
ip link set lo up
"$RAY" start --head --block --port 6379 --node-ip-address 127.0.0.1 --num-cpus 2 --include-dashboard=false \
    --disable-usage-stats --temp-dir "$RAY_DIR" > "$RAY_DIR/start.log" 2>&1 &
HEAD=$!
trap 'kill -TERM $HEAD; wait $HEAD || true' EXIT   # `ray start --block` stops what it started (never `ray stop`)
"$PYTHON" -c "import socket, time
for _ in range(240):
    try:
        socket.create_connection(('127.0.0.1', 6379), 1).close(); break
    except OSError:
        time.sleep(0.5)"
"$PYTHON" -m fedguard.cli simulate --config "$CONFIG" --workdir "$WORKDIR" --ray-address 127.0.0.1:6379 --json
"""


def _namespaces_unavailable() -> str | None:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (util-linux, iproute2) not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr.strip()}"


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_simulate_attaches_to_a_running_cluster(tmp_path: Path) -> None:
    """`fedguard simulate --ray-address` runs the virtual clients on a cluster started with `ray start --head`."""
    reason = _namespaces_unavailable()
    need(reason is None, f"the Ray cluster test needs a private network namespace: {reason}")
    from fedguard.demo import demo_config, write_demo_data

    cfg = demo_config(write_demo_data(tmp_path), rounds=1, clients=3)
    cfg = cfg.model_copy(update={"fairness": cfg.fairness.model_copy(update={"federated_counts": False})})
    ray_dir = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))  # short: Ray's Unix sockets live here
    try:
        env = {
            **os.environ, "RAY": str(RAY), "PYTHON": sys.executable, "RAY_DIR": str(ray_dir),
            "CONFIG": str(write_run_toml(cfg, tmp_path / "run.toml")), "WORKDIR": str(tmp_path / "w"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }  # fmt: skip
        out = subprocess.run(
            ["unshare", "-n", "bash", "-c", _CLUSTER], env=env, capture_output=True, text=True, timeout=450
        )
        assert out.returncode == 0, out.stderr[-3000:] + (ray_dir / "start.log").read_text(errors="replace")[-2000:]
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["status"] == "finished"
        assert len(summary["epsilon_per_node"]) == 3 and summary["final"]["accuracy"] > 0.5
        # The simulation was a driver of the cluster started above (not a private Ray of its own).
        assert list(ray_dir.glob("session_*/logs/python-core-driver-*")), "the simulation did not attach"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
