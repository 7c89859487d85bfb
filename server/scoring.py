"""Scoring every round's global model: metrics and the fairness audit, recorded in the run store.

When an evaluator node takes part (a node holding the central held-out set), the
server sends it the global model and stores what it returns; the server never needs the
held-out data. Without one, a server-side held-out file (``data.evaluation_path``) is used.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import records as R
from common.calibration import calibration_from_json
from common.codec import load_numpy_state, numpy_to_record
from common.config import RunConfig
from common.data import Encoded, load_encoded
from common.errors import DataError, FedGuardError
from common.evaluation import provenance, score_held_out
from common.fairness.thresholds import policy_from_json
from common.models import build_model, text_encoding
from server.grid_io import collect_replies
from server.store import RunStore
from server.validation import Envelope

log = logging.getLogger("fedguard.server")


class HeldOutRefused(FedGuardError):
    """The evaluator refused its held-out data before round 1: no round could be scored, so none is trained."""

    code = "held-out-refused"


@dataclass
class Score:
    metrics: dict[str, float]
    audit_json: str | None
    provenance: dict[str, object] | None
    evaluated_by: str
    findings: list[str] = field(default_factory=list)
    #: ``[mitigation] method = "thresholds"``: the group thresholds fitted on this round's model (JSON).
    threshold_policy_json: str | None = None
    #: ``[evaluation] calibration = "prior"``: the per-class offsets fitted on this round's model (JSON).
    calibration_json: str | None = None


def _checked(text: str, parse: Callable[[str, str], object], what: str) -> str | None:
    """A JSON file the evaluator sent (threshold policy, calibration), checked: one that does not parse is
    left out, not stored."""
    if not text:
        return None
    try:
        parse(text, what)
    except FedGuardError as exc:
        log.warning("%s", exc)
        return None
    return text


def score_from_reply(content: RecordDict, node: int) -> Score:
    """The evaluator's metrics, audit, provenance, threshold policy and calibration, as the run store keeps them."""
    metrics = {k: float(v) for k, v in content[R.EVALUATION].items() if isinstance(v, int | float)}
    audit = str(content[R.AUDIT].get(R.AUDIT_JSON, "")) if R.AUDIT in content else ""
    prov = json.loads(str(content[R.AUDIT].get(R.PROVENANCE_JSON, "{}"))) if R.AUDIT in content else None
    sent: Mapping[str, object] = content[R.AUDIT] if R.AUDIT in content else {}
    who = f"evaluator node {node}'s"
    policy = _checked(str(sent.get(R.THRESHOLD_POLICY_JSON, "")), policy_from_json, f"{who} threshold policy")
    cal = _checked(str(sent.get(R.CALIBRATION_JSON, "")), calibration_from_json, f"{who} calibration")
    return Score(
        metrics, audit or None, prov, f"evaluator node {node}", threshold_policy_json=policy, calibration_json=cal
    )


class Scorer:
    """Scores a global model on the evaluator node, or on the server's own held-out file."""

    def __init__(self, cfg: RunConfig, evaluator: int | None) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self._holdout: Encoded | None = None
        if evaluator is None and cfg.data.evaluation_path:
            self._holdout = load_encoded(
                cfg.data.evaluation_path,
                cfg.data.schema_,
                **text_encoding(cfg.model.name, cfg.model.params),
                cache_dir=None,
            )

    @property
    def active(self) -> bool:
        return self.evaluator is not None or self._holdout is not None

    def describe(self, label: Callable[[int], str]) -> str:
        """One line for the run's log; ``label`` names the evaluator as round lines do (``Federation.label``)."""
        if self.evaluator is not None:
            gap = self.cfg.data.schema_.no_audit_reason()
            does = (
                f"scores every round's model (no fairness audit: {gap})"
                if gap
                else "scores and audits every round's model"
            )
            return f"evaluator {label(self.evaluator)} {does}"
        if self._holdout is not None:
            return f"the server scores every round's model on {self.cfg.data.evaluation_path}"
        return "no evaluation: no evaluator node and no data.evaluation_path"

    def score(
        self,
        grid: object,
        rnd: int,
        state: OrderedDict[str, np.ndarray],
        base: dict[str, object],
        node_keys: dict[int, bytes] | None,
        flower_run_id: int | None,
    ) -> Score | None:
        if self.evaluator is not None:
            return self._remote(grid, rnd, state, base, node_keys, flower_run_id)
        if self._holdout is None:
            return None
        model = build_model(self.cfg.model.name, self.cfg.data.schema_, self.cfg.model.params)
        load_numpy_state(model, state)
        metrics, audit, policy, calibration = score_held_out(model, self._holdout, self.cfg, rnd)
        source = str(self.cfg.data.evaluation_path)
        return Score(
            metrics,
            audit.model_dump_json() if audit else None,
            provenance(self._holdout, source),
            "server",
            threshold_policy_json=policy.model_dump_json() if policy else None,
            calibration_json=calibration.model_dump_json() if calibration else None,
        )

    def _remote(
        self,
        grid: object,
        rnd: int,
        state: OrderedDict[str, np.ndarray],
        base: dict[str, object],
        node_keys: dict[int, bytes] | None,
        flower_run_id: int | None,
    ) -> Score | None:
        node = int(self.evaluator or 0)
        msg = Message(
            RecordDict({R.ARRAYS: numpy_to_record(state), R.CONFIG: ConfigRecord({**base, R.ROUND: rnd})}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
            group_id=str(rnd),
        )
        gate = Envelope([msg], node_keys, int(flower_run_id or 0), rnd)
        replies, _, _ = collect_replies(grid, [msg], self.cfg.server.round_timeout, self.cfg.server.poll_interval)  # type: ignore[arg-type]
        if not replies:
            log.warning("round %d: the evaluator did not reply in time", rnd)
            return None
        if (left_out := gate.check(replies[0])) is not None:
            log.warning("round %d: evaluator reply %s: %s", rnd, left_out.status, left_out.reason)
            if rnd == 0 and left_out.status == "refused" and (left_out.reason or "").startswith(DataError.code):
                # Its data will not fix itself: training now would spend every node's budget on rounds that
                # nobody scores. Fail closed before round 1.
                raise HeldOutRefused(
                    f"the evaluator refused its held-out data before round 1: {left_out.reason}; nothing was "
                    "trained and no node spent budget",
                    fix="correct the evaluator's held-out file (its node log names the row, by the log id) and "
                    "start the run again",
                )
            return None
        content = replies[0].content
        if R.EVALUATION not in content:
            log.warning("round %d: evaluator reply without an evaluation: records %s", rnd, sorted(content.keys()))
            return None
        return score_from_reply(content, node)

    def record(self, store: RunStore, run_id: int, rnd: int, score: Score) -> None:
        store.record_evaluation(run_id, rnd, score.metrics, score.audit_json, score.provenance, score.evaluated_by)
