"""A simulated federation in which partition 1 sends a NaN update (round 1), a wrong shape (round 2)
and a huge-norm update (round 3).

Run as ``python -m tests.malicious_sim WORKDIR CONFIG_JSON``; a test ClientApp variant that
wraps FedGuard's real ClientApp and corrupts one node's replies after training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from client.app import app as real_app
from common import records as R
from common.codec import numpy_to_record, record_to_numpy
from common.config import config_from_json
from fedguard.simulate import simulate
from tests.helpers import with_train


def train(msg: Message, context: Context) -> Message:
    reply = real_app(msg, context)
    if int(context.node_config["partition-id"]) != 1 or R.ARRAYS not in reply.content:
        return reply
    state = record_to_numpy(reply.content[R.ARRAYS])
    first = next(iter(state))
    rnd = int(msg.content[R.CONFIG][R.ROUND])
    if rnd == 1:
        state[first] = np.full_like(state[first], np.nan)
    elif rnd == 2:
        state[first] = np.zeros((*state[first].shape, 2), state[first].dtype)
    else:
        state[first] = state[first] + 1e3  # finite, right shape, far from the global model
    reply.content[R.ARRAYS] = numpy_to_record(state)
    return reply


bad_app = with_train(train)

if __name__ == "__main__":
    workdir, cfg_json = Path(sys.argv[1]), Path(sys.argv[2]).read_text(encoding="utf-8")
    result = simulate(config_from_json(cfg_json), workdir, client_app=bad_app)
    print(f"RUN_ID={result.run_id}")
