"""Safe by default: with a config that says nothing about bounds, one node cannot swamp a round.

The plaintext round protocol's real intake on real Flower messages, in process: three honest
updates and one poisoned one (a +1e3 update, or a declared weight of 1e6 against ~1,100).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from common import records as R
from common.codec import numpy_to_record
from common.config import RunConfig
from server.rounds.base import Federation
from server.rounds.plaintext import REFERENCE_WINDOW, PlaintextRounds, lower_median
from server.scoring import Scorer
from server.validation import Outcome
from tests.helpers import global_state, tabular_config

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(120)]


def protocol(cfg: RunConfig) -> PlaintextRounds:
    fed = Federation(
        None, cfg, None, 1, 1, {}, signed=False, evaluator_key="", meter=None, progress=print,  # type: ignore[arg-type]
        rng=np.random.default_rng(0), scorer=Scorer(cfg, None),
    )  # fmt: skip
    return PlaintextRounds(fed, global_state(cfg))


def shifted(
    state: OrderedDict[str, np.ndarray], shift: float, seed: int, scale: float = 1e-3
) -> OrderedDict[str, np.ndarray]:
    """The global model plus a small random update (an honest node), or plus ``shift`` everywhere."""
    rng = np.random.default_rng(seed)
    out = OrderedDict()
    for k, v in state.items():
        if np.issubdtype(v.dtype, np.floating):
            step = shift if shift else rng.normal(0, scale, v.shape)
            out[k] = (v + step).astype(v.dtype)
        else:
            out[k] = v.copy()
    return out


def play(p: PlaintextRounds, updates: list[tuple[float, float]]) -> tuple[list[Outcome], bool]:
    """One round: each (shift, declared weight) is a node's reply to its own train message."""
    messages, _ = p.configure_train(1, list(range(1, len(updates) + 1)))
    outcomes = []
    for i, (msg, (shift, weight)) in enumerate(zip(messages, updates, strict=True)):
        content = RecordDict(
            {
                R.ARRAYS: numpy_to_record(shifted(p.state, shift, seed=i)),
                R.METRICS: MetricRecord({R.NUM_EXAMPLES: weight}),
            }
        )
        outcomes.append(p.accept(Message(content, reply_to=msg)))
    result = p.aggregate(1, outcomes, needed=1)
    return outcomes, result.updated


def drift(before: OrderedDict[str, np.ndarray], after: OrderedDict[str, np.ndarray]) -> float:
    return max(float(np.abs(after[k] - before[k]).max()) for k in before if np.issubdtype(before[k].dtype, np.floating))


HONEST = [(0.0, 1100.0), (0.0, 1100.0), (0.0, 1200.0)]


def test_a_poisoned_update_is_rejected_with_its_reason_by_default() -> None:
    p = protocol(tabular_config())
    before = p.state
    outcomes, updated = play(p, [*HONEST, (1e3, 1100.0)])
    assert updated and [o.status for o in outcomes] == ["accepted"] * 3 + ["rejected"]
    assert "exceeds 100× the round's median" in str(outcomes[3].reason)
    assert "server.norm_bound_factor" in str(outcomes[3].reason)
    assert drift(before, p.state) < 0.05  # the honest mean moved the model; +1e3 never reached it


def test_nodes_the_model_already_fits_do_not_make_the_informative_ones_look_poisoned() -> None:
    """Without DP, three nodes whose single-class data the model already fits send updates of ~0; the
    two nodes holding the other class send real steps (norm ~1, against the model's ~8). A median of
    ~0 made those "10⁵× the median" and rejected them (churn, Dirichlet 0.1: the model ended on the
    majority class); an update no larger than the model itself is never rejected, and +1e3 still is."""
    from server.validation import model_norm, update_norm

    p = protocol(tabular_config())
    messages, _ = p.configure_train(1, [1, 2, 3, 4, 5, 6])
    steps = [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.02), (0.0, 0.02), (1e3, 0.0)]  # (shift, honest scale)
    outcomes = []
    for i, (msg, (shift, scale)) in enumerate(zip(messages, steps, strict=True)):
        update = shifted(p.state, shift, seed=i, scale=scale)
        if i == 3:
            assert 0.5 < update_norm(update, p.state) < model_norm(p.state)
        content = RecordDict({R.ARRAYS: numpy_to_record(update), R.METRICS: MetricRecord({R.NUM_EXAMPLES: 500.0})})
        outcomes.append(p.accept(Message(content, reply_to=msg)))
    result = p.aggregate(1, outcomes, needed=1)
    assert result.updated and [o.status for o in outcomes] == ["accepted"] * 5 + ["rejected"]
    assert "the global model's own norm" in str(outcomes[5].reason)
    assert result.meta["bounds"]["median_norm"] == 0.0
    assert result.meta["bounds"]["norm_limit"] == pytest.approx(model_norm(global_state(tabular_config())))


