"""``fedguard privacy audit``: measure an ε lower bound for a run config, beside the accountant's ε.

The accountant's ε is an upper bound that holds only if DP-SGD ran as planned. This command
checks that empirically with the one-run canary audit of Steinke, Nasr and Jagielski (2023):

1. the config's federation runs on Flower's simulation engine through ``fedguard.simulate`` (the
   same ServerApp, ClientApp, Opacus DP-SGD and ledger as ``fedguard simulate``) in a throw-away
   work dir with fresh ledgers;
2. after the partition files are written and before any node starts, m crafted canary records
   (a rare feature pattern and a random label for tabular data, a random string for text) are
   each added with probability ½ to one random node's *training* rows; nodes then do their
   ordinary Poisson-sampled DP-SGD over everything they hold;
3. after the run, every canary is scored by the final global model's log-odds of its label (black
   box: only the released model is used), less its never-trained twin's when the schema allows
   twins (see ``craft_canaries``); the auditor guesses IN for the k highest and OUT for the k
   lowest scores and counts correct guesses, which bounds ε from below at the run's δ with the
   stated confidence (``common.audit.one_run``);
4. a loss-threshold membership-inference attack on node 0's training records against the
   simulation's held-out records gives TPR at 0.1% and 1% FPR and the AUC.

The result is stored beside the run (``server.audit_store``) and rendered in its privacy report.
An audit measures the *simulated* federation built from this config; it spends no real node's
budget and touches no real node's data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import ConfigError
from fedguard.json_output import print_json

if TYPE_CHECKING:  # imported where used: `fedguard --help` stays fast
    import pandas as pd
    from flwr.clientapp import ClientApp

    from common.config import RunConfig
    from common.schema import DataSchema

Progress = Callable[[str], None]

DEFAULT_CANARIES = 500
DEFAULT_CONFIDENCE = 0.95
#: Guesses per side by default: the k most and k least likely members, k = m / 10. Fixed before
#: the scores are seen (choosing k after looking would void the stated confidence).
DEFAULT_GUESS_FRACTION = 0.1

METHOD = (
    "one-run canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023), black box: input-space canaries "
    "scored by the final global model's log-odds of their labels"
)
MEANING = (
    "ε_lower is a statistical lower bound: with the stated confidence (over the canaries' coin flips and the "
    "training randomness), this training is NOT (ε, δ)-DP for any ε below it. ε_upper is the accountant's bound, "
    "valid only if DP-SGD ran as planned. ε_lower > ε_upper means the claimed guarantee is false for this "
    "implementation (noise, clipping or accounting is broken). ε_lower far below ε_upper is expected and is "
    "not evidence of more privacy: one-run, black-box audits of DP-SGD are known to be loose."
)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- canaries --------------------------------------------------------------------------------


def craft_canaries(
    df: pd.DataFrame, schema: DataSchema, m: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``m`` records unlike the data (every column valid, model inputs rare, the label random), and
    their never-trained twins when the schema allows them.

    Each canary starts as a copy of a random data row (so columns the model ignores stay valid);
    categorical features take the categories least frequent in the data (distinct per canary while
    there are enough), numeric features a uniform value in their public range, text a random
    string; the label is drawn uniformly from the labels present. Rare inputs make each canary's
    gradient its own: what the model learns about one says little about another.

    Twins: when one categorical feature has at least 2m categories the data never uses, canary i
    gets unused category i there and its twin — the same record with unused category m + i — is
    never trained on. Scoring a canary against its twin cancels what the model predicts from the
    shared features (with a random label that dominates the raw loss) and leaves what it learned
    from the canary's own category. Without such a feature the twins are None (raw loss).
    """
    import pandas as pd

    canaries = df.iloc[rng.integers(0, len(df), size=m)].reset_index(drop=True).copy()
    twin_feature: tuple[str, list[str]] | None = None
    if schema.task == "text":
        alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 "))
        col = schema.text_column or "text"
        canaries[col] = ["".join(rng.choice(alphabet, size=48)) for _ in range(m)]
    else:
        for feat in schema.features or []:
            if feat.type == "categorical":
                cats = list(feat.categories or [])
                counts = df[feat.name].astype(str).value_counts()
                order = sorted(cats, key=lambda c: (int(counts.get(c, 0)), rng.random()))
                canaries[feat.name] = [order[i % len(order)] for i in range(m)]
                unused = [c for c in order if int(counts.get(c, 0)) == 0]
                if len(unused) >= 2 * m and (twin_feature is None or len(unused) > len(twin_feature[1])):
                    twin_feature = (feat.name, unused)
            else:
                if feat.range is not None:
                    lo, hi = feat.range
                else:
                    vals = pd.to_numeric(df[feat.name], errors="coerce")
                    lo, hi = float(vals.min()), float(vals.max())
                canaries[feat.name] = rng.uniform(lo, hi, size=m)
    labels = df[schema.label].dropna().unique()
    canaries[schema.label] = labels[rng.integers(0, len(labels), size=m)]
    if schema.privacy_unit:
        canaries[schema.privacy_unit] = [f"fedguard-canary-{i}" for i in range(m)]
    if twin_feature is None:
        return canaries, None
    name, unused = twin_feature
    canaries[name] = unused[:m]
    twins = canaries.copy()
    twins[name] = unused[m : 2 * m]
    return canaries, twins


