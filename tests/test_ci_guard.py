"""Under ``CI=true`` no test may pass by skipping: the guard in tests/conftest.py and ``need()``.

A skipped test cannot fail, so a CI machine that silently lacks nginx or Chromium would stop
checking the gateway or the dashboard without anyone noticing. Each case runs a small test file
in a child pytest with this suite's conftest loaded as a plugin, with and without ``CI=true``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(120)

CASES = """
import pytest
from tests.helpers import need

def test_need():
    need(False, "widget missing")

def test_plain_skip():
    pytest.skip("plain skip")

@pytest.mark.skipif(True, reason="marker skip")
def test_marker():
    pass

def test_importorskip():
    pytest.importorskip("no_such_module_fedguard")

def test_need_met():
    need(True, "never shown")

@pytest.mark.xfail(reason="expected failures stay expected")
def test_xfail():
    assert False
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_cases.py").write_text(CASES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*cmd, str(tmp_path / "test_cases.py")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100
    )


def test_a_developer_machine_skips_with_the_reason(tmp_path: Path) -> None:
    out = _run(tmp_path, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 4 skipped, 1 xfailed" in out.stdout
    assert "widget missing" in out.stdout


def test_under_ci_every_skip_fails(tmp_path: Path) -> None:
    out = _run(tmp_path, "true")
    assert out.returncode == 1, out.stdout + out.stderr
    summary = out.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and "1 passed" in summary and "1 xfailed" in summary, summary
    assert "CI must run this test, but: widget missing" in out.stdout
    for reason in ("plain skip", "marker skip", "no_such_module_fedguard"):
        assert reason in out.stdout, reason
    assert out.stdout.count("skipped under CI=true, where every test must run") >= 3
