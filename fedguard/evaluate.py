"""``fedguard evaluate``: score and fairness-audit any saved global model on any data file.

A checkpoint (``server.checkpoint``) holds the weights but not the architecture: the run config
comes from ``--config``, or else from the run store next to the checkpoint (checkpoints live in
``<store folder>/checkpoints/run-<id>/round-NNNNN.ckpt``, see ``checkpoint_dir``). The weights are
checked against the model the config builds, the data file is encoded with the given schema (which
must agree with the run's on every field that shapes the model; its sensitive columns may differ),
and the same ``evaluate_and_audit`` the evaluator node runs computes metrics and the audit. The
fairness report has one "round": the checkpoint's.

``--predictions FILE.csv`` also writes every row's prediction (row number in the data file, label,
score, prediction, sensitive attributes), so a reviewer can recompute the metrics and the audit
with their own tools (fairlearn, scikit-learn, R). The file holds per-row sensitive values: it is
as private as the data file and stays where the data is.

Group thresholds (``[mitigation] method = "thresholds"``, :mod:`common.fairness.thresholds`):
``--thresholds POLICY.json`` applies a policy (the run's ``thresholds.json`` beside its checkpoints)
and every number, the audit and ``--predictions`` describe the decisions after the thresholds;
``--fit-thresholds OUT.json`` fits one on a calibration part of the data (seeded by the run's seed)
and reports before/after on the rest. Either way the report says that the thresholds need the
sensitive attribute at prediction time.

Prior calibration (``[evaluation] calibration = "prior"``, :mod:`common.calibration`): the run's
``calibration.json`` beside its checkpoints holds per-class offsets fitted by the evaluator for the
latest round's model. It is applied to that round's checkpoint by default (the decisions the run
reported), never to another round's; ``--calibration FILE`` applies a given one, ``--calibration
none`` scores the model's own decisions. The model's own accuracy and macro-F1 are reported beside.

The evaluation helpers run on the CPU (``common.evaluation.predict`` returns CPU arrays and takes no
device), so this command does too.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError, FedGuardError
from common.files import atomic_write

if TYPE_CHECKING:  # imported where used: `fedguard --help` stays fast
    import numpy as np
    import pandas as pd

    from common.calibration import PriorCalibration
    from common.config import RunConfig
    from common.data import Encoded
    from common.fairness import Finding
    from common.fairness.thresholds import Summary, ThresholdPolicy
    from common.schema import DataSchema
    from server.checkpoint import Checkpoint
    from server.fairness_report import FairnessReport

Progress = Callable[[str], None]

#: Schema fields that shape the model (as ``client.node._MODEL_FIELDS``): they must match the run's.
MODEL_FIELDS = ("task", "text_column", "features", "label", "classes")

_RUN_DIR = re.compile(r"^run-(\d+)$")
NO_CALIBRATION = "none"
_DEFAULT_STORE = "runs.db"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Evaluation:
    """Everything one ``fedguard evaluate`` computed (``evaluate_checkpoint`` returns the first two)."""

    metrics: dict[str, float]
    report: FairnessReport | None
    checkpoint: Checkpoint
    config: RunConfig
    config_source: str
    data_path: Path
    #: Why there is no fairness report (None when there is one).
    no_audit_reason: str | None = None
    #: One row per evaluated row (see :func:`predictions_frame`); None unless asked for.
    predictions: pd.DataFrame | None = None
    #: The group thresholds the decisions went through (``--thresholds``), or None.
    applied: ThresholdPolicy | None = None
    #: The group thresholds fitted on a calibration part of the data (``--fit-thresholds``), or None.
    fitted: ThresholdPolicy | None = None
    #: The prior calibration the decisions went through (``--calibration``, or the run's own), or None.
    calibration: PriorCalibration | None = None

    def model_findings(self) -> list[Finding]:
        """Findings about the model itself (constant, skewed, no better than the majority class): they need no
        sensitive columns, so an evaluation without a fairness report states them too (a report holds them)."""
        from common.fairness import model_findings

        cfg = self.config
        return model_findings(self.metrics, cfg.fairness, self.checkpoint.round, cfg.data.schema_.classes)


@dataclass(frozen=True)
class FitRequest:
    """``--fit-thresholds``: what to equalize, for which attribute (None: the run's [mitigation] choice)."""

    constraint: str | None = None
    strength: float | None = None
    attribute: str | None = None


# -- finding the run config ------------------------------------------------------------------


def _has_runs_table(path: Path) -> bool:
    """Whether ``path`` is an SQLite file with a ``runs`` table; opened read-only, never created or changed."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None


def _store_candidates(folder: Path) -> list[Path]:
    """Run stores in ``folder``: ``runs.db`` first (the default name), then any other ``*.db`` with a runs table."""
    named = folder / _DEFAULT_STORE
    others = sorted(p for p in folder.glob("*.db") if p.is_file() and p.name != _DEFAULT_STORE)
    return [p for p in ([named] if named.is_file() else []) + others if _has_runs_table(p)]


def _config_from_store(ckpt: Checkpoint, ckpt_path: Path, store_path: Path | None) -> tuple[RunConfig, str]:
    """The run config recorded for the checkpoint's run, from ``store_path`` or the store next to it."""
    from common.config import config_from_json
    from server.store import RunStore

    fix = "pass --config with the run's config file (TOML or JSON)"
    if store_path is None:
        run_dir = ckpt_path.resolve().parent
        m = _RUN_DIR.match(run_dir.name)
        if m is None or run_dir.parent.name != "checkpoints":
            raise ConfigError(
                "cannot tell which run wrote this checkpoint: it is not in a run store's checkpoints/run-<id>/ folder",
                where=str(ckpt_path),
                fix=fix,
            )
        if int(m.group(1)) != ckpt.run_id:
            raise ConfigError(
                f"the checkpoint says run {ckpt.run_id} but lies in the folder of run {m.group(1)}",
                where=str(ckpt_path),
                fix=fix,
            )
        folder = run_dir.parent.parent
        candidates = _store_candidates(folder)
        if not candidates:
            raise ConfigError(
                f"no run store found next to the checkpoint (looked for {folder / _DEFAULT_STORE} and other "
                "*.db files there); the checkpoint alone does not say which model it holds",
                where=str(ckpt_path),
                fix=fix + ", or --store with the run store's path",
            )
    else:
        if not store_path.is_file() or not _has_runs_table(store_path):
            raise ConfigError("not a FedGuard run store", where=str(store_path), fix=fix + ", or a valid --store")
        candidates = [store_path]
    for candidate in candidates:
        with RunStore(candidate) as store:
            try:
                run = store.run(ckpt.run_id)
            except FedGuardError:
                continue
        return config_from_json(run["config_json"]), f"run {ckpt.run_id} in {candidate}"
    raise ConfigError(
        f"run {ckpt.run_id} is not recorded in {', '.join(str(c) for c in candidates)}",
        where=str(ckpt_path),
        fix=fix,
    )


# -- checks ----------------------------------------------------------------------------------


def _describe_features(schema: DataSchema) -> list[str]:
    return [f.name + (f" ({f.type})" if f.type != "numeric" else "") for f in schema.features]


def check_schema(schema: DataSchema, run_schema: DataSchema, source: str) -> None:
    """The schema must agree with the run's on every field that shapes the model (sensitive columns may differ)."""
    for name in MODEL_FIELDS:
        mine, theirs = getattr(schema, name), getattr(run_schema, name)
        if mine == theirs:
            continue
        detail = f"{theirs!r} in the run, {mine!r} here"
        if name == "features":
            detail = f"{_describe_features(run_schema)} in the run, {_describe_features(schema)} here"
            for i, (a, b) in enumerate(zip(theirs, mine, strict=False)):
                if a != b:
                    detail += f"; the first difference is feature {i + 1} ({b.name!r} here, {a.name!r} in the run)"
                    break
            else:
                detail += f"; the run has {len(theirs)} feature(s), this schema {len(mine)}"
        raise ConfigError(
            f"the schema differs from the run's in {name!r}: {detail}",
            where=source,
            fix="evaluate with a schema that declares the same task, text_column, features, label and classes as "
            "the run that trained the model (sensitive columns may differ)",
        )


def check_state(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], model_name: str, where: str) -> None:
    """The checkpoint's model arrays must be exactly the model's tensors, by name and shape, in order."""
    from server.checkpoint import CheckpointError

    fix = "pass the --config of the run that wrote this checkpoint"
    got = list(ckpt.model.items())
    names = list(expected)
    for i, name in enumerate(names):
        if i >= len(got):
            raise CheckpointError(
                f"the checkpoint does not fit the {model_name} model the config builds: tensor {name!r} "
                f"{expected[name]} is missing (the checkpoint has {len(got)} tensor(s), the model {len(names)})",
                where=where,
                fix=fix,
            )
        key, arr = got[i]
        if key != name:
            raise CheckpointError(
                f"the checkpoint does not fit the {model_name} model the config builds: tensor {i + 1} is "
                f"{key!r} in the checkpoint but {name!r} in the model",
                where=where,
                fix=fix,
            )
        if tuple(arr.shape) != expected[name]:
            raise CheckpointError(
                f"the checkpoint does not fit the {model_name} model the config builds: tensor {name!r} has "
                f"shape {tuple(arr.shape)} in the checkpoint but {expected[name]} in the model",
                where=where,
                fix=fix,
            )
    if len(got) > len(names):
        raise CheckpointError(
            f"the checkpoint does not fit the {model_name} model the config builds: tensor {got[len(names)][0]!r} "
            "is not in the model",
            where=where,
            fix=fix,
        )


