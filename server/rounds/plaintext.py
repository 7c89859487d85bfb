"""Plaintext rounds: the server sees each update, checks it, and aggregates as it arrives.

FedAvg is a streaming weighted sum (server memory stays at one model however many replies);
with central DP the same sum runs over clipped updates with equal weights, then noise; the
robust options (coordinate-wise median, trimmed mean) hold the round's updates until it ends.
The server optimizer (FedAvg, FedAvgM, FedAdam, ...) turns each aggregate into the next model.

Safe by default: one node must not be able to swamp a round. The first replies of a round (up to
``REFERENCE_WINDOW``) are held until the round's reference is known — the lower median of their
update norms and declared weights — then an update whose norm exceeds ``norm_bound_factor`` ×
that median is rejected with its reason, and a declared weight above ``weight_cap_factor`` × the
median weight counts only as the cap; later replies stream against the same reference. Central
DP needs neither: it clips every update and weighs them equally.

An update no larger than the global model itself is never rejected by the norm bound: without DP,
nodes whose single-class data the model already fits send updates of ~0, and where they are the
majority their median (3e-11 on churn, Dirichlet 0.1) made the informative nodes' updates look
"10⁵× the median": the two nodes holding the other class were rejected in rounds 8–10 and the
model ended on the majority class. A gross poisoning (+1e3 on every weight) is still thousands of
times the model's norm.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import records as R
from common.codec import numpy_to_record
from common.optimizers import describe as describe_optimizer
from common.optimizers import make_server_optimizer
from common.privacy import epsilon_spent
from server.aggregation import CentralDPMean, CoordinateRobust, HeldWeightedMean, WeightedMean
from server.checkpoint import Checkpoint, checkpoint_dir
from server.checkpoint import save as save_checkpoint
from server.mitigation import RoundWeighting
from server.rounds.base import Aggregate, Federation, RoundProtocol
from server.scoring import Score
from server.validation import Outcome, Rejected, classify_reply, model_norm, update_norm

Aggregator = WeightedMean | CentralDPMean | CoordinateRobust | HeldWeightedMean

#: Updates held (at most) to fix a round's reference norm and weight; memory stays bounded.
REFERENCE_WINDOW = 32


def lower_median(values: list[float]) -> float:
    """The median that is always one of the values, the smaller one for an even count: with two
    nodes an outlier cannot pull the reference halfway towards itself."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass
class Bounds:
    """A round's reference: the updates beyond it are rejected (norm) or capped (weight)."""

    median_norm: float
    median_weight: float
    norm_limit: float | None
    weight_cap: float | None
    model_norm: float = 0.0  # the norm limit is never below it

    def meta(self) -> dict[str, float | None]:
        return asdict(self)


