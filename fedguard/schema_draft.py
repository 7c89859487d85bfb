"""``fedguard schema draft``: a data schema drafted from the owner's own file, for the owner to review.

The file is read here, on the owner's machine, and nothing is sent anywhere. The draft is only a
starting point: a schema becomes part of the run config that the server and every node see, so
what it declares (ranges, categories, classes) must be fit to share. Ranges are therefore rounded
outward, and the draft's header says what to check before it is used.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from common.data import DATE_FIX, check_columns, format_of, group_keys, is_date_time, read_table, text_shape
from common.errors import ConfigError, DataError
from common.schema import DataSchema, Feature, format_validation_error
from fedguard.schema_cli import MAX_CATEGORIES


@dataclass
class Draft:
    """A drafted schema plus notes for the owner (per column, and columns left out)."""

    schema: DataSchema
    source: str
    rows: int
    notes: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


#: Field delimiters a CSV header line is checked for (the first is the default when none appears).
_DELIMITERS = (",", ";", "\t", "|")
_DECIMAL_COMMA = r"^\s*[+-]?\d+,\d+\s*$"
_COMMA_NUMBER = r"^\s*[+-]?\d+(,\d+)?\s*$"


def _delimiter(path: Path, encoding: str) -> str:
    """The delimiter a CSV file's header line uses most (``","`` when it holds none): European Excel writes ``;``."""
    try:
        with path.open(encoding=encoding, errors="replace", newline="") as fh:
            header = fh.readline()
    except (OSError, LookupError):
        return ","  # reading the table reports it
    return max(_DELIMITERS, key=header.count) if any(d in header for d in _DELIMITERS) else ","


def _decimal_commas(df: pd.DataFrame, reserved: set[str]) -> bool:
    """Whether some column's numbers are written with a decimal comma (``3,5``) and all of its values are such
    numbers: read with ``decimal = "."`` they would be text."""
    for col in df.columns:
        if str(col) in reserved or pd.api.types.is_numeric_dtype(df[col].dtype):
            continue
        present = df[col].dropna().astype(str)
        if len(present) and present.str.match(_DECIMAL_COMMA).any() and present.str.match(_COMMA_NUMBER).all():
            return True
    return False


def _split_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _missing_mask(series: pd.Series) -> np.ndarray:
    blank = series.map(lambda v: isinstance(v, str) and not v.strip())
    return (series.isna() | blank.astype(bool)).to_numpy(dtype=bool)


def _sorted_values(values: Sequence[str]) -> list[str]:
    """Distinct values, numerically when all look like numbers ("2" before "10"), else as text."""
    distinct = sorted(set(values))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def _numbers(series: pd.Series) -> np.ndarray | None:
    """The column as floats when every present value is a number (as a node would read it), else None."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    stripped = series.map(lambda v: v.strip() if isinstance(v, str) else v)
    nums = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return None if np.isnan(nums).any() else nums


def _tens(k: int, e: int) -> float:
    """k·10^e without binary noise (4·10^-1 is 0.4, not 0.4000000000000001)."""
    return float(k * 10**e) if e >= 0 else k / 10 ** (-e)


def outward_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened to multiples of the power of ten just below its span (17..90 -> 10..90).

    The exact minimum and maximum of a column can single out one record; round bounds say less.
    A constant column gets one step either side, since a range needs lo < hi. The step is never
    finer than 1e-12 of the values' magnitude, so its multiples are exact in float64 and the
    range always covers the data (large magnitudes: 3.3e16 plus a span of 20); at the very edge
    of float64 the data's own bounds are returned.
    """
    top = max(abs(lo), abs(hi), 1.0)
    span = hi - lo if hi > lo else top
    e = max(math.floor(math.log10(span)) if math.isfinite(span) else 308, math.floor(math.log10(top)) - 12)
    try:
        k_lo, k_hi = math.floor(lo / _tens(1, e)), math.ceil(hi / _tens(1, e))
        if k_lo == k_hi:
            k_lo, k_hi = k_lo - 1, k_hi + 1
        while _tens(k_lo, e) > lo:  # a quotient rounded in float64 can land one step inside
            k_lo -= 1
        while _tens(k_hi, e) < hi:
            k_hi += 1
        return _tens(k_lo, e), _tens(k_hi, e)
    except OverflowError:
        return lo, hi


#: Name parts that mark a column as an identifier (``id``, ``patient_id``, ``PatientID``, ``row-uuid``).
_ID_PARTS = {"id", "ids", "uuid", "guid", "identifier"}
#: Rows from which an integer column whose every value differs is taken for an identifier.
ID_MIN_ROWS = 20


def _identifier_reason(name: str, nums: np.ndarray) -> str | None:
    """Why a numeric column looks like a record identifier (not a feature), or None."""
    parts = {p.lower() for p in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)}
    if parts & _ID_PARTS:
        return f"its name ({name!r}) marks an identifier"
    whole = np.isfinite(nums).all() and bool(np.all(nums == np.round(nums)))
    if whole and len(nums) >= ID_MIN_ROWS and len(np.unique(nums)) == len(nums):
        return f"all {len(nums)} values are distinct integers"
    return None


