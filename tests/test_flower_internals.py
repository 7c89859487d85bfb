"""Contracts of every Flower internal FedGuard uses (``common/flower_internals.py``): one test per piece.

Each test pins the signature, attribute or behaviour FedGuard relies on, against the installed
Flower, so a Flower upgrade fails here, by name, instead of a federation hanging in round 2. The
Runtime API tests run FedGuard's executor client against Flower's *own* SuperNode Runtime API
(its FastAPI app and in-memory NodeState, served on loopback in this process), with the task
stored by Flower's own ``_pull_and_store_message``: no federation, no network.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import flwr
import httpx
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common import flower_internals as fi
from common.processes import flwr_env

ROOT = Path(__file__).resolve().parents[1]
NODE_ID = 42
RUN_ID = 1  # the run of the server_identity fixture, which builds the messages
SECRET = b"fedguard-test-superexec-secret-0123456789"


# --- The version pin -------------------------------------------------------------------------------


def test_the_installed_flower_is_the_release_the_module_was_written_for() -> None:
    assert fi.check_flower_version().startswith(fi.FLOWER_RELEASE + ".")
    assert fi.check_flower_version("1.42.7") == "1.42.7"


def test_another_flower_release_is_refused_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    with pytest.raises(fi.FlowerVersionError) as refused:
        fi.check_flower_version()
    assert "1.43.0" in str(refused.value) and f"{fi.FLOWER_RELEASE}.*" in str(refused.value)
    assert refused.value.fix and "pip install" in refused.value.fix
    for other in ("1.4.2", "1.420.0", "2.42.0"):
        with pytest.raises(fi.FlowerVersionError):
            fi.check_flower_version(other)


def test_importing_the_module_under_another_flower_release_fails_at_import() -> None:
    code = "import flwr; flwr.__version__ = '1.43.0'; import common.flower_internals"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "FlowerVersionError" in proc.stderr and "Flower 1.43.0 is installed" in proc.stderr, proc.stderr[-2000:]


# --- Constants, wire format, FlatClip --------------------------------------------------------------


def test_error_codes_are_flowers() -> None:
    from flwr.common.constant import ErrorCode

    for name in ("CLIENT_APP_RAISED_EXCEPTION", "MESSAGE_UNAVAILABLE", "REPLY_MESSAGE_UNAVAILABLE", "INVALID_FAB"):
        assert getattr(fi.ErrorCode, name) == getattr(ErrorCode, name), name


def test_wire_object_sizes_are_flowers_deflated_objects(server_identity: None) -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    big = np.zeros(2_000_000, np.float32)  # 8 MB: travels as two ≤5 MB chunks
    msg = Message(RecordDict({"a": ArrayRecord({"w": Array(big)})}), dst_node_id=1, message_type="train")
    sizes = fi.wire_object_sizes(msg)
    objects = get_all_nested_objects(msg)
    assert sizes == {k: len(o.deflate()) for k, o in objects.items()}
    tree_ids: list[str] = []
    stack = [get_object_tree(msg)]
    while stack:
        node = stack.pop()
        tree_ids.append(node.object_id)
        stack.extend(node.children)
    assert set(sizes) == set(tree_ids)  # exactly the objects Flower sends
    assert 8_000_000 < sum(sizes.values()) < 8_100_000
    assert sum(1 for o in objects.values() if type(o).__name__ == "ArrayChunk") == 2


def test_clip_model_update_is_flowers_flat_clip_in_place() -> None:
    reference = [np.zeros(3), np.zeros(1)]
    params = [np.array([3.0, 0.0, 0.0]), np.array([4.0])]  # update norm 5
    fi.compute_clip_model_update(params, reference, 1.0)
    np.testing.assert_allclose(np.concatenate(params), [0.6, 0.0, 0.0, 0.8])
    small = [np.array([0.1, 0.0, 0.0]), np.array([0.0])]
    fi.compute_clip_model_update(small, reference, 1.0)  # within the bound: unchanged
    np.testing.assert_allclose(np.concatenate(small), [0.1, 0.0, 0.0, 0.0])


# --- The SuperNode's Runtime API, served by Flower's own SuperNode app ----------------------------


def _fab(version: str = "9.9") -> Any:
    from flwr.supercore.fab import Fab

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(
            "pyproject.toml",
            f'[project]\nname = "fedguard"\nversion = "{version}"\n[tool.flwr.app]\npublisher = "fedguard"\n'
            '[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "client.app:app"\n'
            "[tool.flwr.app.config]\nrounds = 3\n",
        )
    content = buf.getvalue()
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


class _Node:
    """Flower's SuperNode state and Runtime API, with messages delivered as Flower delivers them."""

    def __init__(self) -> None:
        import uvicorn
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supernode.main import create_app
        from flwr.supernode.nodestate import NodeStateFactory

        factory = NodeStateFactory(ObjectStoreFactory())
        self.state, self.store = factory.state(), factory.objectstore_factory.store()
        self.state.set_node_id(NODE_ID)
        self.fab = _fab()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app=create_app(state_factory=factory, superexec_auth_secret=SECRET),
                host="127.0.0.1",
                port=port,
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "Flower's Runtime API did not start"
            time.sleep(0.05)

    def deliver(self, message: Message, pull_object: Any = None) -> int | None:
        """Store ``message`` as the SuperNode does when it pulls one from the SuperLink; the run id or None."""
        import flwr.supernode.start_client_internal as sci
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
        from flwr.supercore.run import Run

        message.metadata.__dict__["_message_id"] = message.object_id
        objects = {k: o.deflate() for k, o in get_all_nested_objects(message).items()}
        run = Run.create_empty(RUN_ID)
        run.fab_id, run.fab_version, run.fab_hash = "fedguard/fedguard", "9.9", self.fab.hash_str
        return sci._pull_and_store_message(
            state=self.state,
            object_store=self.store,
            node_config={"data-path": "/nonexistent"},
            receive=lambda: (message, get_object_tree(message)),
            get_run=lambda run_id: run,
            get_fab=lambda fab_hash, run_id: self.fab,
            pull_object=pull_object or (lambda run_id, object_id: objects[object_id]),
            confirm_message_received=lambda run_id, message_id: None,
            trusted_entities=None,
        )

    def task(self, task_id: int) -> Any:
        (task,) = self.state.get_tasks(task_ids=[task_id])
        return task

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def node(server_identity: None) -> Iterator[_Node]:
    n = _Node()
    try:
        yield n
    finally:
        n.close()