def test_an_outsized_declared_weight_counts_only_as_the_cap() -> None:
    p = protocol(tabular_config())
    outcomes, updated = play(p, [*HONEST, (0.0, 1e6)])
    assert updated and all(o.status == "accepted" for o in outcomes)
    assert outcomes[3].weight == pytest.approx(10 * 1100.0)  # 10× the lower median of the round's weights
    assert "declared weight 1e+06 counted as 11000" in str(outcomes[3].reason)
    assert all(o.reason is None for o in outcomes[:3])


def test_two_nodes_the_outlier_cannot_pull_the_reference_towards_itself() -> None:
    p = protocol(tabular_config())
    outcomes, updated = play(p, [(0.0, 1100.0), (1e3, 1100.0)])
    assert [o.status for o in outcomes] == ["accepted", "rejected"] and updated


def test_the_bounds_are_loosened_only_explicitly() -> None:
    cfg = tabular_config(server={"round_timeout": 120, "norm_bound_factor": 0, "weight_cap_factor": 0})
    p = protocol(cfg)
    outcomes, _ = play(p, [*HONEST, (1e3, 1e6)])
    assert all(o.status == "accepted" and o.reason is None for o in outcomes)
    assert outcomes[3].weight == 1e6


def test_a_round_whose_bounds_leave_too_few_updates_does_not_move_the_model() -> None:
    p = protocol(tabular_config())
    before = p.state
    messages, _ = p.configure_train(1, [1, 2])
    outcomes = []
    for i, (msg, shift) in enumerate(zip(messages, [0.0, 1e3], strict=True)):
        content = RecordDict(
            {R.ARRAYS: numpy_to_record(shifted(p.state, shift, i)), R.METRICS: MetricRecord({R.NUM_EXAMPLES: 100.0})}
        )
        outcomes.append(p.accept(Message(content, reply_to=msg)))
    result = p.aggregate(1, outcomes, needed=2)
    assert not result.updated and result.meta["bounds"]["norm_limit"] is not None
    assert drift(before, p.state) == 0.0


def test_many_replies_stream_against_the_reference_of_the_first_window() -> None:
    p = protocol(tabular_config())
    updates = [(0.0, 1000.0)] * (REFERENCE_WINDOW + 5) + [(1e3, 1000.0)]
    outcomes, updated = play(p, updates)
    assert updated and outcomes[-1].status == "rejected"
    assert sum(o.status == "accepted" for o in outcomes) == REFERENCE_WINDOW + 5


def test_honest_nodes_of_very_different_sizes_all_count() -> None:
    """DP noise per step scales with 1/batch: a 150-row node's update is ~10× a 1,500-row node's."""
    p = protocol(tabular_config())
    messages, _ = p.configure_train(1, [1, 2, 3])
    outcomes = []
    for i, (msg, scale, weight) in enumerate(zip(messages, [1e-3, 3e-3, 3e-2], [1500.0, 600.0, 150.0], strict=True)):
        content = RecordDict(
            {
                R.ARRAYS: numpy_to_record(shifted(p.state, 0.0, i, scale=scale)),
                R.METRICS: MetricRecord({R.NUM_EXAMPLES: weight}),
            }
        )
        outcomes.append(p.accept(Message(content, reply_to=msg)))
    assert p.aggregate(1, outcomes, needed=3).updated
    assert all(o.status == "accepted" and o.reason is None for o in outcomes)


def test_lower_median() -> None:
    assert lower_median([3.0]) == 3.0
    assert lower_median([1.0, 1e6]) == 1.0
    assert lower_median([5.0, 1.0, 3.0, 9.0]) == 3.0
