"""Reading a dataset file and encoding it into tensors, exactly as its schema declares.

Every transform here is fixed by the schema (declared ranges, categories, classes) or is
data-independent (signed log1p, byte tokenizer): nothing is fitted on one node's private rows.
Every problem is a :class:`DataError` naming the file, column and first offending 1-based data
row; pandas' own exception text is never passed through as the message.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from common.errors import ConfigError, DataError, closest_name
from common.schema import DataSchema, Feature
from common.tokenizer import encode_texts

log = logging.getLogger(__name__)

#: Bump when the encoding of any value changes, so stale cache files are not reused.
CACHE_VERSION = 2  # 2: CSV fields without the spaces after a delimiter ("39, State-gov"); nested JSON flattened

#: Group value used for a missing sensitive attribute (kept, so audits see the missing group).
MISSING_GROUP = "missing"

_EXTENSIONS = {
    **dict.fromkeys((".csv", ".tsv"), "csv"),
    **dict.fromkeys((".parquet", ".pq"), "parquet"),
    **dict.fromkeys((".jsonl", ".ndjson"), "jsonl"),
}

#: pandas' default missing-value markers (read_csv docs); applied to every column but the text column.
_CSV_NA = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip

_INT_LIKE = re.compile(r"^([+-]?\d+)\.0*$")
_MAX_SHOWN = 5


# --------------------------------------------------------------------------------------------
# Reading


def format_of(path: Path) -> str | None:
    """The format a file's extension names ("csv" for .csv and .tsv), or None."""
    return _EXTENSIONS.get(path.suffix.lower())


def _data_format(path: Path, schema: DataSchema) -> str:
    if schema.format != "auto":
        return schema.format
    fmt = format_of(path)
    if fmt is None:
        known = ", ".join(sorted(_EXTENSIONS))
        spreadsheet = path.suffix.lower() in _SPREADSHEETS
        raise DataError(
            f"cannot tell the file format from the extension {path.suffix or '(none)'!r} (known: {known})",
            where=str(path),
            fix="save the sheet as CSV (UTF-8) or Parquet from the spreadsheet program: a workbook is not read"
            if spreadsheet
            else 'rename the file with a known extension, or set format = "csv", "parquet" or "jsonl" in the '
            "data schema",
        )
    return fmt


#: Workbook extensions: renaming one to .csv does not make it CSV, so their error says to export instead.
_SPREADSHEETS = {".xlsx", ".xlsm", ".xls", ".ods", ".numbers"}


def _repeated_header_names(path: Path, encoding: str, delimiter: str) -> None:
    """A CSV header that names a column twice: pandas would silently read the second as 'name.1'."""
    with path.open(encoding=encoding, newline="") as fh:
        header = next(csv.reader(fh, delimiter=delimiter, skipinitialspace=True), [])
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, 1):
        if name.strip():  # unnamed columns (a spreadsheet's trailing commas) get pandas' own 'Unnamed: i'
            seen.setdefault(name, []).append(i)
    repeated = {n: cols for n, cols in seen.items() if len(cols) > 1}
    if repeated:
        name, cols = next(iter(repeated.items()))
        raise DataError(
            f"the header names column {name!r} {len(cols)} times (columns {', '.join(map(str, cols))})",
            where=f"{path}:line 1",
            fix=_data_row_fix(header) or "give every column its own name in the header, then export the file again",
        )


