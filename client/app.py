"""The FedGuard ClientApp: local DP-SGD on the node's private data, within its privacy budget.

Every DP release goes through the node's privacy facade (``client.privacy.NodePrivacy``): plan,
owner policy, ledger reserve, release, confirm. A round that would overspend is refused before
anything is trained, and nothing leaves the node unaccounted. Only allow-listed values leave
(``common.records``): the DP-SGD model, the declared public size used as the FedAvg weight, and
the accounting of the DP mechanism. Every reply is logged locally (``client.sent_log``). Failures
leave as an error code plus a node-local log id; their text stays in the node's log.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import he_node, mitigation, secagg_node
from client.admission import PolicyViolation, check_policy, check_request, ledger_run_key, record
from client.node import NodeSettings, declared_weight, new_log_id, node_logger, node_settings
from client.privacy import NodePrivacy
from client.sent_log import log_sent, log_usage
from client.training import resolve_grad_sample_mode, run_preflight
from common import he, secagg
from common import records as R
from common.codec import load_numpy_state, module_layout, numpy_to_record, record_to_numpy, state_to_numpy
from common.config import RunConfig, config_from_json
from common.data import Encoded, load_encoded, split_indices
from common.devices import node_device, usable_cpus
from common.errors import FedGuardError
from common.evaluation import predict, provenance, score_held_out
from common.fairness import group_confusion_counts
from common.models import build_model, long_text_note, text_encoding
from common.optimizers import make_server_optimizer
from common.policy import Purpose, sends_resource_figures
from common.reply_signing import sign_reply
from common.resources import EnergyModel, Meter, message_bytes, wire_figures

app = ClientApp()

#: The meter of the message being handled (started in ``_handle``, read in ``_reply``).
_METER: ContextVar[Meter | None] = ContextVar("fedguard_meter", default=None)


def _privacy(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> NodePrivacy:
    """The privacy facade for this message's run: every DP release on this node goes through it."""
    return NodePrivacy(cfg, settings, context.state, ledger_run_key(msg))


def _round(msg: Message) -> int | None:
    value = msg.content[R.CONFIG].get(R.ROUND)
    return None if value is None else int(value)


def _reply(msg: Message, content: RecordDict, settings: NodeSettings | None = None) -> Message:
    """Check every key against the allow-list, sign, log what leaves, and build the reply.

    The message's cost is metered up to here: its exact figures go to the node's own
    ``resources.jsonl``; a training reply carries coarsened ones only if the owner's policy allows.
    """
    meter = _METER.get()
    usage = meter.stop() if meter is not None and settings is not None else None
    figures: dict[str, float | int] = {}
    if (
        usage is not None
        and msg.metadata.message_type == MessageType.TRAIN
        and R.METRICS in content
        and sends_resource_figures(settings.policy if settings else None)
    ):
        figures = wire_figures(usage)
        for key, value in figures.items():
            content[R.METRICS][key] = value
    R.check_reply_keys({name: list(rec.keys()) for name, rec in content.items()})
    if settings is not None and settings.auth_key is not None:
        sign_reply(content, settings.auth_key.read_bytes(), msg.metadata.run_id, _round(msg), msg.metadata.message_id)
    if settings is not None:
        log_sent(
            settings.workdir,
            run_id=ledger_run_key(msg),
            round_=_round(msg),
            reply_to=msg.metadata.message_id,
            content=content,
        )
    reply = Message(content, reply_to=msg)
    if usage is not None and settings is not None:
        usage.bytes_received, usage.bytes_sent = message_bytes(msg), message_bytes(reply)
        log_usage(
            settings.workdir,
            run_id=ledger_run_key(msg),
            round_=_round(msg),
            purpose=msg.metadata.message_type,
            reply_to=msg.metadata.message_id,
            usage=usage.to_dict(),
            sent=figures,
        )
    return reply


def refusal(
    msg: Message, code: str, log_id: str, settings: NodeSettings | None = None, rule: str | None = None
) -> Message:
    values = {R.REFUSAL_CODE: code, R.REFUSAL_LOG_ID: log_id} | ({R.REFUSAL_RULE: rule} if rule else {})
    return _reply(msg, RecordDict({R.REFUSAL: ConfigRecord(values)}), settings)


