"""Model state ↔ Flower ArrayRecord (the packed wire format), and plain numpy views for validation and aggregation.

Why packed: Flower 1.42 sends every ``Array`` of a message as its own objects (the Array and its
≤ 5 MB chunks), each pushed or pulled in its own HTTPS request that the SuperNode authenticates.
One Array per tensor made a model of T tensors cost about 2·T requests per hop; the whole state
as ONE Array costs one Array object plus one chunk per 5 MB.

Wire format, version 1 (the Array's bytes, stype :data:`PACKED_STYPE`, key :data:`PACKED_KEY`):

    b"FGPS" | version (uint16 LE) | header length H (uint32 LE) | header (H bytes of UTF-8 JSON)
    | the tensors' bytes, little-endian and C-ordered, in header order, nothing after the last

with header ``{"tensors": [[name, dtype, shape], ...]}`` (``dtype`` as numpy's ``dtype.str``,
e.g. ``"<f4"``; bool, integer and float tensors only). The layout travels inside the same bytes
as the values, so a reply signature (``common.reply_signing``: the ArrayRecord's ``object_id``
hashes the Array, whose id hashes every chunk) covers both. Decoding checks the whole layout
(and, given one, the layout the receiver expects) before it reads a value, and refuses a
truncated payload, a malformed or unexpected layout and trailing bytes with :class:`PackedStateError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.errors import FedGuardError

PACKED_KEY = "state"
PACKED_STYPE = "fedguard.packed-state"
FORMAT_VERSION = 1
_MAGIC = b"FGPS"
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_MAX_HEADER = 16 << 20  # a layout of ~100k tensors; anything longer is not a model FedGuard builds
_MAX_DIM = 1 << 40
#: What travels: bool, 8–64-bit integers, 16–64-bit floats, as little-endian numpy dtype strings ("<f4").
_DTYPES = frozenset(np.dtype(c).newbyteorder("<").str for c in "?bBhHiIlLqQefd")

#: A state's layout: (name, numpy dtype string, shape) per tensor, in order.
Layout = tuple[tuple[str, str, tuple[int, ...]], ...]


class PackedStateError(FedGuardError, ValueError):
    """A packed model state that cannot be decoded, or not the one expected; the message says which part."""

    code = "packed-state-invalid"


def _fail(what: str) -> PackedStateError:
    return PackedStateError(
        what,
        where=f"model state (packed wire format v{FORMAT_VERSION})",
        fix="run the same FedGuard version on the server and every node; a payload altered in transit is refused",
    )


def state_to_numpy(module: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """The module's state dict as float32/int numpy arrays (CPU copies)."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in module.state_dict().items())


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype


def layout_of(state: Mapping[str, np.ndarray | torch.Tensor]) -> Layout:
    """The layout of a state (numpy arrays, or a module's ``state_dict()`` tensors without copying them)."""
    out = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            dtype = np.dtype(str(value.dtype).removeprefix("torch."))
            shape = tuple(int(d) for d in value.shape)
        else:
            dtype, shape = np.asarray(value).dtype, tuple(int(d) for d in np.shape(value))
        out.append((name, _wire_dtype(dtype).str, shape))
    return tuple(out)


def module_layout(module: torch.nn.Module) -> Layout:
    """The layout a packed state must have to load into ``module``."""
    return layout_of(module.state_dict())


def pack_state(state: Mapping[str, np.ndarray]) -> bytes:
    """The packed bytes of ``state`` (see the module doc)."""
    tensors, blobs = [], []
    for name, value in state.items():
        arr = np.asarray(value)
        if not isinstance(name, str) or not name:
            raise _fail(f"tensor name {name!r} is not a non-empty string")
        dtype = _wire_dtype(arr.dtype)
        if dtype.str not in _DTYPES:
            raise _fail(f"tensor {name} has dtype {arr.dtype}; only bool, integer and float tensors travel")
        tensors.append([name, dtype.str, list(arr.shape)])
        blobs.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    header = json.dumps({"tensors": tensors}, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header)), header, *blobs])


