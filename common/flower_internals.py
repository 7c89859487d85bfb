"""Every use of Flower internals, in one module pinned to the Flower release it was written for.

FedGuard builds on Flower's public app API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.simulation``). A few things it needs exist only inside Flower, and Flower changes those
between minor releases without notice, so they live here and nowhere else:

- the SuperNode's local **Runtime API** client (``RuntimeApi``): FedGuard's node executor takes
  tasks itself instead of ``flwr-clientapp``, so it never installs the server's app bundle;
- three **patches of the SuperNode** (``clean_up_receives_of_stopped_runs``,
  ``take_over_crashed_session``, ``shorten_fleet_poll``) and its entry point
  (``run_flower_supernode``);
- two **patches of the SuperLink's SQL state** (``throttle_task_claim_sweeps``,
  ``serialize_state_sessions``) and its entry point (``run_flower_superlink``);
- Flower's **wire format** (``wire_object_sizes``, for the bytes a message costs), its **FlatClip**
  for central DP (``compute_clip_model_update``) and its **error-reply codes** (``ErrorCode``).

Importing this module refuses any Flower but ``FLOWER_RELEASE`` (a ``FlowerVersionError`` naming
both versions). ``tests/test_flower_internals.py`` holds one contract test per piece (the
signature, attribute or behaviour FedGuard relies on), so a Flower upgrade fails one clear test
per piece instead of a federation hanging in round 2. To upgrade: change ``FLOWER_RELEASE`` and
the ``flwr`` pin in ``pyproject.toml``, run those tests, and fix what they name.

Heavy internals (the Runtime API client, the SuperNode) are imported inside the functions that
use them: the server and the ClientApp import this module too and must not pay for them.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import Context, Message
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares  # noqa: F401
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (  # noqa: F401
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: F401
from flwr.common.secure_aggregation.secaggplus_utils import (  # noqa: F401
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (  # noqa: F401
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.errors import FedGuardError

# The secure-aggregation imports above are Flower's SecAgg+ building blocks (Shamir sharing, ECDH key
# agreement with symmetric encryption, quantization, the share framing), re-exported for
# common/secagg.py: FedGuard drives the protocol's steps itself (Flower's workflow needs its legacy
# context) but writes none of the cryptography.


def plain_flower_console() -> None:
    """Flower's console log handler without colour codes (its level names are coloured on any stream)."""
    from flwr.common.logger import update_console_handler

    update_console_handler(colored=False)


#: The Flower release (major.minor) this module was written and tested against.
FLOWER_RELEASE = "1.42"


class FlowerVersionError(FedGuardError):
    """The installed Flower is not the release FedGuard's use of its internals was written for."""

    code = "flower-version"


def installed_flower_version() -> str:
    """The version of the Flower package this process imported."""
    return str(flwr.__version__)


def check_flower_version(installed: str | None = None) -> str:
    """Return the installed Flower version; raise ``FlowerVersionError`` unless it is ``FLOWER_RELEASE``.*."""
    version = installed_flower_version() if installed is None else installed
    if version.split(".")[:2] != FLOWER_RELEASE.split("."):
        raise FlowerVersionError(
            f"Flower {version} is installed, but FedGuard is written for Flower {FLOWER_RELEASE}.* "
            "(it relies on Flower internals that change between releases)",
            where=f"flwr in {sys.prefix}",
            fix=f"pip install 'flwr[simulation]=={FLOWER_RELEASE}.*' (or reinstall FedGuard, which pins it)",
        )
    return version


check_flower_version()


# --- Error-reply codes (flwr.common.constant.ErrorCode) ------------------------------------------


class ErrorCode:
    """The Flower error-reply codes FedGuard sends or reads.

    Written out rather than imported: they travel on the wire, so a node and a server on
    different Flower releases must agree on the numbers (the contract test checks Flower's).
    """

    CLIENT_APP_RAISED_EXCEPTION = 2
    MESSAGE_UNAVAILABLE = 3
    REPLY_MESSAGE_UNAVAILABLE = 4
    NODE_UNAVAILABLE = 5
    INVALID_FAB = 7


# --- Wire format and central DP ------------------------------------------------------------------


