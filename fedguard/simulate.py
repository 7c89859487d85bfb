"""Run a federation on Flower's simulation engine (Ray) with the deployment ServerApp/ClientApp.

Only how nodes get their data differs from deployment: the source file is split into one
partition file per virtual node, and each node reads its own by Flower's ``partition-id``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, small_data_warning
from common.data import encode, read_table, split_indices, unit_cap_mask
from common.errors import ConfigError
from common.files import only_one
from common.flower_internals import fast_simulation_dispatch
from common.partition import describe_parts, partition_frame, simulated_node_name
from common.privacy import delta_within, eps_text, max_delta
from common.progress import no_colour_codes
from server import grid_io
from server.app import Progress, RunResult, make_server_app
from server.checkpoint import Checkpoint
from server.planning import NodePlan, plan_federation


def prepare_partitions(cfg: RunConfig, workdir: Path, progress: Progress) -> RunConfig:
    """Split the source data into per-node files (and a server hold-out); return the run's config."""
    if not cfg.simulation.data_path:
        raise ConfigError(
            "simulation needs a data file",
            where="simulation.data_path",
            fix="set simulation.data_path to a CSV, Parquet or JSONL file",
        )
    schema = cfg.data.schema_
    df = read_table(cfg.simulation.data_path, schema)
    # The nodes' own checks, on the whole file first: a bad row would have its node refuse every round,
    # the details only in that node's log. Here the error names the row of the user's file, before any run.
    encode(df, schema, max_len=1, source=str(cfg.simulation.data_path))
    if cfg.data.evaluation_path is not None:  # the evaluator's: a bad row there leaves every round unscored
        encode(read_table(cfg.data.evaluation_path, schema), schema, max_len=1, source=str(cfg.data.evaluation_path))
    sim_dir = workdir / "partitions"
    sim_dir.mkdir(parents=True, exist_ok=True)
    data = cfg.data.model_copy(update={"schema_": schema.model_copy(update={"format": "auto"})})
    if cfg.data.evaluation_path is None and cfg.simulation.holdout_fraction > 0:
        keep, hold = split_indices(len(df), cfg.simulation.holdout_fraction, cfg.seed)
        holdout_path = sim_dir / "holdout.parquet"
        df.iloc[hold].to_parquet(holdout_path, index=False)
        df = df.iloc[keep].reset_index(drop=True)
        data = data.model_copy(update={"evaluation_path": str(holdout_path)})
    parts = partition_frame(
        df,
        schema,
        cfg.simulation.partitioner,
        cfg.simulation.num_clients,
        cfg.seed,
        alpha=cfg.simulation.alpha,
        column=cfg.simulation.column,
    )
    for i, part in enumerate(parts):
        part.to_parquet(sim_dir / f"partition-{i}.parquet", index=False)
    sizes = ", ".join(str(len(p)) for p in parts)
    progress(f"split {len(df)} rows into {len(parts)} {cfg.simulation.partitioner} partitions ({sizes} rows)")
    for line in describe_parts(parts, schema.label, schema.classes):
        progress(line)
    smallest = min((len(p) for p in parts), default=0)
    warning = small_data_warning(cfg, int(smallest * (1 - cfg.data.validation_fraction)), where="on the smallest node")
    if warning:
        progress(f"WARNING: {warning}")
    return cfg.model_copy(update={"data": data})


def check_delta(cfg: RunConfig, sim_dir: Path) -> None:
    """Refuse, before any node trains, a ``dp.delta`` that a simulated node's plan refuses (above 1/(10·n) for its
    training records, ``common.privacy.max_delta``): that node would refuse every round, the run would finish
    without its data and the reason would be in its log only. Counted as the node counts: its rows (the file's
    checks passed in ``prepare_partitions``) within the privacy-unit cap, less its validation split."""
    if not cfg.dp.enabled:
        return
    schema = cfg.data.schema_
    over: list[tuple[str, int]] = []
    for i in range(cfg.simulation.num_clients):
        path = sim_dir / f"partition-{i}.parquet"
        part = read_table(path, schema)
        unit = schema.privacy_unit
        n = int(unit_cap_mask(part[unit], schema, str(path)).sum()) if unit else len(part)
        n_train = len(split_indices(n, cfg.data.validation_fraction, cfg.seed)[0])
        if cfg.dp.delta > max_delta(n_train):
            over.append((simulated_node_name(i), n_train))
    if over:
        nodes = ", ".join(f"{name} ({n:,} training records: at most {max_delta(n):.3g})" for name, n in over)
        raise ConfigError(
            f"δ = {cfg.dp.delta:g} is larger than 1/(10·n) on {nodes}: "
            f"{'that node' if len(over) == 1 else 'those nodes'} would refuse every round (privacy-plan-infeasible)",
            where="dp.delta",
            fix=f"set dp.delta ≤ {delta_within(min(max_delta(n) for _, n in over)):g} (a smaller δ is a stronger "
            "guarantee; the noise for the same ε grows only slightly)",
        )


