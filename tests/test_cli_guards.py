"""Guards that run before any command touches anything (issue 20, items 6 and 7).

Bad node flags fail in argparse (exit 2, one line, nothing created); every kit read is pinned to the
CA fingerprint unless explicitly waived; a crashed server's runs are marked failed at the next start;
``run resume`` refuses a run that may still be live; a node the SuperLink reports gone is ``dropped``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from common.config import load_config
from common.errors import ConfigError
from common.flower_internals import ErrorCode
from common.kit import Federation, NodeSpec
from fedguard import deploy
from fedguard.cli import main
from fedguard.provisioning import init_federation
from server.grid_io import collect_replies
from server.runs import RunError, RunStatus
from server.store import RunStore

FED = "guards"


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Any:
    fed = Federation(
        name=FED,
        nodes=[
            NodeSpec(name="alpha", organisation="Alpha Hospital"),
            NodeSpec(name="judge", organisation="Ethics Board", role="evaluator"),
        ],
    )
    return init_federation(fed, tmp_path_factory.mktemp("prov") / "out", generate_node_keys=True)


def _node_argv(tmp_path: Path, role: str = "client") -> list[str]:
    head = ["client", "start"] if role == "client" else ["evaluator", "start"]
    return [
        *head,
        *("--kit", str(tmp_path / "no-kit"), "--workdir", str(tmp_path / "work")),
        *("--data", str(tmp_path / "d.csv"), "--schema", str(tmp_path / "s.toml")),
        *("--superlink", "127.0.0.1:9", "--ca-fingerprint", "AB" * 32),
    ]


# -- numeric node flags: refused by argparse, before the kit, the data or the network ----------------------


@pytest.mark.parametrize(
    ("role", "flag", "value"),
    [
        ("client", "--budget-epsilon", "-5"),
        ("client", "--budget-epsilon", "0"),
        ("client", "--budget-epsilon", "inf"),
        ("client", "--budget-epsilon", "nan"),
        ("client", "--budget-delta", "1.5"),
        ("client", "--budget-delta", "0"),
        ("client", "--declared-size", "-1"),
        ("client", "--declared-size", "0"),
        ("client", "--declared-size", "1e6"),
        ("client", "--watts-per-core", "-10"),
        ("evaluator", "--gpu-watts", "nan"),
        ("evaluator", "--carbon-intensity", "-inf"),
    ],
)
def test_bad_node_flags_fail_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, flag: str, value: str
) -> None:
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        main([*_node_argv(tmp_path, role), f"{flag}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "work").exists()


def test_a_bad_flag_in_a_real_process_is_one_line_and_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", *_node_argv(tmp_path), "--budget-epsilon", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--budget-epsilon" in proc.stderr and "Traceback" not in proc.stderr
    assert "-5 is out of range" in proc.stderr
    assert time.perf_counter() - t0 < 60  # the interpreter's imports; nothing connects
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("flag", "value"), [("--max-clients", "0"), ("--bound", "-1"), ("--bound", "inf")])
def test_keygen_numeric_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    argv = ["evaluator", "keygen", "--kit", str(tmp_path / "k"), "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(tmp_path / "o"), f"{flag}={value}"])
    assert exited.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


# -- the CA pin: required wherever a kit is read, or waived explicitly -------------------------------------


def test_server_start_requires_the_ca_pin(
    provisioned: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDGUARD_CA_FINGERPRINT", raising=False)
    base = ["server", "start", "--kit", str(provisioned.server_kit), "--workdir", str(tmp_path / "srv")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "CA fingerprint is required" in err and "--insecure-skip-ca-pin" in err and "Traceback" not in err
    assert main([*base, "--ca-fingerprint", "AB:" * 31 + "AB"]) == 2
    assert "not the federation's CA" in capsys.readouterr().err
    assert main([*base, "--ca-fingerprint", provisioned.ca_fingerprint, "--insecure-skip-ca-pin"]) == 2
    assert "contradict" in capsys.readouterr().err
    # from the environment (containers): pinned, and a wrong one is refused the same way
    monkeypatch.setenv("FEDGUARD_CA_FINGERPRINT", "CD:" * 31 + "CD")
    assert main(base) == 2
    assert "not the federation's CA" in capsys.readouterr().err
    assert not (tmp_path / "srv").exists()


def test_waiving_the_pin_is_loud(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("FEDGUARD_CA_FINGERPRINT", raising=False)
    argv = ["server", "start", "--kit", str(tmp_path / "missing"), "--workdir", str(tmp_path / "srv")]
    assert main([*argv, "--insecure-skip-ca-pin"]) == 2
    err = capsys.readouterr().err
    assert "WARNING" in err and "without checking its fingerprint" in err and "kit directory not found" in err


def test_keygen_requires_the_ca_pin(provisioned: Any, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("FEDGUARD_CA_FINGERPRINT", raising=False)
    argv = ["evaluator", "keygen", "--kit", str(provisioned.server_kit)]
    argv += ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "CA fingerprint is required" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


# -- run state after a crash ---------------------------------------------------------------------------------


def _store_with_runs(workdir: Path, statuses: list[str]) -> list[int]:
    workdir.mkdir(parents=True, exist_ok=True)
    ids = []
    with RunStore(workdir / "runs.db") as store:
        for i, status in enumerate(statuses):
            run_id = store.create_run(f"r{i}", "{}", "0" * 64, 100 + i)
            if status != "running":
                store.finish_run(run_id, status, None)
            ids.append(run_id)
    return ids


def _runs(workdir: Path) -> dict[int, dict[str, Any]]:
    with RunStore(workdir / "runs.db") as store:
        return {int(r["run_id"]): r for r in store.runs()}


def test_server_start_marks_runs_left_running_as_failed(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    running, finished, failed = _store_with_runs(srv, ["running", "finished", "failed"])
    (srv / "server.json").write_text(json.dumps({"pid": 2**22 + 7}))  # the crashed server's, long gone
    assert deploy.fail_orphaned_runs(srv) == [(running, "r0")]
    runs = _runs(srv)
    assert runs[running]["status"] == "failed" and runs[running]["error"] == deploy.ORPHANED
    assert runs[finished]["status"] == "finished" and runs[failed]["status"] == "failed"
    assert deploy.fail_orphaned_runs(srv) == []  # idempotent
    assert deploy.fail_orphaned_runs(tmp_path / "fresh") == [] and not (tmp_path / "fresh").exists()


def test_server_start_refuses_while_its_superlink_still_runs(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    (running,) = _store_with_runs(srv, ["running"])
    # A process whose command line looks like this workdir's SuperLink.
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "flower-superlink", "--database", str(srv / "x.db")]
    )
    try:
        cmdline = Path(f"/proc/{fake.pid}/cmdline")
        deadline = time.monotonic() + 30
        while b"flower-superlink" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has exec'd
        (srv / "server.json").write_text(json.dumps({"pid": fake.pid}))
        with pytest.raises(ConfigError, match="still running"):
            deploy.fail_orphaned_runs(srv)
        assert _runs(srv)[running]["status"] == "running"
    finally:
        fake.kill()
        fake.wait()


def _status(state: str) -> RunStatus:
    return RunStatus(run_id=100, status=state, details="", elapsed=1.0, raw={})


def _server(srv: Path) -> None:
    state = {"address": "127.0.0.1:9", "ca_cert": "ca.crt", "flwr_home": str(srv / "flwr-home"), "kit": "k"}
    (srv / "server.json").write_text(json.dumps(state))


@pytest.mark.parametrize("live", ["running", "pending", "starting"])
def test_resume_refuses_a_run_the_superlink_still_runs(tmp_path: Path, monkeypatch, live: str) -> None:
    srv = tmp_path / "srv"
    (run_id,) = _store_with_runs(srv, ["running"])
    _server(srv)
    monkeypatch.setattr("server.runs.run_status", lambda *a, **k: _status(live))
    with pytest.raises(ConfigError, match=f"still live: Flower run 100 is {live}") as err:
        deploy.refuse_if_live(str(srv), srv / "runs.db", run_id)
    assert "fedguard run stop 100" in str(err.value)
    assert _runs(srv)[run_id]["status"] == "running"


def test_resume_refuses_when_the_superlink_cannot_say(tmp_path: Path, monkeypatch) -> None:
    srv = tmp_path / "srv"
    (run_id,) = _store_with_runs(srv, ["running"])
    _server(srv)

    def unreachable(*a: Any, **k: Any) -> RunStatus:
        raise RunError("connection refused")

    monkeypatch.setattr("server.runs.run_status", unreachable)
    with pytest.raises(ConfigError, match="may|cannot say"):
        deploy.refuse_if_live(str(srv), srv / "runs.db", run_id)


def test_resume_of_a_run_the_superlink_ended_records_it_failed(tmp_path: Path, monkeypatch) -> None:
    srv = tmp_path / "srv"
    (run_id,) = _store_with_runs(srv, ["running"])
    _server(srv)
    monkeypatch.setattr("server.runs.run_status", lambda *a, **k: _status("finished:failed"))
    deploy.refuse_if_live(str(srv), srv / "runs.db", run_id)
    run = _runs(srv)[run_id]
    assert run["status"] == "failed" and "finished:failed" in run["error"]


def test_resume_cli_refuses_a_live_run_with_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    srv = tmp_path / "srv"
    (run_id,) = _store_with_runs(srv, ["running"])
    _server(srv)
    monkeypatch.setattr("server.runs.run_status", lambda *a, **k: _status("running"))
    assert main(["run", "resume", str(run_id), "--server-workdir", str(srv)]) == 2
    err = capsys.readouterr().err
    assert "still live" in err and "Traceback" not in err


# -- node deaths are "dropped" -------------------------------------------------------------------------------


class _Grid:
    """Pushes get ids; each pull answers with the scripted replies once."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.answered = answer, False

    def push_messages(self, messages: list[Message]) -> list[str]:
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        self.sent = messages
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        if self.answered:
            return []
        self.answered = True
        return [self.answer(m) for m in self.sent]