def _check_policy(policy: ThresholdPolicy, schema: DataSchema, where: str) -> None:
    """A policy needs a binary task and its attribute among the data's sensitive columns (read at prediction time)."""
    if schema.num_classes != 2:
        raise ConfigError(
            f"group thresholds are for binary tasks; the schema has {schema.num_classes} classes",
            where=where,
            fix="drop --thresholds / --fit-thresholds",
        )
    if policy.attribute not in schema.sensitive:
        raise ConfigError(
            f"the threshold policy is for the sensitive attribute {policy.attribute!r}, which the schema does not "
            f"declare (sensitive = {schema.sensitive})",
            where=where,
            fix=f"add {policy.attribute!r} to the schema's sensitive columns: the thresholds need every row's "
            f"{policy.attribute!r} at prediction time",
        )


def _fit_options(req: FitRequest, cfg: RunConfig, schema: DataSchema, where: str) -> dict[str, Any]:
    m = cfg.mitigation
    attribute = req.attribute or cfg.mitigation_attribute or (schema.sensitive[0] if schema.sensitive else None)
    if schema.num_classes != 2 or attribute is None or attribute not in schema.sensitive:
        raise ConfigError(
            "--fit-thresholds needs a binary task and a sensitive column of the data to fit thresholds for "
            f"(classes {schema.classes}, sensitive = {schema.sensitive}, attribute {attribute!r})",
            where=where,
            fix="pass --attribute with one of the schema's sensitive columns, or a schema that declares one",
        )
    strength = req.strength if req.strength is not None else (m.strength if m.method == "thresholds" else 1.0)
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(
            f"--strength {strength}: the fraction of the gap the thresholds close is between 0 and 1",
            where="--strength",
            fix="pass a value in [0, 1]",
        )
    return {
        "attribute": attribute,
        "constraint": req.constraint or m.constraint,
        "strength": strength,
        "min_group_size": cfg.fairness.min_group_size,
        "calibration_fraction": m.calibration_fraction,
        "seed": cfg.seed,
    }


