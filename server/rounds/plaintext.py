"""Plaintext rounds: the server sees each update, checks it, and aggregates as it arrives.

FedAvg is a streaming weighted sum (server memory stays at one model however many replies);
with central DP the same sum runs over clipped updates with equal weights, then noise; the
robust options (coordinate-wise median, trimmed mean) hold the round's updates until it ends.
The server optimizer (FedAvg, FedAvgM, FedAdam, ...) turns each aggregate into the next model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import records as R
from common.codec import numpy_to_record
from common.optimizers import make_server_optimizer
from common.privacy import epsilon_spent
from server.aggregation import CentralDPMean, CoordinateRobust, WeightedMean
from server.checkpoint import Checkpoint, checkpoint_dir
from server.checkpoint import save as save_checkpoint
from server.rounds.base import Aggregate, Federation, RoundProtocol
from server.scoring import Score
from server.validation import Outcome, classify_reply

Aggregator = WeightedMean | CentralDPMean | CoordinateRobust


class PlaintextRounds(RoundProtocol):
    """FedAvg family, central DP and robust aggregation over plaintext updates; checkpoints every round."""

    mode: ClassVar[str] = "none"

    def __init__(self, fed: Federation, state: OrderedDict[str, np.ndarray]) -> None:
        super().__init__(fed, state)
        self.optimizer = make_server_optimizer(self.cfg.server.optimizer)
        self.central_releases = 0
        self._agg: Aggregator = self._aggregator()

    def describe(self) -> str:
        cfg = self.cfg
        if cfg.central_dp.enabled:
            how = f"central DP FedAvg (clip {cfg.central_dp.clipping_norm:g}, σ {cfg.central_dp.noise_multiplier:g})"
        elif cfg.server.aggregation != "fedavg":
            how = f"coordinate-wise {cfg.server.aggregation.replace('_', ' ')}"
        else:
            how = "streaming weighted FedAvg"
        return f"plaintext aggregation: {how}, server optimizer {cfg.server.optimizer.name}"

    def resume(self, ckpt: Checkpoint) -> None:
        self.central_releases = int(ckpt.extra.get("central_releases", 0))
        self.optimizer.load(ckpt.extra.get("optimizer", {}), ckpt.extra_arrays)

    def start(self, resuming: bool) -> Score | None:
        return None if resuming else self._score(0)

    def configure_train(self, rnd: int, nodes: list[int]) -> tuple[list[Message], list[Outcome]]:
        self._agg = self._aggregator()
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
        o = classify_reply(reply, self.state, self.cfg.server.max_weight, self.cfg.server.max_update_norm)
        if o.status == "accepted" and o.state is not None:
            self._agg.add(o.state, o.weight or 0.0)
            o.state = None  # summed and dropped: memory does not grow with the round's replies
        return o

    def aggregate(self, rnd: int, outcomes: list[Outcome], needed: int) -> Aggregate:
        self.state = self.optimizer.step(self.state, self._agg.result())
        if not isinstance(self._agg, CentralDPMean):
            return Aggregate(True)
        self.central_releases += 1
        dp = self.cfg.central_dp
        eps = epsilon_spent([(dp.noise_multiplier, 1.0, self.central_releases)], dp.delta, "rdp")  # q = 1
        meta = {"noise_stdv": self._agg.stdv, "clipped_updates": self._agg.count, "epsilon": eps, "delta": dp.delta}
        return Aggregate(True, meta={"central_dp": meta})

    def conclude(self, rnd: int, updated: bool) -> Score | None:
        fed = self.fed
        ckpt = Checkpoint(
            fed.run_id,
            rnd,
            self.state,
            fed.rng.bit_generator.state,  # the sampling RNG: a resumed run samples as this one would
            {"central_releases": self.central_releases, "optimizer": self.optimizer.scalars()},
            self.optimizer.arrays(),
        )
        save_checkpoint(checkpoint_dir(fed.store.path, fed.run_id), ckpt)
        return self._score(rnd)

    def final_state(self) -> OrderedDict[str, np.ndarray]:
        return self.state

    def _score(self, rnd: int) -> Score | None:
        fed = self.fed
        assert fed.scorer is not None
        return fed.scorer.score(fed.grid, rnd, self.state, fed.base, fed.node_keys, fed.flower_run_id)

    def _aggregator(self) -> Aggregator:
        cfg = self.cfg
        if cfg.central_dp.enabled:
            return CentralDPMean(self.state, cfg.central_dp.noise_multiplier, cfg.central_dp.clipping_norm)
        if cfg.server.aggregation != "fedavg":
            return CoordinateRobust(self.state, cfg.server.aggregation, cfg.server.trim_fraction)
        return WeightedMean(self.state)
