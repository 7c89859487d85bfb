"""The data schema a data owner declares for a dataset file.

Everything that shapes a model (feature kinds, category lists, label classes) is declared
here rather than learned from the data: nodes must agree on it, and anything learned from one
node's private rows would leak them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import ConfigError, closest_name


def _numbers_as_text(values: Any) -> Any:
    """Declared values written as TOML numbers (``classes = [0, 1]``) as the text the data is compared with
    (1 and 1.0 read "1"); anything else is left for validation to report."""
    if not isinstance(values, list):
        return values

    def text(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return v
        return str(int(v)) if float(v).is_integer() else str(v)

    return [text(v) for v in values]


class Feature(BaseModel):
    """One model input column of a tabular dataset."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: Literal["numeric", "categorical"] = "numeric"
    #: Declared category values (categorical only); a value outside this list is a data error.
    categories: list[str] | None = None
    #: Public bounds (numeric only): values are clipped to [lo, hi] and scaled to [-1, 1].
    #: Without bounds a data-independent signed log1p transform is used.
    range: tuple[float, float] | None = None
    #: A missing or empty value: "refuse" (the node refuses the data file, naming the rows) or "token" (the
    #: model learns one vector meaning "missing" for this feature; FT-Transformer's per-feature tokens). Whether
    #: a value is missing is part of the record, so under DP-SGD it is protected like any other value.
    missing: Literal["refuse", "token"] = "refuse"

    _categories_as_text = field_validator("categories", mode="before")(_numbers_as_text)

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.type == "categorical":
            if not self.categories:
                raise ValueError(
                    f"categorical feature {self.name!r} needs a 'categories' list "
                    "(declared, not learned from private data)"
                )
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"feature {self.name!r}: 'categories' has duplicates")
            if self.range is not None:
                raise ValueError(f"feature {self.name!r}: 'range' is for numeric features only")
        else:
            if self.categories is not None:
                raise ValueError(f"feature {self.name!r}: 'categories' is for categorical features only")
            if self.range is not None and not self.range[0] < self.range[1]:
                raise ValueError(f"feature {self.name!r}: range lo must be < hi, got {self.range}")
        return self


class DataSchema(BaseModel):
    """How to read one dataset: task, inputs, label, sensitive attributes."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["text", "tabular"]
    #: Text task: the column holding the text.
    text_column: str | None = None
    #: Tabular task: the model's input columns, in order.
    features: list[Feature] = Field(default_factory=list)
    label: str = Field(min_length=1)
    #: Declared label values, in class-index order (compared as strings).
    classes: list[str] = Field(min_length=2)
    _classes_as_text = field_validator("classes", mode="before")(_numbers_as_text)
    #: Sensitive attribute columns, kept for fairness audits.
    sensitive: list[str] = Field(default_factory=list)
    #: Allow sensitive columns to also be model inputs (off by default).
    sensitive_as_features: bool = False
    #: File format; ``auto`` picks it from the file extension.
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    #: Text encoding for CSV and JSONL files.
    encoding: str = "utf-8"
    #: How a CSV file is written: the character between fields (``";"`` in many European Excel exports, ``"\t"``)
    #: and the decimal mark of its numbers. A node's own schema may set these for its own file.
    delimiter: str = Field(",", min_length=1, max_length=1)
    decimal: Literal[".", ","] = "."
    #: Optional column naming the person a record is about (e.g. a patient id). Each unit keeps at
    #: most ``max_records_per_unit`` records (the first ones in file order), and reports add the
    #: group-privacy ε for a whole unit to the record-level ε.
    privacy_unit: str | None = None
    max_records_per_unit: int = Field(5, ge=1, le=1000)

    @model_validator(mode="after")
    def _check_task(self) -> DataSchema:
        if self.delimiter in ('"', "\n", "\r") or self.delimiter == self.decimal:
            raise ValueError(
                f"delimiter {self.delimiter!r} cannot separate fields"
                + (f" (it is also the decimal mark {self.decimal!r})" if self.delimiter == self.decimal else "")
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("'classes' has duplicates")
        if self.task == "text":
            if not self.text_column:
                raise ValueError("task 'text' needs 'text_column'")
            if self.features:
                raise ValueError("task 'text' takes no 'features' (the text column is the input)")
        else:
            if not self.features:
                raise ValueError("task 'tabular' needs at least one entry in 'features'")
            if self.text_column:
                raise ValueError("task 'tabular' takes no 'text_column'")
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"feature names repeated: {sorted(dup)}")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        if self.privacy_unit is not None and self.privacy_unit in {*names, self.label, self.text_column}:
            raise ValueError(f"privacy_unit column {self.privacy_unit!r} must not be a model input or the label")
        leaked = sorted(set(self.sensitive) & set(names))
        if leaked and not self.sensitive_as_features:
            raise ValueError(
                f"sensitive columns {leaked} are listed as features; remove them or set sensitive_as_features = true"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def no_audit_reason(self) -> str | None:
        """Why a model of this data gets no fairness audit, in words for the operator; None when it gets one."""
        if not self.sensitive:
            return "the schema declares no sensitive columns"
        if self.num_classes != 2:
            return (
                f"the task has {self.num_classes} classes; fairness audits and mitigation are defined for binary "
                f"tasks (the sensitive columns {self.sensitive} are still kept out of the model's inputs)"
            )
        return None

    def required_columns(self) -> list[str]:
        cols = [self.label, *self.sensitive, *([self.privacy_unit] if self.privacy_unit else [])]
        cols += [self.text_column] if self.text_column else [f.name for f in self.features]
        return list(dict.fromkeys(cols))


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``source: field.path: reason``; an unknown key of ``model`` (or of a table
    inside it) gets the field it most resembles (``[server.optimiser]``: did you mean 'optimizer'?)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None:
            close = closest_name(str(err["loc"][-1]), _field_names(model, err["loc"][:-1]))
            msg += f" (did you mean {close!r}?)" if close else ""
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def _field_names(model: type[BaseModel], path: tuple[int | str, ...]) -> list[str]:
    """The keys a config table accepts at ``path`` inside ``model`` (aliases included); [] where unknown."""
    for part in path:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        nested = field.annotation if field is not None else None
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            return []
        model = nested
    return [f.alias or n for n, f in model.model_fields.items()]


def read_schema_table(path: str | Path) -> dict[str, Any]:
    """A schema TOML file's table, checked as ``load_schema`` checks it: what a run config's
    ``[data] schema = "file.toml"`` puts in place of the file name (the config the nodes get holds it)."""
    raw = _schema_toml(Path(path))
    _validated(raw, str(path))
    return raw


def load_schema(path: str | Path) -> DataSchema:
    """Read a schema TOML file (the same table as ``[data.schema]`` in a run config)."""
    return _validated(_schema_toml(Path(path)), str(path))


def _schema_toml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError("schema file not found", where=str(p), fix="pass the path of an existing TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the schema file: {exc.strerror or exc}", where=str(p)) from None


def _validated(raw: dict[str, Any], source: str) -> DataSchema:
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            "invalid data schema:\n" + format_validation_error(exc, source, DataSchema),
            fix="see 'Data schema' in docs/configuration.md",
        ) from None