def _feature(name: str, series: pd.Series, max_categories: int, notes: list[str]) -> Feature | None:
    """A numeric or categorical feature for ``series``, or None (with the reason in ``notes``)."""
    missing = _missing_mask(series)
    if missing.all():
        notes.append("left out: every value is missing")
        return None
    if missing.any():
        notes.append(
            f'{int(missing.sum())} missing value(s): drafted with missing = "token" (the model learns a vector '
            'meaning "missing" for this feature); "refuse" has nodes refuse a file with a missing value instead'
        )
    gaps = "token" if missing.any() else "refuse"
    present = series[~missing]
    if is_date_time(series):
        notes.append(f"left out: a date or time column is not a model input as it is; {DATE_FIX}")
        return None
    nums = _numbers(present)
    if nums is not None and (why := _identifier_reason(name, nums)) is not None:
        notes.append(
            f"left out: looks like a record identifier ({why}); as a feature the model could learn single "
            "records, and it means nothing on another node. Add it by hand if it is a real measurement"
        )
        return None
    if nums is not None:
        finite = nums[np.isfinite(nums)]
        if len(finite) < len(nums):
            notes.append(f"{len(nums) - len(finite)} infinite value(s): nodes refuse them")
        if len(finite):
            lo, hi = float(finite.min()), float(finite.max())
            if lo == hi:
                notes.append("one value only in this file: it tells the model nothing here")
            lo, hi = outward_range(lo, hi)
            return Feature(name=name, type="numeric", range=(lo, hi), missing=gaps)
        return Feature(name=name, type="numeric", missing=gaps)
    categories = _sorted_values(group_keys(present).tolist())
    if (shape := text_shape(present)) is not None:
        if len(categories) > max_categories:
            notes.append(f"left out: {shape}")
            return None
        notes.append(f"drafted as categories, losing their order: {shape}")
    if len(categories) > max_categories:
        notes.append(
            f"left out: {len(categories)} distinct text values (an identifier or free text?); "
            f"add it by hand if it is a feature, or raise --max-categories"
        )
        return None
    return Feature(name=name, type="categorical", categories=categories, missing=gaps)


def _classes(series: pd.Series, declared: list[str] | None, source: str, label: str) -> list[str]:
    keys = group_keys(series[~_missing_mask(series)])
    found = _sorted_values(keys.tolist())
    if declared:
        unknown = [v for v in found if v not in declared]
        if unknown:
            raise DataError(
                f"label value(s) {unknown[:10]} in the file are not among --classes {declared}",
                where=f"{source}:{label}",
                fix="add them to --classes, or check the label column",
            )
        return declared
    if len(found) < 2:
        only = repr(found[0]) if found else "no value"
        raise DataError(
            f"the label column {label!r} holds {only} only, so the draft cannot list the federation's classes",
            where=f"{source}:{label}",
            fix="name every class the federation uses, in order, with --classes (e.g. --classes 0,1); "
            "a node that holds one class trains like any other",
        )
    if len(found) > MAX_CATEGORIES:
        raise DataError(
            f"the label column {label!r} has {len(found)} distinct values; FedGuard trains classifiers",
            where=f"{source}:{label}",
            fix="check that --label names the class column (bin a numeric target into classes first)",
        )
    return found


def draft_schema(
    path: str | Path,
    label: str,
    *,
    sensitive: Sequence[str] = (),
    text: str | None = None,
    classes: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    max_categories: int = MAX_CATEGORIES,
    encoding: str = "utf-8",
) -> Draft:
    """Read ``path`` locally and draft its schema: every other column becomes a feature (tabular),
    except ``sensitive`` (kept for audits, never a model input), ``exclude`` and, for text, all but ``text``.
    A CSV file's delimiter and decimal mark are detected and go into the draft."""
    p = Path(path)
    source = str(p)
    csv_file = format_of(p) == "csv"
    delimiter = _delimiter(p, encoding) if csv_file else ","
    # The columns the draft needs, unvalidated (classes and features are what the draft finds out).
    wanted = DataSchema.model_construct(
        task="text" if text else "tabular",
        text_column=text,
        features=[],
        label=label,
        classes=[],
        sensitive=list(sensitive),
        privacy_unit=None,
        format="auto",
        encoding=encoding,
        delimiter=delimiter,
        decimal=".",
    )
    df = read_table(p, wanted)  # the file's own errors: not found, format, encoding, no rows
    if csv_file and delimiter != "," and _decimal_commas(df, {label, *sensitive, *exclude, text or ""}):
        wanted = wanted.model_copy(update={"decimal": ","})
        df = read_table(p, wanted)
    missing_excluded = [c for c in exclude if c not in df.columns]
    if missing_excluded:
        check_columns(df, wanted.model_copy(update={"sensitive": missing_excluded}), source)
    notes: dict[str, list[str]] = {}
    label_missing = int(_missing_mask(df[label]).sum())
    if label_missing:
        notes[label] = [f"{label_missing} row(s) without a label: nodes refuse them; fill or drop them"]
    if text:
        text_missing = int(_missing_mask(df[text]).sum())
        if text_missing:
            notes[text] = [f"{text_missing} row(s) with empty text: nodes refuse them; fill or drop them"]
    declared = list(dict.fromkeys(classes)) if classes else None
    found_classes = _classes(df[label], declared, source, label)
    features: list[Feature] = []
    skipped: list[str] = []
    if not text:
        reserved = {label, *sensitive, *exclude}
        for col in df.columns:
            name = str(col)
            if name in reserved:
                continue
            col_notes: list[str] = []
            feat = _feature(name, df[col], max_categories, col_notes)
            if col_notes:
                notes[name] = col_notes
            if feat is None:
                skipped.append(name)
            else:
                features.append(feat)
        if not features:
            raise DataError(
                "no feature columns are left once the label, sensitive and excluded columns are set aside",
                where=source,
                fix="check --label, --sensitive and --exclude, or use --text COLUMN for a text dataset",
            )
    try:
        schema = DataSchema(
            task="text" if text else "tabular",
            text_column=text,
            features=features,
            label=label,
            classes=found_classes,
            sensitive=list(sensitive),
            encoding=encoding,
            delimiter=wanted.delimiter,
            decimal=wanted.decimal,
        )
    except ValidationError as exc:
        raise ConfigError("the drafted schema is not valid:\n" + format_validation_error(exc, source)) from None
    return Draft(schema=schema, source=p.name, rows=len(df), notes=notes, skipped=skipped)


