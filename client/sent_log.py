"""The node's local log of everything it sent: one JSON line per reply (``workdir/sent.jsonl``).

Owners and auditors read it to see exactly what left the node: run, round, record names, each
key's privacy class, tensor shapes, dtypes and byte counts, and the ε attached. Values of
tensors are never logged; scalar metrics are (they left the node anyway). The exact cost of each
handled message (time, memory, energy, bytes) goes to ``workdir/resources.jsonl``, which never
leaves the node; only coarsened figures the owner allows are sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from common.records import key_class

SENT = "sent.jsonl"
USAGE = "resources.jsonl"


def _size(value: Any) -> int:
    """Bytes a config value carries: lists (sealed shares, key lists) count every element."""
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return 8


def describe(content: RecordDict) -> tuple[dict[str, Any], int]:
    """Per record and key: class, and shape/dtype/bytes for arrays or the value for scalars."""
    out: dict[str, Any] = {}
    total = 0
    for name, record in content.items():
        entry: dict[str, Any] = {}
        if isinstance(record, ArrayRecord):
            for key, arr in record.items():
                size = len(arr.data)
                total += size
                entry[key] = {
                    "class": key_class(name, key),
                    "shape": list(arr.shape),
                    "dtype": arr.dtype,
                    "bytes": size,
                }
        else:
            for key, value in record.items():
                size = _size(value)
                total += size
                shown = value if isinstance(value, int | float | str) else f"<{type(value).__name__}>"
                entry[key] = {"class": key_class(name, key), "value": shown, "bytes": size}
        out[name] = entry
    return out, total


def log_sent(workdir: Path, *, run_id: str, round_: int | None, reply_to: str, content: RecordDict) -> None:
    records, total = describe(content)
    line = {
        "time": time.time(),
        "run": run_id,
        "round": round_,
        "reply_to": reply_to,
        "bytes": total,
        "records": records,
    }
    _append(workdir / SENT, line)


def read_sent(workdir: Path) -> list[dict[str, Any]]:
    return _read(workdir / SENT)


def log_usage(
    workdir: Path,
    *,
    run_id: str,
    round_: int | None,
    purpose: str,
    reply_to: str,
    usage: dict[str, Any],
    sent: dict[str, float],
) -> None:
    """Append the exact cost of one handled message to ``workdir/resources.jsonl`` (never sent).

    ``usage``: common.resources.Usage as a dict (time, CPU, memory, energy and its label, emissions,
    bytes received and sent); ``sent``: the coarsened figures that left with the reply ({} if none).
    """
    line = {
        "time": time.time(),
        "run": run_id,
        "round": round_,
        "purpose": purpose,
        "reply_to": reply_to,
        "usage": usage,
        "sent": sent,
    }
    _append(workdir / USAGE, line)


def read_usage(workdir: Path) -> list[dict[str, Any]]:
    return _read(workdir / USAGE)


def _append(path: Path, line: dict[str, Any]) -> None:
    """One JSON line, flushed at once: the log is the owner's record of what happened, line by line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