class CanaryInjection:
    """The ``after_partitions`` hook: adds the included canaries to nodes' training rows.

    Canaries go only to rows the node will train on (positions in the node's own
    ``split_indices`` training split), so an included canary is one the node's DP-SGD samples.
    """

    def __init__(self, m: int, seed: int) -> None:
        self.m = m
        self.rng = np.random.default_rng(seed)
        self.canaries: pd.DataFrame | None = None
        self.twins: pd.DataFrame | None = None
        self.included = np.zeros(m, dtype=bool)
        self.node_of = np.full(m, -1)
        #: per partition file: the row positions holding canaries (to exclude them from the MIA).
        self.canary_rows: dict[int, np.ndarray] = {}
        self.holdout_path: Path | None = None

    def __call__(self, run_cfg: RunConfig, parts_dir: Path) -> None:
        import pandas as pd

        from common.data import split_indices

        schema = run_cfg.data.schema_
        paths = sorted(parts_dir.glob("partition-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
        frames = [pd.read_parquet(p) for p in paths]
        self.canaries, self.twins = craft_canaries(pd.concat(frames, ignore_index=True), schema, self.m, self.rng)
        self.included = self.rng.random(self.m) < 0.5
        self.node_of = np.where(self.included, self.rng.integers(0, len(paths), size=self.m), -1)
        for node, (path, part) in enumerate(zip(paths, frames, strict=True)):
            mine = np.flatnonzero(self.node_of == node)
            n = len(part) + len(mine)
            train_idx, _ = split_indices(n, run_cfg.data.validation_fraction, run_cfg.seed)
            if len(mine) > len(train_idx):
                raise ConfigError(
                    f"node {node} would hold more canaries ({len(mine)}) than training rows",
                    where="--canaries",
                    fix="use fewer canaries or more data rows",
                )
            at = np.sort(self.rng.choice(train_idx, size=len(mine), replace=False))
            rows = np.ones(n, dtype=bool)
            rows[at] = False
            merged = pd.concat(
                [part.set_axis(np.flatnonzero(rows)), self.canaries.iloc[mine][part.columns].set_axis(at)]
            ).sort_index()
            tmp = path.with_suffix(".tmp")
            merged.to_parquet(tmp, index=False)
            tmp.replace(path)  # atomic: a node never reads half a file
            self.canary_rows[node] = at
        if run_cfg.data.evaluation_path:
            self.holdout_path = Path(run_cfg.data.evaluation_path)


# -- scoring ---------------------------------------------------------------------------------


def per_record_losses(model: Any, data: Any, batch_size: int = 512) -> np.ndarray:
    """Cross-entropy of every row under ``model`` (eval mode, no gradients)."""
    import torch
    from torch import nn

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            logits = model(data.x[i : i + batch_size])
            out.append(nn.functional.cross_entropy(logits, data.y[i : i + batch_size], reduction="none"))
    return torch.cat(out).numpy().astype(float)


def per_record_log_odds(model: Any, data: Any, batch_size: int = 512) -> np.ndarray:
    """log p(y) − log(1 − p(y)) of every row's own label: unlike the loss it does not saturate at 0
    when the model is confident, so it still ranks memorised records among well-fitted ones."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            logp = torch.log_softmax(model(data.x[i : i + batch_size]), -1)
            y = data.y[i : i + batch_size]
            own = logp.gather(1, y[:, None])[:, 0]
            rest = torch.logsumexp(logp.scatter(1, y[:, None], float("-inf")), -1)
            out.append(own - rest)
    return torch.cat(out).numpy().astype(float)


def _final_model(cfg: RunConfig, store_path: Path, run_id: int) -> Any:
    from common.codec import load_numpy_state
    from common.models import build_model
    from server.checkpoint import checkpoint_dir, latest_good

    ckpt = latest_good(checkpoint_dir(store_path, run_id), warn=lambda _msg: None)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    load_numpy_state(model, ckpt.model)
    return model


def _encode(df: pd.DataFrame, cfg: RunConfig, source: str) -> Any:
    from common.data import encode
    from common.models import text_encoding

    return encode(df, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params), source=source)


def _accountant_bound(store_path: Path, run_id: int, cfg: RunConfig) -> tuple[float | None, float]:
    """(ε_upper, δ) of the run: the largest ε any node's ledger reports for this run, and its δ."""
    from server.privacy_report import build_privacy_report

    rep = build_privacy_report(store_path, run_id)
    eps = [c.epsilon_run for c in rep.clients if c.epsilon_run is not None]
    deltas = [c.delta for c in rep.clients if c.delta is not None]
    delta = max(deltas) if deltas else cfg.dp.delta
    if not cfg.dp.enabled:
        return None, delta
    return (max(eps) if eps else None), delta


# -- the audit -------------------------------------------------------------------------------


def run_audit(
    cfg: RunConfig,
    workdir: Path,
    *,
    canaries: int = DEFAULT_CANARIES,
    guesses: int | None = None,
    guesses_out: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: Progress = _stderr,
    client_app: ClientApp | None = None,
) -> dict[str, Any]:
    """Run the audit federation for ``cfg`` in ``workdir``; store and return the audit result.

    ``guesses``: IN guesses, and OUT guesses unless ``guesses_out`` says otherwise (default m/10
    each). ``guesses_out = 0`` guesses only IN (the bound allows abstaining): an overfitted model
    can move a memorised canary's log-odds either way — a whole label's canaries sometimes fall
    below their twins — and the lowest scores are then members, not the non-members an OUT guess
    assumes. ``client_app`` replaces FedGuard's ClientApp (tests only: the deliberately broken training).
    """
    import pandas as pd

    from common.audit import AuditBound, mia_metrics
    from common.data import split_indices
    from fedguard.simulate import simulate
    from server.audit_store import save_audit

    if canaries < 10:
        raise ConfigError(f"{canaries} canaries cannot bound anything", where="--canaries", fix="use at least 100")
    k = int(guesses) if guesses is not None else max(1, int(canaries * DEFAULT_GUESS_FRACTION))
    k_out = k if guesses_out is None else int(guesses_out)
    if k < 1 or k_out < 0 or k + k_out > canaries:
        raise ConfigError(
            f"{k} IN and {k_out} OUT guesses do not fit {canaries} canaries",
            where="--guesses" if guesses_out is None else "--guesses/--guesses-out",
            fix=f"use at least 1 IN guess and at most {canaries} guesses in all",
        )
    if cfg.secure_aggregation != "none":
        raise ConfigError(
            "the audit scores the released global model, which a homomorphic run never shows the server",
            where="secure_aggregation",
            fix="audit the same config with secure_aggregation = 'none' (DP-SGD on the nodes is the same)",
        )
    if cfg.simulation.holdout_fraction <= 0 and cfg.data.evaluation_path is None:
        raise ConfigError(
            "the membership-inference view needs held-out records",
            where="simulation.holdout_fraction",
            fix="set simulation.holdout_fraction > 0 (e.g. 0.2)",
        )
    workdir = Path(workdir).resolve()
    _fresh_audit_dir(workdir)
    injection = CanaryInjection(canaries, cfg.seed + 7919)
    progress(f"privacy audit: {canaries} canaries, each in training with probability ½; {k} IN + {k_out} OUT guesses")
    t0 = time.perf_counter()
    result = simulate(cfg, workdir, workdir / "runs.db", progress, client_app, after_partitions=injection)
    run_cfg = cfg  # model and schema as the run's (only its file paths differ)
    model = _final_model(run_cfg, result.store_path, result.run_id)
    assert injection.canaries is not None
    scores = per_record_log_odds(model, _encode(injection.canaries, run_cfg, "canaries"))
    if injection.twins is not None:  # how much more the model believes the canary's label than its twin's
        scores = scores - per_record_log_odds(model, _encode(injection.twins, run_cfg, "canary twins"))
    eps_upper, delta = _accountant_bound(result.store_path, result.run_id, cfg)
    bound = AuditBound.from_scores(scores, injection.included, k, k_out, delta, confidence)
    _write_canaries(workdir, injection, scores, k, k_out)

    node = 0
    part = pd.read_parquet(workdir / "partitions" / "partition-0.parquet")
    train_idx, _ = split_indices(len(part), cfg.data.validation_fraction, cfg.seed)
    members = np.setdiff1d(train_idx, injection.canary_rows.get(node, np.array([], dtype=int)))
    holdout = pd.read_parquet(injection.holdout_path) if injection.holdout_path else None
    if holdout is None or len(holdout) == 0:
        raise ConfigError("the simulation wrote no held-out records", where="simulation.holdout_fraction")
    mia = mia_metrics(
        per_record_losses(model, _encode(part.iloc[members].reset_index(drop=True), run_cfg, "node 0 training")),
        per_record_losses(model, _encode(holdout, run_cfg, "held-out")),
    )
    wall = time.perf_counter() - t0
    if eps_upper is None:
        verdict = "no-dp"
    elif bound.epsilon_lower > eps_upper:
        verdict = "violated"
    else:
        verdict = "consistent"
    audit = {
        "method": METHOD,
        "meaning": MEANING,
        "canary_design": "tabular: least frequent categories, uniform numeric values in range, random label; "
        "text: random 48-character strings, random label. Each canary goes to one random node's training rows "
        "with probability ½. Score: "
        + (
            "log-odds of the canary's label under the final model minus that of its never-trained twin "
            "(the same record with another unused category)."
            if injection.twins is not None
            else "log-odds of the canary's label under the final model."
        ),
        **bound.as_dict(),
        "guesses_in": k,
        "guesses_out": k_out,
        "epsilon_upper": eps_upper,
        "dp_enabled": cfg.dp.enabled,
        "verdict": verdict,
        "mia": {"node": str(node), "attack": "loss threshold (lower loss ⇒ member)", **mia.as_dict()},
        "wall_time_s": round(wall, 1),
    }
    save_audit(result.store_path, result.run_id, audit)
    audit["run_id"] = result.run_id
    audit["store"] = str(result.store_path)
    return audit


def _write_canaries(workdir: Path, injection: CanaryInjection, scores: np.ndarray, k: int, k_out: int) -> None:
    """``canaries.csv``: every canary, whether and where it was included, its score and the guess."""
    from common.audit import guess_from_scores

    assert injection.canaries is not None
    table = injection.canaries.copy()
    table.insert(0, "included", injection.included)
    table.insert(1, "node", injection.node_of)
    table.insert(2, "score", scores)
    table.insert(3, "guess", guess_from_scores(scores, k, k_out))
    if injection.twins is not None:
        differs = [c for c in table.columns[4:] if (injection.twins[c] != injection.canaries[c]).any()]
        for c in differs:
            table.insert(4, f"twin_{c}", injection.twins[c].to_numpy())
    tmp = workdir / "canaries.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(workdir / "canaries.csv")


def _fresh_audit_dir(workdir: Path) -> None:
    """The audit federation is throw-away: partitions, ledgers and node caches start empty.

    Refuses a folder that is not an earlier audit's (it must never clear a real node's ledger).
    """
    marker = workdir / ".fedguard-audit"
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise ConfigError(
            f"{workdir} exists and is not a privacy-audit work dir",
            where="--workdir",
            fix="pass a new or empty folder (the audit clears its simulated nodes' ledgers)",
        )
    if (workdir / "partitions").exists():
        shutil.rmtree(workdir / "partitions")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text("privacy audit work dir: simulated nodes, cleared on every audit\n", encoding="utf-8")


# -- CLI -------------------------------------------------------------------------------------


def summary(audit: dict[str, Any]) -> str:
    upper = audit["epsilon_upper"]
    lines = [
        f"privacy audit of run {audit['run_id']} ({audit['store']})",
        f"  canaries {audit['canaries']} ({audit['included']} included); guesses {audit['guesses']}, "
        f"correct {audit['correct']}",
        f"  ε_lower = {audit['epsilon_lower']:.3f} at {audit['confidence']:.0%} confidence, δ = {audit['delta']:g}",
        f"  ε_upper = {'∞ (DP off)' if upper is None else f'{upper:.3f}'} (accountant)",
        f"  verdict: {audit['verdict']}",
        f"  membership inference (node {audit['mia']['node']}): AUC {audit['mia']['auc']:.3f}, "
        f"TPR@0.1%FPR {audit['mia']['tpr_at_fpr_0_1']:.4f}, TPR@1%FPR {audit['mia']['tpr_at_fpr_1']:.4f}",
        f"  wall time {audit['wall_time_s']:.0f}s",
    ]
    return "\n".join(lines)


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    from common.config import load_config
    from server.privacy_report import build_privacy_report, render

    cfg = load_config(args.config)
    workdir = Path(args.workdir or Path(args.config).with_suffix("").name + "-audit")
    audit = run_audit(
        cfg, workdir, canaries=args.canaries, guesses=args.guesses, guesses_out=args.guesses_out,
        confidence=args.confidence,
    )  # fmt: skip
    report = workdir / f"privacy-report-run-{audit['run_id']}.html"
    from common.files import atomic_write

    atomic_write(report, render(build_privacy_report(audit["store"], audit["run_id"]), "html").encode("utf-8"))
    audit["report"] = str(report)
    if args.json:
        print_json(json.dumps(audit, indent=2))
    else:
        print(summary(audit))
        print(f"privacy report: {report}")
    return 1 if audit["verdict"] == "violated" else 0


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``fedguard privacy audit``."""
    p = sub.add_parser("privacy", help="empirical privacy checks")
    psub = p.add_subparsers(dest="privacy_command", required=True)
    a = psub.add_parser(
        "audit",
        help="measure an ε lower bound (one-run canary audit) and a membership-inference attack for a run config",
    )
    a.add_argument("--config", required=True, help="run config TOML (its simulation section is used)")
    a.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, help="canaries m (default %(default)s)")
    a.add_argument("--guesses", type=int, help="IN and OUT guesses each (default m/10)")
    a.add_argument("--guesses-out", type=int, help="OUT guesses (default: as --guesses; 0 = guess only IN)")
    a.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="default %(default)s")
    a.add_argument("--workdir", help="the audit's throw-away simulation folder (default: <config>-audit)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_privacy_audit, streams_progress=True)
