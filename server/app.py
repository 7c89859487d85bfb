"""The FedGuard ServerApp: FedGuard's own round loop on Flower's Message API.

Each round: sample nodes (config seed), push the global model, poll for replies faster than
Flower's built-in 3 s, validate every reply, FedAvg the accepted ones weighted by their
declared public size, evaluate on the held-out split, record everything in the run store.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch
from cryptography.exceptions import UnsupportedAlgorithm
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import records as R
from common.codec import numpy_to_record, state_to_numpy
from common.config import RunConfig, config_from_json, load_config
from common.errors import ConfigError, FedGuardError
from common.models import build_model, describe_model
from common.optimizers import make_server_optimizer
from common.privacy import epsilon_spent
from common.reply_signing import key_fingerprint
from common.resources import EnergyModel, Meter
from server import federated_fairness
from server.aggregation import CentralDPMean, CoordinateRobust, WeightedMean
from server.checkpoint import Checkpoint, checkpoint_dir, latest_good
from server.checkpoint import save as save_checkpoint
from server.grid_io import MeteredGrid, Progress, collect_replies, discover_roles, registered_keys, wait_for_nodes
from server.homomorphic import EvaluatorFailed, HomomorphicRounds, record_score
from server.scoring import Scorer
from server.store import RunStore
from server.validation import Outcome, check_signature, classify_reply

Aggregator = WeightedMean | CentralDPMean | CoordinateRobust
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


def _central_dp_epsilon(cfg: RunConfig, releases: int) -> float:
    """User-level ε after ``releases`` noised aggregates (RDP, no sampling amplification: q = 1)."""
    dp = cfg.central_dp
    return epsilon_spent([(dp.noise_multiplier, 1.0, releases)], dp.delta, "rdp")


class RoundFailed(FedGuardError):
    code = "round-failed"


def _aggregator(cfg: RunConfig, global_state: OrderedDict[str, np.ndarray]) -> Aggregator:
    if cfg.central_dp.enabled:
        return CentralDPMean(global_state, cfg.central_dp.noise_multiplier, cfg.central_dp.clipping_norm)
    if cfg.server.aggregation != "fedavg":
        return CoordinateRobust(global_state, cfg.server.aggregation, cfg.server.trim_fraction)
    return WeightedMean(global_state)


def _needed(cfg: RunConfig, sampled: int) -> int:
    """Fewest accepted replies that let a round update the model."""
    return max(cfg.server.min_replies, math.ceil(cfg.server.min_fraction * sampled))


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
    as a new run linked to the original; no round is run or recorded twice. In deployment a node
    is trusted as the evaluator only if its registered key has the fingerprint ``evaluator_key``
    (the server kit's evaluator); any other node claiming that role is treated as a client.
    ``run_signature`` is the admin's token approving this config; nodes refuse runs without one.
    Every round's cost (the server's time, aggregation time and energy under ``energy``, and the
    bytes of every message to and from each node) is recorded in the run store.
    """
    torch.manual_seed(cfg.seed)
    schema = cfg.data.schema_
    model = build_model(cfg.model.name, schema, cfg.model.params)
    progress(describe_model(cfg.model.name, model))
    global_state = state_to_numpy(model) if resume is None else resume.state
    homomorphic = cfg.secure_aggregation == "homomorphic"
    if homomorphic and (sim_data_dir is not None or resume is not None):
        raise ConfigError(
            "homomorphic aggregation runs on a deployment (nodes open their sealed HE contexts with their own "
            "keys) and cannot resume a run (the server holds no plaintext model to checkpoint)",
            where="secure_aggregation",
            fix='deploy real nodes (`fedguard demo --he` shows how), or set secure_aggregation = "none"',
        )
    store = RunStore(store_path)
    run_id = store.create_run(
        cfg.name,
        cfg.to_json(),
        cfg.digest(),
        flower_run_id,
        _run_meta(cfg, simulated=sim_data_dir is not None),
        resumed_from=resume.run_id if resume else None,
    )
    if flower_run_id is not None and sim_data_dir is None:
        _fail_if_orphaned(store_path, run_id)
    ckpt_dir = checkpoint_dir(store_path, run_id)
    metered = MeteredGrid(grid)
    grid = cast(Grid, metered)
    meter = Meter(energy)
    roles: dict[int, str] = {}

    def record_costs(rnd: int, aggregation_seconds: float | None) -> None:
        """The round's traffic and the server's usage since the last call (round 0: setup)."""
        usage = meter.stop()
        store.record_costs(
            run_id,
            rnd,
            metered.take(),
            roles,
            server=usage.to_dict(),
            wall_seconds=usage.wall_seconds,
            aggregation_seconds=aggregation_seconds,
        )
        meter.restart()

    progress(f"run {run_id} recorded in {store_path}" + (f" (resumes run {resume.run_id})" if resume else ""))
    rng = np.random.default_rng(cfg.seed)
    central_releases = 0
    first_round = 1
    # The server optimizer (FedAvg, FedAvgM, FedAdam, ...) turns each aggregate into the next global model.
    optimizer = make_server_optimizer(cfg.server.optimizer)
    if resume is not None:
        rng.bit_generator.state = resume.rng_state
        central_releases = int(resume.extra.get("central_releases", 0))
        optimizer.load(resume.extra.get("optimizer", {}), resume.extra_arrays)
        first_round = resume.round + 1
    metrics: dict[str, float] = {}
    try:
        nodes = wait_for_nodes(grid, cfg.clients_per_round, cfg.server.wait_for_nodes, progress)
        if len(nodes) < cfg.server.min_replies:
            raise ConfigError(
                f"only {len(nodes)} node(s) connected within {cfg.server.wait_for_nodes:g}s; "
                f"server.min_replies is {cfg.server.min_replies}",
                fix="start more nodes or lower server.min_replies",
            )
        base = {R.RUN_CONFIG: cfg.to_json(), R.RUN_ID: run_id, R.RUN_UID: uuid.uuid4().hex}
        if run_signature:
            base[R.RUN_SIGNATURE] = run_signature
        if sim_data_dir:
            base[R.SIM_DATA_DIR] = sim_data_dir
        # Deployment: every reply must be signed by the key the SuperLink registered for its node.
        signed = sim_data_dir is None
        node_keys = registered_keys(grid) if signed else None
        poll, query_timeout = cfg.server.poll_interval, min(cfg.server.round_timeout, 120.0)
        roles = discover_roles(grid, nodes, {}, base, query_timeout, poll, node_keys, flower_run_id)
        evaluators = sorted(n for n, r in roles.items() if r == "evaluator")
        vetted = set(evaluators)  # evaluator claims already checked (each is reported once)
        if signed:
            evaluators = [n for n in evaluators if _is_bound_evaluator(n, node_keys or {}, evaluator_key, progress)]
        scorer = Scorer(cfg, evaluators[0] if evaluators else None)
        progress(scorer.describe())

        def score(rnd: int) -> None:
            nonlocal metrics
            result = scorer.score(grid, rnd, global_state, base, node_keys, flower_run_id)
            if result is not None:
                scorer.record(store, run_id, rnd, result)
                metrics = result.metrics
                progress(
                    f"  round {rnd} held-out accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.3f}, "
                    f"macro-F1 {metrics['macro_f1']:.3f}"
                )

        he_rounds: HomomorphicRounds | None = None
        if homomorphic:
            if not evaluators:
                raise ConfigError(
                    "homomorphic mode needs the enrolled evaluator node: it holds the key and steps the model",
                    fix="start the evaluator (`fedguard evaluator start`) before the run",
                )
            he_rounds = HomomorphicRounds(
                grid, cfg, global_state, evaluators[0], node_keys or {}, int(flower_run_id or 0), progress
            )
            progress(he_rounds.describe())
            encrypted, first = he_rounds.initial(base)
            record_score(store, run_id, 0, first)
            metrics = first.metrics
        elif resume is None:
            score(0)
        record_costs(0, None)
        for rnd in range(first_round, cfg.rounds + 1):
            agg_seconds = 0.0
            for attempt in range(1, cfg.server.round_retries + 2):
                started = time.time()
                node_keys = registered_keys(grid) if signed else None
                online = sorted(int(n) for n in grid.get_node_ids())
                roles = discover_roles(grid, online, roles, base, query_timeout, poll, node_keys, flower_run_id)
                online = [n for n in online if roles.get(n) == "client"]  # the evaluator never trains
                if scorer.evaluator is None and he_rounds is None:
                    scorer = _late_evaluator(scorer, roles, vetted, node_keys, evaluator_key, progress)
                k = min(cfg.clients_per_round, len(online))
                # Sample by position: node ids are uint64 and would lose precision in a numpy array.
                sampled = sorted(online[i] for i in rng.permutation(len(online))[:k])
                skipped: list[Outcome] = []
                if he_rounds is not None:
                    messages, skipped = he_rounds.train_messages(encrypted, base, rnd, sampled, node_keys or {})
                else:
                    arrays = numpy_to_record(global_state)
                    messages = [
                        Message(
                            RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord({**base, R.ROUND: rnd})}),
                            dst_node_id=node,
                            message_type=MessageType.TRAIN,
                            group_id=str(rnd),
                            # The round closes after round_timeout: a node that gets the message
                            # later (a cut link, a backlog) refuses it instead of spending budget.
                            ttl=cfg.server.round_timeout,
                        )
                        for node in sampled
                    ]
                progress(
                    f"round {rnd}/{cfg.rounds}: training on {len(sampled)} node(s)"
                    + (f" (attempt {attempt})" if attempt > 1 else "")
                )
                needed = _needed(cfg, len(sampled))
                round_meta: dict[str, object] = {"attempt": attempt, "needed": needed}
                discarded = False
                if he_rounds is not None:
                    replies, silent, unreachable = collect_replies(
                        grid, messages, cfg.server.round_timeout, cfg.server.poll_interval
                    )
                    t_agg = time.perf_counter()
                    outcomes, total, accepted = he_rounds.add_replies(replies, node_keys or {}, rnd)
                    count, sum_seconds = len(accepted), time.perf_counter() - t_agg
                    agg_seconds += sum_seconds
                else:
                    # Streaming: each reply is validated and summed as it arrives, then dropped, so
                    # server memory does not grow with the number of clients in a round.
                    intake = _Intake(
                        _aggregator(cfg, global_state),
                        partial(_classify, reference=global_state, cfg=cfg, node_keys=node_keys,
                                flower_run_id=flower_run_id, rnd=rnd),
                    )  # fmt: skip
                    _, silent, unreachable = collect_replies(
                        grid, messages, cfg.server.round_timeout, cfg.server.poll_interval, on_reply=intake
                    )
                    agg, outcomes = intake.agg, intake.outcomes
                    agg_seconds += intake.seconds
                    count = agg.count
                outcomes += [Outcome(n, "dropped", f"no reply within {cfg.server.round_timeout:g}s") for n in silent]
                outcomes += [Outcome(n, "failed", "the message could not be delivered") for n in unreachable]
                outcomes += skipped
                aggregated = count >= needed
                t_agg = time.perf_counter()
                if aggregated and he_rounds is not None:
                    round_meta |= he_rounds.round_meta(outcomes)
                    try:
                        encrypted, he_score, timings = he_rounds.aggregate(
                            encrypted, total, accepted, node_keys or {}, base, rnd, needed
                        )
                        round_meta["homomorphic"] |= {"sum_seconds": sum_seconds, **timings}  # type: ignore[operator]
                    except EvaluatorFailed as exc:  # e.g. a foreign-key update: the round is discarded
                        aggregated, discarded = False, True
                        round_meta["discarded"] = exc.what
                        progress(f"  round {rnd} discarded, global model unchanged: {exc.what}")
                elif aggregated:
                    global_state = optimizer.step(global_state, agg.result())
                    if isinstance(agg, CentralDPMean):
                        central_releases += 1
                        round_meta["central_dp"] = {
                            "noise_stdv": agg.stdv,
                            "clipped_updates": agg.count,
                            "epsilon": _central_dp_epsilon(cfg, central_releases),
                            "delta": cfg.central_dp.delta,
                        }
                agg_seconds += time.perf_counter() - t_agg
                store.record_round(run_id, rnd, started, [o.row() for o in outcomes], aggregated, round_meta)
                progress(_round_line(rnd, needed, outcomes, aggregated, time.time() - started))
                if aggregated or discarded:
                    break
            else:
                raise RoundFailed(
                    f"round {rnd}: fewer than {needed} accepted update(s) in {cfg.server.round_retries + 1} attempt(s)",
                    fix="check the node logs for the refusals and rejections above, start more nodes, or lower "
                    "server.min_replies / server.min_fraction; then `fedguard run resume` continues from the "
                    "last complete round",
                )
            if he_rounds is not None:
                if aggregated:
                    record_score(store, run_id, rnd, he_score)
                    metrics = he_score.metrics
                    progress(f"  round {rnd} held-out accuracy {metrics['accuracy']:.3f} (evaluator, decrypted there)")
                record_costs(rnd, agg_seconds)
                continue  # the server holds no plaintext model: nothing to checkpoint or score here
            save_checkpoint(
                ckpt_dir,
                Checkpoint(
                    run_id,
                    rnd,
                    global_state,
                    rng.bit_generator.state,
                    {"central_releases": central_releases, "optimizer": optimizer.scalars()},
                    optimizer.arrays(),
                ),
            )
            score(rnd)
            record_costs(rnd, agg_seconds)
        if cfg.wants_federated_counts:
            clients = [n for n in sorted(int(n) for n in grid.get_node_ids()) if roles.get(n) == "client"]
            progress(f"federated fairness: asking {len(clients)} client(s) for noised per-group counts")
            view = federated_fairness.collect(
                grid, cfg, global_state, base, clients, cfg.rounds, node_keys, flower_run_id
            )
            store.record_federated(
                run_id,
                cfg.rounds,
                view.audit.model_dump_json() if view.audit else None,
                view.spread,
                [o.row() for o in view.outcomes],
            )
            progress(_federated_line(view))
            store.record_costs(run_id, cfg.rounds, metered.take(), roles)  # the counts' bytes join the last round
        store.finish_run(run_id, "finished")
    except BaseException as exc:
        store.finish_run(run_id, "failed", str(exc) if isinstance(exc, FedGuardError) else type(exc).__name__)
        raise
    finally:
        store.close()
    return RunResult(run_id=run_id, store_path=store_path, final_metrics=metrics)