def _read_checkpoint(path: Path, progress: Progress) -> Checkpoint:
    from server.checkpoint import CheckpointError, latest_good, load

    if path.is_dir():
        ckpt = latest_good(path, warn=progress)
        progress(f"using the newest good checkpoint in {path}: {ckpt.path}")
        return ckpt
    if not path.is_file():
        raise CheckpointError(
            "checkpoint file not found",
            where=str(path),
            fix="pass --model with a round-NNNNN.ckpt file from <store folder>/checkpoints/run-<id>/",
        )
    return load(path)


# -- evaluation ------------------------------------------------------------------------------


def run_evaluation(
    model_path: Path,
    data_path: Path,
    schema_path: Path,
    config_path: Path | None = None,
    *,
    store_path: Path | None = None,
    progress: Progress = _stderr,
    with_predictions: bool = False,
    thresholds_path: Path | None = None,
    fit: FitRequest | None = None,
    calibration: str | None = None,
) -> Evaluation:
    """Load, check and evaluate a checkpoint; see the module docstring.

    ``thresholds_path``: apply that policy to the decisions; ``fit``: fit a policy on a calibration part
    of the data (returned as ``Evaluation.fitted``; the metrics and audit are the model's own);
    ``calibration``: a calibration file to apply, ``"none"``, or None for the run's own (if any).
    """
    import numpy as np

    from common.codec import load_numpy_state
    from common.config import load_config
    from common.data import encode, read_table, unit_cap_mask
    from common.evaluation import evaluate_and_audit, predict, provenance
    from common.fairness.thresholds import fit_and_measure, load_policy
    from common.models import build_model, text_encoding
    from common.schema import load_schema
    from server.fairness_report import build_fairness_report

    model_path, data_path, schema_path = Path(model_path), Path(data_path), Path(schema_path)
    schema = load_schema(schema_path)  # cheap checks first: a bad schema fails before anything heavy
    if thresholds_path is not None and fit is not None:
        raise ConfigError("--thresholds and --fit-thresholds do not go together", fix="pass one of them")
    if thresholds_path is not None and calibration not in (None, NO_CALIBRATION):
        raise ConfigError(
            "--thresholds and --calibration both move the decision threshold",
            fix="pass one of them (--calibration none scores the model's own decisions)",
        )
    applied = None
    if thresholds_path is not None:
        applied = load_policy(Path(thresholds_path))
        _check_policy(applied, schema, str(thresholds_path))
    ckpt = _read_checkpoint(model_path, progress)
    ckpt_path = ckpt.path or model_path
    cal = _calibration(calibration, ckpt, ckpt_path, schema, thresholds_path is not None, progress)
    if config_path is not None:
        cfg, source = load_config(config_path), str(config_path)
    else:
        cfg, source = _config_from_store(ckpt, ckpt_path, store_path)
    run_schema = cfg.data.schema_
    check_schema(schema, run_schema, str(schema_path))
    fit_options = _fit_options(fit, cfg, schema, str(schema_path)) if fit is not None else None

    model = build_model(cfg.model.name, run_schema, cfg.model.params)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state(ckpt, expected, cfg.model.name, str(ckpt_path))
    load_numpy_state(model, ckpt.model)
    progress(f"checkpoint {ckpt_path}: run {ckpt.run_id} ({cfg.name}), round {ckpt.round}; config from {source}")

    progress(f"loading {data_path} ...")
    table = read_table(data_path, schema)
    data = encode(table, schema, **text_encoding(cfg.model.name, cfg.model.params), source=str(data_path))
    if applied is not None and applied.round is not None and applied.round != ckpt.round:
        progress(
            f"note: the threshold policy was fitted on round {applied.round}'s model, this checkpoint is round "
            f"{ckpt.round}: thresholds fit the scores of the model they were fitted on"
        )
    after = " after the group thresholds" if applied else " after the prior calibration" if cal else ""
    progress(f"evaluating on {len(data)} rows{after} ...")
    metrics, audit = evaluate_and_audit(model, data, cfg.fairness, applied, cal)
    fitted = None
    if fit_options is not None:
        fitted = fit_and_measure(predict(model, data)[0], data.y.numpy(), data.groups, **fit_options)
        fitted.round = ckpt.round
    predictions = None
    if with_predictions:
        # Rows the privacy-unit cap left out are not evaluated; the rest keep their file position.
        kept = unit_cap_mask(table[schema.privacy_unit], schema, str(data_path)) if schema.privacy_unit else None
        rows = np.flatnonzero(kept) + 1 if kept is not None else np.arange(1, len(table) + 1)
        # the same model on the same rows and batches on the CPU: the probabilities the audit scored
        predictions = predictions_frame(predict(model, data)[0], data, schema, rows, applied, cal)

    report, reason = None, None
    if audit is not None:
        report = build_fairness_report(
            ckpt.run_id, cfg.name, [(ckpt.round, audit)], provenance(data, data_path.name), cfg=cfg.fairness,
            metrics_by_round={ckpt.round: metrics}, classes=schema.classes,
        )  # fmt: skip
        if applied is not None or cal is not None:  # the audit scored these decisions, not the model's own
            how = "the group thresholds" if applied is not None else "the prior calibration"
            report = report.model_copy(update={"decisions": f"after {how} (see Post-processing)"})
    else:
        reason = schema.no_audit_reason()
    return Evaluation(metrics, report, ckpt, cfg, source, data_path, reason, predictions, applied, fitted, cal)


