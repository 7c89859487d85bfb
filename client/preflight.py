"""Pre-flight check: one DP-SGD step on a tiny synthetic batch before any real record is used.

Per-sample gradients are where DP silently breaks: a layer whose input lost its batch dimension
(BERT's broadcast ``position_ids``), a parameter Opacus has no sampler for, or a sampler that
disagrees with the layer (an older Opacus + PEFT pairing corrupted LoRA updates without any
error). Such a model still trains and still reports ε, but its updates are not what was accounted
or not what was meant. This check runs on public, made-up sentences and a throw-away copy of the
model, and fails with a :class:`PreflightError` naming the parameter and the problem when:

- a parameter trains that should not (e.g. a frozen base weight left trainable) or vice versa,
  or the tensors the node would share are not exactly the trainable ones;
- a layer's input does not have one row per sample (the leading dimension is not the batch);
- a trainable parameter gets no per-sample gradient, or one of the wrong shape (leading dim ≠ batch);
- a per-sample gradient differs from the exact gradient of that one sample (autograd, batch of 1);
- after the step a frozen parameter changed, or a trainable one did not.

Cost: a copy of the model, one DP step and ``batch`` single-sample backward passes (LoRA MiniLM on
this CPU: well under a second after the model is built).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import FedGuardError
from common.tokenizer import encode_texts

__all__ = ["PREFLIGHT_TEXTS", "PreflightError", "PreflightReport", "intended_trainable", "preflight"]

#: Made-up sentences (public by construction): the check never touches a node's data.
PREFLIGHT_TEXTS = [
    "The committee approved the new budget after a short debate.",
    "Rain is expected tomorrow, so the match may be postponed.",
    "She fixed the old bicycle and rode it to the market.",
    "This is a short one.",
]


class PreflightError(FedGuardError):
    """The model would not train correctly under DP; nothing was trained and no data was read."""

    code = "preflight-failed"


@dataclass(frozen=True)
class PreflightReport:
    trainable_tensors: int
    trainable_parameters: int
    batch: int
    grad_sample_mode: str
    seconds: float


def intended_trainable(model: nn.Module) -> list[str]:
    """Names the model declares as meant to train (``trainable_names()``), else those with requires_grad."""
    names = getattr(model, "trainable_names", None)
    if callable(names):
        return list(names())
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _fail(what: str, where: str, fix: str) -> PreflightError:
    return PreflightError(f"pre-flight DP check failed: {what}", where=where, fix=fix)


def _check_trainable(model: nn.Module) -> list[str]:
    intended = intended_trainable(model)
    actual = [n for n, p in model.named_parameters() if p.requires_grad]
    extra = sorted(set(actual) - set(intended))
    if extra:
        raise _fail(
            f"{len(extra)} parameter(s) would train although they should stay frozen, e.g. {extra[0]!r}",
            "model",
            "freeze them (requires_grad_(False)): they would be updated and, under LoRA, silently diverge from "
            "the shared base",
        )
    frozen = sorted(set(intended) - set(actual))
    if frozen:
        raise _fail(f"parameter {frozen[0]!r} should train but is frozen", "model", "set requires_grad on it")
    if callable(getattr(model, "trainable_names", None)):
        shared = set(model.state_dict())
        if shared != set(intended):
            odd = sorted(shared ^ set(intended))
            raise _fail(
                f"the tensors this node would share differ from the trainable ones (e.g. {odd[0]!r})",
                "model.state_dict()",
                "share exactly the adapters and the head",
            )
    return intended


def _no_dropout(model: nn.Module) -> None:
    """Dropout masks differ between the DP pass and the reference pass: switch them off in the copies."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _batch_dim_culprit(model: nn.Module, seen: dict[str, tuple[int, ...]], batch: int) -> PreflightError | None:
    """The first layer with trainable parameters whose input did not have one row per sample."""
    for name, shape in seen.items():
        if shape and shape[0] != batch:
            module = model.get_submodule(name)
            params = [f"{name}.{p}" for p, t in module.named_parameters(recurse=False) if t.requires_grad]
            return _fail(
                f"parameter {params[0]!r}: its layer received input of shape {shape}, whose leading dimension is "
                f"{shape[0]}, not the batch size {batch}; per-sample gradients need one row per sample",
                params[0],
                "pass such inputs expanded to (batch, …) and contiguous — for BERT-style models pass "
                "position_ids and token_type_ids of shape (batch, seq) explicitly",
            )
    return None