def _train_message(server_round: int = 1) -> Message:
    content = RecordDict(
        {"cfg": ConfigRecord({"round": server_round}), "arrays": ArrayRecord({"w": Array(np.arange(4.0))})}
    )
    return Message(content, dst_node_id=NODE_ID, message_type="train", group_id=str(server_round))


def test_runtime_api_acquire_task_is_signed_with_the_superexec_secret(node: _Node) -> None:
    with pytest.raises(fi.RuntimeApiRejected):
        fi.RuntimeApi.for_executor(node.address, b"another secret").acquire_task()
    acquirer = fi.RuntimeApi.for_executor(node.address, SECRET)
    try:
        assert acquirer.acquire_task() is None  # nothing pending
        assert node.deliver(_train_message()) == RUN_ID
        claimed = acquirer.acquire_task()
        assert claimed is not None and claimed.token and claimed.run_id == RUN_ID
        assert node.task(claimed.task_id).status.status != "pending"  # taken: no other process gets it
        assert acquirer.acquire_task() is None  # claimed once
    finally:
        acquirer.close()


def test_runtime_api_task_round_trip(node: _Node) -> None:
    """Pull the input (bytes only), heartbeat, push the reply and the node state, finish the task."""
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    sent = _train_message()
    node.deliver(sent)
    acquirer = fi.RuntimeApi.for_executor(node.address, SECRET)
    claimed = acquirer.acquire_task()
    acquirer.close()
    assert claimed is not None
    api = fi.RuntimeApi.for_task(node.address, claimed.token)
    try:
        task = api.pull_task_input()
        assert task.message.metadata.message_id == sent.object_id  # the id Flower leaves out of the tree
        assert task.message.content["cfg"]["round"] == 1
        np.testing.assert_array_equal(task.message.content["arrays"]["w"].numpy(), np.arange(4.0))
        assert (task.fab_content, task.fab_id, task.fab_version) == (node.fab.content, "fedguard/fedguard", "9.9")
        assert task.context.node_id == NODE_ID and task.context.node_config == {"data-path": "/nonexistent"}
        assert task.context.run_config == {"rounds": 3}
        assert api.heartbeat() is True

        api.push_reply(Message(RecordDict({"m": ConfigRecord({"ok": 1})}), reply_to=task.message), task.context)
        task.context.state["ledger"] = ConfigRecord({"spent": 7})
        api.finish_task(task.context, True, "")
    finally:
        api.close()

    assert node.task(claimed.task_id).status.sub_status == "completed"
    (reply,) = node.state.get_messages_legacy(is_reply=True)
    assert reply.metadata.reply_to_message_id == sent.object_id
    tree = node.store.get_object_tree(reply.metadata.message_id)
    pulled = pull_and_inflate_object_from_tree(tree, node.store.get, lambda _: None, return_type=Message)
    assert pulled.content["m"]["ok"] == 1
    stored = node.state.get_run_series_context(task.context.series_id)
    assert stored is not None and stored.state["ledger"]["spent"] == 7  # next message sees it


