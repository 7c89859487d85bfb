"""Local DP-SGD with Opacus.

Each step Poisson-samples the whole training split (Opacus's DPDataLoader) and clips and
noises per-sample gradients. Sampling and noise draw from generators seeded from
``os.urandom`` — never from the config seed — so the server cannot predict the noise.

Device: ``device`` comes from ``common.devices`` (``auto``, or the node owner's override); on CUDA the
loader pins host memory and batches copy non-blocking. Training stays float32 under DP (see
``common.devices``). Pretrained models first pass ``client.preflight`` (one DP step on synthetic text).

Utility options (``[train]``), none of which touches the privacy accounting:

- ``proximal_mu`` (FedProx): after every optimizer step ``w ← w − lr·μ·(w − w_global)``, with
  ``w_global`` the model this round started from. Opacus's DP optimizer replaces ``p.grad`` with
  the clipped, noised per-sample sum, computed by layer hooks that never see a parameter-only
  loss term, so FedProx's usual loss penalty would silently do nothing under DP-SGD.
- ``warmup_steps``: linear learning-rate warm-up at the start of every round.
- ``physical_batch_size``: Opacus's BatchMemoryManager runs a large logical (Poisson) batch as
  several physical batches and takes one DP step per logical batch ("virtual steps").
- ``class_weights``: public per-class loss weights, applied per sample so that one record's
  gradient never depends on the other records in its batch.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_guards import DPGuard, GuardReport
from client.preflight import preflight
from common.config import RunConfig
from common.data import Encoded
from common.devices import loader_options
from common.models import MODELS, model_max_len
from common.privacy import DPPlan, History
from common.progress import Progress

# Opacus's hooks on the first trained layer above a frozen one (LoRA over frozen embeddings, or
# integer inputs) make torch warn that no input requires a gradient; the per-sample gradients of the
# layer's own parameters are unaffected (client.preflight checks them against exact gradients).
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

#: Where local-step progress goes when the caller names no node log (the executor's log, in deployment).
_log = logging.getLogger("fedguard.node.training")
#: Local-step progress lines: at most one per this many seconds and per tenth of the round (the rarer).
PROGRESS_EVERY_S = 5.0


@dataclass
class LocalResult:
    history: History  # this round's DP releases (σ, q, steps); empty without DP
    steps: int
    guards: GuardReport | None = None  # the DP integrity guards' findings (client.dp_guards); None without DP


def secure_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the OS CSPRNG; the seed is never stored or logged."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


def resolve_grad_sample_mode(cfg: RunConfig) -> str:
    if cfg.dp.grad_sample_mode != "auto":
        return cfg.dp.grad_sample_mode
    return MODELS[cfg.model.name].default_grad_sample_mode


#: Pre-flight checks already passed in this process: (model, params, mode, device). Flower's simulation
#: keeps worker processes, so a round after the first skips the repeat.
_PREFLIGHT_DONE: set[str] = set()


def run_preflight(model: nn.Module, cfg: RunConfig, mode: str, device: torch.device) -> None:
    """One DP step on a synthetic batch (``client.preflight``) for pretrained models, once per process.

    Raises ``PreflightError`` before any training. Built-in models are built from Opacus-tested
    layers and covered by their own tests, so they skip it (it costs a model copy and a few passes).
    """
    if not MODELS[cfg.model.name].pretrained:
        return
    key = f"{cfg.model.name}|{sorted(cfg.model.params.items())}|{mode}|{device}"
    if key in _PREFLIGHT_DONE:
        return
    preflight(
        model,
        grad_sample_mode=mode,
        num_classes=cfg.data.schema_.num_classes,
        max_len=model_max_len(cfg.model.name, cfg.model.params),
        device=device,
    )
    _PREFLIGHT_DONE.add(key)


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.learning_rate)
    return torch.optim.SGD(params, lr=cfg.train.learning_rate, momentum=cfg.train.momentum)


class PerSampleWeightedCE(nn.Module):
    """Cross-entropy with public class weights, weighted per sample and averaged over the batch count.

    ``nn.CrossEntropyLoss(weight=…)`` divides by the batch's summed weights, which depend on the
    other records' labels: a record's gradient would then change with its neighbours, outside the
    per-record bound that DP-SGD's clipping and accounting assume. Here record i's loss is
    ``w[y_i]·ce_i`` whatever else is in the batch. ``reduction`` is read and set by Opacus's ghost
    clipping wrapper ("none" gives the per-sample losses).
    """

    weight: torch.Tensor

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32))
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, target, reduction="none") * self.weight[target]
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def make_criterion(cfg: RunConfig, device: torch.device) -> nn.Module:
    if cfg.train.class_weights is None:
        return nn.CrossEntropyLoss()
    return PerSampleWeightedCE(cfg.train.class_weights).to(device)


def loader_batch_size(n_train: int, plan: DPPlan) -> int:
    """A DataLoader batch size whose Opacus schedule is exactly the plan's (q = 1/k, k batches per epoch).

    Opacus derives q = 1/len(loader) = 1/⌈n/b⌉; for the k = ⌈n/B⌉ of any planned batch B,
    b = ⌈n/k⌉ gives ⌈n/b⌉ = k again. Deriving b from the plan (not from the config) keeps training
    on the schedule that was accounted, however the planner chose the batch.
    """
    k = round(1.0 / plan.sample_rate)
    return math.ceil(n_train / k)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _physical_batches(
    xb: torch.Tensor, yb: torch.Tensor, size: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if size is None or len(yb) <= size:
        yield xb, yb
        return
    for i in range(0, len(yb), size):
        yield xb[i : i + size], yb[i : i + size]


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """One DP step on an empty Poisson batch: the clipped sum is zero, so the update is noise alone.

    Poisson sampling sometimes draws no record, most often on a small node. The accountant counts
    the step as a release, and skipping it would reveal that the batch was empty, so it is taken.
    Opacus's optimizer handles an empty batch, but the "ew" and "functorch" per-sample modes fail on
    a zero-row forward pass, so none is run: every parameter gets an empty per-sample gradient.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:  # type: ignore[attr-defined]  # a DPOptimizer
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def train_local(
    model: nn.Module,
    data: Encoded,
    cfg: RunConfig,
    plan: DPPlan | None,
    device: torch.device,
    *,
    guards: bool = True,
    log: logging.Logger | None = None,
    label: str = "local training",
) -> LocalResult:
    """Train ``model`` in place for ``cfg.train.local_epochs``; with ``plan``, under DP-SGD.

    ``model`` arrives holding the global model; FedProx pulls towards that snapshot. Under DP the
    integrity guards (``client.dp_guards``) check every step and the finished round against the
    plan and raise ``DPIntegrityError`` (nothing may be sent); ``guards=False`` is for benchmarks only.
    Local steps done / total go to ``log`` (the node's log) as ``label: steps k/N`` lines, at most
    every 10% and 5 s, and as a bar on the process's terminal when it has one (``common.progress``).
    """
    model.to(device).train()
    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if tc.proximal_mu > 0 else []
    dataset = TensorDataset(data.x, data.y)
    sampling = secure_generator(torch.device("cpu"))
    batch = loader_batch_size(len(data), plan) if plan is not None else tc.logical_batch_size(len(data))
    loader = DataLoader(dataset, batch_size=batch, shuffle=plan is None, generator=sampling, **loader_options(device))
    optimizer = _optimizer(model, cfg)
    criterion: nn.Module = make_criterion(cfg, device)
    engine: PrivacyEngine | None = None
    guard: DPGuard | None = None
    trained: nn.Module = model
    physical = tc.physical_batch_size
    noise_only_when_empty = False
    if plan is not None:
        mode = resolve_grad_sample_mode(cfg)
        if physical is not None and mode == "ew":
            mode = "hooks"  # ew cannot accumulate per-sample gradients over physical batches
        run_preflight(model, cfg, mode, device)  # before the first real record goes through the model
        if guards:  # snapshot before Opacus wraps the model: what must move, what must stay frozen
            guard = DPGuard(model, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm)
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off; its CSPRNG (torchcsprng) has no build for this
            # torch, so the sampling and noise generators above are seeded from os.urandom instead.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=plan.accountant)
            wrapped = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True,
                noise_generator=secure_generator(device),
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            trained, optimizer, criterion, loader = wrapped
        else:
            trained, optimizer, loader = wrapped
            noise_only_when_empty = True
        # Fail closed: the releases must be exactly the ones the plan was calibrated for.
        actual_q = getattr(loader, "sample_rate", None)
        if (
            actual_q is None
            or abs(actual_q - plan.sample_rate) > 1e-12
            or len(loader) != plan.steps_per_round // tc.local_epochs
        ):
            raise RuntimeError(
                f"Opacus sampling (q={actual_q}, {len(loader)} steps) differs from the DP plan "
                f"(q={plan.sample_rate}, {plan.steps_per_round // tc.local_epochs} steps); nothing was trained"
            )
        if guard is not None:
            guard.attach(optimizer, trained)  # type: ignore[arg-type]
    steps = 0
    # Logical (DP) steps: the plan's count under DP, the loader's batches × epochs without.
    total = plan.steps_per_round if plan is not None else len(loader) * tc.local_epochs
    meter = Progress(total, label, log=log or _log, every_s=PROGRESS_EVERY_S)

    def after_step() -> None:
        """One logical step was taken: warm-up schedule and FedProx's proximal step."""
        nonlocal steps
        lr = tc.learning_rate * (min(1.0, (steps + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0)
        if anchor:
            pull = min(1.0, lr * tc.proximal_mu)  # ≥ 1 would overshoot w_global
            with torch.no_grad():
                for p, g in zip(params, anchor, strict=True):
                    p.sub_(pull * (p - g))
        steps += 1
        meter.update(steps)
        if tc.warmup_steps:
            _set_lr(optimizer, tc.learning_rate * min(1.0, (steps + 1) / tc.warmup_steps))

    if tc.warmup_steps:
        _set_lr(optimizer, tc.learning_rate / tc.warmup_steps)
    with meter:  # its final line, k/N, is written even when a step raises
        for _ in range(tc.local_epochs):
            if engine is not None and physical is not None:
                with BatchMemoryManager(
                    data_loader=loader,
                    max_physical_batch_size=physical,
                    optimizer=optimizer,  # type: ignore[arg-type]
                ) as physical_loader:
                    for xb, yb in physical_loader:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        optimizer.zero_grad(set_to_none=True)
                        criterion(trained(xb), yb).backward()
                        optimizer.step()
                        if not getattr(optimizer, "_is_last_step_skipped", False):
                            after_step()
                continue
            for xb, yb in loader:
                if noise_only_when_empty and len(yb) == 0:
                    _noise_only_step(optimizer)
                    after_step()
                    continue
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                if engine is None and physical is not None and len(yb) > physical:
                    for xp, yp in _physical_batches(xb, yb, physical):  # plain gradient accumulation
                        (criterion(trained(xp), yp) * (len(yp) / len(yb))).backward()
                else:
                    criterion(trained(xb), yb).backward()
                if engine is None and tc.clip_without_dp:
                    nn.utils.clip_grad_norm_(params, cfg.dp.max_grad_norm)
                optimizer.step()
                after_step()
    if engine is not None:
        if hasattr(trained, "_close"):
            trained._close()  # remove Opacus hooks from the original module
        report = guard.finish(model) if guard is not None else None
        return LocalResult(history=[(s, q, n) for s, q, n in engine.accountant.history], steps=steps, guards=report)
    return LocalResult(history=[], steps=steps)
