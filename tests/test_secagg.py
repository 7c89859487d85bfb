"""Threshold secure aggregation on the real ClientApp and the server's real round protocol, in process.

Real key agreement, Shamir shares, sealed shares, masks, DP-SGD and reply signatures; only the
transport is skipped: :class:`LoopbackGrid` hands each message to the node's ClientApp and keeps
everything the server saw (the transcript an attacking server holds). The deployed test runs the
same over TLS.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from client import secagg_node
from client.app import app as client_app
from common import records as R
from common import secagg as S
from common.config import RunConfig
from common.errors import ConfigError
from common.flower_internals import ErrorCode
from common.he_custody import flatten_state, trainable_keys
from common.reply_signing import sign_reply
from server.grid_io import MeteredGrid
from server.rounds.base import Federation
from server.rounds.secagg import SecAggRounds
from server.validation import Outcome
from tests.helpers import global_state, make_tabular, node_context, node_keypair, tabular_config

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(600)]

NODES = [101, 202, 303, 404]  # t = 3 (a majority of 4)


class LoopbackGrid:
    """A Grid whose nodes are ClientApps in this process: each pushed message is answered at once.

    ``silent[message type]`` lists nodes gone before that message (the SuperLink answers for
    them, as it does for a node whose heartbeats stopped); ``tamper``
    rewrites a reply before the server pulls it (a forger on the path); ``seen`` is every message
    the server sent and every reply it received.
    """

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.silent: dict[str, set[int]] = {}
        self.tamper: Callable[[Message], Message] | None = None
        self.seen: list[Message] = []
        self._ready: dict[str, list[Message]] = {}
        self._count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"msg-{self._count}"
            self.seen.append(msg)
            node = int(msg.metadata.dst_node_id)
            ids.append(msg.metadata.message_id)
            if node in self.silent.get(msg.metadata.message_type, set()):
                gone = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=msg)
                self._ready[msg.metadata.message_id] = [gone]
                continue
            reply = client_app(msg, self.contexts[node])
            self._ready[msg.metadata.message_id] = [self.tamper(reply) if self.tamper else reply]
        return ids

    def pull_messages(self, ids: Any) -> list[Message]:
        out = []
        for mid in ids:
            out += self._ready.pop(mid, [])
        self.seen += out
        return out


@pytest.fixture
def fed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Four client nodes with their own keys and data; the server's protocol over a loopback grid."""
    cfg = tabular_config(
        clients_per_round=4,
        secure_aggregation="secagg",
        fairness={"federated_counts": False},
    )
    keys, contexts = {}, {}
    for i, node in enumerate(NODES):
        private, public = node_keypair()
        (tmp_path / f"{node}.key").write_bytes(private)
        keys[node] = public
        data = tmp_path / f"{node}.csv"
        make_tabular(300 + 100 * i, seed=i).to_csv(data, index=False)
        contexts[node] = node_context(data, tmp_path / f"node-{node}", auth_key_path=str(tmp_path / f"{node}.key"))
    grid = LoopbackGrid(contexts)
    federation = Federation(
        MeteredGrid(grid), cfg, None, 1, 1, {R.RUN_CONFIG: cfg.to_json(), R.RUN_UID: "run-secagg"},  # type: ignore[arg-type]
        signed=True, evaluator_key="", meter=None, progress=print, rng=np.random.default_rng(0), node_keys=keys,  # type: ignore[arg-type]
    )  # fmt: skip
    # What each node trained (the spy keeps the arguments; the real function masks them).
    trained: dict[int, dict[str, Any]] = {}
    real = secagg_node.masked_update

    def spy(msg: Message, context: Context, cfg: RunConfig, settings: Any, new: Any, old: Any) -> Any:
        node = int(msg.metadata.dst_node_id)
        trained[node] = {"new": new, "old": old, "secrets": dict(context.state[secagg_node.STATE])}
        return real(msg, context, cfg, settings, new, old)

    monkeypatch.setattr(secagg_node, "masked_update", spy)
    return {"cfg": cfg, "grid": grid, "rounds": SecAggRounds(federation, global_state(cfg)), "trained": trained}