def _reading_encoding(encoding: str) -> str:
    """Read UTF-8 as utf-8-sig so an Excel byte-order mark does not end up in the first column name."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _decode_error(path: Path, encoding: str, exc: UnicodeDecodeError) -> DataError:
    """Find the first undecodable byte in the file itself (the exception's offset is per chunk)."""
    where, detail = str(path), ""
    try:
        raw = path.read_bytes()
        raw.decode(_reading_encoding(encoding))
    except UnicodeDecodeError as full:
        line = raw.count(b"\n", 0, full.start) + 1
        where, detail = f"{path}:line {line}", f" (byte 0x{raw[full.start]:02x} on line {line})"
    except OSError:
        pass
    return DataError(
        f"the file is not valid {encoding} text{detail}",
        where=where,
        fix=f'set encoding = "..." in the data schema to the file\'s real encoding (tried {encoding!r}; '
        'Chinese Windows files are often "gb18030", Western Excel exports "cp1252"), '
        "or re-save the file as UTF-8",
    )


def _read_csv(path: Path, schema: DataSchema) -> pd.DataFrame:
    enc = _reading_encoding(schema.encoding)
    str_cols = [schema.label, *schema.sensitive]
    str_cols += [f.name for f in schema.features if f.type == "categorical"]
    if schema.text_column:
        str_cols.append(schema.text_column)
    # Declared-category, label, group and text columns stay strings, so "01" is not read as 1. Spaces after a
    # delimiter are layout, not data (UCI's "39, State-gov, 77516"): a name or category never starts with one.
    kwargs: dict[str, Any] = {
        "encoding": enc,
        "sep": schema.delimiter,
        "decimal": schema.decimal,
        "skipinitialspace": True,
        "dtype": dict.fromkeys(str_cols, str),
    }
    try:
        _repeated_header_names(path, enc, schema.delimiter)
        if schema.text_column:
            # Text is kept verbatim: a review reading "NA" or "None" is text, not a missing value.
            header = pd.read_csv(path, encoding=enc, sep=schema.delimiter, skipinitialspace=True, nrows=0).columns
            kwargs["keep_default_na"] = False
            kwargs["na_values"] = {c: ([""] if c == schema.text_column else _CSV_NA) for c in header}
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(
            "the file is empty (no header line)",
            where=str(path),
            fix="export the data again with a header line naming the columns",
        ) from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            expected, line, saw = m.groups()
            raise DataError(
                f"line {line} has {saw} fields but the header has {expected}",
                where=f"{path}:line {line}",
                fix="quote values that contain commas, or remove the extra separators on that line",
            ) from None
        raise DataError(
            "the file cannot be parsed as CSV",
            where=str(path),
            fix="check that it is a comma-separated file with a header line and balanced quotes, "
            "or set format in the data schema",
        ) from None


def _read_jsonl(path: Path, schema: DataSchema) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    with path.open(encoding=_reading_encoding(schema.encoding)) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
                    where=f"{path}:line {lineno}",
                    fix="write one complete JSON object per line (JSON Lines)",
                ) from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"line {lineno} is a JSON {type(rec).__name__}, not an object",
                    where=f"{path}:line {lineno}",
                    fix='write one JSON object per line, e.g. {"text": "...", "label": 1}',
                )
            records.append(rec)
    # Nested objects become dotted columns ({"review": {"text": ...}} → "review.text"), as pandas flattens them.
    return pd.json_normalize(records) if records else pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid/ArrowIOError subclass these
        raise DataError(
            f"the file cannot be read as Parquet ({type(exc).__name__})",
            where=str(path),
            fix="check that the file is a complete Parquet file, or set format in the data schema",
        ) from None


def check_columns(df: pd.DataFrame, schema: DataSchema, source: str) -> None:
    """Raise a DataError listing every column the schema needs that ``df`` lacks."""
    available = [str(c) for c in df.columns]
    have = set(available)
    missing = [c for c in schema.required_columns() if c not in have]
    if not missing:
        return
    separator = next(
        (
            sep
            for sep in (";", "\t", "|", ",")
            if len(available) == 1 and sep != schema.delimiter and sep in available[0]
        ),
        None,
    )
    if separator is not None:  # one column whose name holds the others: written with another delimiter
        comma = ' (and decimal = "," if its numbers are written 3,5)' if separator != "," else ""
        fix = (
            f"the file looks {separator!r}-separated (its one column name holds {separator!r}), not "
            f"{schema.delimiter!r}: set delimiter = {json.dumps(separator)}{comma} in the data schema (a node's own "
            "--schema file; `fedguard schema draft` detects both), or save the file with "
            f"{schema.delimiter!r} between fields"
        )
    elif data_row := _data_row_fix(available):
        fix = data_row
    else:
        fix = "rename the columns in the file or correct the names in the data schema (names are case-sensitive)"
        hints = [f"{col!r} -> {close!r}?" for col in missing if (close := closest_name(col, available))]
        fix += "; did you mean " + ", ".join(hints) if hints else ""
    shown = ", ".join(repr(a) for a in available[:30]) + (" ..." if len(available) > 30 else "")
    wanted = ", ".join(repr(c) for c in missing)
    raise DataError(
        f"missing required column(s) {wanted}; the file has: {shown or '(none)'}",
        where=source,
        fix=fix,
    )