def _msg(node: int) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


@pytest.mark.usefixtures("server_identity")
def test_a_node_the_superlink_reports_unavailable_is_dropped_with_the_reason() -> None:
    def superlink_answers(m: Message) -> Message:
        reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=m)
        reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers under its own id
        return reply

    seen: list[Message] = []
    lost: dict[int, str] = {}
    replies, silent, unreachable = collect_replies(
        _Grid(superlink_answers), [_msg(7), _msg(8)], 5, 0.01, on_reply=seen.append, lost=lost
    )
    assert seen == [] and silent == {7, 8} and unreachable == set()
    assert set(lost) == {7, 8} and all("offline" in r and "Node Unavailable" in r for r in lost.values())


@pytest.mark.usefixtures("server_identity")
def test_an_expired_message_is_dropped_and_a_node_error_stays_failed() -> None:
    expired = collect_replies(
        _Grid(lambda m: Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "expired"), reply_to=m)),
        [_msg(3)],
        5,
        0.01,
        lost=(lost := {}),
    )
    # Dropped; an expired message (TTL = the round's timeout) leaves the reason to the caller's "no reply within Ns".
    assert expired[1] == {3} and lost == {3: ""}
    # The node's own error reply (its ClientApp raised) is the node answering: failed, not dropped.
    replies, silent, _ = collect_replies(
        _Grid(lambda m: Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=m)), [_msg(4)], 5, 0.01
    )
    assert silent == set() and len(replies) == 1 and replies[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION


# -- config: clear errors for hostile files ----------------------------------------------------------------


def test_config_check_of_a_deeply_nested_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 50_000 + "]" * 50_000)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="nested"):
        load_config(path)