def play(fed: dict[str, Any], rnd: int = 1, silent_in_training: set[int] = frozenset()) -> tuple[Any, list[Outcome]]:
    """One round as the engine plays it: configure, deliver, accept each reply, aggregate."""
    rounds, grid = fed["rounds"], fed["grid"]
    before = rounds.state
    grid.silent["train"] = set(silent_in_training)
    messages, outcomes = rounds.configure_train(rnd, NODES)
    gate = rounds.fed.envelope(messages, rnd)
    ids = grid.push_messages(messages)
    for reply in grid.pull_messages(ids):
        outcomes.append(gate.check(reply) or rounds.accept(reply))
    result = rounds.aggregate(rnd, outcomes, 1)
    fed["before"] = before
    return result, outcomes


def fedavg(fed: dict[str, Any], nodes: list[int]) -> np.ndarray:
    """Plaintext FedAvg of the nodes' trained models (what plaintext mode would compute), flattened."""
    keys = trainable_keys(fed["before"])
    weights = {n: fed["rounds"].session.weights[n] for n in nodes}
    total = sum(weights[n] * flatten_state(fed["trained"][n]["new"], keys) for n in nodes)
    return total / sum(weights.values())


def flat(state: OrderedDict[str, np.ndarray]) -> np.ndarray:
    return flatten_state(state, trainable_keys(state))


def test_the_unmasked_sum_is_plaintext_fedavg_within_the_stated_error(fed: dict[str, Any]) -> None:
    result, outcomes = play(fed)
    assert result.updated and not result.discarded, result
    assert sorted(o.node_id for o in outcomes if o.status == "accepted") == NODES
    info = result.meta["secagg"]
    assert info["threshold"] == 3 and info["contributors"] == 4 and info["dropped_before_sending"] == 0
    error = np.abs(flat(fed["rounds"].state) - fedavg(fed, NODES)).max()
    assert 0 < error <= info["error_bound"] < 1e-4, (error, info["error_bound"])
    assert fed["rounds"].state is not fed["before"]


def test_a_node_that_drops_after_masking_is_recovered_from_the_others_shares(fed: dict[str, Any]) -> None:
    fed["grid"].silent["query.secagg_unmask"] = {NODES[0]}
    result, outcomes = play(fed)
    assert result.updated, result.discarded
    assert result.meta["secagg"]["recovered_from_shares"] == 1
    assert "unmasked from t peers' shares" in next(o.reason for o in outcomes if o.node_id == NODES[0])
    error = np.abs(flat(fed["rounds"].state) - fedavg(fed, NODES)).max()
    assert error <= result.meta["secagg"]["error_bound"]


def test_a_node_that_drops_before_sending_is_not_in_the_sum(fed: dict[str, Any]) -> None:
    result, _ = play(fed, silent_in_training={NODES[1]})
    assert result.updated, result.discarded
    assert result.meta["secagg"]["dropped_before_sending"] == 1
    others = [n for n in NODES if n != NODES[1]]
    error = np.abs(flat(fed["rounds"].state) - fedavg(fed, others)).max()
    assert error <= result.meta["secagg"]["error_bound"]


def test_the_round_discards_with_its_reason_when_fewer_than_t_remain(fed: dict[str, Any]) -> None:
    fed["grid"].silent["query.secagg_unmask"] = {NODES[0], NODES[1]}
    result, _ = play(fed)
    assert not result.updated
    assert result.discarded.startswith("only 2 node(s) revealed shares; t=3 are needed")
    assert fed["rounds"].state is fed["before"]  # the global model is unchanged


