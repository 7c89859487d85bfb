"""Talking to nodes through Flower's Grid: waiting for them, pushing and polling, learning their roles.

FedGuard polls for replies itself (Flower's ``send_and_receive`` sleeps 3 s between pulls).
``MeteredGrid`` counts the bytes of every message pushed to and pulled from each node.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import records as R
from common.flower_internals import ErrorCode
from common.resources import message_bytes
from server.validation import Envelope

Progress = Callable[[str], None]
log = logging.getLogger("fedguard.server")


class MeteredGrid:
    """A Grid that counts, per node, the bytes of every message pushed to it and every reply pulled from it.

    Sizes are Flower's wire format (``common.resources.message_bytes``); everything else is the
    wrapped Grid's. ``take()`` hands over the counts since the last call: the server's exact,
    own figures for a round.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._sent: dict[int, int] = defaultdict(int)
        self._received: dict[int, int] = defaultdict(int)
        self._messages: dict[int, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        pushed = {str(i) for i in ids if i}
        for msg in messages:
            if msg.metadata.message_id in pushed:
                node = int(msg.metadata.dst_node_id)
                self._sent[node] += message_bytes(msg)
                self._messages[node] += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            self._received[node] += message_bytes(reply)
            self._messages[node] += 1
        return replies

    def take(self) -> dict[int, dict[str, int]]:
        """Node → {"sent", "received", "messages"} since the last ``take`` (bytes from the server's side)."""
        nodes = set(self._sent) | set(self._received)
        out = {
            n: {
                "sent": self._sent.get(n, 0),
                "received": self._received.get(n, 0),
                "messages": self._messages.get(n, 0),
            }
            for n in sorted(nodes)
        }
        self._sent.clear()
        self._received.clear()
        self._messages.clear()
        return out


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, progress: Progress) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        progress(f"waiting for nodes: {len(nodes)}/{wanted} online")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


#: Flower's answers for a message that expired before its node replied (TTL = the round's timeout).
_EXPIRED = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


def _lost_reason(reply: Message, dst_node: int) -> str | None:
    """Why a node dropped out, when ``reply`` is the SuperLink answering for it; None for a node's own reply.

    The SuperLink answers for a node whose heartbeats stopped (``NODE_UNAVAILABLE``, e.g. a SIGKILLed
    SuperNode) and for a message that outlived its TTL; either way the node went away, which the
    docs call ``dropped`` — not ``failed``, which is for a node that answered with an error.
    """
    if not reply.has_error():
        return None
    code = reply.error.code
    if code in _EXPIRED:
        return ""  # the message outlived its TTL (the round's timeout): the caller's "no reply within Ns"
    if code == ErrorCode.NODE_UNAVAILABLE or int(reply.metadata.src_node_id) != int(dst_node):
        return f"the node went offline (SuperLink: {reply.error.reason or 'node unavailable'})"
    return None


#: The first poll after a push (and after a reply), doubling up to the config's poll interval; None: every
#: poll waits the interval. Simulation sets 0.02 (``fedguard.simulate``: a pull there reads process memory);
#: a deployed ServerApp's pull is a round trip the SuperLink serves on the nodes' cores, so it keeps the interval.
FIRST_POLL_S: float | None = None


def collect_replies(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    poll: float,
    on_reply: Callable[[Message], None] | None = None,
    lost: dict[int, str] | None = None,
) -> tuple[list[Message], set[int], set[int]]:
    """Push, then poll until all replies arrive or ``timeout``; return replies, silent and unreachable nodes.

    With ``on_reply`` each reply is handed over as it arrives and not kept (the returned list is
    empty): the caller can validate and sum updates without holding a round's worth of them.
    Nodes the SuperLink reports gone (offline, or their message expired) count as silent (dropped);
    ``lost``, when given, receives node → the SuperLink's reason for them.
    """
    pushed = list(zip(grid.push_messages(messages), messages, strict=True))
    unreachable = {int(m.metadata.dst_node_id) for mid, m in pushed if not mid}
    dst = {mid: m.metadata.dst_node_id for mid, m in pushed if mid}
    pending, replies, expired = set(dst), [], set()
    deadline = time.monotonic() + timeout
    first = poll if FIRST_POLL_S is None else min(poll, FIRST_POLL_S)
    wait = first
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(list(pending)))
        # Poll fast right after the push and after each reply (more tend to follow), backing off to ``poll``.
        wait = first if pulled else min(poll, wait * 2)
        for reply in pulled:
            if reply.metadata.reply_to_message_id not in pending:
                log.warning("dropped a duplicate reply to message %s", reply.metadata.reply_to_message_id)
                continue  # only the first reply to a message counts
            rid = reply.metadata.reply_to_message_id
            pending.discard(rid)
            reason = _lost_reason(reply, int(dst[rid]))
            if reason is not None:  # the SuperLink answered for the node (under its own id): it dropped out
                expired.add(rid)
                if lost is not None:
                    lost[int(dst[rid])] = reason
                continue
            if on_reply is not None:
                on_reply(reply)
            else:
                replies.append(reply)
        if pending:
            time.sleep(wait)
    return replies, {int(dst[m]) for m in pending | expired}, unreachable


def registered_keys(grid: Grid) -> dict[int, bytes]:
    """Node id → the public key the SuperLink authenticated it with (empty without node auth)."""
    return {int(n.node_id): bytes(n.public_key) for n in grid.get_nodes()}


def discover_roles(
    grid: Grid,
    nodes: list[int],
    known: dict[int, str],
    base: dict[str, object],
    timeout: float,
    poll: float,
    node_keys: dict[int, bytes] | None,
    flower_run_id: int | None,
    names: dict[int, str] | None = None,
) -> dict[int, str]:
    """Ask nodes not yet known for their role (client or evaluator); the names nodes give go into ``names``
    (self-reported: ``Federation.learn_names`` takes them in simulation only, never in deployment).

    A node whose ClientApp has no role handler (Flower replies with an error) counts as a client,
    and so does a node that refuses (an unsigned run, its policy): it then refuses its training
    messages too, each refusal recorded with its reason in the run store where the operator sees
    it. Silent nodes and replies with a bad signature stay unknown and are asked again next round.
    """
    unknown = [n for n in nodes if n not in known]
    if unknown:
        messages = [
            Message(RecordDict({R.CONFIG: ConfigRecord(dict(base))}), dst_node_id=n, message_type="query.role")
            for n in unknown
        ]
        gate = Envelope(messages, node_keys, int(flower_run_id or 0), None)
        replies, _, _ = collect_replies(grid, messages, timeout, poll)
        for reply in replies:
            node, left_out = int(reply.metadata.src_node_id), gate.check(reply)
            if left_out is None and R.ROLE in reply.content:
                known[node] = str(reply.content[R.ROLE].get(R.ROLE_NAME, "client"))
                if names is not None and R.NODE_NAME in reply.content[R.ROLE]:
                    names[node] = str(reply.content[R.ROLE][R.NODE_NAME])
            elif left_out is not None and left_out.status == "rejected":
                log.warning("node %s: role reply ignored: %s", node, left_out.reason)
            else:  # no role handler (a Flower error), or a refusal: a client that will refuse its training too
                if left_out is not None and left_out.status == "refused":
                    log.warning("node %s refused the run: %s", node, left_out.reason)
                known[node] = "client"
    return known