def _data_row_fix(header: Sequence[str]) -> str | None:
    """The fix for a file without a header line (its first line holds numbers where names belong), else None."""
    for name in header:
        try:
            float(name)
        except ValueError:
            continue
        return (
            f"the file's first line looks like a data row (it holds {name.strip()!r}), not column names: add a "
            "header line naming the columns (in file order), then read the file again"
        )
    return None


def _check_file(p: Path) -> None:
    if not p.exists():
        raise DataError(
            "data file not found",
            where=str(p),
            fix=f"check the path (a relative path starts from the working directory {os.getcwd()})",
        )
    if not p.is_file():
        raise DataError("the data path is not a file", where=str(p), fix="give the path of the data file itself")


def read_table(path: str | Path, schema: DataSchema) -> pd.DataFrame:
    """Read a CSV, Parquet or JSONL file and check it has the schema's columns and at least one row."""
    p = Path(path)
    _check_file(p)
    fmt = _data_format(p, schema)
    try:
        if fmt == "csv":
            df = _read_csv(p, schema)
        elif fmt == "jsonl":
            df = _read_jsonl(p, schema)
        else:
            df = _read_parquet(p)
    except UnicodeDecodeError as exc:
        raise _decode_error(p, schema.encoding, exc) from None
    except LookupError:
        raise DataError(
            f"unknown text encoding {schema.encoding!r}",
            where=str(p),
            fix='set encoding in the data schema to a Python codec name such as "utf-8" or "gb18030"',
        ) from None
    except PermissionError:
        raise DataError("no permission to read the file", where=str(p), fix="check the file permissions") from None
    check_columns(df, schema, str(p))
    if len(df) == 0:
        raise DataError("the file has no data rows", where=str(p), fix="check that the right file was exported")
    if fmt != "csv":  # JSON and Parquet values can be lists; a CSV field is always one value
        _check_scalars(df, schema, str(p))
    return df.reset_index(drop=True)


def _check_scalars(df: pd.DataFrame, schema: DataSchema, source: str) -> None:
    """A JSON list in a column the schema uses is not one value: its text form would reach the model silently."""
    for col in schema.required_columns():
        if df[col].dtype != object:
            continue
        nested = df[col].map(lambda v: isinstance(v, list | dict | np.ndarray)).to_numpy(dtype=bool)
        if nested.any():
            first, rows = _rows_text(nested)
            kind = "an object" if isinstance(df[col].iloc[first - 1], dict) else "a list"
            raise DataError(
                f"column {col!r} holds {kind} at {rows}, not one value",
                where=f"{source}:{col}:row {first}",
                fix="write one value per field (join a list into one text, or keep the item the model should see)",
            )


# --------------------------------------------------------------------------------------------
# Value normalisation


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, float | np.floating):
        return bool(np.isnan(v))
    return isinstance(v, str) and not v.strip()


def _candidates(v: Any) -> list[str]:
    """String forms a cell may match in a declared list, most literal first (1.0 and "1.0" match "1")."""
    if isinstance(v, bool | np.bool_):
        return [str(bool(v)), str(bool(v)).lower(), str(int(v))]
    if isinstance(v, int | np.integer):
        return [str(int(v))]
    if isinstance(v, float | np.floating):
        return [str(int(v)), str(v)] if np.isfinite(v) and float(v).is_integer() else [str(v)]
    if isinstance(v, list | dict):
        return [json.dumps(v, ensure_ascii=False)]
    s = str(v)
    out = [s, s.strip()]
    m = _INT_LIKE.match(s.strip())
    if m:
        out.append(str(int(m.group(1))))
    return out


def _map_values(values: np.ndarray, fn: Callable[[Any], Any]) -> list[Any]:
    """Apply ``fn`` once per distinct value (cells repeat a lot), keyed by type so 1 and True differ."""
    cache: dict[tuple[type, Any], Any] = {}
    out = []
    for v in values:
        try:
            key = (type(v), v)
            r = cache.get(key, cache)
            if r is cache:
                r = cache[key] = fn(v)
        except TypeError:  # unhashable cell
            r = fn(v)
        out.append(r)
    return out


