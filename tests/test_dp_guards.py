"""DP integrity guards (client.dp_guards) on the real ClientApp, in process.

Honest DP-SGD rounds pass for the tabular, text and pretrained LoRA models; each guard has a
sabotaged round that it refuses with ``dp-integrity``: no model is sent, the reason stays in the
node's log, and the release stays pending (counted) in the ledger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import client.training as training
from client.admission import read_requests
from client.app import app as client_app
from client.dp_guards import FALSE_ALARM_RATE, DPGuard, DPIntegrityError
from client.ledger import Ledger
from common import records as R
from common.config import RunConfig
from common.data import encode
from common.models import build_model
from common.pretrained import pretrained_available
from common.privacy import DPPlan, plan_dp
from tests.helpers import global_state, node_context, tabular_config, train_message

#: The sabotage helpers patch Opacus's make_private, so those rounds pin an Opacus engine; the
#: book-keeping path ("auto" for built-in models) has its own sabotage tests (tests/test_dp_fast_path.py).
OPACUS_DP = {"target_epsilon": 4.0, "delta": 1e-4, "grad_sample_mode": "ew"}

pytestmark = [
    pytest.mark.usefixtures("server_identity"),
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


# -- helpers ------------------------------------------------------------------------------------
def _round(cfg: RunConfig, csv: Path, workdir: Path) -> Any:
    return client_app(train_message(cfg, global_state(cfg)), node_context(csv, workdir))


def _assert_refused(reply: Any, workdir: Path, check: str) -> None:
    """Refused with dp-integrity; nothing but the refusal left; the reason is in the node's log; counted."""
    assert set(reply.content.keys()) == {R.REFUSAL}, "a model left the node after a failed guard"
    refusal = reply.content[R.REFUSAL]
    assert refusal[R.REFUSAL_CODE] == "dp-integrity"
    log = (workdir / "node.log").read_text(encoding="utf-8")
    assert str(refusal[R.REFUSAL_LOG_ID]) in log and f"DP integrity guard '{check}'" in log
    sent = [json.loads(line) for line in (workdir / "sent.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [set(entry["records"]) for entry in sent] == [{R.REFUSAL}]  # the refusal, nothing else
    request = read_requests(workdir)[-1]
    assert request["accepted"] is False and request["code"] == "dp-integrity"
    assert f"DP integrity guard '{check}' failed" in request["reason"]
    with Ledger(workdir / "ledger.db") as ledger:
        assert [r["status"] for r in ledger.releases()] == ["pending"]  # spent stays spent, nothing more


class _Patched(training.PrivacyEngine):
    """FedGuard's PrivacyEngine (Opacus's, plus bk); ``tamper(optimizer, module)`` sabotages what it makes."""

    tamper: Callable[[Any, Any], None] = staticmethod(lambda opt, module: None)

    def make_private(self, *args: Any, **kwargs: Any) -> Any:
        out = super().make_private(*args, **kwargs)
        type(self).tamper(out[1], out[0])
        return out


def _sabotage(monkeypatch: pytest.MonkeyPatch, tamper: Callable[[Any, Any], None]) -> None:
    engine = type("Sabotaged", (_Patched,), {"tamper": staticmethod(tamper)})
    monkeypatch.setattr(training, "PrivacyEngine", engine)


# -- honest rounds pass -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bk", "ew", "hooks", "ghost", "functorch"])
def test_guards_pass_honest_tabular_rounds(tabular_csv: Path, tmp_path: Path, mode: str) -> None:
    cfg = tabular_config(dp={"target_epsilon": 4.0, "delta": 1e-4, "grad_sample_mode": mode})
    reply = _round(cfg, tabular_csv, tmp_path / "node")
    assert R.REFUSAL not in reply.content and R.ARRAYS in reply.content


def test_guards_pass_with_physical_batches_and_sgd(tabular_csv: Path, tmp_path: Path) -> None:
    cfg = tabular_config(
        train={"local_epochs": 2, "batch_size": 64, "physical_batch_size": 16, "optimizer": "sgd", "momentum": 0.9}
    )
    reply = _round(cfg, tabular_csv, tmp_path / "node")
    assert R.REFUSAL not in reply.content


def _text_csv(path: Path, n: int = 300) -> Path:
    words = ["good", "great", "bad", "awful", "fine", "poor", "nice", "sad"]
    rows = [
        {"text": " ".join(words[(i * 7 + j) % 8] for j in range(6)), "group": "a" if i % 2 else "b", "y": i % 2}
        for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _text_config() -> RunConfig:
    return tabular_config(
        model={"name": "text-transformer", "params": {"d_model": 16, "layers": 1, "heads": 2, "max_len": 32}},
        data={
            "schema": {
                "task": "text",
                "text_column": "text",
                "label": "y",
                "classes": ["0", "1"],
                "sensitive": ["group"],
            },
            "validation_fraction": 0.2,
        },
    )


def test_guards_pass_an_honest_text_round(tmp_path: Path) -> None:
    reply = _round(_text_config(), _text_csv(tmp_path / "text.csv"), tmp_path / "node")
    assert R.REFUSAL not in reply.content and R.ARRAYS in reply.content


# -- each check has a round that fails it -------------------------------------------------------
#: The noise and clipping checks read bk's flat buffers (client.dp_guards.flat_base) and every other
#: mode's per-tensor gradients: each sabotage runs on both paths.
GUARD_PATHS = ["ew", "bk"]


def _dp(mode: str, **extra: Any) -> dict[str, Any]:
    return {**OPACUS_DP, "grad_sample_mode": mode, **extra}


@pytest.mark.parametrize("mode", GUARD_PATHS)
def test_noise_multiplier_silently_zero_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The ledger records the planned σ; the optimizer adds no noise at all."""

    def no_noise(opt: Any, _: Any) -> None:
        opt.noise_multiplier = 0.0

    _sabotage(monkeypatch, no_noise)
    reply = _round(tabular_config(dp=_dp(mode)), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "noise")


@pytest.mark.parametrize("mode", GUARD_PATHS)
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_noise_of_another_scale_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: float, mode: str
) -> None:
    """Half or twice the planned noise: still 'noised', but not the release the ledger charged for."""

    def rescale(opt: Any, _: Any) -> None:
        opt.noise_multiplier *= factor

    _sabotage(monkeypatch, rescale)
    reply = _round(tabular_config(dp=_dp(mode)), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "noise")
    log = (tmp_path / "node" / "node.log").read_text(encoding="utf-8")
    assert ("missing or too small" if factor < 1 else "larger than planned") in log


@pytest.mark.parametrize("mode", GUARD_PATHS)
def test_noise_missing_on_one_tensor_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Noise skipped for a single small tensor: the per-tensor test catches what a pooled one would not.
    Written in place, so bk's gradients stay one flat buffer and its flat path is the one tested."""

    def skip_one(opt: Any, _: Any) -> None:
        original = opt.add_noise

        def add_noise() -> None:
            original()
            p = opt.params[-1]
            p.grad.copy_(p.summed_grad.view_as(p.grad))

        opt.add_noise = add_noise

    _sabotage(monkeypatch, skip_one)
    reply = _round(tabular_config(dp=_dp(mode)), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "noise")


def test_per_sample_gradient_dropped_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One layer's Opacus hooks are gone: its parameters get a gradient but no per-sample gradients."""

    def drop_hooks(_: Any, module: Any) -> None:
        head = module._module.head
        head._forward_hooks.clear()  # Opacus's activation capture …
        head._backward_hooks.clear()  # … and its per-sample gradient hook
        head._is_full_backward_hook = None

    _sabotage(monkeypatch, drop_hooks)
    cfg = tabular_config(dp={"target_epsilon": 4.0, "delta": 1e-4, "grad_sample_mode": "hooks"})
    reply = _round(cfg, tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "coverage")


def test_parameter_outside_the_dp_optimizer_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = training._optimizer

    def partial(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
        opt = real(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad][1:]  # one trainable tensor left out
        return type(opt)(params, lr=cfg.train.learning_rate)

    monkeypatch.setattr(training, "_optimizer", partial)
    reply = _round(tabular_config(), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "coverage")


@pytest.mark.parametrize("mode", GUARD_PATHS)
def test_unclipped_gradients_are_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A clipping bug: the clipped sum is inflated far beyond b·C before noise (in place: bk's stays flat)."""

    def inflate(opt: Any, _: Any) -> None:
        name = "accumulate" if mode == "bk" else "clip_and_accumulate"  # where each fills p.summed_grad
        original = getattr(opt, name)

        def fill_and_inflate() -> None:
            original()
            for p in opt.params:
                p.summed_grad.mul_(1e4)

        setattr(opt, name, fill_and_inflate)

    _sabotage(monkeypatch, inflate)
    reply = _round(tabular_config(dp=_dp(mode, max_grad_norm=0.5)), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "clipping")


def test_trainable_parameter_that_never_moves_is_refused(
    tabular_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Noised gradients for every tensor, but one of them is never updated (a learning rate of 0)."""

    def frozen_group(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params[:1], "lr": 0.0}, {"params": params[1:]}]
        return torch.optim.Adam(groups, lr=cfg.train.learning_rate)

    monkeypatch.setattr(training, "_optimizer", frozen_group)
    reply = _round(tabular_config(), tabular_csv, tmp_path / "node")
    _assert_refused(reply, tmp_path / "node", "moved")


# -- the guard on its own: the statistic's calibration and the frozen-base check -----------------
def _plan_for(n: int, cfg: RunConfig) -> DPPlan:
    return plan_dp(
        n, cfg.dp, batch_size=cfg.train.logical_batch_size(n), local_epochs=cfg.train.local_epochs, rounds=cfg.rounds
    )


def test_noise_statistic_is_centred_on_one(tabular_csv: Path) -> None:
    """An honest round: Σ‖z‖²/(σ²C²·d·T) ≈ 1, well inside the accepted band."""
    cfg = tabular_config()
    data = encode(pd.read_csv(tabular_csv), cfg.data.schema_)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    plan = _plan_for(len(data), cfg)
    result = training.train_local(model, data, cfg, plan, torch.device("cpu"))
    report = result.guards
    assert report is not None and report.steps == plan.steps_per_round
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(report.noise_ratio - 1) < 6 * math.sqrt(2 / (d * report.steps))
    assert FALSE_ALARM_RATE <= 1e-6


def test_frozen_base_change_is_detected() -> None:
    """Any frozen weight changing during the round (Opacus issue 820's failure) fails the guard."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    guard = DPGuard(model, noise_multiplier=1.0, max_grad_norm=1.0)
    guard._optimizer = object()  # type: ignore[assignment]  # attached; no steps taken
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    with pytest.raises(DPIntegrityError, match="0.weight") as err:
        guard.finish(model)
    assert err.value.check == "frozen-base" and err.value.code == "dp-integrity"


# -- pretrained LoRA (the `pretrained` extra) ----------------------------------------------------
def _lora_setup(tmp_path: Path) -> tuple[RunConfig, Path]:
    from common.config import parse_config
    from fedguard.demo import TEXT_DEMO_SCHEMA, text_demo_frame

    path = tmp_path / "tweets.csv"
    text_demo_frame().sample(n=150, random_state=3).to_csv(path, index=False)
    cfg = parse_config(
        {
            "name": "guards-lora",
            "seed": 5,
            "rounds": 1,
            "clients_per_round": 1,
            "model": {"name": "minilm-lora", "params": {"max_tokens": 24}},
            "train": {"local_epochs": 1, "batch_size": 40, "learning_rate": 0.01, "optimizer": "adam"},
            "dp": {"target_epsilon": 8.0, "delta": 1e-4},
            "data": {"schema": TEXT_DEMO_SCHEMA, "validation_fraction": 0.2},
            "simulation": {"num_clients": 1},
        },
        "lora test config",
    )
    return cfg, path


@pytest.mark.skipif(not pretrained_available(), reason="the pretrained extra is not installed")
def test_lora_round_passes_and_a_changed_base_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, csv = _lora_setup(tmp_path)
    reply = _round(cfg, csv, tmp_path / "honest")
    assert R.REFUSAL not in reply.content and R.ARRAYS in reply.content

    def corrupt_base(opt: Any, module: Any) -> None:
        inner = opt.original_optimizer
        step = inner.step
        base = module._module.encoder.encoder.layer[0].attention.self.query.base.weight

        def corrupting_step(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                base.add_(1e-3)  # a frozen base weight drifts, as PEFT + Opacus did (issue 820)
            return step(*args, **kwargs)

        inner.step = corrupting_step

    _sabotage(monkeypatch, corrupt_base)
    reply = _round(cfg, csv, tmp_path / "corrupt")
    _assert_refused(reply, tmp_path / "corrupt", "frozen-base")