def _late_evaluator(
    scorer: Scorer,
    roles: dict[int, str],
    vetted: set[int],
    node_keys: dict[int, bytes] | None,
    evaluator_key: str,
    progress: Progress,
) -> Scorer:
    """An evaluator whose role reply came late (it joined after the start, a slow host) scores from now on."""
    late = sorted(n for n, r in roles.items() if r == "evaluator" and n not in vetted)
    vetted.update(late)
    if node_keys is not None:
        late = [n for n in late if _is_bound_evaluator(n, node_keys, evaluator_key, progress)]
    if not late:
        return scorer
    progress(f"evaluator node {late[0]} answered late; it scores and audits the rounds from now on")
    return Scorer(scorer.cfg, late[0])


def _is_bound_evaluator(node: int, node_keys: dict[int, bytes], expected: str, progress: Progress) -> bool:
    """Only the key enrolled as the evaluator may act as one (DESIGN §5: roles bound to keys)."""
    try:
        actual = key_fingerprint(node_keys.get(node, b""))
    except (ValueError, UnsupportedAlgorithm):  # no key, or one that is not an EC key
        actual = "unknown"
    if expected and actual == expected:
        return True
    progress(f"node {node} claims the evaluator role but its key {actual} is not the enrolled evaluator's; ignored")
    return False