def _calibration(
    requested: str | None,
    ckpt: Checkpoint,
    ckpt_path: Path,
    schema: DataSchema,
    thresholds: bool,
    progress: Progress,
) -> PriorCalibration | None:
    """The calibration to apply: the file asked for, none, or the run's own for this very round."""
    from common.calibration import CALIBRATION_FILE, load_calibration

    if requested == NO_CALIBRATION:
        return None
    if requested is not None:
        cal = load_calibration(Path(requested))
        where = requested
    else:
        own = Path(ckpt_path).parent / CALIBRATION_FILE
        if thresholds or not own.is_file():
            return None
        cal = load_calibration(own)
        where = str(own)
        if cal.round != ckpt.round:
            progress(
                f"note: {own} is for round {cal.round}'s model, this checkpoint is round {ckpt.round}: not applied "
                "(offsets fit the scores of the model they were fitted on; pass --calibration to apply it anyway)"
            )
            return None
        progress(f"applying the run's prior calibration {own} (--calibration none for the model's own decisions)")
    if list(cal.classes) != [str(c) for c in schema.classes]:
        raise ConfigError(
            f"the calibration is for classes {cal.classes}, the schema has {schema.classes}",
            where=where,
            fix="pass the calibration.json of this run, or --calibration none",
        )
    if requested is not None and cal.round is not None and cal.round != ckpt.round:
        progress(
            f"note: the calibration was fitted on round {cal.round}'s model, this checkpoint is round {ckpt.round}"
        )
    return cal


def evaluate_checkpoint(
    model_path: Path,
    data_path: Path,
    schema_path: Path,
    config_path: Path | None = None,
    *,
    store_path: Path | None = None,
    progress: Progress = _stderr,
) -> tuple[dict[str, float], FairnessReport | None]:
    """Metrics of a saved global model on ``data_path``, and its fairness report (None without an audit)."""
    ev = run_evaluation(model_path, data_path, schema_path, config_path, store_path=store_path, progress=progress)
    return ev.metrics, ev.report


