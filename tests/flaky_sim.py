"""A simulated federation whose nodes all fail round 2 while a marker file exists.

``python -m tests.flaky_sim WORKDIR CONFIG_JSON MARKER``: with the marker present the run fails
at round 2 (after round 1's checkpoint); ``fedguard run resume`` then continues it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.app import Context, Message

from client.app import app as real_app
from common import records as R
from common.config import config_from_json
from common.errors import FedGuardError
from fedguard.simulate import simulate
from tests.helpers import with_train

MARKER = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/nonexistent")


def train(msg: Message, context: Context) -> Message:
    if int(msg.content[R.CONFIG][R.ROUND]) == 2 and MARKER.exists():
        raise RuntimeError("injected node failure")
    return real_app(msg, context)


flaky = with_train(train)

if __name__ == "__main__":
    workdir, cfg_json = Path(sys.argv[1]), Path(sys.argv[2]).read_text(encoding="utf-8")
    try:
        result = simulate(config_from_json(cfg_json), workdir, client_app=flaky)
        print(f"RUN_ID={result.run_id}")
    except (RuntimeError, FedGuardError) as exc:
        print(f"FAILED {exc}")