def test_runtime_api_failed_task_keeps_no_context(node: _Node) -> None:
    node.deliver(_train_message())
    acquirer = fi.RuntimeApi.for_executor(node.address, SECRET)
    claimed = acquirer.acquire_task()
    acquirer.close()
    assert claimed is not None
    api = fi.RuntimeApi.for_task(node.address, claimed.token)
    try:
        api.pull_task_input()
        api.finish_task(None, False, "refused")
    finally:
        api.close()
    task = node.task(claimed.task_id)
    assert (task.status.sub_status, task.status.details) == ("failed", "refused")


# --- Patches of the SuperNode ----------------------------------------------------------------------


def test_a_run_stopping_while_its_message_is_received_is_cleaned_up(
    node: _Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower 1.42's bug (a wedged task) and the patch; if Flower fixed it, this says so and the patch can go."""
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.run import RunNotRunningException

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)  # undone after the test

    def stopped(run_id: int, object_id: str) -> bytes:
        raise RunNotRunningException  # the restarted SuperLink: the run is no longer running

    def pending() -> list[Any]:
        return [t for t in node.state.get_tasks(run_ids=[RUN_ID]) if t.status.status in ("pending", "starting")]

    wedged = _train_message(1)
    assert node.deliver(wedged, pull_object=stopped) is None
    assert pending(), "Flower no longer leaves the task claimable: drop clean_up_receives_of_stopped_runs"
    assert [m.metadata.message_id for m in node.state.get_messages_legacy(is_reply=False)] == [wedged.object_id]
    for task in pending():  # forget the wedged one
        node.state.finish_task(task.task_id, sub_status="failed", details="test")

    fi.clean_up_receives_of_stopped_runs()
    fi.clean_up_receives_of_stopped_runs()  # idempotent
    assert node.deliver(_train_message(2), pull_object=stopped) is None
    assert not pending()  # finished as failed by Flower's own clean-up
    assert not node.state.get_messages_legacy(is_reply=False)


def test_take_over_crashed_session_signs_the_old_session_off_and_activates_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.fleet_http_client import FleetHttpClient

    # What the patch relies on: the connection uses this class, which has both calls, taking a request.
    assert fleet_http_connection.FleetHttpClient is FleetHttpClient
    for name in ("ActivateNode", "DeactivateNode"):
        assert list(inspect.signature(getattr(FleetHttpClient, name)).parameters) == ["self", "request"]
    assert "node_id" in DeactivateNodeRequest.DESCRIPTOR.fields_by_name

    calls: list[str] = []
    refused = httpx.HTTPStatusError("412", request=httpx.Request("POST", "https://x"), response=httpx.Response(412))

    def activate(self: Any, request: Any) -> str:
        calls.append("activate")
        if calls.count("activate") == 1:
            raise refused
        return "activated"

    monkeypatch.setattr(FleetHttpClient, "ActivateNode", activate)  # restored after the test
    fi.take_over_crashed_session(77)
    client = SimpleNamespace(DeactivateNode=lambda req: calls.append(f"deactivate {req.node_id}"))
    assert FleetHttpClient.ActivateNode(client, ActivateNodeRequest()) == "activated"
    assert calls == ["activate", "deactivate 77", "activate"]