def predictions_frame(
    probs: np.ndarray,
    data: Encoded,
    schema: DataSchema,
    rows: np.ndarray,
    policy: ThresholdPolicy | None = None,
    calibration: PriorCalibration | None = None,
) -> pd.DataFrame:
    """One row per evaluated row: ``row``, ``label``, ``score``, ``prediction``, then each sensitive column.

    ``row`` is the 1-based position in the data file (as in FedGuard's data errors); ``label`` and
    ``prediction`` are class names from the schema; the prediction is the most probable class, as
    the metrics and the audit use it. Binary tasks: ``score`` is the probability of the positive
    class (the schema's second class, the one the audit calls positive). More classes: one
    ``score:<class>`` column per class. Sensitive columns hold the group keys the audit grouped by;
    a sensitive column named like one of the fixed columns gets a ``sensitive:`` prefix. With a threshold
    ``policy`` the prediction is the post-processed one and a ``threshold`` column holds the row's threshold;
    with a prior ``calibration``, the prediction is the calibrated one (argmax of log-score + offset)
    and ``calibrated_score`` (``calibrated_score:<class>``) holds the probabilities after its temperature.
    """
    import numpy as np
    import pandas as pd

    from common.calibration import apply_offsets, tempered
    from common.fairness.thresholds import apply_thresholds

    classes = np.asarray(schema.classes, dtype=object)
    cols: dict[str, Any] = {"row": rows, "label": classes[data.y.numpy()]}
    p = probs.astype(np.float64)  # float32 → float64 is exact; CSV floats are written round-trip
    scores = [("score", p)] + ([("calibrated_score", tempered(p, calibration.temperature))] if calibration else [])
    for name, q in scores:
        if len(schema.classes) == 2:
            cols[name] = q[:, 1]
        else:
            cols.update({f"{name}:{c}": q[:, i] for i, c in enumerate(schema.classes)})
    if calibration is not None:
        cols["prediction"] = classes[apply_offsets(probs, calibration.offsets)]
    elif policy is None:
        cols["prediction"] = classes[probs.argmax(-1)]
    else:
        keys = np.asarray(data.groups[policy.attribute]).astype(str)
        cols["threshold"] = np.array([policy.threshold_for(k) for k in keys], dtype=np.float64)
        cols["prediction"] = classes[apply_thresholds(policy, probs, data.groups)]
    for name, values in data.groups.items():
        cols[f"sensitive:{name}" if name in cols else name] = values
    return pd.DataFrame(cols)


# -- output ----------------------------------------------------------------------------------


def _metrics_document(ev: Evaluation, fmt: str) -> str:
    """What --out gets when there is no fairness report: the metrics and why there is no audit."""
    import json

    from common.evaluation import loss_note
    from server.report_blocks import to_html, to_markdown

    m, ck = ev.metrics, ev.checkpoint
    doc: dict[str, Any] = {
        "format": "fedguard-evaluation/1",
        "run_id": ck.run_id,
        "run_name": ev.config.name,
        "round": ck.round,
        "data": ev.data_path.name,
        "metrics": m,
        "fairness_report": None,
        "note": ev.no_audit_reason,
        "model_findings": [f.model_dump(mode="json") for f in ev.model_findings()],
    }
    if ev.applied is not None or ev.fitted is not None or ev.calibration is not None:
        doc["post_processing"] = _post_processing_json(ev)
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    title = f"Evaluation — run {ck.run_id} ({ev.config.name}), round {ck.round}"
    lines = [
        f"Evaluation set: {int(m['n'])} rows ({ev.data_path.name})",
        f"Accuracy {m['accuracy']:.4f}, {loss_note(m, 4)}, macro-F1 {m['macro_f1']:.4f}",
        f"No fairness audit: {ev.no_audit_reason}.",
        *(f"Model finding ({f.severity}): {f.message}" for f in ev.model_findings()),
    ]
    blocks = [("h1", title), ("ul", lines), *_post_processing_blocks(ev)]
    return to_markdown(blocks) if fmt == "md" else to_html(blocks, title, json.dumps(doc))


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _thresholds_text(p: ThresholdPolicy) -> str:
    shown = ", ".join(f"{g} {t:.4f}" for g, t in sorted(p.thresholds.items())) or "none fitted"
    return f"{shown}; any other group {p.default_threshold:g}"


