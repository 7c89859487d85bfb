"""Local DP-SGD with Opacus.

Each step Poisson-samples the whole training split (Opacus's DPDataLoader) and clips and
noises per-sample gradients. Sampling and noise draw from generators seeded from
``os.urandom`` — never from the config seed — so the server cannot predict the noise.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.data import Encoded
from common.models import MODELS
from common.privacy import DPPlan, History


@dataclass
class LocalResult:
    history: History  # this round's DP releases (σ, q, steps); empty without DP
    steps: int


def secure_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the OS CSPRNG; the seed is never stored or logged."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


def resolve_grad_sample_mode(cfg: RunConfig) -> str:
    if cfg.dp.grad_sample_mode != "auto":
        return cfg.dp.grad_sample_mode
    return MODELS[cfg.model.name].default_grad_sample_mode


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.learning_rate)
    return torch.optim.SGD(params, lr=cfg.train.learning_rate, momentum=cfg.train.momentum)


def train_local(
    model: nn.Module, data: Encoded, cfg: RunConfig, plan: DPPlan | None, device: torch.device
) -> LocalResult:
    """Train ``model`` in place for ``cfg.train.local_epochs``; with ``plan``, under DP-SGD."""
    model.to(device).train()
    dataset = TensorDataset(data.x, data.y)
    sampling = secure_generator(torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=plan is None, generator=sampling)
    optimizer = _optimizer(model, cfg)
    criterion: nn.Module = nn.CrossEntropyLoss()
    engine: PrivacyEngine | None = None
    trained: nn.Module = model
    if plan is not None:
        mode = resolve_grad_sample_mode(cfg)
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
        # Fail closed: the releases must be exactly the ones the plan was calibrated for.
        actual_q = getattr(loader, "sample_rate", None)
        if (
            actual_q is None
            or abs(actual_q - plan.sample_rate) > 1e-12
            or len(loader) != plan.steps_per_round // cfg.train.local_epochs
        ):
            raise RuntimeError(
                f"Opacus sampling (q={actual_q}, {len(loader)} steps) differs from the DP plan "
                f"(q={plan.sample_rate}, {plan.steps_per_round // cfg.train.local_epochs} steps); nothing was trained"
            )
    steps = 0
    for _ in range(cfg.train.local_epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(trained(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
    if engine is not None:
        if hasattr(trained, "_close"):
            trained._close()  # remove Opacus hooks from the original module
        return LocalResult(history=[(s, q, n) for s, q, n in engine.accountant.history], steps=steps)
    return LocalResult(history=[], steps=steps)