def simulate(
    cfg: RunConfig,
    workdir: Path,
    store_path: Path | None = None,
    progress: Progress = print,
    client_app: ClientApp | None = None,
    resume: Checkpoint | None = None,
    ray_address: str | None = None,
    after_partitions: Callable[[RunConfig, Path], None] | None = None,
) -> RunResult:
    """Run the whole federation in simulation; ``client_app`` overrides FedGuard's (tests only).

    ``after_partitions(run_cfg, partitions_dir)`` runs once the partition files are written and
    before any node starts (``fedguard privacy audit`` adds its canaries there).

    With ``resume`` the run continues after the checkpoint's round, on the same partitions.
    ``ray_address`` attaches to an existing Ray cluster (``auto`` or ``HOST:PORT``) instead of
    starting a local one (see ``deploy/ray/README.md``).
    """
    workdir = workdir.resolve()
    check_simulation(cfg, progress)
    with work_dir_lock(workdir):
        run_cfg = cfg if resume is not None else prepare_partitions(cfg, workdir, progress)
        if resume is None and (spent := earlier_spending(cfg, workdir / "partitions")):
            progress(f"WARNING: {spent}")
        if after_partitions is not None:
            after_partitions(run_cfg, workdir / "partitions")
        if resume is None:  # the nodes' rows as they will train on them (a privacy audit's canaries included)
            check_delta(run_cfg, workdir / "partitions")
        store_path = (store_path or workdir / "runs.db").resolve()
        results: list[RunResult] = []
        server_app = make_server_app(run_cfg, store_path, str(workdir / "partitions"), results.append, resume)
        run_on_simulation(run_cfg, server_app, client_app, ray_address)
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return results[0]


def work_dir_lock(workdir: Path) -> contextlib.AbstractContextManager[None]:
    """One simulation (run, resume or plan) per work directory at a time: a second one would rewrite the
    partition files the first one's nodes are reading."""
    return only_one(
        workdir / ".fedguard-simulate.lock",
        "another fedguard simulate, run plan or run resume is using this work directory",
        "wait for it to finish, or pass another --workdir",
    )


def check_simulation(cfg: RunConfig, progress: Progress) -> None:
    """Refuse what a simulation's own settings make impossible before anything is written or spent; warn
    about what they make partial.

    - ``clients_per_round`` above ``num_clients`` (``check_node_count``): the server would wait
      ``wait_for_nodes`` seconds for nodes that never come, then train on fewer.
    - a target ε no simulated owner's budget covers: a node refuses every round its budget cannot cover
      (client.privacy), so with ``target_epsilon = 20`` and the default budget of 10 the nodes train until
      10 is spent and the run fails there. Some owners short: a warning naming them.
    """
    sim = cfg.simulation
    check_node_count(cfg)
    if not cfg.dp.enabled:
        return
    target = cfg.dp.target_epsilon
    short = [i for i in range(sim.num_clients) if sim.budget_for(i) < target]
    if not short:
        return
    budgets = sorted({sim.budget_for(i) for i in short})
    what = (
        f"the run's target ε = {target:g} exceeds the simulated owners' budget ε = "
        f"{' / '.join(f'{b:g}' for b in budgets)} ([simulation] budget_epsilon)"
    )
    fix = f"set [simulation] budget_epsilon to at least {target:g}, or lower [dp] target_epsilon"
    if len(short) == sim.num_clients:
        raise ConfigError(
            f"{what} on every node: each would refuse the rounds its budget cannot cover, and the run would fail",
            fix=fix,
        )
    names = ", ".join(simulated_node_name(i) for i in short)
    progress(f"WARNING: {what} on {names}: they will refuse the rounds their budgets cannot cover ({fix})")


def check_node_count(cfg: RunConfig) -> None:
    """Sampling more nodes than the simulation has: the server would wait ``wait_for_nodes`` for the rest."""
    n = cfg.simulation.num_clients
    if cfg.clients_per_round > n:
        raise ConfigError(
            f"clients_per_round = {cfg.clients_per_round} exceeds [simulation] num_clients = {n}: "
            "a simulation has no other nodes to sample",
            fix=f"lower clients_per_round to {n} or less (left out, a simulation samples every node), "
            "or raise num_clients",
        )