def _attack(fed: dict[str, Any], victim: int, sk_shares: list[bytes]) -> np.ndarray | None:
    """The server's best reconstruction of ``victim``'s update from its transcript and ``sk_shares``.

    From the transcript: the victim's masked vector, the peers' mask keys and, since the victim's
    vector arrived, t shares of its self-mask seed. The pairwise masks need the victim's mask key,
    interpolated from ``sk_shares`` (the colluding nodes' shares of it); None when that is no key.
    """
    s, cfg = fed["rounds"].session, fed["cfg"]
    sent = {m.metadata.message_id: m for m in fed["grid"].seen if not m.metadata.reply_to_message_id}
    replies = [m for m in fed["grid"].seen if m.metadata.reply_to_message_id]
    masked = next(
        r.content[S.SECAGG_MASKED][S.MASKED_VECTOR].numpy()
        for r in replies
        if int(r.metadata.src_node_id) == victim and S.SECAGG_MASKED in r.content
    )
    b_shares = []
    for r in replies:
        if sent[r.metadata.reply_to_message_id].metadata.message_type == "query.secagg_unmask":
            rec = r.content[S.SECAGG]
            b_shares += [bytes(sh) for n, sh in zip(rec[S.SHARE_NODES], rec[S.SHARES], strict=True) if n == victim]
    vector = masked - S.self_mask(S.reconstruct(b_shares, s.threshold, "b"), s.id, masked.size)
    try:
        sk1 = S.combine_shares(sk_shares)  # Lagrange interpolation of whatever shares the coalition holds
        for peer in s.shared:
            if peer != victim:
                m = S.pair_mask(S.shared_key(sk1, s.pk1[peer]), s.id, masked.size)
                vector = vector - m if victim > peer else vector + m
    except ValueError:  # the interpolated bytes are not a private key
        return None
    values, _ = S.decode(vector, 1, s.weight_max, cfg.secagg.clipping_range, cfg.secagg.quantization_range)
    return values  # decode divides by the victim's own weight share: Δ itself


def test_one_node_with_the_server_cannot_read_another_update_but_t_nodes_could(fed: dict[str, Any]) -> None:
    result, _ = play(fed)
    assert result.updated
    victim, colluders = NODES[0], NODES[1:]
    truth = flat(fed["trained"][victim]["new"]) - flat(fed["before"])

    def share_of(colluder: int) -> bytes:
        held = fed["trained"][colluder]["secrets"]  # kept before the node wiped them, as a dishonest node would
        return bytes(held["held-sk"][[int(n) for n in held["held-from"]].index(victim)])

    for coalition in ([colluders[0]], colluders[:2]):  # the server with 1 or t-1 = 2 nodes
        guess = _attack(fed, victim, [share_of(c) for c in coalition])
        assert guess is None or np.abs(guess - truth).mean() > 0.1
    # The same attack with t = 3 colluders' shares reads the update: the test above could fail.
    recovered = _attack(fed, victim, [share_of(c) for c in colluders])
    assert recovered is not None and np.abs(recovered - truth).max() < 1e-4


def _refusal(reply: Message) -> str:
    assert R.REFUSAL in reply.content, reply.content
    return str(reply.content[R.REFUSAL][R.REFUSAL_CODE])