class PlaintextRounds(RoundProtocol):
    """FedAvg family, central DP and robust aggregation over plaintext updates; checkpoints every round."""

    mode: ClassVar[str] = "none"

    def __init__(self, fed: Federation, state: OrderedDict[str, np.ndarray]) -> None:
        super().__init__(fed, state)
        self.optimizer = make_server_optimizer(self.cfg.server.optimizer)
        self.central_releases = 0
        #: fairfed / qfedavg: aggregation multipliers from each reply's noised counts (server.mitigation).
        self.weighting = RoundWeighting(self.cfg) if self.cfg.mitigation.node_releases_per_round else None
        self._added: list[int] = []  # node ids in the order their updates were added (the multipliers' order)
        self._agg: Aggregator = self._aggregator()
        self._held: list[tuple[Outcome, float]] = []  # (accepted so far, update norm) until bounds are set
        self._bounds: Bounds | None = None

    def describe(self) -> str:
        cfg = self.cfg
        if cfg.central_dp.enabled:
            how = f"central DP FedAvg (clip {cfg.central_dp.clipping_norm:g}, σ {cfg.central_dp.noise_multiplier:g})"
        elif cfg.server.aggregation != "fedavg":
            how = f"coordinate-wise {cfg.server.aggregation.replace('_', ' ')}"
        elif self.weighting is not None:
            m = cfg.mitigation
            how = f"FedAvg weighted by {m.method} (strength {m.strength:g}) from the nodes' noised counts"
        else:
            how = "streaming weighted FedAvg"
        return f"plaintext aggregation: {how}, server optimizer {describe_optimizer(cfg.server.optimizer)}"

    def resume(self, ckpt: Checkpoint) -> None:
        self.central_releases = int(ckpt.extra.get("central_releases", 0))
        if self.weighting is not None:
            self.weighting.multipliers = {str(k): float(v) for k, v in ckpt.extra.get("mitigation", {}).items()}
        self.optimizer.load(ckpt.extra.get("optimizer", {}), ckpt.extra_arrays)

    def start(self, resuming: bool) -> Score | None:
        return None if resuming else self._score(0)

    def configure_train(self, rnd: int, nodes: list[int]) -> tuple[list[Message], list[Outcome]]:
        self._agg, self._held, self._bounds, self._added = self._aggregator(), [], None, []
        if self.weighting is not None:
            self.weighting.start_round()
        arrays = numpy_to_record(self.state)
        config = ConfigRecord({**self.fed.base, R.ROUND: rnd})
        messages = [
            Message(
                RecordDict({R.ARRAYS: arrays, R.CONFIG: config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
                # The round closes after round_timeout: a node that gets the message later (a cut
                # link, a backlog) refuses it instead of spending budget.
                ttl=self.cfg.server.round_timeout,
            )
            for node in nodes
        ]
        return messages, []

    def accept(self, reply: Message) -> Outcome:
        also = frozenset({R.MITIGATION_COUNTS}) if self.weighting is not None else frozenset()
        o = classify_reply(reply, self.state, self.cfg.server.max_weight, self.cfg.server.max_update_norm, also)
        if o.status != "accepted" or o.state is None:
            return o
        if self.weighting is not None:
            try:
                self.weighting.take(o.node_id, reply)
            except Rejected as exc:
                o.status, o.reason, o.state = "rejected", str(exc), None
                return o
        norm = update_norm(o.state, self.state)
        if not self._bounded:
            self._add(o)
        elif self._bounds is None:
            self._held.append((o, norm))  # the engine's outcome list holds the same object: settled later
            if len(self._held) >= REFERENCE_WINDOW:
                self._settle()
        else:
            self._bound(o, norm)
        return o

    def aggregate(self, rnd: int, outcomes: list[Outcome], needed: int) -> Aggregate:
        meta: dict = {}
        if self._bounded:
            self._settle()
            if self._bounds is not None:
                meta["bounds"] = self._bounds.meta()
            if self._agg.count < needed:  # bounds rejected some: the engine retries or fails the round
                return Aggregate(False, meta=meta)
        if self.weighting is not None and isinstance(self._agg, HeldWeightedMean):
            self._agg.multipliers = self.weighting.round_multipliers(self._added)
            meta["mitigation"] = self.weighting.meta(self._added, self._agg.multipliers, self.fed.label)
        self.state = self.optimizer.step(self.state, self._agg.result())
        if not isinstance(self._agg, CentralDPMean):
            return Aggregate(True, meta=meta)
        self.central_releases += 1
        dp = self.cfg.central_dp
        eps = epsilon_spent([(dp.noise_multiplier, 1.0, self.central_releases)], dp.delta, "rdp")  # q = 1
        meta["central_dp"] = {
            "noise_stdv": self._agg.stdv, "clipped_updates": self._agg.count, "epsilon": eps, "delta": dp.delta,
        }  # fmt: skip
        return Aggregate(True, meta=meta)

    @property
    def _bounded(self) -> bool:
        server = self.cfg.server
        on = bool(server.norm_bound_factor or server.weight_cap_factor)
        return on and not self.cfg.central_dp.enabled

    def _settle(self) -> None:
        """Fix the round's reference from the held updates, then judge and add each of them."""
        if not self._held:
            return
        if self._bounds is None:
            server = self.cfg.server
            norms, weights = [n for _, n in self._held], [o.weight or 0.0 for o, _ in self._held]
            median_norm, median_weight = lower_median(norms), lower_median(weights)
            nf, wf = server.norm_bound_factor, server.weight_cap_factor  # 0: off
            floor = model_norm(self.state)
            self._bounds = Bounds(
                median_norm,
                median_weight,
                max(nf * median_norm, floor) if nf else None,
                wf * median_weight if wf else None,
                floor,
            )
        held, self._held = self._held, []
        for o, norm in held:
            self._bound(o, norm)

    def _bound(self, o: Outcome, norm: float) -> None:
        b = self._bounds
        assert b is not None
        if b.norm_limit is not None and norm > b.norm_limit:
            o.status, o.state = "rejected", None
            o.reason = (
                f"update norm {norm:.3g} exceeds {self.cfg.server.norm_bound_factor:g}× the round's median "
                f"{b.median_norm:.3g} and the global model's own norm {b.model_norm:.3g} (server.norm_bound_factor)"
            )
            return
        if b.weight_cap is not None and (o.weight or 0.0) > b.weight_cap:
            o.reason = (
                f"declared weight {o.weight:g} counted as {b.weight_cap:g}, {self.cfg.server.weight_cap_factor:g}× "
                f"the round's median {b.median_weight:g} (server.weight_cap_factor)"
            )
            o.weight = b.weight_cap
        self._add(o)

    def _add(self, o: Outcome) -> None:
        assert o.state is not None
        self._agg.add(o.state, o.weight or 0.0)
        self._added.append(o.node_id)
        o.state = None  # summed and dropped: memory does not grow with the round's replies

    def conclude(self, rnd: int, updated: bool) -> Score | None:
        fed = self.fed
        ckpt = Checkpoint(
            fed.run_id,
            rnd,
            self.state,
            fed.rng.bit_generator.state,  # the sampling RNG: a resumed run samples as this one would
            {
                "central_releases": self.central_releases,
                "optimizer": self.optimizer.scalars(),
                **({"mitigation": self.weighting.multipliers} if self.weighting is not None else {}),
            },
            self.optimizer.arrays(),
        )
        save_checkpoint(checkpoint_dir(fed.store.path, fed.run_id), ckpt)
        return self._score(rnd)

    def final_state(self) -> OrderedDict[str, np.ndarray]:
        return self.optimizer.released(self.state)

    def _score(self, rnd: int) -> Score | None:
        fed = self.fed
        assert fed.scorer is not None
        model = self.optimizer.released(self.state)  # the model average, when the run keeps one
        return fed.scorer.score(fed.grid, rnd, model, fed.base, fed.node_keys, fed.flower_run_id)

    def _aggregator(self) -> Aggregator:
        cfg = self.cfg
        if cfg.central_dp.enabled:
            return CentralDPMean(self.state, cfg.central_dp.noise_multiplier, cfg.central_dp.clipping_norm)
        if cfg.server.aggregation != "fedavg":
            return CoordinateRobust(self.state, cfg.server.aggregation, cfg.server.trim_fraction)
        return HeldWeightedMean(self.state) if self.weighting is not None else WeightedMean(self.state)