def earlier_spending(cfg: RunConfig, sim_dir: Path) -> str | None:
    """What earlier runs in this work directory spent of the simulated owners' budgets, or None.

    The simulated nodes keep one ledger in the work directory, as real owners keep theirs: a second run
    there composes with the first, and a node refuses every round its remaining budget cannot cover
    (a rerun of a finished ε = 8 run with the default budget of 10 fails at its third round).
    """
    from client.ledger import Ledger
    from client.node import simulated_dataset_id, simulated_ledger

    path = simulated_ledger(sim_dir)
    if not path.exists():
        return None
    with Ledger(path) as ledger:
        spent = {s.dataset_id: s.epsilon for s in ledger.summaries()}
    shown = [
        f"{simulated_node_name(i)} ε {eps_text(eps)} of {cfg.simulation.budget_for(i):g}"
        for i in range(cfg.simulation.num_clients)
        if (eps := spent.get(simulated_dataset_id(i), 0.0)) > 0
    ]
    if not shown:
        return None
    return (
        f"earlier runs in this work directory ({sim_dir.parent}) already spent part of the simulated owners' "
        f"budgets ({', '.join(shown)}); a node refuses every round its remaining budget cannot cover. "
        "`fedguard run plan` with the same --workdir shows what each node can afford; a fresh --workdir starts "
        "with full budgets"
    )


def plan(cfg: RunConfig, workdir: Path, progress: Progress = print) -> list[NodePlan]:
    """Ask the simulated nodes for their privacy plan (nothing is trained or spent); a target ε above the
    owners' budgets shows in each node's verdict."""
    check_node_count(cfg)
    workdir = workdir.resolve()
    with work_dir_lock(workdir):
        run_cfg = prepare_partitions(cfg, workdir, progress)
        try:  # the nodes' verdicts say only "privacy-plan-infeasible"; here the partitions say why
            check_delta(run_cfg, workdir / "partitions")
        except ConfigError as err:
            progress(f"WARNING: {err}")
        plans: list[NodePlan] = []
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            plans.extend(plan_federation(grid, run_cfg, str(workdir / "partitions"), progress))

        run_on_simulation(run_cfg, app)
    return plans


def has_evaluator(cfg: RunConfig) -> bool:
    """One extra simulated node holds the held-out set and scores every round's model."""
    return cfg.simulation.evaluator and cfg.data.evaluation_path is not None


def run_on_simulation(
    run_cfg: RunConfig, server_app: ServerApp, client_app: ClientApp | None = None, ray_address: str | None = None
) -> None:
    """Flower's simulation engine, offline and quiet: no telemetry, update checks or Ray dashboard.

    Flower's Ray backend runs one actor per ``simulation.client_cpus`` CPUs and feeds it virtual
    nodes; only sampled nodes do work, so a round costs time in the nodes sampled, not in
    ``num_clients``. On an existing cluster the actors spread over its hosts.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not sys.stdout.isatty():  # a log file: no colour codes from Ray's worker prefixes or Flower
        no_colour_codes()
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    # FedGuard drives the simulation engine through its Python API on purpose (one process,
    # ServerApp bound to a validated config); Flower's deprecation notice only adds noise.
    flwr_log.addFilter(lambda record: "`run_simulation` function is deprecated" not in record.getMessage())
    from flwr.simulation import run_simulation

    speed_up_simulation()
    if client_app is None:
        from client.app import app as client_app

    if ray_address:
        init_args: dict[str, object] = {"address": _check_ray_address(ray_address)}
    else:
        # "local": a new Ray instance even when a cluster runs on this host (Ray would attach to it).
        # No prestarted workers: Ray starts one idle Python worker per CPU for tasks without a runtime
        # environment, and Flower's actors carry one, so those workers only cost a Python start each.
        init_args = {
            "address": "local",
            "num_cpus": os.cpu_count() or 1,
            "_system_config": {"enable_worker_prestart": False, "prestart_worker_first_driver": False},
        }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=run_cfg.simulation.num_clients + int(has_evaluator(run_cfg)),
        backend_config={
            "client_resources": {"num_cpus": run_cfg.simulation.client_cpus, "num_gpus": 0.0},
            "init_args": {**init_args, "include_dashboard": False, "logging_level": logging.ERROR},
        },
    )


def speed_up_simulation() -> None:
    """In-process simulation only: new messages reach the engine's workers within 20 ms without a sweep over
    every registered node (``fast_simulation_dispatch``), and the ServerApp's reply polls, which read process
    memory here, start at 20 ms and back off to ``server.poll_interval`` (``bench/scale.py`` measures both)."""
    fast_simulation_dispatch()
    grid_io.FIRST_POLL_S = 0.02


def _check_ray_address(address: str) -> str:
    """Fail fast when the cluster cannot be reached: Ray itself retries for minutes."""
    import socket

    problem = None
    if address == "auto":
        import ray

        try:
            ray.init(address="auto", include_dashboard=False, logging_level=logging.ERROR)
            ray.shutdown()  # reachable: Flower's backend attaches again with its own runtime environment
        except (ConnectionError, RuntimeError, ValueError) as exc:
            problem = str(exc)
    else:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    if problem:
        raise ConfigError(
            f"cannot attach to the Ray cluster at {address!r}: {problem}",
            where="--ray-address",
            fix="start the cluster first (`ray start --head` on the head host, `ray start --address HEAD:6379` on "
            "the others); pass `auto` on a cluster host, or HEAD:6379",
        )
    return address