def test_shorten_fleet_poll_shortens_the_supernodes_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as sci

    # What the patch relies on: module-level `time.sleep(3)` / `time.sleep(0.5)` and `pull_objects`.
    assert sci.time is time
    source = inspect.getsource(sci)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source and "pull_objects(" in source
    params = inspect.signature(sci.pull_objects).parameters
    assert params["initial_backoff"].kind is params["backoff_cap"].kind is inspect.Parameter.KEYWORD_ONLY

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    fi.shorten_fleet_poll(0.01)
    t0 = time.monotonic()
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    assert time.monotonic() - t0 < 0.5
    assert abs(sci.time.time() - time.time()) < 1
    assert sci.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}


def test_the_fleet_poll_is_fast_right_after_a_reply_and_slow_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a run the next round's message is due seconds after a reply: pull every 0.25 s then; an idle node
    keeps the slower interval (its polling costs CPU on the node and the SuperLink)."""
    import flwr.supernode.start_client_internal as sci

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    fi.shorten_fleet_poll(1.0, busy=0.25, window=5.0)
    sci.time.sleep(3)  # idle: nothing handled yet
    sci.time.sleep(0.5)  # waiting for the ClientApp's reply
    sci.time.sleep(3)  # right after the reply
    later = time.monotonic() + 6.0
    monkeypatch.setattr(time, "monotonic", lambda: later)  # 6 s without a reply: idle again
    sci.time.sleep(3)
    assert slept == [1.0, 0.1, 0.25, 1.0]


def _sql_core_state(tmp_path: Path) -> Any:
    """Flower's own SQL core state on a fresh SQLite file (the SuperLink's, minus its link-state half)."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    class CoreState(SqlCoreState):  # the two abstract methods belong to the link/node state
        def get_node_id(self) -> int:
            raise NotImplementedError

        def store_message_and_object_tree(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    state = CoreState(str(tmp_path / "state.db"), InMemoryObjectStore())
    state.initialize()
    return state


def test_a_task_token_is_checked_against_its_own_expiry_without_a_sweep(tmp_path: Path) -> None:
    """What makes spacing out the expired-claim sweep safe: Flower checks each token's expiry on use."""
    from datetime import UTC, datetime, timedelta

    from flwr.supercore.corestate.sql_corestate import TaskModel
    from sqlalchemy import update

    state = _sql_core_state(tmp_path)
    token = state.claim_task(state.create_task("serverapp", 1))
    state._cleanup_expired_task_tokens = lambda: None  # no sweep at all

    def expire_in(seconds: float) -> None:
        with state.session() as session:
            until = datetime.now(UTC) + timedelta(seconds=seconds)
            session.execute(update(TaskModel).values(active_until=until))

    expire_in(60)
    assert state.get_task_by_token(token) is not None
    expire_in(-1)
    assert state.get_task_by_token(token) is None


def test_task_claim_sweeps_run_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweeps: list[float] = []
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", lambda self: sweeps.append(time.monotonic()))
    fi.throttle_task_claim_sweeps(0.3)
    fi.throttle_task_claim_sweeps(0.3)  # applying it twice wraps once
    for _ in range(50):  # every state read of a burst of Fleet requests
        SqlCoreState._cleanup_expired_task_tokens(None)
    assert len(sweeps) == 1
    time.sleep(0.35)
    SqlCoreState._cleanup_expired_task_tokens(None)
    assert len(sweeps) == 2


def test_the_superlink_reads_its_state_through_the_throttled_sweep() -> None:
    """flwr 1.42 sweeps before each run-status read (every Fleet request's ``check_abort``)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    assert "self._cleanup_expired_task_tokens()" in inspect.getsource(SqlLinkState.get_run_status)
    assert "_cleanup_expired_task_tokens" not in SqlLinkState.__dict__  # inherited: the class-level patch applies
    assert "throttle_task_claim_sweeps()" in inspect.getsource(fi.run_flower_superlink)


def test_the_superlinks_state_sessions_run_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads on Flower's own SQL state: the second enters while the first is inside, until patched."""
    from flwr.supercore.sql_mixin import SqlMixin

    monkeypatch.setattr(SqlMixin, "session", SqlMixin.session)  # the patch is undone after the test
    state = _sql_core_state(tmp_path)

    def second_waited() -> float:
        inside, done = threading.Event(), threading.Event()

        def first() -> None:
            with state.session():
                inside.set()
                done.wait(0.5)

        t = threading.Thread(target=first)
        t.start()
        assert inside.wait(5)
        t0 = time.monotonic()
        with state.session():
            waited = time.monotonic() - t0
        done.set()
        t.join()
        return waited

    assert second_waited() < 0.3  # Flower's own: sessions overlap (SQLite arbitrates the writes)
    fi.serialize_state_sessions()
    fi.serialize_state_sessions()  # applying it twice wraps once
    assert second_waited() >= 0.4  # patched: the second waits for the first to end
    with state.session(), state.session():  # a nested session in one thread does not deadlock
        assert state.query("SELECT 1 AS one") == [{"one": 1}]


def test_every_superlink_state_opens_its_sessions_through_the_serialized_method() -> None:
    """flwr 1.42's link state, core state and object store reach SQLite only through ``SqlMixin.session``."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from flwr.supercore.sql_mixin import SqlMixin

    for cls in (SqlLinkState, SqlCoreState, SqlObjectStore):
        assert issubclass(cls, SqlMixin)
        assert not any("session" in k.__dict__ for k in cls.__mro__ if k is not SqlMixin)
    source = inspect.getsource(SqlMixin)
    assert source.count("self._session_factory()") == 1 and "_engine.connect" not in source
    assert "with self.session() as session" in inspect.getsource(SqlMixin.query)
    assert "serialize_state_sessions()" in inspect.getsource(fi.run_flower_superlink)


def test_flower_supernode_entry_point_takes_every_option_fedguard_passes(tmp_path: Path) -> None:
    """``python -m client.supernode --help`` runs the patches, then Flower's own argument parser."""
    from client.supernode import SuperNode

    key = tmp_path / "node.key"
    node = SuperNode(
        tmp_path,
        superlink="127.0.0.1:1",
        root_certificates=tmp_path / "ca.crt",
        private_key=key,
        node_config={"data-path": "x"},
    )
    command = node.supernode_command()
    ours = command[command.index("client.supernode") + 1 :]
    # FedGuard's own options (the fleet poll, on by default) come first and are consumed before
    # Flower's parser runs: pass them, so a change in how they are stripped fails here too.
    own = ours[: ours.index("--fleet-poll-interval") + 2]
    assert own == ["--fleet-poll-interval", "1.0"]
    ours = ours[len(own) :]
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "client.supernode", *own, "--help"],
        cwd=ROOT,
        env=flwr_env(tmp_path / "flwr-home"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for option in (arg for arg in ours if arg.startswith("--")):
        assert option in proc.stdout, f"flower-supernode no longer takes {option}"
    assert "process" in proc.stdout  # --isolation process


# --- The SuperLink boundary: Control API secret, SuperExec task tokens in files ---------------------

CONTROL = "c0ffee" * 11  # 66 hex characters


def test_cli_credentials_are_what_flowers_cli_reads(tmp_path: Path) -> None:
    import json

    from flwr.cli import constant as cli
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    address = "localhost:9093"
    path = tmp_path / fi.CLI_CREDENTIALS_FILE
    path.write_text(json.dumps(fi.cli_credentials(address, CONTROL)), encoding="utf-8")  # YAML is a JSON superset
    store = FileCredentialStore(path)
    assert store.get(cli.AUTHN_TYPE_STORE_KEY % address) == b"oidc"
    assert store.get(cli.ACCESS_TOKEN_STORE_KEY % address) == CONTROL.encode()
    assert store.get(cli.REFRESH_TOKEN_STORE_KEY % address)  # must be non-empty


def test_shared_secret_plugin_accepts_only_the_secret() -> None:
    from flwr.common.constant import ACCESS_TOKEN_KEY
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    plugin = fi.shared_secret_authn_plugin(CONTROL)
    assert isinstance(plugin, ControlAuthnPlugin)
    ok, account = plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, CONTROL)])
    assert ok and account is not None
    for metadata in ([], [(ACCESS_TOKEN_KEY, "")], [(ACCESS_TOKEN_KEY, CONTROL[:-1] + "0")], [("other", CONTROL)]):
        assert plugin.validate_tokens_in_metadata(metadata) == (False, None)
    assert plugin.get_login_details() is None and plugin.get_auth_tokens("code") is None
    assert plugin.refresh_tokens([(ACCESS_TOKEN_KEY, CONTROL)])[1] is None
    with pytest.raises(ValueError, match="at least"):
        fi.shared_secret_authn_plugin("short")