def _classify(
    reply: Message,
    reference: dict[str, np.ndarray],
    cfg: RunConfig,
    node_keys: dict[int, bytes] | None,
    flower_run_id: int | None,
    rnd: int,
) -> Outcome:
    if node_keys is not None:
        bad = check_signature(reply, node_keys, int(flower_run_id or 0), rnd)
        if bad is not None:
            log.warning("node %s: %s", bad.node_id, bad.reason)
            return bad
    return classify_reply(reply, reference, cfg.server.max_weight, cfg.server.max_update_norm)


def _federated_line(view: federated_fairness.FederatedView) -> str:
    sent = sum(o.status == "accepted" for o in view.outcomes)
    lines = [f"  federated fairness: {sent}/{len(view.outcomes)} client(s) sent noised counts"]
    lines += [f"  node {o.node_id} {o.status}: {o.reason}" for o in view.outcomes if o.status != "accepted"]
    return "\n".join(lines)


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


@dataclass
class _Intake:
    """Validates each reply and adds an accepted update to the running sum as it arrives, then drops
    it: a round's server memory does not grow with its number of clients (streaming FedAvg)."""

    agg: Aggregator
    classify: Callable[[Message], Outcome]
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def __call__(self, reply: Message) -> None:
        t0 = time.perf_counter()
        o = self.classify(reply)
        if o.status == "accepted" and o.state is not None:
            self.agg.add(o.state, o.weight or 0.0)
            o.state = None
        self.outcomes.append(o)
        self.seconds += time.perf_counter() - t0


