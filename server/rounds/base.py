"""The round engine's seam: what every aggregation mode provides, and the federation it runs in.

A :class:`RoundProtocol` is to FedGuard what Flower's ``Strategy`` is to Flower: the engine
(``server.app.run_federation``) samples nodes and collects replies; the protocol says what to
send, checks each reply's payload (after the shared :class:`~server.validation.Envelope`),
aggregates, and produces the next global model and its score. One file per mode.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from flwr.app import Message

from common.calibration import CALIBRATION_FILE
from common.config import RunConfig
from common.errors import FedGuardError
from common.evaluation import calibration_note, loss_note
from common.fairness.model_findings import constant_streak, constant_streak_line, model_findings
from common.files import atomic_write
from common.reply_signing import key_fingerprint
from common.resources import Meter
from server.checkpoint import Checkpoint, checkpoint_dir
from server.enrollment import read_enrolled, server_workdir
from server.grid_io import MeteredGrid, Progress, discover_roles, registered_keys
from server.run_health import node_label
from server.scoring import Score, Scorer
from server.store import RunStore
from server.validation import Envelope, Outcome

log = logging.getLogger("fedguard.server")
STRANGER = "stranger"
#: The thresholds policy the evaluator fitted on the latest round's model (``fedguard evaluate --thresholds``).
THRESHOLDS_FILE = "thresholds.json"  # alarm kind: a key the SuperLink registered that the kit does not enroll


def _fingerprint(key: bytes, node: int) -> str:
    try:
        return key_fingerprint(key)
    except (ValueError, UnsupportedAlgorithm):  # not an EC key FedGuard could have enrolled
        return f"unreadable-key:{node}"


@dataclass
class Federation:
    """What every round of a run shares: the metered grid, the run's store row, node keys, roles, scorer.

    ``node_keys`` is None in simulation (no node authentication); in deployment it is re-read from
    the SuperLink every round and every reply must be signed by its node's key. When the server
    workdir is known (``FEDGUARD_SERVER_WORKDIR``, set by ``fedguard server start``) only keys in
    its ``enrolled.json`` count: any other registered key (a stranger) is never asked for a role,
    never sampled, its replies fail the envelope check, and it raises an alarm once per run.
    """

    grid: MeteredGrid
    cfg: RunConfig
    store: RunStore
    run_id: int
    flower_run_id: int
    base: dict[str, Any]
    signed: bool
    evaluator_key: str
    meter: Meter
    progress: Progress
    rng: np.random.Generator  # seeded by the config: client selection only (never DP noise)
    roles: dict[int, str] = field(default_factory=dict)
    node_keys: dict[int, bytes] | None = None
    scorer: Scorer | None = None
    #: Node id → the name the operator knows it by (the kit's, or in simulation the node's own ``node-N``).
    names: dict[int, str] = field(default_factory=dict)
    _vetted: set[int] = field(default_factory=set)  # evaluator claims already checked (each reported once)
    _strangers: set[str] = field(default_factory=set)  # fingerprints already alarmed in this run
    _advised: set[str] = field(default_factory=set)  # model findings whose "Try: ..." a round line has shown

    @property
    def timeouts(self) -> tuple[float, float]:
        """(query timeout, poll interval) for the short exchanges around a round."""
        return min(self.cfg.server.round_timeout, 120.0), self.cfg.server.poll_interval

    def refresh(self, nodes: list[int] | None = None) -> list[int]:
        """Re-read node keys and learn the roles of new nodes; the online clients (the evaluator never trains)."""
        self.node_keys = self.enrolled_keys(registered_keys(self.grid)) if self.signed else None  # type: ignore[arg-type]
        online = sorted(int(n) for n in self.grid.get_node_ids()) if nodes is None else nodes
        if self.node_keys is not None:
            online = [n for n in online if n in self.node_keys]  # strangers are never asked, never sampled
        query_timeout, poll = self.timeouts
        reported: dict[int, str] = {}
        self.roles = discover_roles(
            self.grid,  # type: ignore[arg-type]
            online,
            self.roles,
            self.base,
            query_timeout,
            poll,
            self.node_keys,
            self.flower_run_id,
            names=reported,
        )
        self.learn_names(reported, "node")  # simulation only; a kit name, learnt above, outranks these
        self.adopt_evaluator()
        return [n for n in online if self.roles.get(n) == "client"]

    def enrolled_keys(self, keys: dict[int, bytes]) -> dict[int, bytes]:
        """The registered keys the kit enrolls (all of them when no server workdir is known); alarm on the rest.

        Fails closed: with a server workdir but no readable ``enrolled.json`` the run stops here.
        """
        workdir = server_workdir()
        if workdir is None:
            return keys
        enrolled = read_enrolled(workdir)  # re-read every round: a revocation takes effect at the next one
        allowed: dict[int, bytes] = {}
        for node, key in keys.items():
            fp = _fingerprint(key, node)
            if fp in enrolled:
                allowed[node] = key
                self.learn_names({node: enrolled[fp].name}, "kit")
            else:
                self._stranger(node, fp, workdir)
        return allowed

    def learn_names(self, names: dict[int, str], source: str) -> None:
        """Record names not yet known (``kit``: bound to an enrolled key; ``node``: a node's own answer, taken
        only in simulation); a kit name outranks a node's.

        In deployment what a node says of itself is never taken: only the kit's names (bound to enrolled keys)
        count, else the node is ``node <id>`` — a node must not pass for another by naming itself.
        """
        if source == "node" and self.signed:
            return
        clean = {n: "".join(ch for ch in name if ch.isprintable())[:64] for n, name in names.items()}  # no escapes
        new = {
            n: name
            for n, name in clean.items()
            if name and self.names.get(n) != name and (source == "kit" or n not in self.names)
        }
        if new:
            self.names.update(new)
            self.store.record_node_names(self.run_id, new, source)

    def label(self, node: int) -> str:
        """How progress lines name a node (``server.run_health.node_label``: its name, else its SuperLink id)."""
        return node_label(node, self.names)

    def _stranger(self, node: int, fp: str, workdir: Path) -> None:
        """Record a stranger once per run: run store alarm, the operator's log and the audit log."""
        if fp in self._strangers:
            return
        self._strangers.add(fp)
        rnd = len(self.store.rounds(self.run_id)) + 1
        detail = f"registered node {node} with key {fp} is not enrolled in the kit; ignored"
        if not self.store.record_alarm(self.run_id, STRANGER, fp, node_id=node, detail=detail, round_=rnd):
            return  # already recorded for this run (e.g. by an earlier ServerApp of it)
        self.progress(f"ALARM: {detail}")
        try:
            from server.control.audit import AuditLog

            AuditLog(workdir).append(
                actor="server",
                role="system",
                action="node.stranger",
                target=f"{fp} (node {node})",
                outcome=f"ignored in run {self.run_id}: not enrolled in the kit",
            )
        except (FedGuardError, OSError, sqlite3.Error) as exc:  # the run store keeps the alarm regardless
            log.warning("could not audit stranger %s: %s", fp, exc)

    def adopt_evaluator(self) -> None:
        """Score with the enrolled evaluator once it has answered (late answers too); else on the server."""
        claims = sorted(n for n, r in self.roles.items() if r == "evaluator" and n not in self._vetted)
        self._vetted.update(claims)
        bound = [n for n in claims if not self.signed or self._is_bound_evaluator(n)]
        if bound and (self.scorer is None or self.scorer.evaluator is None):
            if self.scorer is not None:
                self.progress(
                    f"evaluator {self.label(bound[0])} answered late; it scores and audits the rounds from now on"
                )
            self.scorer = Scorer(self.cfg, bound[0])
        elif self.scorer is None:
            self.scorer = Scorer(self.cfg, None)

    def _is_bound_evaluator(self, node: int) -> bool:
        """Only the key enrolled as the evaluator may act as one (roles are bound to keys)."""
        try:
            actual = key_fingerprint((self.node_keys or {}).get(node, b""))
        except (ValueError, UnsupportedAlgorithm):  # no key, or one that is not an EC key
            actual = "unknown"
        if self.evaluator_key and actual == self.evaluator_key:
            return True
        self.progress(
            f"node {node} claims the evaluator role but its key {actual} is not the enrolled evaluator's; ignored"
        )
        return False

    def sample(self, online: list[int]) -> list[int]:
        """This round's clients: ``clients_per_round`` of the online ones, drawn with the config seed."""
        k = min(self.cfg.clients_per_round, len(online))
        # By position: node ids are uint64 and would lose precision in a numpy array.
        return sorted(online[i] for i in self.rng.permutation(len(online))[:k])

    @property
    def evaluator(self) -> int | None:
        return self.scorer.evaluator if self.scorer is not None else None

    def needed(self, sampled: int) -> int:
        """Fewest accepted replies that let a round update the model."""
        return max(self.cfg.server.min_replies, math.ceil(self.cfg.server.min_fraction * sampled))

    def envelope(self, messages: list[Message], rnd: int) -> Envelope:
        return Envelope(messages, self.node_keys, self.flower_run_id, rnd)

    def record_score(self, rnd: int, score: Score) -> dict[str, float]:
        self.store.record_evaluation(
            self.run_id, rnd, score.metrics, score.audit_json, score.provenance, score.evaluated_by
        )
        folder = checkpoint_dir(self.store.path, self.run_id)
        if score.threshold_policy_json:  # [mitigation] thresholds: the latest policy, beside the checkpoints
            atomic_write(folder / THRESHOLDS_FILE, score.threshold_policy_json.encode())
        if score.calibration_json:  # [evaluation] calibration: the latest offsets, beside the checkpoints
            atomic_write(folder / CALIBRATION_FILE, score.calibration_json.encode())
        m = score.metrics
        by = score.evaluated_by if self.evaluator is None else f"evaluator {self.label(self.evaluator)}"  # its name
        self.progress(
            f"  round {rnd} held-out accuracy {m['accuracy']:.3f}{calibration_note(m)}, "
            f"{loss_note(m)}, macro-F1 {m.get('macro_f1', float('nan')):.3f} ({by})"
        )
        classes = self.cfg.data.schema_.classes
        for f in model_findings(m, self.cfg.fairness, rnd, classes):
            if f.kind != "constant_model":  # a constant model is called out once it persists (below)
                self.progress(self._advise_once(f.kind, f"  round {rnd}: {f.severity.upper()} {f.message}"))
        streak = constant_streak(self.store.evaluations(self.run_id)) if rnd > 0 else 0
        if streak >= self.cfg.fairness.constant_rounds:
            self.progress(self._advise_once("constant_streak", constant_streak_line(rnd, streak, m, classes)))
        return m

    def _advise_once(self, kind: str, line: str) -> str:
        """What to try is said once per run and kind; later rounds state the finding (the summary repeats it)."""
        said = line if kind not in self._advised else line.split(" Try: ")[0]
        self._advised.add(kind)
        return said

    def record_costs(self, rnd: int, aggregation_seconds: float | None) -> None:
        """The round's traffic and the server's usage since the last call (round 0: setup)."""
        usage = self.meter.stop()
        self.store.record_costs(
            self.run_id,
            rnd,
            self.grid.take(),
            self.roles,
            server=usage.to_dict(),
            wall_seconds=usage.wall_seconds,
            aggregation_seconds=aggregation_seconds,
        )
        self.meter.restart()