def _summary_rows(before: Summary, after: Summary) -> list[list[str]]:
    rows = [
        ["accuracy", _num(before.accuracy), _num(after.accuracy)],
        ["demographic-parity ratio", _num(before.demographic_parity_ratio), _num(after.demographic_parity_ratio)],
        [
            "demographic-parity difference",
            _num(before.demographic_parity_difference),
            _num(after.demographic_parity_difference),
        ],
        ["equalized-odds difference", _num(before.equalized_odds_difference), _num(after.equalized_odds_difference)],
    ]
    for g in sorted(before.groups):
        b, a = before.groups[g], after.groups.get(g)
        for rate in ("selection_rate", "tpr", "fpr"):
            rows.append(
                [
                    f"{g}: {rate.replace('_', ' ')}",
                    "suppressed" if b is None else _num(getattr(b, rate)),
                    "suppressed" if a is None else _num(getattr(a, rate)),
                ]
            )
    return rows


def _post_processing_blocks(ev: Evaluation) -> list[tuple[str, object]]:
    """What the group thresholds did, and that they need the sensitive attribute at prediction time."""
    blocks: list[tuple[str, object]] = []
    if ev.calibration is not None:
        text = _calibration_text(ev)  # not str.capitalize(): it would lower-case the class names
        blocks += [
            ("h2", "Post-processing: prior calibration"),
            (
                "p",
                "Every decision, metric and finding in this report is after the calibration "
                f"({ev.calibration.rule}), and every score after its temperature, softmax(log p / "
                f"{ev.calibration.temperature:.3g}); the loss is the model's own. {text[:1].upper()}{text[1:]}.",
            ),
        ]
    for p, applied in ((ev.applied, True), (ev.fitted, False)):
        if p is None:
            continue
        head = "Post-processing: group thresholds" if applied else "Group thresholds fitted (not applied here)"
        intro = (
            "Every decision, metric and finding in this report is after the group thresholds below "
            f"({p.rule}); the loss is the model's own."
            if applied
            else f"Fitted on {p.calibration_rows} rows of this data (the run's seed draws the calibration part); "
            "the metrics and findings in this report are the model's own decisions. Apply the policy with "
            "fedguard evaluate --thresholds."
        )
        items = [
            f"Attribute: {p.attribute}; constraint: {p.constraint.replace('_', ' ')}; strength {p.strength:g} "
            "(fraction of the gap closed)",
            f"Thresholds on the positive-class probability: {_thresholds_text(p)}",
        ]
        if p.suppressed:
            items.append(
                f"Groups with fewer than {p.min_group_size} calibration rows keep the default: "
                f"{', '.join(p.suppressed)}"
            )
        if p.round is not None:
            items.append(f"Fitted for the model of round {p.round}")
        blocks += [("h2", head), ("p", intro), ("ul", items), ("p", f"Needs the sensitive attribute: {p.note}")]
        if p.before is not None and p.after is not None:
            blocks += [
                (
                    "p",
                    f"When fitted, measured on the {p.after.rows} rows of the data it was fitted on that the fit "
                    "did not use:"
                    if applied
                    else f"Measured on the {p.after.rows} rows of this data not used for fitting:",
                ),
                ("table", (["", "before", "after"], _summary_rows(p.before, p.after))),
            ]
    return blocks


def _post_processing_json(ev: Evaluation) -> dict[str, Any]:
    return {
        "applied": ev.applied.model_dump(mode="json") if ev.applied else None,
        "fitted": ev.fitted.model_dump(mode="json") if ev.fitted else None,
        "calibration": ev.calibration.model_dump(mode="json") if ev.calibration else None,
    }


def _calibration_text(ev: Evaluation) -> str:
    from common.calibration import SHIFT_LEVEL, SIGNAL_Z

    c, m = ev.calibration, ev.metrics
    assert c is not None
    offsets = ", ".join(f"{k} {v:+.3f}" for k, v in zip(c.classes, c.offsets, strict=True))
    fitted = f"fitted on {c.rows} held-out rows" + (f" for round {c.round}'s model" if c.round is not None else "")
    if not any(c.offsets) and c.shift_p_value is not None and c.shift_p_value >= SHIFT_LEVEL:
        offsets = f"all 0: the model's class shares already matched the labels', p = {c.shift_p_value:.2f}"
    elif not any(c.offsets) and c.signal_z is not None:
        offsets = (
            "all 0: the model's own decisions are one class, and share-matched decisions would be right no "
            f"more often than a ranking without information would make them (z = {c.signal_z:.2f}, kept from "
            f"{SIGNAL_Z})"
        )
    elif not any(c.offsets) and c.matched_accuracy is not None and c.own_accuracy is not None:
        accuracies = f"{c.matched_accuracy:.3f} against the model's own {c.own_accuracy:.3f}"
        if c.matched_accuracy < c.own_accuracy:
            offsets = f"all 0: share-matched decisions would be less accurate on these rows, {accuracies}"
        elif c.rows_gained == 0 and c.rows_lost == 0:
            offsets = "all 0: share-matched offsets would change no decision on these rows"
        elif c.rows_gained is not None and c.rows_lost is not None:
            offsets = (
                f"all 0: share-matched decisions would not be clearly more accurate on these rows, {accuracies} "
                f"({c.rows_gained} rows gained, {c.rows_lost} lost; kept only if gained − lost ≥ "
                "max(1, √(gained + lost)))"
            )
    own = m.get("uncalibrated_accuracy")
    own_text = "" if own is None else f"; the model's own decisions: accuracy {own:.3f}"
    scale = f"; probabilities at temperature {c.temperature:.3g}" if c.temperature != 1.0 else ""
    return f"decisions after the prior calibration (offsets {offsets}; {fitted}{scale}){own_text}"


