"""Threshold secure aggregation on a node: its per-round secrets, its shares, its masked update.

The secrets of a round (both private keys, the self-mask seed, the shares peers sealed for this
node) live in the ClientApp's ``context.state``, on the node only, under one random session id
per round attempt; none of them leaves in the clear. The steps, each answering one server message:

1. ``advertise`` — new key pairs; the public keys and the declared weight go up.
2. ``share`` — check the peers' keys and t, Shamir-share the self-mask seed and the mask key,
   seal each share for its peer (ECDH + Fernet); only ciphertexts go up.
3. ``receive`` + ``masked_update`` (the train message) — open the shares peers sealed for this
   node, train (the ledger is charged first, as in plaintext mode), send the masked update; the
   private keys and the seed are wiped once the update is masked.
4. ``unmask`` — reveal, once per session, the self-mask share of each contributor or the
   mask-key share of each node that dropped before sending, never both for one node, and only
   when at least max(t, server.min_replies) nodes contributed. Then every secret is wiped.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from client.node import NodeSettings, node_logger
from common import records as R
from common import secagg as S
from common.config import RunConfig
from common.he_custody import flatten_state, trainable_keys

#: ``context.state`` record holding this node's secrets of the current session.
STATE = "fedguard-secagg"


def _own(msg: Message) -> int:
    return int(msg.metadata.dst_node_id)


def _session(msg: Message) -> str:
    session = str(msg.content[R.CONFIG].get(S.SESSION, ""))
    if len(session) < 16:
        raise S.SecAggError("the message names no secure-aggregation session")
    return session


def _state(msg: Message, context: Context, stage: str) -> dict[str, Any]:
    """This session's secrets, if the node is at ``stage`` of it; else refuse (nothing is revealed)."""
    record = context.state.get(STATE)
    session = _session(msg)
    if record is None or record["session"] != session:
        raise S.SecAggError(f"no secure-aggregation session {session[:8]}… on this node (expired or already revealed)")
    if record["stage"] != stage:
        raise S.SecAggError(f"session {session[:8]}… is at step {record['stage']!r}, not {stage!r}")
    return dict(record)


def _save(context: Context, state: dict[str, Any]) -> None:
    context.state[STATE] = ConfigRecord(state)


def _ints(config: Any, key: str) -> list[int]:
    return [int(v) for v in config.get(key, [])]


def _blobs(config: Any, key: str) -> list[bytes]:
    return [bytes(v) for v in config.get(key, [])]


def advertise(msg: Message, context: Context, weight: int) -> ConfigRecord:
    """Step 1: fresh key pairs for this session (any earlier session's secrets are dropped)."""
    session = _session(msg)
    old = context.state.get(STATE)
    if old is not None and old["session"] == session:
        raise S.SecAggError("keys for this session were already advertised")
    keys = S.new_key_pairs()
    _save(
        context,
        {
            "session": session,
            "stage": "keys",
            "sk1": keys.sk1,
            "pk1": keys.pk1,
            "sk2": keys.sk2,
            "pk2": keys.pk2,
            "weight": int(weight),
        },
    )
    return ConfigRecord({S.PK1: keys.pk1, S.PK2: keys.pk2, S.WEIGHT: int(weight)})


def share(msg: Message, context: Context, cfg: RunConfig) -> ConfigRecord:
    """Step 2: Shamir-share the self-mask seed and the mask key; seal each share for its peer."""
    state, config, own = _state(msg, context, "keys"), msg.content[R.CONFIG], _own(msg)
    peers, pk1s, pk2s = _ints(config, S.PEERS), _blobs(config, S.PEER_PK1), _blobs(config, S.PEER_PK2)
    t = int(config.get(S.THRESHOLD, 0))
    if not len(peers) == len(pk1s) == len(pk2s) or len(set(peers)) != len(peers):
        raise S.SecAggError("the peer list is malformed (lengths differ or a node appears twice)")
    if own not in peers:
        raise S.SecAggError("this node is not among the round's peers")
    i = peers.index(own)
    if (pk1s[i], pk2s[i]) != (bytes(state["pk1"]), bytes(state["pk2"])):
        raise S.SecAggError("the server relayed other keys as this node's own")
    if len(set(pk1s) | set(pk2s)) != 2 * len(peers):
        raise S.SecAggError("two advertised public keys are identical")
    if not S.threshold(cfg, len(peers)) <= t <= len(peers):
        raise S.SecAggError(
            f"threshold t={t} for {len(peers)} peers: the signed run config needs at least "
            f"{S.threshold(cfg, len(peers))} (a majority) and at most the number of peers"
        )
    for peer, pk1, pk2 in zip(peers, pk1s, pk2s, strict=True):
        S.check_public_key(pk1, f"node {peer}'s mask key")
        S.check_public_key(pk2, f"node {peer}'s encryption key")
    b = os.urandom(32)
    b_shares, sk_shares = S.split(b, t, len(peers)), S.split(bytes(state["sk1"]), t, len(peers))
    dsts, ciphertexts = [], []
    for idx, (peer, pk2) in enumerate(zip(peers, pk2s, strict=True)):
        if peer == own:
            continue
        key = S.shared_key(bytes(state["sk2"]), pk2)
        dsts.append(peer)
        ciphertexts.append(S.seal_share(key, own, peer, b_shares[idx], sk_shares[idx]))
    _save(
        context,
        state
        | {
            "stage": "shares",
            "b": b,
            "t": t,
            "peers": peers,
            "pk1s": pk1s,
            "pk2s": pk2s,
            "held-from": [own],
            "held-b": [b_shares[i]],
            "held-sk": [sk_shares[i]],
        },
    )
    return ConfigRecord({S.DSTS: dsts, S.CIPHERTEXTS: ciphertexts})


