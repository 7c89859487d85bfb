"""Shared fixtures; helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers import make_tabular, under_ci

# `fedguard server start` serves the control service on 8443 by default; test servers run side by
# side (pytest-xdist), so each takes a free port (inherited by the server processes tests start).
os.environ.setdefault("FEDGUARD_CONTROL_PORT", "0")


def _skip_reason(longrepr: object) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skips_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under ``CI=true`` a skip is a failure, however it was written (``need()``, skipif, importorskip)."""
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    _fail_skips_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    _fail_skips_under_ci(outcome.get_result())


@pytest.fixture
def tabular_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    make_tabular().to_csv(path, index=False)
    return path


@pytest.fixture
def server_identity():
    """Messages built in-process need the identity Flower's runtime sets for a ServerApp task."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def seeded_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training draws its batches and DP noise from OS entropy (``client.training.secure_generator``);
    a test whose assertion rests on what training reaches seeds them from torch's global generator
    instead: after the same ``torch.manual_seed`` two trainings see the same draws (a paired
    comparison), and every run of the test sees the same ones, so it is not a draw (an unlucky one
    failed a mitigation test in CI). In-process training only; Ray workers are other processes."""
    import torch

    import client.training

    torch.manual_seed(0)

    def seeded(device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,))))

    monkeypatch.setattr(client.training, "secure_generator", seeded)