def wire_object_sizes(message: Message) -> dict[str, int]:
    """Object id → serialized size of each object a message travels as.

    A Flower message travels as a tree of objects (its metadata, RecordDict, each record, each
    array and its ≤5 MB chunks), each serialized by ``deflate()`` and sent once per message.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {object_id: len(obj.deflate()) for object_id, obj in get_all_nested_objects(message).items()}


def compute_clip_model_update(params: list[np.ndarray], reference: list[np.ndarray], clipping_norm: float) -> None:
    """Clip ``params - reference`` to L2 norm ``clipping_norm``, in place in ``params`` (Flower's FlatClip).

    Flower's own implementation, so FedGuard's central DP clips exactly like Flower's DP strategies.
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update as flower_clip

    flower_clip(params, reference, clipping_norm)


# --- The SuperNode's local Runtime API (what flwr-clientapp uses) --------------------------------

#: The Runtime API method that a SuperExec secret signs (the SuperNode checks the signature).
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"


class RuntimeApiRejected(FedGuardError):
    """The SuperNode's Runtime API refused this process's credentials (HTTP 401 or 403)."""

    code = "runtime-api-rejected"


@dataclass(frozen=True)
class ClaimedTask:
    """A ClientApp task this process claimed: its token authenticates every later call."""

    token: str
    task_id: int
    run_id: int


@dataclass(frozen=True)
class TaskInput:
    """What a claimed task carries: the message, the node's context, and the run's app bundle (bytes only)."""

    message: Message
    context: Context
    fab_content: bytes
    fab_id: str
    fab_version: str


def _retry_invoker() -> Any:
    """Retry transport errors and 502/503/504 for up to 30 s; give up on any other HTTP status.

    Flower's ``make_simple_http_retry_invoker`` is made for one-task processes: on a 401 it sends
    SIGINT to its own process and it retries transport errors forever. A long-lived executor must
    survive an expired task token and report a rejected SuperExec secret instead.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential, full_jitter

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in (502, 503, 504)

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.2, max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=30.0,
        jitter=full_jitter,
        should_giveup=give_up,
    )


class RuntimeApi:
    """A protobuf-over-HTTP client of one SuperNode's local Runtime API (plain HTTP on loopback).

    ``for_executor`` acquires tasks (HMAC-signed with the node's SuperExec secret, so no other
    local process can take them); ``for_task`` serves one claimed task, bound by its token.
    """

    def __init__(self, address: str, interceptors: list[Any]) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = address
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
            retry_invoker=_retry_invoker(),
        )

    @classmethod
    def for_executor(cls, address: str, auth_secret: bytes | None) -> RuntimeApi:
        """The client that acquires tasks; AcquireTask is signed when the node uses a SuperExec secret."""
        interceptors: list[Any] = []
        if auth_secret:
            from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=auth_secret, protected_methods=frozenset({ACQUIRE_TASK_METHOD})
                )
            )
        return cls(address, interceptors)

    @classmethod
    def for_task(cls, address: str, token: str) -> RuntimeApi:
        """A client bound to one claimed task by its token."""
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor

        return cls(address, [RuntimeTokenHttpInterceptor(token)])

    def close(self) -> None:
        self._client.close()

    def acquire_task(self) -> ClaimedTask | None:
        """Claim the oldest pending ClientApp task, or None when there is none."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        try:
            res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (401, 403):
                raise RuntimeApiRejected(
                    f"the SuperNode's Runtime API rejected this process (HTTP {exc.response.status_code})",
                    where=self.address,
                    fix="start the executor with the same --superexec-auth-secret-file as the SuperNode",
                ) from None
            raise
        if not res.HasField("task") or not res.token:
            return None
        return ClaimedTask(res.token, int(res.task.task_id), int(res.task.run_id))

    def pull_task_input(self) -> TaskInput:
        """Message, context and app bundle of the claimed task. Pulls bytes only; installs nothing.

        Mirrors Flower's ``supernode.runtime.run_clientapp.pull_task_input`` but retries objects the
        SuperNode is still downloading after 20 ms instead of Flower's 1 s initial backoff (a task
        is claimable before its message body has arrived; a fresh ``flwr-clientapp`` hid that wait).
        """
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        client = self._client
        res = client.PullTaskInput(PullTaskInputRequest())
        context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("the SuperNode returned no message for this task")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
            max_tries_per_object=None,  # bounded by Flower's max_time (2 h) instead
            initial_backoff=0.02,
            backoff_cap=0.5,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message lacks its own id
        return TaskInput(message, context, bytes(fab.content), str(run.fab_id), str(run.fab_version))

    def push_reply(self, reply: Message, context: Context) -> None:
        """Send the reply message (and its objects) to the SuperNode."""
        from flwr.supernode.runtime.run_clientapp import push_message

        push_message(self._client, reply, context)

    def finish_task(self, context: Context | None, completed: bool, details: str) -> None:
        """Finish the task; the SuperNode stores ``context`` as the run's node state for the next message."""
        from flwr.common.constant import SubStatus
        from flwr.supernode.runtime.run_clientapp import push_task_output

        push_task_output(self._client, context, SubStatus.COMPLETED if completed else SubStatus.FAILED, details)

    def heartbeat(self) -> bool:
        """Keep the task token alive; False when the SuperNode no longer knows the task."""
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

        return bool(self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)


# --- Flower's SuperNode and FedGuard's patches of it (applied in the SuperNode's own process) ----


def clean_up_receives_of_stopped_runs() -> None:
    """A message whose run stops while its body is being received must not wedge the node.

    flwr 1.42 ``supernode/start_client_internal._pull_and_store_message`` creates the task and
    stores the (empty) message *before* pulling the message's objects. When the SuperLink then
    says the run is no longer running (it crashed mid-round and was restarted, or the run was
    stopped), ``RunNotRunningException`` (a ``BaseException``) skips the clean-up that every other
    failure gets: the task stays claimable and its objects stay announced but never arrive, so
    the executor that claimed it waits for them (for up to two hours) and the node takes no
    further message. Turning that exception into an ordinary error once the task exists runs
    Flower's own clean-up (delete the message and its objects, finish the task as failed).
    Idempotent.
    """
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.run import RunNotRunningException

    if getattr(sci._pull_and_store_message, "_fedguard_patched", False):
        return
    original = sci._pull_and_store_message

    def as_error(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RunNotRunningException:
                raise RuntimeError("the run is no longer running at the SuperLink") from None

        return call

    @functools.wraps(original)
    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        # Both are called only after the task was created (pull_object via pull_objects).
        for name in ("pull_object", "confirm_message_received"):
            if name in kwargs:
                kwargs[name] = as_error(kwargs[name])
        return original(*args, **kwargs)

    pull_and_store._fedguard_patched = True  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull_and_store  # type: ignore[assignment]


def take_over_crashed_session(node_id: int) -> None:
    """Let a node restarted after a crash in at once, instead of a minute later.

    The SuperLink (flwr 1.42) activates a node only if it is not online, and a node that was
    killed stays online until it misses two 30 s heartbeats. A launcher that finds its own
    crashed session starts the SuperNode with this patch: if activation is refused, the node
    signs its old session off (DeactivateNode for its own node id, signed with its own key) and
    activates again. Never used when the previous SuperNode of the workdir is still running, so
    one live instance is never pushed out by another.
    """
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supernode.fleet_http_client import FleetHttpClient

    original = FleetHttpClient.ActivateNode

    def activate(self: FleetHttpClient, request: Any) -> Any:
        try:
            return original(self, request)
        except httpx.HTTPStatusError as refused:
            try:
                self.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
            except httpx.HTTPError:
                raise refused from None
            return original(self, request)

    FleetHttpClient.ActivateNode = activate  # type: ignore[method-assign]


#: After the node handled a message, it pulls every BUSY_POLL_S for BUSY_WINDOW_S: in a run the next round's
#: message comes seconds after the reply, and an idle node still polls at the slower interval.
BUSY_POLL_S = 0.25
BUSY_WINDOW_S = 5.0


def shorten_fleet_poll(interval: float, busy: float = BUSY_POLL_S, window: float = BUSY_WINDOW_S) -> None:
    """Experimental: shorten flower-supernode's hard-coded sleeps, in this process only.

    flwr 1.42 ``supernode/start_client_internal.py`` sleeps 3 s after an empty pull and 0.5 s
    while waiting for a reply (module-level ``time.sleep`` calls), and retries message objects
    the ServerApp is still uploading after 1 s, 2 s, 4 s ... (``pull_objects``); all three are
    shortened here. The wait after an empty pull adapts: ``busy`` for ``window`` seconds after the
    node last waited for a reply (it is in a run: the next round's message is due), else ``interval``.
    """
    import time as _time

    import flwr.supernode.start_client_internal as sci

    last_reply_wait = [-float("inf")]

    class _Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            now = _time.monotonic()
            if seconds < 3:  # waiting for the ClientApp's reply (or a reply object): the node is in a run
                last_reply_wait[0] = now
                _time.sleep(min(seconds, 0.1))
            else:  # after an empty pull
                _time.sleep(min(busy, interval) if now - last_reply_wait[0] < window else interval)

    sci.time = _Clock()  # type: ignore[assignment]
    sci.pull_objects = functools.partial(  # type: ignore[assignment]
        sci.pull_objects, initial_backoff=0.05, backoff_cap=1.0
    )


def fast_reply_pulls() -> None:
    """The ServerApp retries reply objects a node is still uploading after 20 ms, not 1 s/2 s/4 s.

    flwr 1.42 ``HttpGrid.pull_messages`` calls ``pull_objects`` with its default backoff; the
    ServerApp polls every 0.2 s, so it nearly always meets a reply mid-upload and then sleeps a
    whole second (bench/round_overhead.py: 2.5 s → 1.75 s per round with 3 nodes). In-process
    only; a no-op where the HTTP grid is absent (simulation).
    """
    try:
        import flwr.superlink.grid.http_grid as http_grid
    except ImportError:
        return
    if getattr(http_grid.pull_objects, "_fedguard_fast", False):
        return
    fast = functools.partial(http_grid.pull_objects, initial_backoff=0.02, backoff_cap=0.5)
    fast._fedguard_fast = True  # type: ignore[attr-defined]
    http_grid.pull_objects = fast  # type: ignore[assignment]


#: How often the simulation engine looks for new messages (Flower: 0.1 s).
SIMULATION_DISPATCH_S = 0.02


def fast_simulation_dispatch() -> None:
    """Flower's simulation engine hands messages to its workers faster and without a sweep over every node.

    flwr 1.42 ``vce_api.add_messages_to_queue`` asks the link state for one message per *registered*
    node every 0.1 s; each ask scans every stored message under the state's lock, so a sweep costs
    O(nodes × messages) and, with 1,000 virtual nodes, holds the lock the ServerApp needs to push and
    pull. The replacement first lists the nodes that have an undelivered message (one scan, reading
    metadata only), then asks Flower's own ``get_message_ins`` for just those (its expiry and
    federation checks unchanged, still one message per node per sweep), every 20 ms. A state without
    the in-memory store (not what simulation uses) keeps Flower's loop. In-process; idempotent.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api.add_messages_to_queue, "_fedguard_fast", False):
        return
    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        store = getattr(state, "message_ins_store", None)
        if store is None or not hasattr(state, "lock"):
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                waiting = {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}
            for node_id in waiting & nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(SIMULATION_DISPATCH_S)

    add_messages_to_queue._fedguard_fast = True  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue


def run_flower_supernode(argv: list[str]) -> None:
    """Run ``flower-supernode ARGV`` in this process (after any patches above); returns when it stops."""
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


# --- The SuperLink's Control and Runtime APIs: only FedGuard's server process may use them --------
#
# Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port; the Control API asks no
# credentials (NoOpControlAuthnPlugin) and, in its default subprocess isolation, the Runtime API
# hands a task token to whoever asks first. FedGuard closes both: the SuperLink runs with a
# shared-secret Control authn plugin (the ``flwr`` CLI sends the secret as an OIDC bearer token from
# FLWR_HOME/credentials.yaml) and in process isolation with a SuperExec HMAC secret, and the SuperExec
# FedGuard starts hands each ServerApp its task token in a 0600 file, never on a command line.

#: Shortest Control API secret the plugin accepts (hex characters).
CONTROL_SECRET_MIN_LENGTH = 32
#: Where the ``flwr`` CLI keeps account credentials, relative to FLWR_HOME (flwr/cli/constant.py).
CLI_CREDENTIALS_FILE = "credentials.yaml"
# flwr/cli/constant.py AUTHN_TYPE_STORE_KEY, ACCESS_TOKEN_STORE_KEY, REFRESH_TOKEN_STORE_KEY.
_CLI_AUTHN_TYPE_KEY = "flower.account-auth.%s.authn-type"
_CLI_ACCESS_TOKEN_KEY = "flower.account-auth.%s.oidc-access-token"
_CLI_REFRESH_TOKEN_KEY = "flower.account-auth.%s.oidc-refresh-token"
#: Phrases the ``flwr`` CLI prints when the Control API refuses its credentials.
CLI_AUTH_FAILED = ("authentication failed", "flwr login")


def cli_credentials(address: str, secret: str) -> dict[str, str]:
    """The ``credentials.yaml`` entries that make the stock ``flwr`` CLI send ``secret`` to ``address``.

    Authn type ``oidc`` makes the CLI load its OIDC plugin, whose access token goes out as
    ``Authorization: Bearer``; the refresh token only has to be non-empty (refreshing is refused).
    Values are base64, as Flower's ``FileCredentialStore`` stores them; the file is YAML, so JSON works.
    """
    import base64

    def b64(value: str) -> str:
        return base64.b64encode(value.encode("utf-8")).decode("ascii")

    return {
        _CLI_AUTHN_TYPE_KEY % address: b64("oidc"),
        _CLI_ACCESS_TOKEN_KEY % address: b64(secret),
        _CLI_REFRESH_TOKEN_KEY % address: b64(secret),
    }


def shared_secret_authn_plugin(secret: str) -> Any:
    """A Flower ``ControlAuthnPlugin`` that accepts a Control API call only with ``Bearer <secret>``.

    Constant-time comparison; no login flow, no token issuing, no refresh. The accepted identity
    is Flower's NoOp account, so runs keep the owner they had without the plugin.
    """
    import hmac
    from collections.abc import Sequence

    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.utils import get_metadata_str
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    if len(secret) < CONTROL_SECRET_MIN_LENGTH:
        raise ValueError(f"the Control API secret must have at least {CONTROL_SECRET_MIN_LENGTH} characters")
    expected = secret.encode("utf-8")

    class SharedSecretControlAuthnPlugin(ControlAuthnPlugin):  # type: ignore[misc]
        def __init__(self) -> None:
            pass

        def get_login_details(self) -> None:
            return None  # `flwr login` gets nothing: there is no device flow to start

        def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool, Any]:
            token = get_metadata_str(metadata, ACCESS_TOKEN_KEY)
            if token and hmac.compare_digest(token.encode("utf-8"), expected):
                return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
            return False, None

        def get_auth_tokens(self, device_code: str) -> None:
            return None  # never hands out tokens

        def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[list[Any], None]:
            return [], None  # a refresh always fails

    return SharedSecretControlAuthnPlugin()


def run_flower_superlink(argv: list[str], control_secret: str) -> None:
    """Run ``flower-superlink ARGV`` in this process with the shared-secret Control authn plugin.

    flwr 1.42 ``superlink/cli/flower_superlink.py`` imports ``load_control_authn_plugin`` by name and
    calls it once while parsing its start-up configuration; the plugin ends up in the FastAPI app.
    """
    import importlib

    # The package re-exports a function of the same name: import the module itself.
    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")
    plugin = shared_secret_authn_plugin(control_secret)
    fsl.load_control_authn_plugin = lambda: plugin  # type: ignore[attr-defined]
    throttle_task_claim_sweeps()
    serialize_state_sessions()
    sys.argv = ["flower-superlink", *argv]
    fsl.flower_superlink()


#: The SuperLink sweeps expired task claims at most this often (flwr 1.42: before nearly every read).
TASK_CLAIM_SWEEP_S = 0.5


def throttle_task_claim_sweeps(interval: float = TASK_CLAIM_SWEEP_S) -> None:
    """The SuperLink's SQL state sweeps expired task claims at most every ``interval`` seconds.

    flwr 1.42 ``SqlCoreState._cleanup_expired_task_tokens`` (two UPDATE statements, so a write
    transaction on the state database) runs before nearly every state read — on every Fleet
    request of every node, through ``check_abort`` → ``get_run_status``, so concurrent requests
    queue on SQLite's single write lock. With 10 nodes fetching a round's messages at once, a sixth
    of the SuperLink's busy samples were in this sweep (py-spy; bench/README.md, Round overhead).
    Safe to space out: a task token is checked against its own expiry on every use
    (``get_task_by_token``), so an expired claim is never honoured; only the bookkeeping of expired
    claims (back to pending, or marked failed) may happen up to ``interval`` later. In-process only.
    """
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    original = SqlCoreState._cleanup_expired_task_tokens
    if getattr(original, "_fedguard_throttled", False):
        return
    lock, last = threading.Lock(), [float("-inf")]

    def sweep(self: Any) -> None:
        t = time.monotonic()
        with lock:
            if t - last[0] < interval:
                return
            last[0] = t
        original(self)

    sweep._fedguard_throttled = True  # type: ignore[attr-defined]
    SqlCoreState._cleanup_expired_task_tokens = sweep  # type: ignore[method-assign]


def serialize_state_sessions() -> None:
    """The SuperLink's SQL state runs one database session at a time (a process-wide lock).

    flwr 1.42 serves each Fleet, ServerAppIo and Control request in a worker thread with its own
    SQLite session on the one state file. When write transactions collide, SQLite's busy handler
    puts the loser to sleep (1, 2, 5, 10 … 100 ms steps, up to ``busy_timeout``) instead of queueing
    it. In a 10-node round the ServerApp's upload of the round's objects met the nodes' object pulls
    (each a write: Flower records its traffic) and nodes retrying objects not yet uploaded: requests
    took 0.3–0.6 s each, the upload of 15 small objects 2–8 s (bench/README.md, Round overhead).
    With a lock around each session, requests wait their turn in the process instead of sleeping in
    SQLite. The GIL already runs one request's Python at a time; SQLite still guards the file
    against other processes. Re-entrant: a nested session in one thread (Flower reuses the outer
    one) passes. In-process only (the SuperLink's).
    """
    import contextlib
    from collections.abc import Iterator

    from flwr.supercore.sql_mixin import SqlMixin

    original = SqlMixin.session
    if getattr(original, "_fedguard_serialized", False):
        return
    lock = threading.RLock()

    @contextlib.contextmanager
    def session(self: Any) -> Iterator[Any]:
        with lock, original(self) as opened:
            yield opened

    session._fedguard_serialized = True  # type: ignore[attr-defined]
    SqlMixin.session = session  # type: ignore[method-assign]


def pass_task_tokens_in_files(token_dir: str) -> None:
    """Make SuperExec's subprocess executor hand the task token over in a file, not on the command line.

    flwr 1.42 ``SubprocessExecutor.launch`` starts ``flwr-serverapp ... --token TOKEN``: every user
    of the host reads it in /proc/PID/cmdline and can then act as that ServerApp on the Runtime API.
    Here the token goes into a 0600 file in ``token_dir`` (0700) and the child gets ``--token-file``;
    the file is deleted when the child exits. Calling it again replaces the patch (new ``token_dir``).
    """
    import contextlib
    import os
    import subprocess
    import tempfile
    import threading

    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    def launch(self: Any, spec: Any) -> Any:
        fd, path = tempfile.mkstemp(dir=token_dir, prefix="task-")  # O_EXCL, 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(spec.token)
        args = [
            TASK_TYPE_TO_COMMAND[spec.task_type],
            TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address,
            "--token-file",
            path,
        ]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        out = subprocess.DEVNULL if spec.suppress_output else None
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=out)
        except BaseException:
            os.unlink(path)
            raise

        def reap() -> None:
            proc.wait()
            with contextlib.suppress(OSError):
                os.unlink(path)

        threading.Thread(target=reap, daemon=True, name="fedguard-token-reaper").start()
        return LaunchResult.accepted()

    SubprocessExecutor.launch = launch  # type: ignore[method-assign]


def run_flower_superexec(argv: list[str], token_dir: str) -> None:
    """Run ``flower-superexec ARGV`` in this process, task tokens passed in files (see above)."""
    import importlib

    pass_task_tokens_in_files(token_dir)
    sys.argv = ["flower-superexec", *argv]
    importlib.import_module("flwr.supercore.cli.flower_superexec").flower_superexec()


# -- The SuperLink's node table (server start's registry reconciliation) ---------------------------
#
# Flower's Control API neither lists other accounts' nodes with their keys nor lets a key that was
# once unregistered be registered again (``node.public_key`` is UNIQUE and unregistered rows stay).
# ``fedguard server start`` therefore reads, and for that one case edits, the SuperLink's SQLite
# state directly. The layout is Flower 1.42's ``flwr.supercore.state.schema.linkstate_models.Node``.

NODE_UNREGISTERED = "unregistered"  # flwr.supercore.constant.NodeStatus.UNREGISTERED


def read_node_table(database: Path) -> list[tuple[int, str, bytes]]:
    """(node id as uint64, status, public key bytes) of every row of the SuperLink's node table."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        rows = db.execute("SELECT node_id, status, public_key FROM node").fetchall()
    # Flower stores uint64 node ids as sint64.
    return [(int(n) % (1 << 64), str(s), bytes(k or b"")) for n, s, k in rows]


def forget_unregistered_node(database: Path, node_id: int) -> None:
    """Delete an *unregistered* node's row so its key can be registered again (nothing else is touched)."""
    import contextlib
    import sqlite3

    sint64 = node_id - (1 << 64) if node_id >= (1 << 63) else node_id
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as db, db:
        db.execute("DELETE FROM node WHERE node_id=? AND status=?", (sint64, NODE_UNREGISTERED))
