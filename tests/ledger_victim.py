"""A node process to SIGKILL mid-training: ``python -m tests.ledger_victim DATA WORKDIR CONFIG_JSON``.

Runs one round of the real ClientApp in process; the test kills it once the ledger shows the
round's pending release.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from common.config import config_from_json
from tests.helpers import global_state, node_context, train_message

if __name__ == "__main__":
    data, workdir, cfg_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cfg = config_from_json(cfg_path.read_text(encoding="utf-8"))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    reply = app(
        train_message(cfg, global_state(cfg), 1, run_uid="victim"), node_context(data, workdir, dataset_id="ds")
    )
    print("FINISHED", list(reply.content.keys()))
