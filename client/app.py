"""The FedGuard ClientApp: local DP-SGD on the node's private data.

Only allow-listed values leave (see ``common.records``): the DP-SGD model, the declared
public size used as the FedAvg weight, and the accounting of the DP mechanism. Failures
leave as an error code plus a node-local log id; their text stays in the node's log.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import NodeSettings, declared_weight, new_log_id, node_logger, node_settings
from client.training import resolve_grad_sample_mode, train_local
from common import records as R
from common.codec import load_numpy_state, numpy_to_record, record_to_numpy, state_to_numpy
from common.config import RunConfig, config_from_json
from common.data import load_encoded, split_indices
from common.errors import FedGuardError
from common.models import build_model, model_max_len, pick_device
from common.privacy import DPPlan, History, epsilon_spent, plan_dp

app = ClientApp()

_DP_STATE = "fedguard-dp"


def _load_history(context: Context) -> tuple[tuple[int, float] | None, History]:
    """This run's earlier (n, σ) calibration on this node, and its DP releases so far."""
    rec = context.state.get(_DP_STATE)
    if rec is None:
        return None, []
    sig, qs, steps = rec["sigmas"], rec["rates"], rec["steps"]
    history = [(float(a), float(b), int(c)) for a, b, c in zip(sig, qs, steps, strict=True)]
    return (int(rec["planned-n"]), float(rec["planned-sigma"])), history


def _save_history(context: Context, plan: DPPlan, history: History) -> None:
    context.state[_DP_STATE] = ConfigRecord(
        {
            "planned-n": plan.n_train,
            "planned-sigma": plan.noise_multiplier,
            "sigmas": [h[0] for h in history],
            "rates": [h[1] for h in history],
            "steps": [h[2] for h in history],
        }
    )


def _reply(msg: Message, content: RecordDict) -> Message:
    R.check_reply_keys({name: list(rec.keys()) for name, rec in content.items()})
    return Message(content, reply_to=msg)


def refusal(msg: Message, code: str, log_id: str) -> Message:
    return _reply(msg, RecordDict({R.REFUSAL: ConfigRecord({R.REFUSAL_CODE: code, R.REFUSAL_LOG_ID: log_id})}))


def _settings(msg: Message, context: Context, cfg: RunConfig) -> NodeSettings:
    sim_dir = msg.content[R.CONFIG].get(R.SIM_DATA_DIR)
    return node_settings(dict(context.node_config), cfg, str(sim_dir) if sim_dir else None)


def _train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    settings = _settings(msg, context, cfg)
    log = node_logger(settings.workdir)
    round_ = int(msg.content[R.CONFIG][R.ROUND])
    torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)

    data = load_encoded(
        settings.data_path,
        settings.schema,
        max_len=model_max_len(cfg.model.name, cfg.model.params),
        cache_dir=settings.workdir / "cache",
    )
    train_idx, _ = split_indices(len(data), cfg.data.validation_fraction, cfg.seed)
    train = data.subset(train_idx)

    model = build_model(cfg.model.name, settings.schema, cfg.model.params)
    load_numpy_state(model, record_to_numpy(msg.content[R.ARRAYS]))

    earlier, history = _load_history(context)
    plan: DPPlan | None = None
    if cfg.dp.enabled:
        same_size = earlier is not None and earlier[0] == len(train)
        plan = plan_dp(
            len(train),
            cfg.dp,
            batch_size=cfg.train.batch_size,
            local_epochs=cfg.train.local_epochs,
            rounds=cfg.rounds,
            noise_multiplier=earlier[1] if same_size and earlier else None,
        )
        if not same_size:
            print(f"[{settings.workdir.name}] {plan.describe()}", flush=True)
            log.info("%s; grad_sample_mode=%s", plan.describe(), resolve_grad_sample_mode(cfg))

    t0 = time.perf_counter()
    result = train_local(model, train, cfg, plan, device)
    history += result.history
    metrics: dict[str, float | int] = {
        R.NUM_EXAMPLES: declared_weight(settings, len(train)),
        R.STEPS: result.steps,
    }
    if plan is not None:
        eps = epsilon_spent(history, plan.delta, plan.accountant)
        _save_history(context, plan, history)
        metrics |= {
            R.EPSILON: eps,
            R.DELTA: plan.delta,
            R.NOISE_MULTIPLIER: plan.noise_multiplier,
            R.SAMPLE_RATE: plan.sample_rate,
            R.MAX_GRAD_NORM: plan.max_grad_norm,
        }
    log.info(
        "round %d: trained %d steps in %.1fs on %d records; sent %s",
        round_,
        result.steps,
        time.perf_counter() - t0,
        len(train),
        {k: v for k, v in metrics.items() if k != R.STEPS},
    )
    content = RecordDict({R.ARRAYS: numpy_to_record(state_to_numpy(model)), R.METRICS: MetricRecord(metrics)})
    return _reply(msg, content)


@app.train()
def train(msg: Message, context: Context) -> Message:
    log_id = new_log_id()
    try:
        cfg = config_from_json(str(msg.content[R.CONFIG][R.RUN_CONFIG]))
        return _train(msg, context, cfg)
    except FedGuardError as exc:
        _log_failure(context, msg, log_id, exc)
        return refusal(msg, exc.code, log_id)
    except Exception as exc:  # noqa: BLE001 - the text may quote private data: it stays local
        _log_failure(context, msg, log_id, exc)
        return refusal(msg, "internal-error", log_id)


def _log_failure(context: Context, msg: Message, log_id: str, exc: BaseException) -> None:
    """Write the full error to the node's own log (or stderr when no workdir is known)."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        cfg = config_from_json(str(msg.content[R.CONFIG][R.RUN_CONFIG]))
        node_logger(_settings(msg, context, cfg).workdir).error("log-id %s: %s", log_id, text)
    except Exception:  # noqa: BLE001
        import sys

        print(f"[fedguard node] log-id {log_id}: {text}", file=sys.stderr, flush=True)