def preflight(
    model: nn.Module,
    *,
    grad_sample_mode: str,
    num_classes: int,
    max_len: int,
    read: str = "head",
    device: torch.device | str = "cpu",
    batch: int = 3,
    tolerance: float = 1e-3,
) -> PreflightReport:
    """Run the check on a copy of ``model`` (which is left untouched); raise :class:`PreflightError`."""
    t0 = time.perf_counter()
    device = torch.device(device)
    intended = _check_trainable(model)
    work = copy.deepcopy(model).to(device).train()
    _no_dropout(work)
    ref = copy.deepcopy(work)
    params = dict(work.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    texts = (PREFLIGHT_TEXTS * batch)[:batch]
    x = encode_texts(texts, max_len, read).to(device)
    y = (torch.arange(batch) % num_classes).to(device)

    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in work.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):

            def record(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    seen[_name] = tuple(args[0].shape)

            handles.append(module.register_forward_pre_hook(record))

    trainable = [params[n] for n in intended]
    optimizer = torch.optim.SGD(trainable, lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    criterion: Any = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine()
        try:
            wrapped = engine.make_private(
                module=work,
                optimizer=optimizer,
                data_loader=loader,
                criterion=criterion,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode=grad_sample_mode,
            )
        except Exception as exc:  # the validator names unsupported layers
            raise _fail(f"Opacus refuses the model: {exc}", "model", "use layers Opacus supports") from None
        if grad_sample_mode == "ghost":
            dp_model, dp_opt, criterion, _ = wrapped
        else:
            dp_model, dp_opt, _ = wrapped
        try:
            dp_opt.zero_grad(set_to_none=True)
            try:
                criterion(dp_model(x), y).backward()
            except Exception as exc:
                culprit = _batch_dim_culprit(work, seen, batch)
                if culprit is not None:
                    raise culprit from None
                raise _fail(
                    f"per-sample gradients failed: {type(exc).__name__}: {exc}", "model", "see the error"
                ) from None
            culprit = _batch_dim_culprit(work, seen, batch)
            if culprit is not None:
                raise culprit
            _check_samples(work, ref, intended, x, y, batch, grad_sample_mode, tolerance)
            dp_opt.step()
        finally:
            for h in handles:
                h.remove()
            if hasattr(dp_model, "_close"):
                dp_model._close()
    for n, p in params.items():
        changed = not torch.equal(before[n], p.detach())
        if n in intended and not changed:
            raise _fail(f"trainable parameter {n!r} did not change in a DP step", n, "check that the loss reaches it")
        if n not in intended and changed:
            raise _fail(
                f"frozen parameter {n!r} changed in a DP step", n, "freeze it and exclude it from the optimizer"
            )
    return PreflightReport(
        trainable_tensors=len(intended),
        trainable_parameters=sum(params[n].numel() for n in intended),
        batch=batch,
        grad_sample_mode=grad_sample_mode,
        seconds=time.perf_counter() - t0,
    )


def _check_samples(
    work: nn.Module,
    ref: nn.Module,
    intended: list[str],
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    mode: str,
    tolerance: float,
) -> None:
    params = dict(work.named_parameters())
    for n, p in params.items():
        if n not in intended and (p.grad is not None or getattr(p, "grad_sample", None) is not None):
            raise _fail(f"frozen parameter {n!r} received a gradient", n, "freeze it (requires_grad_(False))")
    if mode == "ghost":  # ghost clipping keeps per-sample norms, not gradients
        for n in intended:
            norms = getattr(params[n], "_norm_sample", None)
            if norms is None or norms.shape[0] != batch:
                shape = None if norms is None else tuple(norms.shape)
                raise _fail(
                    f"parameter {n!r} has per-sample gradient norms of shape {shape}, expected ({batch},)",
                    n,
                    "Opacus ghost clipping cannot bound this parameter's per-sample gradients",
                )
        return
    ref_params = dict(ref.named_parameters())
    exact: list[list[torch.Tensor]] = []
    for i in range(batch):  # the gradient of sample i alone, by plain autograd on an unwrapped copy
        loss = F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1], reduction="sum")
        exact.append(list(torch.autograd.grad(loss, [ref_params[n] for n in intended], allow_unused=True)))
    for j, n in enumerate(intended):
        p = params[n]
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise _fail(
                f"parameter {n!r} got no per-sample gradient",
                n,
                "Opacus has no grad sampler for its layer: build it from nn.Linear/nn.Embedding/nn.LayerNorm",
            )
        if tuple(gs.shape) != (batch, *p.shape):
            raise _fail(
                f"parameter {n!r} has per-sample gradients of shape {tuple(gs.shape)}, expected {(batch, *p.shape)} "
                f"(leading dimension = batch size {batch})",
                n,
                "make every input to its layer carry the batch as its first dimension",
            )
        for i in range(batch):
            g = exact[i][j]
            g = torch.zeros_like(p) if g is None else g
            err = (gs[i] - g).abs().max().item()
            scale = g.abs().max().item()
            if err > tolerance * max(scale, 1e-6) + 1e-7:
                raise _fail(
                    f"parameter {n!r}: the per-sample gradient of sample {i} differs from its exact gradient "
                    f"(max abs error {err:.3g}, gradient scale {scale:.3g}); DP updates would be silently wrong",
                    n,
                    "Opacus's grad sampler and this layer disagree: check the layer type and Opacus/adapter versions",
                )
