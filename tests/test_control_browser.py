"""The dashboard in real headless Chromium (the distribution's ``chromium``, driven by Playwright).

The control service runs as in production: uvicorn with TLS in a thread, on a free loopback
port. A reviewer logs in, opens a finished run, sees the ε and fairness charts (SVG series per
node and per attribute) and downloads the privacy report; an operator starts a run from the
form, and the federation door receives it signed with the run-signing key.

The README's screenshot: ``FEDGUARD_RUN_PAGE_PNG=docs/run-page.png FEDGUARD_RUN_PAGE_STORE=fedguard-demo/runs.db
pytest tests/test_control_browser.py -k screenshot`` (the store of a real ``fedguard demo``; it is copied first).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.control.app import create_app
from server.control.serve import ControlServer, self_signed
from tests.helpers import need
from tests.test_control_api import demo_toml, make_service

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("FEDGUARD_CHROMIUM", "/usr/bin/chromium")
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium_or_skip() -> None:
    present = Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None
    need(present, f"no Chromium at {CHROMIUM}: install the distribution's `chromium` package (CI installs it)")
    need(importlib.util.find_spec("playwright") is not None, "pip install playwright (dev extras)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _chromium_or_skip()
    tmp = tmp_path_factory.mktemp("control-browser")
    svc, fed = make_service(tmp)
    cert, key = self_signed(tmp / "tls")
    server = ControlServer(create_app(svc), cert, key, host="127.0.0.1", port=0).start()
    try:
        yield {"svc": svc, "fed": fed, "url": server.url, "tmp": tmp}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(served: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _login(browser: Any, served: dict[str, Any], role: str) -> Any:
    _, token = served["svc"].users.add(f"browser-{role}", role)
    # the certificate is the service's own (here self-signed): trust is the CA's job, not this test's
    context = browser.new_context(
        ignore_https_errors=True, accept_downloads=True, viewport={"width": 1250, "height": 900}
    )
    page = context.new_page()
    page.goto(served["url"] + "/login")
    page.fill("#token", token)
    page.click("#login")
    page.wait_for_url(served["url"] + "/")
    return page


def test_reviewer_reads_a_finished_run_and_downloads_the_privacy_report(browser: Any, served: dict[str, Any]) -> None:
    page = _login(browser, served, "reviewer")
    cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-fedguard_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert page.locator("#runs td.status").all_inner_texts() == ["running", "finished"]
    page.click("#runs a[href='/runs/1']")
    page.wait_for_url(served["url"] + "/runs/1")
    # ε per client per round: one line per node, three points each except the refused round of node 303
    eps = page.locator("#chart-epsilon polyline.series")
    assert eps.count() == 3
    assert sorted(eps.evaluate_all("els => els.map(e => e.dataset.series)")) == ["node 101", "node 202", "node 303"]
    assert page.locator("#chart-epsilon circle").count() == 9
    assert page.locator("#chart-epsilon line.threshold").count() == 1  # the target ε
    # fairness: a line per audited attribute, and the findings listed
    fair = page.locator("#chart-fairness-dp polyline.series")
    assert set(fair.evaluate_all("els => els.map(e => e.dataset.series)")) >= {"gender", "maritalcat"}
    assert page.locator("#chart-fairness-eo polyline.series").count() >= 2
    assert page.locator("#findings tbody tr").count() >= 1
    assert "refused" in page.locator("#participation").inner_text()
    with page.expect_download() as info:
        page.click("#dl-privacy-html")
    download = info.value
    assert download.suggested_filename == "privacy-report-run-1.html"
    text = Path(download.path()).read_text(encoding="utf-8")
    svc = served["svc"]
    head = svc.audit.head()
    assert "FedGuard privacy report 1" in text and "DP-SGD" in text
    assert f"fedguard-audit-head: {head}" in text
    entry = svc.audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("browser-reviewer", "report.privacy", "run 1 (html)")
    assert svc.audit.verify(expect_head=head).ok
    # a reviewer sees no run-control links and cannot open the form
    assert page.locator("a[href='/runs/new']").count() == 0
    assert page.goto(served["url"] + "/runs/new").status == 403  # type: ignore[union-attr]
    page.context.close()


def test_operator_starts_a_run_from_the_dashboard(browser: Any, served: dict[str, Any]) -> None:
    page = _login(browser, served, "operator")
    page.click("a[href='/runs/new']")
    page.fill("#config_toml", demo_toml(served["tmp"]))
    page.click("#submit-run")
    ok = page.locator("#start-ok")
    ok.wait_for()
    fed = served["fed"]
    assert len(fed.started) == 1  # the recorder checked the signature with the pinned run-signing key
    assert f"Submitted as Flower run {9000 + len(fed.started)}" in ok.inner_text()
    assert fed.started[0]["name"] == "fedguard-demo"
    entry = served["svc"].audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.outcome) == (
        "browser-operator",
        "run.start",
        "ok (signed by the control service)",
    )
    # a broken config comes back to the form with the problem named, and nothing is submitted
    page.fill("#config_toml", 'name = "x"\nrounds = 0\n')
    page.click("#submit-run")
    assert "rounds" in page.locator("#start-error").inner_text()
    assert len(fed.started) == 1
    page.context.close()


def test_run_page_screenshot(browser: Any, tmp_path: Path) -> None:
    """The run page renders to a full-page screenshot; with FEDGUARD_RUN_PAGE_PNG set, (re)makes the README's.

    Without it the picture goes to a temporary file, so the test still checks that the page renders.
    """
    from server.control.service import ControlService

    source = os.environ.get("FEDGUARD_RUN_PAGE_STORE")
    if source:
        with sqlite3.connect(source) as src, sqlite3.connect(tmp_path / "runs.db") as dst:
            src.backup(dst)  # never touch the demo's own file
        svc = ControlService(tmp_path, tmp_path / "runs.db")
    else:
        svc, _ = make_service(tmp_path)
    run_id = max(int(r["run_id"]) for r in svc_runs(svc) if r["status"] == "finished")
    cert, key = self_signed(tmp_path / "tls")
    with ControlServer(create_app(svc), cert, key, port=0) as server:
        page = _login(browser, {"svc": svc, "url": server.url}, "reviewer")
        page.goto(f"{server.url}/runs/{run_id}")
        out = Path(os.environ.get("FEDGUARD_RUN_PAGE_PNG") or tmp_path / "run-page.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        page.context.close()
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 10_000


def svc_runs(svc: Any) -> list[dict[str, Any]]:
    from server.control.views import list_runs

    return list_runs(svc.store_path)