def _toml(value: Any) -> str:
    """A TOML value for strings, numbers and lists of them (JSON's string escapes are TOML's)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() or abs(value) >= 1e16 else f"{value:.1f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def _feature_line(feat: Feature) -> str:
    parts = [f"name = {_toml(feat.name)}", f"type = {_toml(feat.type)}"]
    if feat.range is not None:
        parts.append(f"range = {_toml(list(feat.range))}")
    if feat.categories is not None:
        parts.append(f"categories = {_toml(feat.categories)}")
    if feat.missing != "refuse":
        parts.append(f"missing = {_toml(feat.missing)}")
    return "  { " + ", ".join(parts) + " },"


def render(draft: Draft) -> str:
    """The draft as TOML: a header saying where it came from and what to check, then the schema keys."""
    s = draft.schema
    lines = [
        f"# DRAFT data schema for {draft.source} ({draft.rows} rows), written by `fedguard schema draft`.",
        "# It was read from the data owner's own file, on the owner's machine; nothing was sent anywhere",
        "# and nothing leaves the node. Review it before use: a schema goes into the run config that the",
        "# server and every node see, so it must declare only what all of them may know.",
        "#   - ranges: this file's minimum and maximum rounded outward; prefer public bounds (age 0-120);",
        "#   - categories and classes: the values this file holds; remove or merge any that could identify",
        "#     someone, and add values other nodes hold (every node declares the same lists, same order);",
        "#   - classes are in class-index order; with two classes the second is the positive class.",
        '# Use it as a node\'s --schema file and in a run config ([data] schema = "<this file>", relative to',
        "# the config; or paste the keys below under [data.schema]).",
        "",
        f"task = {_toml(s.task)}",
    ]
    if s.text_column:
        lines.append(f"text_column = {_toml(s.text_column)}")
    lines += [
        f"label = {_toml(s.label)}",
        f"classes = {_toml(s.classes)}",
        f"sensitive = {_toml(s.sensitive)}  # kept for fairness audits; never a model input",
    ]
    layout = [f"{key} = {_toml(getattr(s, key))}" for key in ("encoding", "delimiter", "decimal")
              if getattr(s, key) != DataSchema.model_fields[key].default]  # fmt: skip
    if layout:
        lines.append("# how this file is written (a node's own --schema may differ here for its own file):")
        lines += layout
    for col in (s.text_column, s.label):
        lines += [f"# {col}: {note}" for note in draft.notes.get(col or "", [])]
    if s.features:
        lines.append("features = [")
        for feat in s.features:
            lines += [f"  # {feat.name}: {note}" for note in draft.notes.get(feat.name, [])]
            lines.append(_feature_line(feat))
        lines.append("]")
    for name in draft.skipped:
        lines += [f"# {name}: {note}" for note in draft.notes.get(name, [])]
    return "\n".join(lines) + "\n"


def cmd_schema_draft(args: argparse.Namespace) -> int:
    draft = draft_schema(
        args.data,
        args.label,
        sensitive=_split_names(args.sensitive),
        text=args.text,
        classes=_split_names(args.classes) or None,
        exclude=_split_names(args.exclude),
        max_categories=args.max_categories,
        encoding=args.encoding,
    )
    text = render(draft)
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError("the output file already exists", where=str(out), fix="choose another --out, or add --force")
    out.write_text(text, encoding="utf-8")
    s = draft.schema
    what = f"text column {s.text_column!r}" if s.text_column else f"{len(s.features)} feature(s)"
    left = f"; left out {', '.join(draft.skipped)}" if draft.skipped else ""
    print(f"wrote a draft schema to {out}: {what}, {len(s.classes)} classes{left}. Review it before use.")
    return 0