def _settings(msg: Message, context: Context, cfg: RunConfig) -> NodeSettings:
    sim_dir = msg.content[R.CONFIG].get(R.SIM_DATA_DIR)
    return node_settings(dict(context.node_config), cfg, str(sim_dir) if sim_dir else None)


def _node_data(settings: NodeSettings, cfg: RunConfig) -> Encoded:
    """The node's whole data file, encoded for the run's model (cached in the node's workdir)."""
    return load_encoded(
        settings.data_path,
        settings.schema,
        **text_encoding(cfg.model.name, cfg.model.params),
        cache_dir=settings.workdir / "cache",
    )


def _training_split(settings: NodeSettings, cfg: RunConfig, data: Encoded | None = None) -> Encoded:
    """The training rows of the node's data (``data``: already loaded; else read now)."""
    data = _node_data(settings, cfg) if data is None else data
    train_idx, _ = split_indices(len(data), cfg.data.validation_fraction, cfg.seed)
    return data.subset(train_idx)


#: Context state key: this node has said whether the model reads its texts whole (once per run).
_LONG_TEXTS_NOTED = "fedguard-long-texts"


def _note_long_texts(model: torch.nn.Module, train: Encoded, cfg: RunConfig, settings: NodeSettings,
                     context: Context) -> None:  # fmt: skip
    """Once per run: say on the node (never to the server) when the model reads only part of many of
    its training texts (``common.models.long_text_note``)."""
    if settings.schema.task != "text" or _LONG_TEXTS_NOTED in context.state:
        return
    context.state[_LONG_TEXTS_NOTED] = ConfigRecord({"noted": True})
    note = long_text_note(model, train.x, cfg.model.name)
    if note:
        print(f"[{settings.workdir.name}] NOTE: {note}", flush=True)
        node_logger(settings.workdir).info("data: %s", note)


class RoundClosed(FedGuardError):
    """The server stopped waiting for this round (the message outlived its TTL): training it would
    spend privacy budget on an update nobody aggregates."""

    code = "round-closed"


def _check_round_open(msg: Message) -> None:
    meta = msg.metadata
    if meta.created_at and meta.ttl and time.time() > meta.created_at + meta.ttl:
        late = time.time() - meta.created_at - meta.ttl
        raise RoundClosed(f"the round closed {late:.0f}s before this node got to it; nothing trained or spent")