def test_forged_and_replayed_protocol_messages_are_refused(fed: dict[str, Any], tmp_path: Path) -> None:
    grid, forger = fed["grid"], tmp_path / f"{NODES[1]}.key"

    def forge(reply: Message) -> Message:  # node 202's key signs node 101's advertisement with other keys
        if int(reply.metadata.src_node_id) != NODES[0] or S.SECAGG not in reply.content:
            return reply
        if S.PK1 not in reply.content[S.SECAGG]:
            return reply
        content = RecordDict({k: v for k, v in reply.content.items() if k != R.SIGNATURE})
        keys = S.new_key_pairs()
        content[S.SECAGG] = ConfigRecord({S.PK1: keys.pk1, S.PK2: keys.pk2, S.WEIGHT: 400})
        sign_reply(content, forger.read_bytes(), 1, 1, reply.metadata.reply_to_message_id)
        return Message(
            content, reply_to=next(m for m in grid.seen if m.metadata.message_id == reply.metadata.reply_to_message_id)
        )

    grid.tamper = forge
    result, outcomes = play(fed)
    grid.tamper = None
    forged = next(o for o in outcomes if o.node_id == NODES[0])
    assert forged.status == "rejected" and forged.reason.startswith("key advertisement: bad reply signature")
    assert result.updated and result.meta["secagg"]["contributors"] == 3

    # A reply replayed for another message of the round fails the envelope too.
    rounds = fed["rounds"]
    messages, _ = rounds.configure_train(2, NODES)
    gate = rounds.fed.envelope(messages, 2)
    reply = grid.pull_messages(grid.push_messages(messages[:1]))[0]
    assert gate.check(reply) is None
    again = gate.check(reply)
    assert again is not None and again.reason == "a second reply to the same message (only the first counts)"

    # A node reveals once per session, and never both kinds of share for one node.
    node, context = NODES[0], grid.contexts[NODES[0]]
    session = rounds.session.id
    peers = rounds.session.shared
    base = {R.RUN_CONFIG: fed["cfg"].to_json(), R.RUN_UID: "run-secagg", R.ROUND: 2, S.SESSION: session}
    both = ConfigRecord({**base, S.SURVIVORS: peers, S.DROPPED: [peers[-1]]})
    assert (
        _refusal(client_app(Message(RecordDict({R.CONFIG: both}), node, "query.secagg_unmask"), context))
        == "secagg-refused"
    )
    too_few = ConfigRecord({**base, S.SURVIVORS: peers[:2], S.DROPPED: peers[2:]})
    assert node in peers[:2]
    assert (
        _refusal(client_app(Message(RecordDict({R.CONFIG: too_few}), node, "query.secagg_unmask"), context))
        == "secagg-refused"
    )
    fair = ConfigRecord({**base, S.SURVIVORS: peers, S.DROPPED: []})
    first = client_app(Message(RecordDict({R.CONFIG: fair}), node, "query.secagg_unmask"), context)
    assert R.REFUSAL not in first.content
    replayed = client_app(Message(RecordDict({R.CONFIG: fair}), node, "query.secagg_unmask"), context)
    assert _refusal(replayed) == "secagg-refused"


def test_a_round_with_a_single_node_never_starts(fed: dict[str, Any]) -> None:
    """The sum of one update is that update: a round needs t ≥ 2 nodes whatever the sample."""
    messages, outcomes = fed["rounds"].configure_train(1, NODES[:1])
    assert messages == []
    assert [(o.status, o.reason) for o in outcomes] == [
        ("failed", "round not started: only 1 node(s) advertised keys; t=2 are needed to unmask")
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clients_per_round": 1, "server": {"min_replies": 1}}, "at least 2 nodes per round"),
        ({"clients_per_round": 3, "secagg": {"threshold": 4}}, "exceeds clients_per_round"),
        ({"clients_per_round": 4, "secagg": {"threshold": 2}}, "not a majority"),
        ({"clients_per_round": 300, "secagg": {"quantization_range": 2**24}}, r"overflows the 2\^32 masking ring"),
    ],
)
def test_configs_that_could_not_unmask_or_could_reveal_too_little_are_refused(overrides: dict, message: str) -> None:
    cfg = tabular_config(secure_aggregation="secagg", **overrides)
    with pytest.raises(ConfigError, match=message):
        SecAggRounds.check_supported(cfg, simulated=False, resuming=False)


def test_the_trust_statement_names_the_mode_t_and_who_could_learn_what() -> None:
    lines = S.describe_trust(tabular_config(clients_per_round=5, secure_aggregation="secagg"))
    text = "\n".join(lines)
    assert "t = 3 of 5" in text and "No single party" in text and "3 or more colluding nodes" in text
    assert S.describe_trust(tabular_config()) == []


def test_the_nodes_sent_log_counts_every_sealed_share_it_sent() -> None:
    """The owner's log of what left the node must not understate a secagg reply (lists of sealed shares)."""
    from flwr.app import ConfigRecord, RecordDict

    from client.sent_log import describe

    shares = [b"s" * 300, b"t" * 200]
    records, total = describe(RecordDict({S.SECAGG: ConfigRecord({S.CIPHERTEXTS: shares, S.PK1: "k" * 40})}))
    assert total == 540
    assert records[S.SECAGG][S.CIPHERTEXTS]["bytes"] == 500