def _round_line(rnd: int, needed: int, outcomes: list[Outcome], aggregated: bool, secs: float) -> str:
    acc = [o for o in outcomes if o.status == "accepted"]
    eps_values = [o.values[R.EPSILON] for o in acc if R.EPSILON in o.values]
    if len(eps_values) > _LIST_NODES:
        eps = f"ε {min(eps_values):.2f}–{max(eps_values):.2f} over {len(eps_values)} nodes"
    else:
        eps = ", ".join(f"node {o.node_id}: ε={o.values[R.EPSILON]:.2f}" for o in acc if R.EPSILON in o.values)
    lines = [
        f"  round {rnd}: {len(acc)}/{len(outcomes)} accepted in {secs:.1f}s"
        + ("" if aggregated else f" — fewer than {needed} needed, global model unchanged")
        + (f"; {eps}" if eps else "")
    ]
    others = [o for o in outcomes if o.status != "accepted"]
    if len(others) > _LIST_NODES:  # the run store has every node's line
        reasons = Counter(f"{o.status}: {o.reason}" for o in others)
        lines += [f"  {n} node(s) {reason}" for reason, n in reasons.most_common()]
    else:
        lines += [f"  node {o.node_id} {o.status}: {o.reason}" for o in others]
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
    """A ServerApp bound to ``cfg``; without it, the config comes from the run config: ``config-path``
    (and ``resume-run-id`` to continue a run from its last checkpoint in ``store-path``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, checkpoint = cfg, resume
        path = store_path or Path(str(context.run_config.get("store-path", "fedguard-runs.db")))
        if run_cfg is None:
            if int(context.run_config.get("resume-run-id", 0) or 0) > 0:
                run_cfg, checkpoint = resume_point(path, int(context.run_config["resume-run-id"]))
            else:
                config_path = str(context.run_config.get("config-path", ""))
                if not config_path:
                    raise ConfigError("no FedGuard config", fix="flwr run ... -c 'config-path=\"/path/run.toml\"'")
                run_cfg = load_config(config_path)
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