def _group_key(v: Any) -> str:
    if _is_missing(v):
        return MISSING_GROUP
    forms = _candidates(v)
    # Strings: stripped, int-like "1.0" -> "1"; other types: their canonical form (1.0 -> "1").
    return forms[-1] if isinstance(v, str) else forms[0]


def group_keys(values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Normalised string keys for group/partition values; missing values become ``"missing"``.

    1, 1.0 and "1" are the same group, as they would be in a declared list.
    """
    raw = values.to_numpy(dtype=object) if isinstance(values, pd.Series) else values
    arr = np.empty(len(raw), dtype=object)
    arr[:] = list(raw)
    return np.array(_map_values(arr, _group_key), dtype=str).reshape(len(arr))


def _codes(values: np.ndarray, allowed: Sequence[str]) -> np.ndarray:
    """Index of each value in ``allowed``; -1 if not there, -2 if missing."""
    index = {a: i for i, a in enumerate(allowed)}

    def code(v: Any) -> int:
        if _is_missing(v):
            return -2
        return next((index[c] for c in _candidates(v) if c in index), -1)

    return np.array(_map_values(values, code), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Encoding


@dataclass
class Encoded:
    """Model-ready tensors for one dataset; ``groups`` holds the sensitive attributes for audits."""

    x: torch.Tensor
    y: torch.Tensor
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> Encoded:
        """Rows ``idx`` (positions or a boolean mask), in that order."""
        arr = np.asarray(idx)
        arr = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64, copy=False)
        t = torch.from_numpy(arr)
        return Encoded(self.x[t], self.y[t], {k: v[arr] for k, v in self.groups.items()})


def _rows_text(mask: np.ndarray) -> tuple[int, str]:
    rows = np.flatnonzero(mask) + 1
    shown = ", ".join(str(r) for r in rows[:_MAX_SHOWN])
    more = f" and {len(rows) - _MAX_SHOWN} more" if len(rows) > _MAX_SHOWN else ""
    return int(rows[0]), f"{'row' if len(rows) == 1 else 'rows'} {shown}{more}"


#: What to do with dates or times (text, or a Parquet timestamp): a raw date means nothing to a model.
DATE_FIX = "derive a number from them (a year, or days since a public date) in a new column and declare that"

_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
#: Text that holds numbers or dates a node cannot read as numbers: (shape, what it is, what to do).
_TEXT_SHAPES = (
    (  # reached only when some value is not a plain number: here, one with separators
        re.compile(_NUMBER),
        "numbers written with ',' thousands separators ('1,234.5')",
        "write them without separators (1234.5) to use them as a numeric feature",
    ),
    (re.compile(_NUMBER + r"\s?%"), "percentages ('12%')", "write them as plain numbers, without '%'"),
    (
        re.compile(r"[$€£¥]\s?" + _NUMBER + "|" + _NUMBER + r"\s?[$€£¥]"),
        "amounts with a currency sign ('$1,234')",
        "write them as plain numbers, without the sign or separators",
    ),
    (
        re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2})?)?|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}"),
        "dates ('2024-01-31', '31/01/2024')",
        DATE_FIX,
    ),
)


def text_shape(present: pd.Series) -> str | None:
    """What a text column holds when every value has one shape of number or date (``_TEXT_SHAPES``), and the
    fix; None otherwise. For the node's error on a numeric feature and for ``fedguard schema draft``."""
    values = [v.strip() for v in present if isinstance(v, str)]
    if not values or len(values) < len(present):
        return None
    for pattern, what, fix in _TEXT_SHAPES:
        if all(pattern.fullmatch(v) for v in values):
            return f"its values are {what}, which a node reads as text: {fix}"  # no value of the file in the note
    return None


def _missing(series: pd.Series, values: np.ndarray) -> np.ndarray:
    """Which values are missing or empty (NaN, None, blank text)."""
    if pd.api.types.is_numeric_dtype(series.dtype):  # fast path: no empty strings possible
        return series.isna().to_numpy(dtype=bool)
    return np.fromiter((_is_missing(v) for v in values), dtype=bool, count=len(values))


def _check_missing(series: pd.Series, values: np.ndarray, col: str, role: str, source: str) -> None:
    mask = _missing(series, values)
    if mask.any():
        first, rows = _rows_text(mask)
        raise DataError(
            f"{role} column {col!r} has {int(mask.sum())} missing or empty value(s) at {rows}",
            where=f"{source}:{col}:row {first}",
            fix=f"fill in or drop those rows; the {role} column may not have missing values"
            + (f', or declare {col!r} with missing = "token" in the schema' if role == "feature" else ""),
        )


def _shown(values: Sequence[str], limit: int = 20) -> str:
    head = ", ".join(repr(v) for v in values[:limit])
    return f"[{head}{', ...' if len(values) > limit else ''}]"


def is_date_time(series: pd.Series) -> bool:
    return pd.api.types.is_datetime64_any_dtype(series.dtype) or pd.api.types.is_timedelta64_dtype(series.dtype)


def _encode_numeric(series: pd.Series, feat: Feature, source: str) -> np.ndarray:
    col = feat.name
    values = series.to_numpy(dtype=object)
    gone = _missing(series, values) if feat.missing == "token" else None
    if gone is None:
        _check_missing(series, values, col, "feature", source)
    if is_date_time(series):
        raise DataError(f"numeric feature {col!r} holds dates or times, not numbers", where=f"{source}:{col}",
                        fix=DATE_FIX)  # fmt: skip
    if pd.api.types.is_bool_dtype(series.dtype):
        nums = series.to_numpy(dtype=np.float64)
    elif pd.api.types.is_numeric_dtype(series.dtype):
        nums = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        stripped = series.map(lambda v: v.strip() if isinstance(v, str) else v)
        nums = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(nums) if gone is None else ~np.isfinite(nums) & ~gone
    if bad.any():
        first, rows = _rows_text(bad)
        raise DataError(
            f"numeric feature {col!r} has a non-numeric or infinite value {values[first - 1]!r} at {rows}",
            where=f"{source}:{col}:row {first}",
            fix=text_shape(series.dropna())
            or f'correct those values, or declare {col!r} with type = "categorical" and its categories',
        )
    if gone is not None:
        nums = np.where(gone, np.nan, nums)  # missing = "token": NaN tells the model to use the missing vector
    if feat.range is not None:
        lo, hi = feat.range
        return 2.0 * (np.clip(nums, lo, hi) - lo) / (hi - lo) - 1.0
    return np.sign(nums) * np.log1p(np.abs(nums))


def _encode_categorical(series: pd.Series, feat: Feature, source: str) -> np.ndarray:
    col, cats = feat.name, feat.categories or []
    values = series.to_numpy(dtype=object)
    if feat.missing == "refuse":
        _check_missing(series, values, col, "feature", source)
    codes = _codes(values, cats)
    codes[codes == -2] = len(cats)  # missing = "token": one more category, after the declared ones
    bad = codes < 0
    if bad.any():
        first, rows = _rows_text(bad)
        raise DataError(
            f"value {values[first - 1]!r} of categorical feature {col!r} at {rows} is not one of the "
            f"declared categories {_shown(cats)}",
            where=f"{source}:{col}:row {first}",
            fix=f"add it to 'categories' of feature {col!r} in the data schema (every node must use the "
            "same list), or correct the data",
        )
    return codes.astype(np.float64)


def _encode_labels(series: pd.Series, schema: DataSchema, source: str) -> np.ndarray:
    """Class index of every row; a label outside the schema's classes is an error naming file, column, row."""
    col = schema.label
    values = series.to_numpy(dtype=object)
    _check_missing(series, values, col, "label", source)
    codes = _codes(values, schema.classes)
    bad = codes < 0
    if bad.any():
        first, rows = _rows_text(bad)
        raise DataError(
            f"label value {values[first - 1]!r} at {rows} is not one of the declared classes {_shown(schema.classes)}",
            where=f"{source}:{col}:row {first}",
            fix="add the value to 'classes' in the data schema, or correct the label column",
        )
    return codes


def encode(
    df: pd.DataFrame,
    schema: DataSchema,
    *,
    max_len: int = 128,
    read: str = "head",
    source: str = "data",
) -> Encoded:
    """Encode ``df`` per ``schema`` (rows keep their order; row numbers in errors are 1-based positions).

    A file whose rows all carry one class encodes like any other: in federated learning a node often
    sees one label only (a clinic that sees only negatives) and still contributes to the global model.
    """
    check_columns(df, schema, source)
    if len(df) == 0:
        raise DataError("no data rows", where=source, fix="check that the right file was given")
    y = torch.from_numpy(_encode_labels(df[schema.label], schema, source))
    if schema.task == "text":
        col = schema.text_column or ""
        values = df[col].to_numpy(dtype=object)
        _check_missing(df[col], values, col, "text", source)
        x = encode_texts([v if isinstance(v, str) else str(v) for v in values], max_len, read)
    else:
        cols = np.empty((len(df), len(schema.features)), dtype=np.float32)
        for j, feat in enumerate(schema.features):
            enc = _encode_numeric if feat.type == "numeric" else _encode_categorical
            cols[:, j] = enc(df[feat.name], feat, source)
        x = torch.from_numpy(cols)
    groups = {col: group_keys(df[col]) for col in schema.sensitive}
    encoded = Encoded(x=x, y=y, groups=groups)
    if schema.privacy_unit:
        encoded = encoded.subset(np.flatnonzero(unit_cap_mask(df[schema.privacy_unit], schema, source)))
    return encoded


def unit_cap_mask(units: pd.Series, schema: DataSchema, source: str) -> np.ndarray:
    """Keep the first ``max_records_per_unit`` records of each privacy unit (file order)."""
    col = schema.privacy_unit or ""
    _check_missing(units, units.to_numpy(dtype=object), col, "privacy unit", source)
    return (units.groupby(units, sort=False).cumcount() < schema.max_records_per_unit).to_numpy()


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (by seed) train/validation row split; always keeps at least one training row."""
    if not 0.0 <= validation_fraction <= 0.9:
        raise ConfigError(
            f"validation_fraction must be between 0 and 0.9, got {validation_fraction}",
            fix="use e.g. 0.1 (or 0 for no validation split)",
        )
    if n < 1:
        raise DataError("no rows to split", fix="check that the data file has rows")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(int(round(validation_fraction * n)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------------------------
# Cache


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(file_hash: str, schema: DataSchema, max_len: int, read: str = "head") -> str:
    """Key over everything that determines the encoding: file content, schema, max_len, read, code version."""
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "file": file_hash,
            "schema": schema.model_dump(mode="json"),
            "max_len": max_len,
            "read": read,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _load_cached(path: Path) -> Encoded | None:
    """The cached encoding, or None if absent or unusable (then it is simply rebuilt)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("version") != CACHE_VERSION:
            return None
        x, y, groups = obj["x"], obj["y"], obj["groups"]
        n = int(y.shape[0])
        ok = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape[0] == n
        ok = ok and isinstance(groups, dict) and all(len(v) == n for v in groups.values())
        if not ok:
            raise ValueError("inconsistent shapes")
        return Encoded(x, y, {k: np.array(v, dtype=str) for k, v in groups.items()})
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is rebuilt, never fatal
        log.warning("ignoring unreadable data cache %s (%s); rebuilding", path, type(exc).__name__)
        return None


def _store_cached(path: Path, enc: Encoded) -> None:
    payload = {
        "version": CACHE_VERSION,
        "x": enc.x,
        "y": enc.y,
        "groups": {k: v.tolist() for k, v in enc.groups.items()},
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mkstemp creates the file 0600: the cache holds encoded private rows.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not write data cache %s (%s); continuing without it", path, exc.strerror or exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_encoded(
    path: str | Path, schema: DataSchema, *, max_len: int = 128, read: str = "head", cache_dir: Path | None = None
) -> Encoded:
    """Read and encode a data file, reusing ``cache_dir/<key>.pt`` when file, schema, max_len and read match.

    A cache hit only hashes the file; it is not parsed or tokenized again.
    """
    p = Path(path)
    if cache_dir is None:
        return encode(read_table(p, schema), schema, max_len=max_len, read=read, source=str(p))
    _check_file(p)
    digest = file_sha256(p)
    cached_path = Path(cache_dir) / f"{cache_key(digest, schema, max_len, read)}.pt"
    cached = _load_cached(cached_path)
    if cached is not None:
        return cached
    enc = encode(read_table(p, schema), schema, max_len=max_len, read=read, source=str(p))
    if file_sha256(p) == digest:  # do not file an encoding under a hash of other content
        _store_cached(cached_path, enc)
    return enc
