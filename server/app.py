"""The FedGuard ServerApp: FedGuard's own round loop on Flower's Message API.

``run_federation`` is the template every run follows; what differs between aggregation modes
lives in one round protocol each (``server/rounds/``). Each round: sample nodes (config seed),
let the protocol build the train messages, poll for replies faster than Flower's built-in 3 s,
put every reply through the shared envelope check and the protocol's payload check as it
arrives, aggregate, score the new model, and record everything in the run store.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from common import records as R
from common.codec import state_to_numpy
from common.config import RunConfig, config_from_json
from common.errors import BudgetExceeded, ConfigError, FedGuardError
from common.models import build_model, describe_model
from common.privacy import eps_text
from common.progress import RunProgress, terminal
from common.resources import EnergyModel, Meter
from server import federated_fairness, mitigation
from server.checkpoint import Checkpoint, checkpoint_dir, latest_good
from server.grid_io import MeteredGrid, Progress, collect_replies, wait_for_nodes
from server.rounds import PROTOCOLS
from server.rounds.base import Aggregate, Federation, RoundProtocol
from server.run_health import DP_DISABLED
from server.store import RunStore
from server.validation import Outcome

log = logging.getLogger("fedguard.server")


@dataclass
class RunResult:
    run_id: int
    store_path: Path
    final_metrics: dict[str, float]


def software_versions() -> dict[str, str]:
    """Versions of everything that shapes a run's results: the reproducibility manifest."""
    out = {"python": platform.python_version()}
    for dist in ("fedguard", "flwr", "torch", "opacus", "tenseal", "numpy", "cryptography"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _run_meta(cfg: RunConfig, simulated: bool) -> dict[str, object]:
    return {
        "engine": "simulation (Flower simulation engine, Ray; all nodes in one trust domain)"
        if simulated
        else "deployment (Flower SuperLink and SuperNodes)",
        "transport": "in-process (simulation: no network)" if simulated else "TLS with SuperNode authentication",
        "secure_aggregation": cfg.secure_aggregation,
        "central_dp": cfg.central_dp.model_dump() if cfg.central_dp.enabled else None,
        "versions": software_versions(),
    }


class RoundFailed(FedGuardError):
    code = "round-failed"


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    store_path: Path,
    *,
    sim_data_dir: str | None = None,
    flower_run_id: int | None = None,
    progress: Progress = print,
    resume: Checkpoint | None = None,
    evaluator_key: str = "",
    run_signature: str = "",
    energy: EnergyModel | None = None,
) -> RunResult:
    """Run ``cfg.rounds`` rounds of DP federated training; one bad reply never ends the run.

    With ``resume`` (a checkpoint of an earlier run) it continues after that checkpoint's round
    as a new run linked to the original; no round is run or recorded twice. In deployment every
    reply must be signed by its node's registered key, and only the key with fingerprint
    ``evaluator_key`` (the server kit's evaluator) may act as the evaluator. ``run_signature`` is
    the admin's token approving this config; nodes refuse runs without one. Every round's cost
    (server time, aggregation time, energy under ``energy``, bytes per node) goes to the run store.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    progress(describe_model(cfg.model.name, model))
    protocol_type = PROTOCOLS[cfg.secure_aggregation]
    protocol_type.check_supported(cfg, simulated=sim_data_dir is not None, resuming=resume is not None)
    store = RunStore(store_path)
    run_uid = uuid.uuid4().hex  # the nodes' ledgers key this run's releases by it (`fedguard client budget`)
    meta = _run_meta(cfg, simulated=sim_data_dir is not None) | {"ledger_run_key": run_uid}
    run_id = store.create_run(
        cfg.name, cfg.to_json(), cfg.digest(), flower_run_id, meta, resumed_from=resume.run_id if resume else None
    )
    if flower_run_id is not None and sim_data_dir is None:
        _fail_if_orphaned(store_path, run_id)
    progress(f"run {run_id} recorded in {store_path}" + (f" (resumes run {resume.run_id})" if resume else ""))
    if not cfg.dp.enabled:
        progress(f"WARNING: {DP_DISABLED}")
    base = {R.RUN_CONFIG: cfg.to_json(), R.RUN_ID: run_id, R.RUN_UID: run_uid}
    base |= {R.RUN_SIGNATURE: run_signature} if run_signature else {}
    base |= {R.SIM_DATA_DIR: sim_data_dir} if sim_data_dir else {}
    fed = Federation(
        MeteredGrid(grid), cfg, store, run_id, int(flower_run_id or 0), base, signed=sim_data_dir is None,
        evaluator_key=evaluator_key, meter=Meter(energy), progress=progress, rng=np.random.default_rng(cfg.seed),
    )  # fmt: skip
    metrics: dict[str, float] = {}
    try:
        nodes = wait_for_nodes(grid, cfg.clients_per_round, cfg.server.wait_for_nodes, progress)
        if len(nodes) < cfg.server.min_replies:
            raise ConfigError(
                f"only {len(nodes)} node(s) connected within {cfg.server.wait_for_nodes:g}s; "
                f"server.min_replies is {cfg.server.min_replies}",
                fix="start more nodes or lower server.min_replies",
            )
        fed.refresh(nodes)
        progress(fed.scorer.describe(fed.label))  # type: ignore[union-attr]
        protocol = protocol_type(fed, state_to_numpy(model) if resume is None else resume.state)
        progress(protocol.describe())
        mitigation.prepare(fed, resume.run_id if resume is not None else None)  # reweighing's table, if any
        if resume is not None:
            fed.rng.bit_generator.state = resume.rng_state
            protocol.resume(resume)
        if (score := protocol.start(resuming=resume is not None)) is not None:
            metrics = fed.record_score(0, score)
        fed.record_costs(0, None)
        first = (resume.round + 1) if resume else 1
        # Rounds done / total with elapsed time and ETA; a bar when the CLI attached its terminal.
        with RunProgress(cfg.rounds, progress, first_round=first, stream=terminal()) as run:
            for rnd in range(first, cfg.rounds + 1):
                updated, seconds = _play_round(fed, protocol, rnd, run)
                if (score := protocol.conclude(rnd, updated)) is not None:
                    metrics = fed.record_score(rnd, score)
                fed.record_costs(rnd, seconds)
                run.round_done(rnd)
        if cfg.wants_federated_counts:
            _federated_counts(fed, protocol)
        store.finish_run(run_id, "finished")
    except BaseException as exc:
        store.finish_run(run_id, "failed", str(exc) if isinstance(exc, FedGuardError) else type(exc).__name__)
        raise
    finally:
        store.close()
    return RunResult(run_id=run_id, store_path=store_path, final_metrics=metrics)


def _play_round(fed: Federation, protocol: RoundProtocol, rnd: int, run: RunProgress) -> tuple[bool, float]:
    """Sample, send, take each reply through the envelope and the protocol, aggregate; retry a short round.

    Returns whether the global model moved and the server's aggregation seconds.
    """
    cfg, seconds = fed.cfg, 0.0
    for attempt in range(1, cfg.server.round_retries + 2):
        started = time.time()
        sampled = fed.sample(fed.refresh())
        messages, outcomes = protocol.configure_train(rnd, sampled)
        fed.progress(
            f"round {rnd}/{cfg.rounds}: training on {len(sampled)} node(s)"
            + (f" (attempt {attempt})" if attempt > 1 else "")
        )
        needed = fed.needed(len(sampled))
        run.round_started(rnd, len(messages))
        collected, intake_seconds = _collect(fed, protocol, rnd, messages, run)
        outcomes, seconds = outcomes + collected, seconds + intake_seconds
        result = Aggregate(False)
        if sum(o.status == "accepted" for o in outcomes) >= needed:
            t0 = time.perf_counter()
            result = protocol.aggregate(rnd, outcomes, needed)
            seconds += time.perf_counter() - t0
        meta = {"attempt": attempt, "needed": needed, **result.meta}
        if result.discarded:
            meta["discarded"] = result.discarded
        fed.store.record_round(fed.run_id, rnd, started, [o.row() for o in outcomes], result.updated, meta)
        fed.progress(_round_line(rnd, needed, outcomes, result.updated, time.time() - started, fed.label))
        if result.discarded:
            fed.progress(f"  round {rnd} discarded, global model unchanged: {result.discarded}")
        if result.updated or result.discarded:
            return result.updated, seconds
    raise round_failed(rnd, needed, cfg.server.round_retries + 1, outcomes)


def round_failed(rnd: int, needed: int, attempts: int, outcomes: list[Outcome]) -> RoundFailed:
    """Why a round could not be aggregated, with the fix; nodes out of privacy budget get their own."""
    resume = "then `fedguard run resume` continues from the last complete round"
    spent = [o for o in outcomes if o.status == "refused" and (o.reason or "").startswith(BudgetExceeded.code)]
    if spent and len(spent) == sum(o.status != "accepted" for o in outcomes):
        fix = (
            f"{len(spent)} node(s) refused because their privacy budgets cannot cover this round "
            f"({BudgetExceeded.code}): lower [dp] target_epsilon or the rounds, or the node owners raise their budgets "
            "(`fedguard client budget` shows what each node has left); " + resume
        )
    else:
        fix = (
            "check the node logs for the refusals and rejections above, start more nodes, or lower "
            "server.min_replies / server.min_fraction; " + resume
        )
    return RoundFailed(f"round {rnd}: fewer than {needed} accepted update(s) in {attempts} attempt(s)", fix=fix)


def _collect(
    fed: Federation, protocol: RoundProtocol, rnd: int, messages: list[Message], run: RunProgress
) -> tuple[list[Outcome], float]:
    """Each reply through the shared envelope, then the protocol, as it arrives (streaming: nothing is kept);
    the round's outcomes for ``messages`` and the server's intake seconds."""
    gate, seconds = fed.envelope(messages, rnd), 0.0
    outcomes: list[Outcome] = []

    def intake(reply: Message) -> None:
        nonlocal seconds
        run.replied(rnd, fed.label(reply.metadata.src_node_id))
        t0 = time.perf_counter()
        outcomes.append(gate.check(reply) or protocol.accept(reply))
        seconds += time.perf_counter() - t0

    cfg = fed.cfg
    lost: dict[int, str] = {}  # nodes the SuperLink answered for (offline, expired): dropped, with its reason
    _, silent, unreachable = collect_replies(
        fed.grid, messages, cfg.server.round_timeout, cfg.server.poll_interval, on_reply=intake, lost=lost
    )
    no_reply = f"no reply within {cfg.server.round_timeout:g}s"
    outcomes += [Outcome(n, "dropped", lost.get(n) or no_reply) for n in sorted(silent)]
    outcomes += [Outcome(n, "failed", "the message could not be delivered") for n in unreachable]
    return outcomes, seconds


def _federated_line(view: federated_fairness.FederatedView, label: Callable[[int], str]) -> str:
    sent = sum(o.status == "accepted" for o in view.outcomes)
    lines = [f"  federated fairness: {sent}/{len(view.outcomes)} client(s) sent noised counts"]
    lines += [f"  {label(o.node_id)} {o.status}: {o.reason}" for o in view.outcomes if o.status != "accepted"]
    return "\n".join(lines)


def _federated_counts(fed: Federation, protocol: RoundProtocol) -> None:
    """After the last round: clients release DP-noised per-group counts of the final model (plaintext only)."""
    state = protocol.final_state()
    assert state is not None, "federated counts need the plaintext model (config: plaintext mode only)"
    cfg, rounds = fed.cfg, fed.cfg.rounds
    clients = fed.refresh()
    fed.progress(f"federated fairness: asking {len(clients)} client(s) for noised per-group counts")
    view = federated_fairness.collect(fed.grid, cfg, state, fed.base, clients, rounds, fed.node_keys, fed.flower_run_id)
    audit = view.audit.model_dump_json() if view.audit else None
    fed.store.record_federated(fed.run_id, rounds, audit, view.spread, [o.row() for o in view.outcomes])
    fed.progress(_federated_line(view, fed.label))
    fed.store.record_costs(fed.run_id, rounds, fed.grid.take(), fed.roles)  # the counts' bytes join the last round


#: Above this many nodes a round's progress line summarizes (ε range, counts per reason).
_LIST_NODES = 10


def _fail_if_orphaned(store_path: Path, run_id: int, poll: float = 1.0) -> None:
    """In a deployment, end this ServerApp process once the SuperLink that launched it is gone.

    Flower's ServerApp retries its runtime-API calls (and heartbeats) indefinitely, so a ServerApp
    whose SuperLink was killed would wait forever, its run shown as ``running``, and could resume
    talking to a restarted SuperLink. Its launcher (Flower's SuperExec) exits with the SuperLink;
    the process is then re-parented, which this watchdog notices: it records the run as failed
    (``fedguard run resume`` continues it from its last checkpoint) and exits.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        try:
            with RunStore(store_path) as store:
                if store.run(run_id)["status"] == "running":
                    store.finish_run(run_id, "failed", "the SuperLink stopped during the run")
        finally:
            log.error("run %s: the SuperLink is gone; this ServerApp exits", run_id)
            os._exit(1)

    threading.Thread(target=watch, name="fedguard-orphan-watch", daemon=True).start()


def _round_line(
    rnd: int,
    needed: int,
    outcomes: list[Outcome],
    aggregated: bool,
    secs: float,
    label: Callable[[int], str] = lambda node: f"node {node}",
) -> str:
    """The operator's line for a round: how many were accepted, refused, dropped…, then each node by ``label``
    (its name, in natural order: node-2 before node-10) with its ε or its reason; above ``_LIST_NODES`` nodes,
    counts per reason."""
    from server.run_health import natural_key

    outcomes = sorted(outcomes, key=lambda o: natural_key(label(o.node_id)))
    acc = [o for o in outcomes if o.status == "accepted"]
    eps_values = [o.values[R.EPSILON] for o in acc if R.EPSILON in o.values]
    if len(eps_values) > _LIST_NODES:
        eps = f"ε {eps_text(min(eps_values))}–{eps_text(max(eps_values))} over {len(eps_values)} nodes"
    else:
        eps = ", ".join(f"{label(o.node_id)}: ε={eps_text(o.values[R.EPSILON])}" for o in acc if R.EPSILON in o.values)
    tally = Counter(o.status for o in outcomes if o.status != "accepted")
    lines = [
        f"  round {rnd}: {len(acc)}/{len(outcomes)} accepted"
        + "".join(f", {n} {status}" for status, n in sorted(tally.items()))
        + f" in {secs:.1f}s"
        + ("" if aggregated else f" — fewer than {needed} needed, global model unchanged")
        + (f"; {eps}" if eps else "")
    ]
    others = [o for o in outcomes if o.status != "accepted" or o.reason]  # a capped weight has a reason too
    if len(others) > _LIST_NODES:  # the run store has every node's line
        reasons = Counter(f"{o.status}: {o.reason}" for o in others)
        lines += [f"  {n} node(s) {reason}" for reason, n in reasons.most_common()]
    else:
        lines += [f"  {label(o.node_id)} {o.status}: {o.reason}" for o in others]
    return "\n".join(lines)


def resume_point(store_path: Path, run_id: int, progress: Progress = print) -> tuple[RunConfig, Checkpoint]:
    """The config and last good checkpoint of ``run_id``, to continue it as a new run."""
    with RunStore(store_path) as store:
        run = store.run(run_id)
    if run["status"] == "finished":
        raise ConfigError(f"run {run_id} already finished; nothing to resume", where=str(store_path))
    ckpt = latest_good(checkpoint_dir(store_path, run_id), progress)
    progress(f"resuming run {run_id} after round {ckpt.round} (checkpoint {ckpt.path})")
    return config_from_json(run["config_json"]), ckpt


def make_server_app(
    cfg: RunConfig | None = None,
    store_path: Path | None = None,
    sim_data_dir: str | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    resume: Checkpoint | None = None,
) -> ServerApp:
    """A ServerApp bound to ``cfg`` and ``store_path`` (simulation, in process); without them the config
    comes from the run config (``config-json``, or ``resume-run-id`` to continue a run from its last
    checkpoint) and the store is the server's own (``$FEDGUARD_RUN_STORE``, else
    ``$FEDGUARD_SERVER_WORKDIR/runs.db``, both set by ``server.superlink.SuperLink``). A run config
    never chooses a server-side path: one carrying ``store-path`` or ``config-path`` is refused
    before anything is recorded."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from common.flower_internals import fast_reply_pulls
        from server.runs import FORBIDDEN_RUN_CONFIG_KEYS, RUN_STORE_ENV, SERVER_WORKDIR_ENV, STORE_NAME

        fast_reply_pulls()
        run_cfg, checkpoint = cfg, resume
        forbidden = [k for k in FORBIDDEN_RUN_CONFIG_KEYS if k in context.run_config]
        if forbidden:
            raise ConfigError(
                f"the run config sets {', '.join(forbidden)}: a run may not choose paths on the server",
                where="run config",
                fix="submit runs with `fedguard run start`; the server records them in its own workdir",
            )
        path = store_path
        if path is None:
            workdir = os.environ.get(SERVER_WORKDIR_ENV, "")
            if not workdir or not Path(workdir).is_absolute():
                raise ConfigError(
                    f"{SERVER_WORKDIR_ENV} is not set: this ServerApp was not started by `fedguard server start`",
                    fix="start the server with `fedguard server start`, and runs with `fedguard run start`",
                )
            chosen = os.environ.get(RUN_STORE_ENV, "")  # set by the server itself, never by a run
            path = Path(chosen) if chosen and Path(chosen).is_absolute() else Path(workdir) / STORE_NAME
        if run_cfg is None:
            if int(context.run_config.get("resume-run-id", 0) or 0) > 0:
                run_cfg, checkpoint = resume_point(path, int(context.run_config["resume-run-id"]))
            else:
                config_json = str(context.run_config.get("config-json", ""))
                if not config_json:
                    raise ConfigError("no FedGuard config in the run config", fix="submit it with `fedguard run start`")
                run_cfg = config_from_json(config_json)
        result = run_federation(
            grid,
            run_cfg,
            path,
            sim_data_dir=sim_data_dir,
            flower_run_id=int(context.run_id),
            resume=checkpoint,
            evaluator_key=str(context.run_config.get("evaluator-key", "")),
            run_signature=str(context.run_config.get("run-signature", "")),
            energy=EnergyModel.from_config(dict(context.run_config), where="run config"),
        )
        if on_result is not None:
            on_result(result)

    return app


app = make_server_app()