def test_flower_superlink_takes_its_control_authn_plugin_from_the_patched_name() -> None:
    import importlib

    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")
    assert callable(fsl.load_control_authn_plugin) and callable(fsl.flower_superlink)
    assert "load_control_authn_plugin()" in inspect.getsource(fsl._parse_superlink_lifespan_config)


def test_every_control_and_runtime_route_refuses_calls_without_the_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own FastAPI app, with FedGuard's plugin and a SuperExec secret (what process isolation sets)."""
    from fastapi.testclient import TestClient
    from flwr.superlink import main as superlink_main

    monkeypatch.setattr(superlink_main, "load_control_authn_plugin", lambda: fi.shared_secret_authn_plugin(CONTROL))
    app = superlink_main.create_app()
    app.state.superexec_auth_secret = SECRET
    client = TestClient(app)
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    answered: dict[str, int] = {}
    for path in sorted(app.openapi()["paths"]):
        if path.startswith(("/v1/control/", "/v1/runtime/")):
            answered[path] = client.post(path, content=b"", headers=headers).status_code
    login_only = {"/v1/control/get-login-details", "/v1/control/get-auth-tokens"}  # answer "no login here"
    assert {"/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/acquire-task"} <= set(answered)
    assert {p: c for p, c in answered.items() if c != 401 and p not in login_only} == {}
    wrong = {**headers, "Authorization": "Bearer " + "0" * 66}
    assert client.post("/v1/control/list-runs", content=b"", headers=wrong).status_code == 401