@dataclass
class Aggregate:
    """What a round's aggregation produced: whether the model moved, why not, and what to record."""

    updated: bool
    discarded: str | None = None  # the round was refused after aggregation (the model is unchanged)
    meta: dict[str, Any] = field(default_factory=dict)


class RoundProtocol(ABC):
    """One aggregation mode. The engine calls, each round: ``configure_train`` → ``accept`` per reply
    (after the shared envelope check) → ``aggregate`` once enough were accepted → ``conclude``."""

    #: The config's ``secure_aggregation`` value this protocol serves.
    mode: ClassVar[str]

    def __init__(self, fed: Federation, state: OrderedDict[str, np.ndarray]) -> None:
        self.fed, self.cfg, self.state = fed, fed.cfg, state

    @classmethod  # noqa: B027
    def check_supported(cls, cfg: RunConfig, *, simulated: bool, resuming: bool) -> None:
        """Raise a ConfigError before the run is recorded if this mode cannot run this way."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the operator: the mode and what the server can see."""

    def resume(self, ckpt: Checkpoint) -> None:  # noqa: B027
        """Continue from a checkpoint (modes that cannot resume refuse in ``check_supported``)."""

    @abstractmethod
    def start(self, resuming: bool) -> Score | None:
        """Round 0: the initial global model's score (None: not scored)."""

    @abstractmethod
    def configure_train(self, rnd: int, nodes: list[int]) -> tuple[list[Message], list[Outcome]]:
        """The train messages for the sampled nodes, and outcomes for nodes left out before sending."""

    @abstractmethod
    def accept(self, reply: Message) -> Outcome:
        """Check one reply's payload (its envelope already passed) and take an accepted one into the round."""

    @abstractmethod
    def aggregate(self, rnd: int, outcomes: list[Outcome], needed: int) -> Aggregate:
        """Turn the accepted replies into the next global model (called only with ≥ ``needed`` accepted)."""

    @abstractmethod
    def conclude(self, rnd: int, updated: bool) -> Score | None:
        """After the round: persist what must survive a crash and score the new global model."""

    def final_state(self) -> OrderedDict[str, np.ndarray] | None:
        """The plaintext global model after the last round, if the server holds one."""
        return None