def render(ev: Evaluation, fmt: str) -> str:
    import json

    from server.fairness_report import render as render_report
    from server.fairness_report import report_blocks
    from server.report_blocks import to_html, to_markdown

    if ev.report is None:
        return _metrics_document(ev, fmt)
    extra = _post_processing_blocks(ev)
    if not extra:
        return render_report(ev.report, fmt)
    doc = ev.report.model_dump(mode="json") | {"post_processing": _post_processing_json(ev)}
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    blocks = report_blocks(ev.report)
    blocks[2:2] = extra  # after the title and the evaluation set
    if fmt == "md":
        return to_markdown(blocks)
    return to_html(blocks, f"FedGuard fairness report {ev.report.run_id}", json.dumps(doc))


def summary(ev: Evaluation) -> str:
    from common.evaluation import loss_note

    m, ck = ev.metrics, ev.checkpoint
    lines = [
        f"run {ck.run_id} ({ev.config.name}), round {ck.round}, on {ev.data_path.name} ({int(m['n'])} rows): "
        f"accuracy {m['accuracy']:.3f}  {loss_note(m)}  macro-F1 {m['macro_f1']:.3f}"
    ]
    if ev.report is None:
        lines.append(f"no fairness audit: {ev.no_audit_reason}")
        lines += [f"model finding: [{f.severity}] {f.message}" for f in ev.model_findings()]
    elif ev.report.findings:
        lines.append(f"fairness findings ({len(ev.report.findings)}):")
        lines += [f"  [{f.severity}] {f.message}" for f in ev.report.findings]
    else:
        lines.append("fairness findings: none (every disparity is within its threshold)")
    if ev.calibration is not None:
        lines.insert(1, _calibration_text(ev))
    if ev.applied is not None:
        p = ev.applied
        lines.insert(1, f"decisions after the group thresholds for {p.attribute!r} ({_thresholds_text(p)})")
        lines.append(f"note: {p.note}")
    if ev.fitted is not None:
        p = ev.fitted
        lines.append(
            f"group thresholds fitted for {p.attribute!r} ({p.constraint}, strength {p.strength:g}): "
            f"{_thresholds_text(p)}"
        )
        if p.before is not None and p.after is not None:
            b, a = p.before, p.after
            lines.append(
                f"  on the {a.rows} rows not used for fitting: accuracy {_num(b.accuracy)} → {_num(a.accuracy)}, "
                f"DP ratio {_num(b.demographic_parity_ratio)} → {_num(a.demographic_parity_ratio)}, "
                f"EO difference {_num(b.equalized_odds_difference)} → {_num(a.equalized_odds_difference)}"
            )
        lines.append(f"note: {p.note}")
    return "\n".join(lines)


def write_atomic(path: Path, text: str, what: str = "report", option: str = "--out") -> None:
    """Write the report via a temp file and a rename: never a half-written report."""
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as exc:
        raise FedGuardError(
            f"cannot write the {what}: {exc.strerror or exc}",
            where=str(path),
            fix=f"pass {option} with a path in an existing, writable folder",
        ) from None


def _check_output(path: str | None, option: str, what: str, data: str) -> None:
    """Fail before the evaluation, not after: the folder must exist and the data file must not be overwritten."""
    if not path:
        return
    target = Path(path).resolve()
    if not target.parent.is_dir():
        raise FedGuardError(
            f"the folder for the {what} does not exist", where=path, fix=f"create it or pass another {option}"
        )
    if target == Path(data).resolve():
        raise FedGuardError(
            f"{option} names the data file itself: writing the {what} would overwrite the data",
            where=path,
            fix=f"pass another {option}",
        )