def test_superexec_hands_the_task_token_over_in_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    monkeypatch.setattr(SubprocessExecutor, "launch", SubprocessExecutor.launch)  # restored afterwards
    token_dir = tmp_path / "tasks"
    token_dir.mkdir(mode=0o700)
    fi.pass_task_tokens_in_files(str(token_dir))
    started: list[list[str]] = []
    exited = threading.Event()

    class Child:
        def __init__(self, args: list[str], **_: Any) -> None:
            started.append(args)

        def wait(self) -> int:
            exited.wait(30)
            return 0

    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", Child)
    token = "ab" * 32
    spec = ExecutionSpec(
        task_type=TaskType.SERVER_APP,
        runtime_api_address="127.0.0.1:1",
        token=token,
        insecure=False,
        root_certificates_path="/ca.crt",
        runtime_dependency_install=False,
        parent_pid=123,
        suppress_output=True,
        task_id=1,
    )
    assert SubprocessExecutor().launch(spec).status == "accepted"
    (args,) = started
    assert args[0] == "flwr-serverapp" and token not in " ".join(args) and "--token" not in args
    token_file = Path(args[args.index("--token-file") + 1])
    assert token_file.parent == token_dir and token_file.read_text(encoding="utf-8") == token
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert args[args.index("--root-certificates") + 1] == "/ca.crt" and "123" in args
    exited.set()
    deadline = time.monotonic() + 10
    while token_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not token_file.exists()  # deleted once the ServerApp exits


