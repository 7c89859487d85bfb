"""A node's local settings, work directory and log: what it trains on and where it writes.

In deployment the owner sets these in the SuperNode's node config (``data-path``,
``schema-path``, ``workdir``, ``declared-size``; for the privacy ledger ``dataset-id``,
``ledger-path``, ``budget-epsilon``, ``budget-delta``; ``auth-key-path`` to sign replies;
``run-signing-pub-path``, the kit's pinned key that every run must be signed with;
``policy-path``, the owner's ``policy.toml`` or ``default`` for the built-in safe policy; for the
cost accounting ``watts-per-core``, ``gpu-watts`` and ``carbon-intensity`` in gCO2e/kWh of the
node's grid, see ``common.resources``); in simulation Flower injects ``partition-id`` and the node
reads its partition file from the simulation folder.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DEFAULT_BUDGET_DELTA, DEFAULT_BUDGET_EPSILON, RunConfig
from common.errors import ConfigError
from common.partition import simulated_node_name
from common.policy import NodePolicy, load_policy
from common.progress import PlainFormatter
from common.schema import DataSchema, load_schema

#: Schema fields that shape the model: a node's own schema must agree on them.
_MODEL_FIELDS = ("task", "text_column", "features", "label", "classes")


@dataclass(frozen=True)
class NodeSettings:
    data_path: Path
    workdir: Path
    schema: DataSchema
    declared_size: int | None
    #: The owner's name for this dataset: the ledger's key (appending rows keeps the budget).
    dataset_id: str
    #: One ledger per host; its high-water markers live in ``workdir``.
    ledger_path: Path
    budget_epsilon: float
    budget_delta: float
    #: The node's authentication key (the SuperNode's): it signs every reply. None in simulation.
    auth_key: Path | None = None
    #: ``client`` trains; ``evaluator`` holds the central held-out set and scores global models.
    role: str = "client"
    #: The kit's pinned run-signing key: runs without a valid token are refused. None in simulation.
    run_signing_pub: Path | None = None
    #: The owner's policy; None in simulation (one trust domain) and in-process tests.
    policy: NodePolicy | None = None
    #: The kit's federation and node name: a sealed HE context must be addressed to exactly these.
    federation: str | None = None
    node_name: str | None = None

    @property
    def marker_dir(self) -> Path:
        return self.workdir / "ledger-markers"


def simulated_dataset_id(partition: int) -> str:
    """The ledger key of a simulated node's data (partition ``partition`` of the simulation's file)."""
    return f"sim-partition-{partition}"


def simulated_ledger(sim_data_dir: str | Path) -> Path:
    """The one ledger the simulated nodes share, as owners on one host would."""
    return Path(sim_data_dir) / "ledger.db"


def node_settings(node_config: dict[str, Any], cfg: RunConfig, sim_data_dir: str | None) -> NodeSettings:
    """Resolve where this node's data and work directory are, from node config."""
    schema = cfg.data.schema_
    role = str(node_config.get("role", "client"))
    if role not in ("client", "evaluator"):
        raise ConfigError(f"unknown node role {role!r}", where="node config 'role'", fix="use client or evaluator")
    if "data-path" in node_config:
        data_path = Path(str(node_config["data-path"]))
        workdir = Path(str(node_config.get("workdir", data_path.parent / "fedguard-node")))
        dataset_id = str(node_config.get("dataset-id", data_path.resolve()))
        ledger_path = Path(str(node_config.get("ledger-path", workdir / "ledger.db")))
        budget = (
            float(node_config.get("budget-epsilon", DEFAULT_BUDGET_EPSILON)),
            float(node_config.get("budget-delta", DEFAULT_BUDGET_DELTA)),
        )
        if "schema-path" in node_config:
            own = load_schema(str(node_config["schema-path"]))
            for field in _MODEL_FIELDS:
                if getattr(own, field) != getattr(schema, field):
                    raise ConfigError(
                        f"the node's schema differs from the run's in {field!r}",
                        where=str(node_config["schema-path"]),
                        fix="nodes must declare the same task, features, label and classes as the run",
                    )
            schema = own
    elif "partition-id" in node_config and sim_data_dir:
        pid = int(node_config["partition-id"])
        node_config = {"node-name": simulated_node_name(pid), **node_config}  # as the plan and round lines say
        data_path = Path(sim_data_dir) / f"partition-{pid}.parquet"
        if pid == cfg.simulation.num_clients and cfg.data.evaluation_path:  # the extra simulated node
            role, data_path = "evaluator", Path(cfg.data.evaluation_path)
        workdir = Path(sim_data_dir) / simulated_node_name(pid)
        if role == "client":  # partition files are Parquet; the evaluator's file keeps the schema's format
            schema = schema.model_copy(update={"format": "parquet"})
        # Simulated owners: one host, one ledger; budgets from the run's simulation section.
        dataset_id = simulated_dataset_id(pid)
        ledger_path = simulated_ledger(sim_data_dir)
        budget = (cfg.simulation.budget_for(pid), DEFAULT_BUDGET_DELTA)
    else:
        raise ConfigError(
            "this node has no data: node config lacks 'data-path'",
            fix="start the SuperNode with --node-config 'data-path=\"/path/to/data.csv\"'",
        )
    declared = node_config.get("declared-size")
    return NodeSettings(
        data_path=data_path,
        workdir=workdir,
        schema=schema,
        declared_size=int(declared) if declared is not None else None,
        dataset_id=dataset_id,
        ledger_path=ledger_path,
        budget_epsilon=budget[0],
        budget_delta=budget[1],
        auth_key=Path(str(node_config["auth-key-path"])) if "auth-key-path" in node_config else None,
        role=role,
        run_signing_pub=Path(str(node_config["run-signing-pub-path"]))
        if "run-signing-pub-path" in node_config
        else None,
        policy=_policy(node_config, role),
        federation=str(node_config["federation"]) if "federation" in node_config else None,
        node_name=str(node_config["node-name"]) if "node-name" in node_config else None,
    )


def _policy(node_config: dict[str, Any], role: str) -> NodePolicy | None:
    """Read on every message, so an owner's edit applies to the next round (and a broken file refuses)."""
    value = node_config.get("policy-path")
    if value is None:
        return None
    return NodePolicy.default_for(role) if str(value) == "default" else load_policy(str(value))


def node_logger(workdir: Path) -> logging.Logger:
    """The node's local log (``workdir/node.log``): full error text stays here, never in replies.

    Plain text: escape codes that reach a record (a library's coloured message) are stripped.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"fedguard.node.{workdir}"
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.FileHandler(workdir / "node.log", encoding="utf-8")
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def new_log_id() -> str:
    return uuid.uuid4().hex[:12]


def declared_weight(settings: NodeSettings, n_train: int) -> int:
    """The FedAvg weight that leaves the node: the owner's declared size, else n rounded to 100."""
    if settings.declared_size is not None:
        return max(1, settings.declared_size)
    return max(100, int(round(n_train / 100.0)) * 100)
