"""Signed replies, in process: the real ClientApp signs; the server's check drops forged and replayed replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message, MetricRecord

from client.app import app as client_app
from common import records as R
from server.validation import check_signature, classify_reply
from tests.helpers import global_state, node_context, tabular_config, train_message

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(120)]


def keypair(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / f"{name}.key"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, pem  # the SuperLink reports registered keys as PEM


def message(cfg, state, msg_id: str, rnd: int = 1) -> Message:  # noqa: ANN001
    msg = train_message(cfg, state, rnd)
    msg.metadata.__dict__["_message_id"] = msg_id  # what the SuperLink assigns on push
    return msg


def test_signed_reply_verifies_and_forgeries_are_dropped(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    state = global_state(cfg)
    key, pem = keypair(tmp_path, "node")
    _, other_pem = keypair(tmp_path, "other")
    msg = message(cfg, state, "msg-1")
    reply = client_app(msg, node_context(tabular_csv, tmp_path / "node", auth_key_path=str(key)))
    assert R.SIGNATURE in reply.content
    node = int(reply.metadata.src_node_id)
    keys = {node: pem}

    assert check_signature(reply, keys, msg.metadata.run_id, 1) is None
    assert classify_reply(reply, state, cfg.server.max_weight).status == "accepted"

    # Signed by a key the SuperLink did not register for this node.
    bad = check_signature(reply, {node: other_pem}, msg.metadata.run_id, 1)
    assert bad is not None and bad.status == "rejected" and "bad reply signature" in (bad.reason or "")
    # Claimed for another round, or replayed as the answer to another message.
    assert check_signature(reply, keys, msg.metadata.run_id, 2) is not None
    replay = Message(reply.content, reply_to=message(cfg, state, "msg-2"))
    assert "bad reply signature" in (check_signature(replay, keys, msg.metadata.run_id, 1).reason or "")  # type: ignore[union-attr]
    # Altered in transit: a different weight.
    reply.content[R.METRICS] = MetricRecord({**dict(reply.content[R.METRICS]), R.NUM_EXAMPLES: 900})
    assert check_signature(reply, keys, msg.metadata.run_id, 1) is not None


def test_unsigned_reply_and_unknown_node_are_rejected(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    msg = message(cfg, global_state(cfg), "msg-1")
    reply = client_app(msg, node_context(tabular_csv, tmp_path / "node"))  # no auth-key-path: unsigned
    node = int(reply.metadata.src_node_id)
    _, pem = keypair(tmp_path, "node")
    assert "unsigned reply" in (check_signature(reply, {node: pem}, msg.metadata.run_id, 1).reason or "")  # type: ignore[union-attr]
    assert "no registered public key" in (check_signature(reply, {}, msg.metadata.run_id, 1).reason or "")  # type: ignore[union-attr]


def test_refusals_are_signed_too(tmp_path: Path) -> None:
    cfg = tabular_config()
    key, pem = keypair(tmp_path, "node")
    msg = message(cfg, global_state(cfg), "msg-1")
    reply = client_app(msg, node_context(tmp_path / "missing.csv", tmp_path / "node", auth_key_path=str(key)))
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "data-invalid"
    assert check_signature(reply, {int(reply.metadata.src_node_id): pem}, msg.metadata.run_id, 1) is None


def test_the_envelope_takes_only_the_first_signed_answer_to_a_message_of_this_round(
    tabular_csv: Path, tmp_path: Path
) -> None:
    """The check every mode shares: this round's message, answered by the node it went to, once, signed."""
    from server.validation import Envelope

    cfg = tabular_config()
    state = global_state(cfg)
    key, pem = keypair(tmp_path, "node")
    msg = message(cfg, state, "msg-1")
    reply = client_app(msg, node_context(tabular_csv, tmp_path / "node", auth_key_path=str(key)))
    node = int(reply.metadata.src_node_id)
    gate = Envelope([msg], {node: pem}, msg.metadata.run_id, 1)
    assert gate.check(reply) is None  # its payload is the protocol's to check
    again = gate.check(reply)
    assert again is not None and again.status == "rejected" and "only the first counts" in str(again.reason)
    # An answer to a message of another round (or none at all) never reaches a protocol.
    other_round = Envelope([message(cfg, state, "msg-9", rnd=2)], {node: pem}, msg.metadata.run_id, 2)
    assert "answers no message of round 2" in str(other_round.check(reply).reason)  # type: ignore[union-attr]
    # A message sent to node 7, answered by this node.
    elsewhere = message(cfg, state, "msg-1")
    elsewhere.metadata.dst_node_id = 7
    assert "sent to node 7" in str(Envelope([elsewhere], {node: pem}, msg.metadata.run_id, 1).check(reply).reason)  # type: ignore[union-attr]
    # Signed by another key than the node's registered one.
    _, other_pem = keypair(tmp_path, "other")
    forged = Envelope([msg], {node: other_pem}, msg.metadata.run_id, 1).check(reply)
    assert forged is not None and "bad reply signature" in str(forged.reason)
    # Simulation (no node authentication): the same checks but the signature.
    assert Envelope([msg], None, msg.metadata.run_id, 1).check(reply) is None