def receive(msg: Message, context: Context, cfg: RunConfig) -> None:
    """Step 3, before training: open the shares every mask peer sealed for this node, check the weight scale."""
    state, config, own = _state(msg, context, "shares"), msg.content[R.CONFIG], _own(msg)
    peers, t = [int(p) for p in state["peers"]], int(state["t"])
    mask_peers = _ints(config, S.PEERS)
    if len(set(mask_peers)) != len(mask_peers) or not set(mask_peers) <= set(peers) or own not in mask_peers:
        raise S.SecAggError("the round's contributors are not a subset of the peers that advertised keys")
    if len(mask_peers) < t:
        raise S.SecAggError(f"only {len(mask_peers)} node(s) shared keys; t={t} are needed to unmask")
    srcs, ciphertexts = _ints(config, S.SRCS), _blobs(config, S.FORWARDED)
    expected = sorted(p for p in mask_peers if p != own)
    if sorted(srcs) != expected or len(ciphertexts) != len(srcs):
        raise S.SecAggError("the relayed shares do not come from exactly the round's other contributors")
    pk2s = dict(zip(peers, state["pk2s"], strict=True))
    held_from, held_b, held_sk = [own], list(state["held-b"]), list(state["held-sk"])
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        key = S.shared_key(bytes(state["sk2"]), bytes(pk2s[src]))
        b_share, sk_share = S.open_share(key, src, own, ciphertext)
        held_from.append(src)
        held_b.append(b_share)
        held_sk.append(sk_share)
    weight, weight_max = int(state["weight"]), float(config.get(S.WEIGHT_MAX, 0.0))
    if not weight <= weight_max <= cfg.server.max_weight:
        raise S.SecAggError(
            f"weight scale {weight_max:g} is below this node's weight {weight} or above server.max_weight"
        )
    _save(
        context,
        state
        | {
            "stage": "train",
            "mask-peers": mask_peers,
            "weight-max": weight_max,
            "held-from": held_from,
            "held-b": held_b,
            "held-sk": held_sk,
        },
    )


def advertised_weight(msg: Message, context: Context) -> int:
    return int(_state(msg, context, "train")["weight"])


def masked_update(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    settings: NodeSettings,
    new: OrderedDict[str, np.ndarray],
    old: OrderedDict[str, np.ndarray],
) -> ArrayRecord:
    """Step 3, after training: ``[quantize(w/w_max · Δ), w]`` masked; the keys and the seed are wiped."""
    state, own, session = _state(msg, context, "train"), _own(msg), _session(msg)
    keys = trainable_keys(old)
    delta = flatten_state(new, keys) - flatten_state(old, keys)
    weight, weight_max = int(state["weight"]), float(state["weight-max"])
    sa = cfg.secagg
    vector, clipped = S.encode(delta, S.ratio(weight, weight_max), weight, sa.clipping_range, sa.quantization_range)
    peers = [int(p) for p in state["peers"]]
    pk1s = dict(zip(peers, state["pk1s"], strict=True))
    mask_peers = {int(p): bytes(pk1s[int(p)]) for p in state["mask-peers"]}
    masked = S.mask(vector, own, bytes(state["b"]), bytes(state["sk1"]), mask_peers, session)
    _save(context, {k: v for k, v in state.items() if k not in ("b", "sk1", "sk2")} | {"stage": "masked"})
    node_logger(settings.workdir).info(
        "round %s: masked update of %d values for %d peers (weight %d / %g); %d value(s) clipped to ±%g",
        msg.content[R.CONFIG].get(R.ROUND),
        delta.size,
        len(mask_peers) - 1,
        weight,
        weight_max,
        clipped,
        sa.clipping_range,
    )
    return ArrayRecord({S.MASKED_VECTOR: Array(masked)})


def unmask(msg: Message, context: Context, cfg: RunConfig) -> ConfigRecord:
    """Step 4: reveal, once, the shares the server needs to remove the masks; then forget the session."""
    state, config, own = _state(msg, context, "masked"), msg.content[R.CONFIG], _own(msg)
    survivors, dropped = _ints(config, S.SURVIVORS), _ints(config, S.DROPPED)
    mask_peers = [int(p) for p in state["mask-peers"]]
    if set(survivors) & set(dropped):
        raise S.SecAggError("asked for both the self-mask and the mask-key share of the same node")
    if sorted(set(survivors) | set(dropped)) != sorted(mask_peers) or len(survivors) + len(dropped) != len(mask_peers):
        raise S.SecAggError("the survivors and dropouts named are not exactly the round's contributors")
    if own not in survivors:
        raise S.SecAggError("this node's own update is named as missing")
    least = max(int(state["t"]), cfg.server.min_replies, 2)
    if len(survivors) < least:
        raise S.SecAggError(
            f"only {len(survivors)} update(s) would be in the sum; at least {least} (t and server.min_replies) "
            "must be, or the sum could reveal too few nodes' updates"
        )
    held = {int(n): i for i, n in enumerate(state["held-from"])}
    del context.state[STATE]  # one reveal per session: a second request finds nothing
    nodes, kinds, shares = [], [], []
    for node in survivors:
        nodes.append(node)
        kinds.append("b")
        shares.append(bytes(state["held-b"][held[node]]))
    for node in dropped:
        nodes.append(node)
        kinds.append("sk")
        shares.append(bytes(state["held-sk"][held[node]]))
    return ConfigRecord({S.SHARE_NODES: nodes, S.SHARE_KINDS: kinds, S.SHARES: shares})