def _parse_layout(raw: Any) -> Layout:
    """The header's layout, every entry checked; raises PackedStateError naming the first bad one."""
    if not isinstance(raw, dict) or set(raw) != {"tensors"} or not isinstance(raw["tensors"], list):
        raise _fail('malformed layout: expected {"tensors": [[name, dtype, shape], ...]}')
    out, seen = [], set()
    for i, entry in enumerate(raw["tensors"]):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise _fail(f"malformed layout entry {i}: expected [name, dtype, shape]")
        name, dtype_str, shape = entry
        if not isinstance(name, str) or not name:
            raise _fail(f"malformed layout entry {i}: the name is not a non-empty string")
        if name in seen:
            raise _fail(f"tensor {name} appears twice in the layout")
        seen.add(name)
        if not isinstance(dtype_str, str) or dtype_str not in _DTYPES:  # checked before numpy parses it
            raise _fail(f"tensor {name}: dtype {dtype_str!r} is not a little-endian bool, integer or float type")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape
        ):
            raise _fail(f"tensor {name}: shape {shape!r} is not a list of sizes ≥ 0")
        out.append((name, dtype_str, tuple(shape)))
    return tuple(out)


def check_layout(layout: Layout, expected: Layout) -> None:
    """Raise PackedStateError unless ``layout`` holds exactly the expected tensors, shapes and dtypes."""
    got, want = {n: (d, s) for n, d, s in layout}, {n: (d, s) for n, d, s in expected}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise _fail(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (dtype, shape) in want.items():
        if got[name][1] != shape:
            raise _fail(f"wrong shape for {name}: {got[name][1]}, expected {shape}")
        if got[name][0] != dtype:
            raise _fail(f"wrong dtype for {name}: {np.dtype(got[name][0])}, expected {np.dtype(dtype)}")


def unpack_state(data: bytes, expected: Layout | None = None) -> OrderedDict[str, np.ndarray]:
    """Decode packed bytes into writable native numpy arrays, checking the layout before any value."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise _fail(f"truncated: {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != _MAGIC:
        raise _fail("not a FedGuard packed model state (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise _fail(f"format version {version}; this FedGuard reads version {FORMAT_VERSION}")
    start = _PREFIX.size + header_len
    if header_len > _MAX_HEADER or start > len(view):
        raise _fail(f"truncated: the layout needs {header_len} bytes, {len(view) - _PREFIX.size} follow the prefix")
    try:
        raw = json.loads(bytes(view[_PREFIX.size : start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail("malformed layout: the header is not UTF-8 JSON") from None
    layout = _parse_layout(raw)
    if expected is not None:
        check_layout(layout, expected)
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for _, dtype, shape in layout]
    declared, held = sum(sizes), len(view) - start
    if held < declared:
        raise _fail(f"truncated: the layout declares {declared} bytes of tensors, the payload holds {held}")
    if held > declared:
        raise _fail(f"{held - declared} extra bytes after the last tensor")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = start
    for (name, dtype_str, shape), size in zip(layout, sizes, strict=True):
        dtype = np.dtype(dtype_str)
        try:
            flat = np.frombuffer(view, dtype=dtype, count=size // dtype.itemsize, offset=offset) if size else None
            native = dtype.newbyteorder("=")
            out[name] = np.zeros(shape, native) if flat is None else flat.astype(native).reshape(shape)  # a copy
        except ValueError:
            raise _fail(f"tensor {name}: shape {shape} cannot be built") from None
        offset += size
    return out


def numpy_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The whole state as ONE Array (packed bytes) in an ArrayRecord: every model message uses this."""
    data = pack_state(state)
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def record_to_numpy(record: ArrayRecord, expected: Layout | None = None) -> OrderedDict[str, np.ndarray]:
    """Decode a packed ArrayRecord; with ``expected``, refuse any other layout. Raises PackedStateError."""
    keys = list(record.keys())
    if keys != [PACKED_KEY]:
        raise _fail(f"expected one packed array {PACKED_KEY!r}, got {len(keys)} array(s) {keys[:3]}")
    arr = record[PACKED_KEY]
    if arr.stype != PACKED_STYPE:
        raise _fail(f"array {PACKED_KEY!r} has serialization {arr.stype!r}, expected {PACKED_STYPE!r}")
    return unpack_state(arr.data, expected)


def load_numpy_state(module: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    module.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in state.items()))