def _global_state(msg: Message, model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """The plaintext global model the message carries; a packed state of another layout is refused unread."""
    return record_to_numpy(msg.content[R.ARRAYS], module_layout(model))


def _train(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    log = node_logger(settings.workdir)
    round_ = int(msg.content[R.CONFIG][R.ROUND])
    _check_round_open(msg)
    torch.set_num_threads(cfg.train.threads)
    device = node_device(context.node_config, cfg.train.device)  # the owner's --device wins
    model = build_model(cfg.model.name, settings.schema, cfg.model.params)
    homomorphic, masked = cfg.secure_aggregation == "homomorphic", cfg.secure_aggregation == "secagg"
    if masked:  # open the peers' shares before anything is spent: a bad relay refuses the round
        secagg_node.receive(msg, context, cfg)
    if homomorphic:  # decrypt only what the pinned evaluator signed, with the context the admin approved
        ctx = he_node.client_context(msg, cfg, settings)
        blobs = he.record_to_blobs(msg.content[R.ARRAYS], where="global model")
        global_state = he_node.decrypt_global(ctx, cfg, blobs, msg.content[R.CONFIG], ledger_run_key(msg), round_ - 1)
    else:
        global_state = _global_state(msg, model)
    load_numpy_state(model, global_state)
    # Pretrained models: one DP step on made-up text proves per-sample gradients are right before
    # any record is read or any budget reserved (client.preflight).
    run_preflight(model, cfg, resolve_grad_sample_mode(cfg), device)
    data = _node_data(settings, cfg)
    train = _training_split(settings, cfg, data)
    _note_long_texts(model, train, cfg, settings, context)
    # fairfed / qfedavg: counts of the global model as received, on all the node's rows (as FairFed's local
    # metric; a validation split alone would leave most groups under the release threshold); they leave
    # only noised, after training.
    counts = mitigation.model_counts(model, data, cfg, settings) if cfg.mitigation.node_releases_per_round else None
    table = mitigation.received_weights(msg) if cfg.mitigation.method == "reweighing" else None
    weights = mitigation.record_weights(train, cfg, table) if table is not None else None

    t0 = time.perf_counter()
    # Plan → owner policy → ledger reserve → DP-SGD → confirm (client.privacy); refused before training.
    privacy = _privacy(msg, context, cfg, settings)
    result, accounting = privacy.train(
        model, train, device, round_=round_, message_id=msg.metadata.message_id, record_weights=weights
    )
    released = None
    if counts is not None:  # a second charged release: the reply's ε is the one composing both
        released, spend = mitigation.release(privacy, counts, msg, cfg, settings, round_, "model counts")
        accounting |= {R.EPSILON: spend.epsilon_run, R.EPSILON_TOTAL: spend.epsilon_total}
        accounting |= privacy.selection_values(spend)
    weight = secagg_node.advertised_weight(msg, context) if masked else declared_weight(settings, len(train))
    metrics: dict[str, float | int] = {R.NUM_EXAMPLES: weight, **accounting}
    metrics[R.STEPS] = result.steps
    meter = _METER.get()
    if meter is not None:  # each epoch visits the split once (DP: Poisson sampling, in expectation)
        meter.examples = cfg.train.local_epochs * len(train)
    log.info(
        "round %d: trained %d steps in %.1fs on %d records (dataset %s)",
        round_,
        result.steps,
        time.perf_counter() - t0,
        len(train),
        settings.dataset_id,
    )
    if homomorphic:  # w·Δ with w = declared size over the config's cap (≤ 1), clipped to ±B
        weight = min(1.0, float(metrics[R.NUM_EXAMPLES]) / cfg.server.max_weight)
        blobs, secs = he_node.encrypt_delta(ctx, cfg, state_to_numpy(model), global_state, weight)
        content = RecordDict(
            {
                R.ARRAYS: he.blobs_to_record(blobs),
                R.METRICS: MetricRecord(metrics),
                R.HE: ConfigRecord({R.HE_ENCRYPT_SECONDS: secs}),
            }
        )
        return _reply(msg, content, settings)
    if masked:  # [w/w_max · Δ, w], quantized and masked: only a sum over ≥ t nodes can be unmasked
        update = secagg_node.masked_update(msg, context, cfg, settings, state_to_numpy(model), global_state)
        return _reply(msg, RecordDict({secagg.SECAGG_MASKED: update, R.METRICS: MetricRecord(metrics)}), settings)
    content = RecordDict({R.ARRAYS: numpy_to_record(state_to_numpy(model)), R.METRICS: MetricRecord(metrics)})
    if released is not None:
        content[R.MITIGATION_COUNTS] = released
    return _reply(msg, content, settings)


class LabelCountsNotRequested(FedGuardError):
    code = "label-counts-not-in-run-config"


def _label_counts(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Reweighing, before round 1: noised group × label counts of the training split, one charged release."""
    if not cfg.mitigation.label_counts_release:
        raise LabelCountsNotRequested("the signed run config does not ask for reweighing's label counts")
    privacy = _privacy(msg, context, cfg, settings)
    train = _training_split(settings, cfg)
    privacy.admit("train", privacy.plan(len(train)))  # the whole run fits, or nothing
    counts = mitigation.label_counts(train, cfg, settings)
    record, spend = mitigation.release(privacy, counts, msg, cfg, settings, _round(msg) or 0, "label counts")
    metrics = {
        R.EPSILON: spend.epsilon_run,
        R.DELTA: privacy.accountant_delta,
        R.NOISE_MULTIPLIER: cfg.mitigation.noise_multiplier,
        R.EPSILON_TOTAL: spend.epsilon_total,
        R.BUDGET_EPSILON: settings.budget_epsilon,
        R.BUDGET_DELTA: settings.budget_delta,
        **privacy.selection_values(spend),
    }
    return _reply(msg, RecordDict({R.MITIGATION_COUNTS: record, R.METRICS: MetricRecord(metrics)}), settings)


def _secagg_keys(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Secure aggregation, step 1: fresh per-round public keys and the declared weight (public)."""
    weight = declared_weight(settings, len(_training_split(settings, cfg)))
    return _reply(msg, RecordDict({secagg.SECAGG: secagg_node.advertise(msg, context, weight)}), settings)


def _secagg_shares(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Secure aggregation, step 2: shares of this node's secrets, each sealed for one peer."""
    return _reply(msg, RecordDict({secagg.SECAGG: secagg_node.share(msg, context, cfg)}), settings)


def _secagg_unmask(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Secure aggregation, step 4: the shares that remove the masks from the sum, once."""
    return _reply(msg, RecordDict({secagg.SECAGG: secagg_node.unmask(msg, context, cfg)}), settings)


def _plan_reply(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """What the planned run would cost this node, from its own size and ledger; nothing is spent."""
    values = _privacy(msg, context, cfg, settings).preview(len(_training_split(settings, cfg)))
    return _reply(msg, RecordDict({R.PLAN: MetricRecord(values)}), settings)


Work = Callable[[Message, Context, RunConfig, NodeSettings], Message]


def _handle(msg: Message, context: Context, work: Work, purpose: Purpose | None) -> Message:
    """Admit the request, run ``work``; any failure becomes an explicit refusal with a code and a log id.

    Admission (signed run, owner's policy) comes before any data is read; every decision lands in
    the node's request log.
    """
    meter = Meter()  # the message's cost: time, CPU, memory, energy (common.resources)
    token = _METER.set(meter)
    try:
        return _admit_and_work(msg, context, work, purpose, new_log_id(), meter)
    finally:
        _METER.reset(token)


def _admit_and_work(
    msg: Message, context: Context, work: Work, purpose: Purpose | None, log_id: str, meter: Meter
) -> Message:
    settings: NodeSettings | None = None
    what = purpose or "role"
    try:
        cfg = config_from_json(str(msg.content[R.CONFIG][R.RUN_CONFIG]))
        settings = _settings(msg, context, cfg)
        meter.model = EnergyModel.from_config(dict(context.node_config))
        check_request(msg, cfg, settings)
        if purpose is not None:
            check_policy(cfg, settings, purpose)  # rules that need no data; σ and ε follow the plan
        reply = work(msg, context, cfg, settings)
        if R.REFUSAL not in reply.content:
            record(settings, msg, what, accepted=True)
        return reply
    except Exception as exc:  # noqa: BLE001 - the text may quote private data: it stays local
        code = exc.code if isinstance(exc, FedGuardError) else "internal-error"
        rule = exc.rule if isinstance(exc, PolicyViolation) else None
        _log_failure(settings, log_id, exc)
        if settings is not None:
            record(settings, msg, what, accepted=False, code=code, reason=_local_reason(exc, log_id))
    try:
        return refusal(msg, code, log_id, settings, rule)
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable key: unsigned, so the server drops it
        _log_failure(settings, log_id, exc)
        return refusal(msg, code, log_id, rule=rule)


def _local_reason(exc: BaseException, log_id: str) -> str:
    """For the node's own request log (never sent): the error's first line."""
    text = exc.what if isinstance(exc, FedGuardError) else type(exc).__name__
    return f"{text} (log id {log_id})"


def _role_reply(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """The node's role, and the name the operator knows it by (its kit name; ``node-N`` in simulation)."""
    answer: dict[str, str] = {R.ROLE_NAME: settings.role}
    answer |= {R.NODE_NAME: settings.node_name} if settings.node_name else {}
    return _reply(msg, RecordDict({R.ROLE: ConfigRecord(answer)}), settings)


def _score(model: torch.nn.Module, cfg: RunConfig, settings: NodeSettings, round_: int | None) -> RecordDict:
    """The evaluator's metrics and fairness audit of ``model`` on its held-out set.

    On every core this node may use: scoring runs between rounds, while the training nodes wait.
    """
    torch.set_num_threads(max(cfg.train.threads, usable_cpus()))
    data = _node_data(settings, cfg)
    metrics, audit, policy, calibration = score_held_out(model, data, cfg, round_)  # thresholds / calibration runs
    node_logger(settings.workdir).info("round %s: evaluated %d held-out rows: %s", round_, len(data), metrics)
    audit_record = ConfigRecord(
        {
            R.AUDIT_JSON: audit.model_dump_json() if audit is not None else "",
            R.PROVENANCE_JSON: json.dumps(provenance(data, settings.data_path.name)),
        }
    )
    if policy is not None:
        audit_record[R.THRESHOLD_POLICY_JSON] = policy.model_dump_json()
    if calibration is not None:
        audit_record[R.CALIBRATION_JSON] = calibration.model_dump_json()
    return RecordDict({R.EVALUATION: MetricRecord(metrics), R.AUDIT: audit_record})


def _evaluator_only(settings: NodeSettings) -> None:
    if settings.role != "evaluator":
        raise RoleError("this node is not the federation's evaluator", fix="send evaluate messages to the evaluator")


def _evaluate(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """The evaluator scores and audits the global model on its held-out set; results leave rounded."""
    _evaluator_only(settings)
    model = build_model(cfg.model.name, settings.schema, cfg.model.params)
    load_numpy_state(model, _global_state(msg, model))
    return _reply(msg, _score(model, cfg, settings, _round(msg)), settings)


def _he_step(
    msg: Message,
    cfg: RunConfig,
    settings: NodeSettings,
    state: OrderedDict[str, np.ndarray],
    timings: dict[str, float],
    released: OrderedDict[str, np.ndarray] | None = None,
) -> Message:
    """Score ``released`` (the run's model average; default ``state``), then hand ``state`` out
    re-encrypted and signed for the next round."""
    ctx = he_node.evaluator_context(cfg, settings)
    model = build_model(cfg.model.name, settings.schema, cfg.model.params)
    load_numpy_state(model, state if released is None else released)
    content = _score(model, cfg, settings, _round(msg))
    record, sig = he_node.signed_global(ctx, cfg, settings, state, ledger_run_key(msg), int(_round(msg) or 0))
    content[R.ARRAYS] = record
    content[R.HE] = ConfigRecord({R.HE_SIGNATURE: sig, **timings})
    return _reply(msg, content, settings)


def _he_init(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Homomorphic mode, round 0: the evaluator encrypts and signs the initial model (from the seed)."""
    _evaluator_only(settings)
    return _he_step(msg, cfg, settings, he_node.template(cfg), {})


def _he_aggregate(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Homomorphic mode: check and decrypt the server's sum, step the model, evaluate, re-encrypt, sign."""
    _evaluator_only(settings)
    ctx = he_node.evaluator_context(cfg, settings)
    round_ = int(msg.content[R.CONFIG][R.ROUND])
    current, delta, timings = he_node.aggregate(
        msg, ctx, cfg, settings, ledger_run_key(msg), round_, int(msg.metadata.run_id)
    )
    optimizer = make_server_optimizer(cfg.server.optimizer)
    saved = context.state.get(_OPTIMIZER_STATE)
    if saved is not None:
        optimizer.load(json.loads(str(saved["scalars"])), record_to_numpy(context.state[_OPTIMIZER_ARRAYS]))
    aggregated = OrderedDict((k, current[k] + delta[k] if k in delta else current[k]) for k in current)
    new = optimizer.step(current, aggregated)
    context.state[_OPTIMIZER_STATE] = ConfigRecord({"scalars": json.dumps(optimizer.scalars())})
    context.state[_OPTIMIZER_ARRAYS] = numpy_to_record(optimizer.arrays())
    return _he_step(msg, cfg, settings, new, timings, optimizer.released(new))


_OPTIMIZER_STATE, _OPTIMIZER_ARRAYS = "fedguard-he-optimizer", "fedguard-he-optimizer-arrays"


class CountsNotRequested(FedGuardError):
    code = "counts-not-in-run-config"


def _fairness_counts(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
    """Per-group confusion counts of the global model on the validation split, Gaussian-noised.

    The release (one Gaussian release, q = 1) is reserved in the ledger before any noise is drawn
    (``client.privacy``); groups below the larger of the run's and the owner's minimum never leave.
    """
    privacy = _privacy(msg, context, cfg, settings)
    if not privacy.count_release():
        raise CountsNotRequested("the signed run config does not ask for federated fairness counts")
    fc = cfg.fairness
    torch.set_num_threads(cfg.train.threads)
    data = _node_data(settings, cfg)
    _, val_idx = split_indices(len(data), cfg.data.validation_fraction, cfg.seed)
    val = data.subset(val_idx)
    model = build_model(cfg.model.name, settings.schema, cfg.model.params)
    load_numpy_state(model, _global_state(msg, model))
    min_size = max(fc.min_group_size, settings.policy.min_group_size if settings.policy else 1)
    probs, _ = predict(model, val)
    counts = group_confusion_counts(val.y.numpy(), probs.argmax(-1), val.groups, min_size, fc.intersections)
    noisy, spend = privacy.release_counts(
        counts,
        round_=int(msg.content[R.CONFIG][R.ROUND]),
        message_id=msg.metadata.message_id,
        min_group_size=min_size,
    )
    node_logger(settings.workdir).info(
        "round %s: released noised counts of %d group(s) (σ=%.1f per cell); ε this run %.3f, dataset total %.3f",
        _round(msg),
        sum(len(rows) for rows in noisy.counts.values()),
        noisy.sigma,
        spend.epsilon_run,
        spend.epsilon_total,
    )
    content = RecordDict(
        {
            R.FAIRNESS_COUNTS: ConfigRecord(
                {
                    R.COUNTS_JSON: json.dumps(noisy.counts),
                    R.COUNT_SIGMA: noisy.sigma,
                    R.COUNT_THRESHOLD: noisy.threshold,
                    R.COUNT_SELECTION_DELTA: noisy.selection_delta,
                }
            ),
            R.METRICS: MetricRecord(
                {
                    R.EPSILON: spend.epsilon_run,
                    R.DELTA: privacy.accountant_delta,  # its ε composes the run's releases at it
                    R.NOISE_MULTIPLIER: fc.count_noise_multiplier,
                    R.EPSILON_TOTAL: spend.epsilon_total,
                    R.BUDGET_EPSILON: settings.budget_epsilon,
                    R.BUDGET_DELTA: settings.budget_delta,
                    **privacy.selection_values(spend),
                }
            ),
        }
    )
    return _reply(msg, content, settings)


class RoleError(FedGuardError):
    code = "wrong-role"


def _clients_only(work: Work) -> Work:
    def run(msg: Message, context: Context, cfg: RunConfig, settings: NodeSettings) -> Message:
        if settings.role != "client":
            raise RoleError("the evaluator never trains or spends a privacy budget")
        return work(msg, context, cfg, settings)

    return run


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_train), "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate, "evaluate")


@app.query("plan")
def plan(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_plan_reply), "plan")


@app.query("fairness")
def fairness(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_fairness_counts), "fairness-counts")


@app.query("label_counts")
def label_counts(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_label_counts), "train")


@app.query("he_init")
def he_init(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _he_init, "evaluate")


@app.query("he_aggregate")
def he_aggregate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _he_aggregate, "evaluate")


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_secagg_keys), "train")


@app.query("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_secagg_shares), "train")


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _clients_only(_secagg_unmask), "train")


@app.query("role")
def role(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _role_reply, None)


def _log_failure(settings: NodeSettings | None, log_id: str, exc: BaseException) -> None:
    """Write the full error to the node's own log (or stderr when no workdir is known)."""
    import traceback

    text = exc.render() if isinstance(exc, FedGuardError) else "".join(traceback.format_exception(exc))
    if settings is not None:
        node_logger(settings.workdir).error("log-id %s: %s", log_id, text)
    else:
        import sys

        print(f"[fedguard node] log-id {log_id}: {text}", file=sys.stderr, flush=True)