def test_superlink_and_superexec_entry_points_take_every_option_fedguard_passes(tmp_path: Path) -> None:
    """``python -m server.superlink_launch superlink|superexec --help``: the patches, then Flower's parsers."""
    import os

    from server.superlink import SuperLink, TlsFiles

    secret = tmp_path / "control.secret"
    secret.write_text(CONTROL, encoding="utf-8")
    os.chmod(secret, 0o600)
    tasks = tmp_path / "tasks"
    tasks.mkdir(mode=0o700)
    link = SuperLink(tmp_path, TlsFiles(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key"), port=1)
    paths = {"FEDGUARD_CONTROL_SECRET_FILE": str(secret), "FEDGUARD_TASK_TOKEN_DIR": str(tasks)}
    env = flwr_env(tmp_path / "flwr-home", paths)
    for command in (link.command(), link.superexec_command(1)):
        which = command.index("server.superlink_launch") + 2
        proc = subprocess.run(
            [*command[:which], "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        for option in (arg for arg in command[which:] if arg.startswith("--") and arg != "--superexec-address"):
            assert option in proc.stdout, f"{command[which - 1]} no longer takes {option}"
    loose = subprocess.run(
        [*link.command()[:5], "--help"],
        cwd=ROOT,
        env={**env, "FEDGUARD_CONTROL_SECRET_FILE": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert loose.returncode != 0 and "not readable" in loose.stderr


# --- Nothing else touches Flower internals --------------------------------------------------------

#: Flower's documented app API; everything else goes through common/flower_internals.py.
PUBLIC = ("flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.simulation")


def test_no_product_module_outside_the_adapter_imports_flower_internals() -> None:
    offenders: list[str] = []
    for package in ("common", "server", "client", "fedguard"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "common" / "flower_internals.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and node.level == 0
                    else []
                )
                for name in names:
                    public = name in PUBLIC or name.startswith(tuple(p + "." for p in PUBLIC))
                    if name.split(".")[0] == "flwr" and not public:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not offenders, "Flower internals outside common/flower_internals.py:\n" + "\n".join(offenders)


def test_the_node_table_layout_server_start_reads_and_edits() -> None:
    """Flower 1.42's node rows: (node_id, status, public_key), unregistered rows kept with that status.

    The whole path (a key unregistered behind FedGuard's back, released and registered again) runs
    against a real SuperLink in tests/test_enrollment.py.
    """
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.state.schema.linkstate_models import Node

    columns = set(Node.__table__.columns.keys())
    assert Node.__tablename__ == "node" and {"node_id", "status", "public_key"} <= columns
    assert NodeStatus.UNREGISTERED == fi.NODE_UNREGISTERED


def test_simulation_dispatch_asks_only_nodes_with_mail_and_delivers_every_message() -> None:
    """1,000 registered virtual nodes, 3 undelivered messages: Flower's loop would scan the store 1,000
    times per sweep; the patched one asks the state for the 3 nodes only, one message per node per sweep."""
    import queue
    import threading
    from types import SimpleNamespace

    from flwr.server.superlink.fleet.vce import vce_api

    from common.flower_internals import fast_simulation_dispatch

    class State:
        def __init__(self) -> None:
            self.lock = threading.RLock()
            meta = [SimpleNamespace(dst_node_id=n, delivered_at="") for n in (5, 7, 7)]
            self.message_ins_store = {f"m{i}": SimpleNamespace(metadata=m) for i, m in enumerate(meta)}
            self.asked: list[int] = []

        def get_message_ins(self, node_id: int, limit: int) -> list:
            self.asked.append(node_id)
            with self.lock:
                for msg in self.message_ins_store.values():
                    if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                        msg.metadata.delivered_at = "now"
                        return [msg]
            return []

    fast_simulation_dispatch()
    fast_simulation_dispatch()  # idempotent
    state, out, stop = State(), queue.Queue(), threading.Event()
    worker = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, dict.fromkeys(range(1000)), stop))
    worker.start()
    got = [out.get(timeout=5) for _ in range(3)]
    stop.set()
    worker.join(timeout=5)
    assert sorted(m.metadata.dst_node_id for m in got) == [5, 7, 7]
    assert set(state.asked) == {5, 7}  # never the 997 nodes without a message


def test_the_simulation_dispatch_contract_holds() -> None:
    """What ``fast_simulation_dispatch`` relies on: Flower's run_api starts ``add_messages_to_queue`` by its
    module name, and the in-memory link state keeps its undelivered messages in ``message_ins_store``
    behind ``lock`` with ``delivered_at == ""``, handing them out through ``get_message_ins``."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    init = inspect.getsource(InMemoryLinkState.__init__)
    assert "self.message_ins_store" in init and "self.lock" in init
    getter = inspect.getsource(InMemoryLinkState.get_message_ins)
    assert 'delivered_at == ""' in getter and "_check_stored_messages" in getter
    assert list(inspect.signature(InMemoryLinkState.get_message_ins).parameters)[:3] == ["self", "node_id", "limit"]