# -- command line ----------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    predictions = getattr(args, "predictions", None)
    _check_output(args.out, "--out", "report", args.data)
    _check_output(predictions, "--predictions", "predictions", args.data)
    fit_out = getattr(args, "fit_thresholds", None)
    _check_output(fit_out, "--fit-thresholds", "threshold policy", args.data)
    outputs = [
        (o, path)
        for o, path in (("--out", args.out), ("--predictions", predictions), ("--fit-thresholds", fit_out))
        if path
    ]
    for i, (opt, path) in enumerate(outputs):
        for other, other_path in outputs[i + 1 :]:
            if Path(path).resolve() == Path(other_path).resolve():
                raise FedGuardError(f"{opt} and {other} name the same file", where=path, fix="give each its own file")
    fit_options = (getattr(args, "constraint", None), getattr(args, "strength", None), getattr(args, "attribute", None))
    if not fit_out and any(v is not None for v in fit_options):
        raise FedGuardError(
            "--constraint, --strength and --attribute choose how --fit-thresholds fits",
            fix="add --fit-thresholds OUT.json, or drop them",
        )
    ev = run_evaluation(
        Path(args.model),
        Path(args.data),
        Path(args.schema),
        Path(args.config) if args.config else None,
        store_path=Path(args.store) if getattr(args, "store", None) else None,
        with_predictions=bool(predictions),
        thresholds_path=Path(args.thresholds) if getattr(args, "thresholds", None) else None,
        fit=FitRequest(*fit_options) if fit_out else None,
        calibration=getattr(args, "calibration", None),
    )
    text = render(ev, args.format)
    if fit_out and ev.fitted is not None:
        write_atomic(Path(fit_out), ev.fitted.model_dump_json(indent=2) + "\n", "threshold policy", "--fit-thresholds")
    if args.out:
        write_atomic(Path(args.out), text)
    if predictions and ev.predictions is not None:
        write_atomic(Path(predictions), ev.predictions.to_csv(index=False), "predictions", "--predictions")
    say = print if args.out else _stderr  # without --out, stdout carries the report alone
    say(summary(ev))
    if args.out:
        say(f"{'fairness report' if ev.report is not None else 'evaluation'} written to {args.out}")
    if predictions and ev.predictions is not None:
        say(f"predictions for {len(ev.predictions)} rows written to {predictions}")
    if fit_out and ev.fitted is not None:
        say(f"threshold policy written to {fit_out} (apply it with --thresholds {fit_out})")
    if not args.out:
        sys.stdout.write(text)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = sub.add_parser(
        "evaluate",
        help="score and fairness-audit a saved global model (a round checkpoint) on a data file",
        description="Evaluate a round checkpoint on any data file that matches the run's schema: accuracy, loss, "
        "macro-F1 and, for binary tasks with sensitive columns, a fairness report. The run config comes from "
        "--config or from the run store next to the checkpoint.",
    )
    e.add_argument(
        "--model",
        required=True,
        help="checkpoint file (<store folder>/checkpoints/run-N/round-NNNNN.ckpt: round 6 is round-00006.ckpt)",
    )
    e.add_argument("--data", required=True, help="data file to evaluate on (CSV, Parquet or JSONL)")
    e.add_argument("--schema", required=True, help="data schema TOML of --data (its sensitive columns are audited)")
    e.add_argument("--config", help="the run's config (TOML or JSON); default: read from the run store")
    e.add_argument("--store", help="run store holding the run (default: the store next to the checkpoint)")
    e.add_argument("--format", choices=["html", "json", "md"], default="md")
    e.add_argument("--out", help="write the report to this file (default: stdout)")
    e.add_argument(
        "--predictions",
        metavar="FILE.csv",
        help="also write every row's prediction (row, label, score, prediction, sensitive columns) as CSV, "
        "to recompute the metrics and the fairness audit with other tools",
    )
    e.add_argument(
        "--thresholds",
        metavar="POLICY.json",
        help="apply a group-threshold policy (the run's thresholds.json) to the decisions before scoring and "
        "auditing; it needs the policy's sensitive attribute in --data",
    )
    e.add_argument(
        "--calibration",
        metavar="FILE.json|none",
        help="apply a prior calibration (per-class offsets; default: the run's calibration.json beside the "
        "checkpoint when it is for the checkpoint's round), or 'none' for the model's own decisions",
    )
    e.add_argument(
        "--fit-thresholds",
        metavar="OUT.json",
        help="fit group thresholds on a calibration part of --data, report before/after on the rest, and write "
        "the policy to OUT.json",
    )
    e.add_argument(
        "--constraint",
        choices=["demographic_parity", "equalized_odds"],
        help="--fit-thresholds: the gap to close (default: the run's mitigation.constraint)",
    )
    e.add_argument(
        "--strength",
        type=float,
        help="--fit-thresholds: fraction of the gap closed, 0 to 1 (default: the run's, or 1)",
    )
    e.add_argument(
        "--attribute", help="--fit-thresholds: sensitive column (default: the run's mitigation attribute, or the first)"
    )
    e.set_defaults(func=cmd_evaluate)
