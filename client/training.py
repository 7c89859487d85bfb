"""Local DP-SGD with Opacus.

Each step Poisson-samples the whole training split (Opacus's DPDataLoader) and clips and
noises per-sample gradients. Sampling and noise draw from generators seeded from
``os.urandom`` — never from the config seed — so the server cannot predict the noise.

Per-sample gradients: for the built-in from-scratch models ``grad_sample_mode = "auto"`` is ``"bk"``,
FedGuard's book-keeping path (``BKModule``: exact per-record clipping in one backward pass, Opacus's
noise, sampling and accountant; ``PrivacyEngine`` here adds it to Opacus's engine), 1.1–1.35× plain
training on CPU where Opacus's default ``hooks`` costs ~2× (bench/dp_overhead.py); other models use
their registry mode.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine as OpacusPrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_guards import DPGuard, GuardReport, flat_base
from client.preflight import preflight
from common.config import RunConfig
from common.data import Encoded
from common.devices import loader_options
from common.models import MODELS, text_encoding
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


def auto_grad_sample_mode(model_name: str) -> str:
    """The per-sample-gradient engine ``auto`` picks: the fastest measured (bench/dp_overhead.py).

    FedGuard's book-keeping path (``BK_MODE``) for the built-in from-scratch models, the registry's
    Opacus mode for pretrained ones (``client.preflight`` checks those). ``train_local`` falls back
    to Opacus's ``hooks`` if a model has a trainable layer the book-keeping path does not handle.
    """
    spec = MODELS[model_name]
    return spec.default_grad_sample_mode if spec.pretrained else BK_MODE


def resolve_grad_sample_mode(cfg: RunConfig) -> str:
    if cfg.dp.grad_sample_mode != "auto":
        return cfg.dp.grad_sample_mode
    return auto_grad_sample_mode(cfg.model.name)


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
        **text_encoding(cfg.model.name, cfg.model.params),
        device=device,
    )
    _PREFLIGHT_DONE.add(key)


class Rows(TensorDataset):
    """A ``TensorDataset`` whose batches are gathered with one index per tensor.

    Why: the default fetch calls ``__getitem__`` once per record and stacks the pieces, ~0.3 ms of
    a ~5 ms tabular training step at batch 64; ``__getitems__`` takes the whole batch's indices.
    Use with ``collate_fn=Rows.collate`` (the batch is already stacked). Opacus's Poisson loader
    keeps both; an empty Poisson batch comes out as tensors with zero rows.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)

    @staticmethod
    def collate(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The local optimizer, with torch's fused kernel where it has one for the parameters.

    Why fused: torch defaults to its per-tensor Python loop on the CPU; for the tabular model (15
    tensors, batch 64) Adam's step took 0.62 ms of a ~5 ms training step, fused 0.16 ms (same
    update to float rounding; SGD with momentum 0.21 → 0.09 ms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.learning_rate, fused=fused or None)
    return torch.optim.SGD(params, lr=cfg.train.learning_rate, momentum=cfg.train.momentum, fused=fused or None)


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
        #: This batch's per-record weights (reweighing), set before each forward pass; None: all 1.
        self.record_weights: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, target, reduction="none") * self.weight[target]
        if self.record_weights is not None:
            per_sample = per_sample * self.record_weights
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def make_criterion(cfg: RunConfig, device: torch.device, record_weighted: bool = False) -> nn.Module:
    """Cross-entropy; per-sample weighted with class weights, or when records carry weights in the loss."""
    if cfg.train.class_weights is None and not record_weighted:
        return nn.CrossEntropyLoss()
    return PerSampleWeightedCE(cfg.train.class_weights or [1.0] * cfg.data.schema_.num_classes).to(device)


def _weigh_batch(trained: nn.Module, criterion: nn.Module, rest: list[torch.Tensor], device: torch.device) -> None:
    """Hand this batch's record weights (reweighing) to where they apply.

    On the bk DP path they scale each record's *clipped* gradient (weights ≤ 1: the per-record bound C
    and the accounting are unchanged). On Opacus's paths and without DP they scale each record's loss,
    as class weights do: exact without DP; under DP a record whose gradient is clipped anyway keeps
    the norm C, so the weights act only below the clipping norm.
    """
    if not rest:
        return
    wb = rest[0].to(device, non_blocking=True)
    if isinstance(trained, BKModule):
        trained.record_weights = wb
    else:
        criterion.record_weights = wb  # type: ignore[assignment]


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


def _physical_batches(size: int | None, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """``tensors`` (a batch's inputs, labels and any record weights) in slices of at most ``size`` rows."""
    n = len(tensors[1])
    if size is None or n <= size:
        yield tensors
        return
    for i in range(0, n, size):
        yield tuple(t[i : i + size] for t in tensors)


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


def _noise_only_step_bk(module: BKModule, optimizer: torch.optim.Optimizer) -> None:
    """``_noise_only_step`` for the book-keeping path: a zero clipped sum, then noise alone."""
    optimizer.zero_grad(set_to_none=True)
    module.empty_batch()
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
    weights: torch.Tensor | None = None,
) -> LocalResult:
    """Train ``model`` in place for ``cfg.train.local_epochs``; with ``plan``, under DP-SGD.

    ``weights`` (one per record, in (0, 1]): reweighing's per-record weights (``_weigh_batch``).

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
    if weights is not None and not (len(weights) == len(data) and bool(((weights > 0) & (weights <= 1)).all())):
        raise ValueError("record weights need one value in (0, 1] per training record")
    dataset = Rows(data.x, data.y) if weights is None else Rows(data.x, data.y, weights.float())
    sampling = secure_generator(torch.device("cpu"))
    batch = loader_batch_size(len(data), plan) if plan is not None else tc.logical_batch_size(len(data))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=plan is None,
        generator=sampling,
        collate_fn=Rows.collate,
        **loader_options(device),
    )
    optimizer = _optimizer(model, cfg)
    criterion: nn.Module = make_criterion(cfg, device, record_weighted=weights is not None)
    engine: PrivacyEngine | None = None
    guard: DPGuard | None = None
    trained: nn.Module = model
    physical = tc.physical_batch_size
    empty_step: Callable[[], None] | None = None  # a DP step on a zero-record Poisson batch
    if plan is not None:
        mode = resolve_grad_sample_mode(cfg)
        if physical is not None and mode == "ew":
            mode = "hooks"  # ew cannot accumulate per-sample gradients over physical batches
        if mode == BK_MODE and not bk_supported(model):
            mode = "hooks"  # a trainable layer outside nn.Linear / nn.Embedding / nn.LayerNorm
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
            if isinstance(trained, BKModule):
                empty_step = partial(_noise_only_step_bk, trained, optimizer)
            else:
                empty_step = partial(_noise_only_step, optimizer)
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
                    for xb, yb, *rest in physical_loader:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        _weigh_batch(trained, criterion, rest, device)
                        optimizer.zero_grad(set_to_none=True)
                        criterion(trained(xb), yb).backward()
                        optimizer.step()
                        if not getattr(optimizer, "_is_last_step_skipped", False):
                            after_step()
                continue
            for xb, yb, *rest in loader:
                if empty_step is not None and len(yb) == 0:
                    empty_step()
                    after_step()
                    continue
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                _weigh_batch(trained, criterion, rest, device)
                optimizer.zero_grad(set_to_none=True)
                if engine is None and physical is not None and len(yb) > physical:
                    for xp, yp, *wp in _physical_batches(physical, xb, yb, *rest):  # plain gradient accumulation
                        _weigh_batch(trained, criterion, wp, device)
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


# --------------------------------------------------------------------------- book-keeping DP-SGD ("bk")

#: The grad_sample_mode name of FedGuard's own exact per-sample clipping (``BKModule``).
BK_MODE = "bk"
#: Layers whose per-sample gradients the "bk" path computes itself; a model with a trainable
#: parameter anywhere else uses its Opacus mode instead.
BK_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


def bk_supported(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer the "bk" path handles exactly."""
    for m in model.modules():
        if not _trained(m):
            continue
        if not isinstance(m, BK_LAYERS):
            return False
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            return False
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
            return False
    return True


#: One parameter's share of a batch: per-record gradient norms (B,) of the unscaled loss, and the
#: function that writes the weighted sum of per-record gradients for per-record weights (B,) into a
#: flat output (the parameter's slice of the step's one gradient buffer).
_Part = tuple[nn.Parameter, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], Any]]


class BKModule(nn.Module):
    """Exact per-sample clipping in one backward pass ("book-keeping", Bu et al. 2023) for DP-SGD.

    Forward hooks keep each trained layer's input and tensor hooks its output gradient; the weights
    themselves are constants during the forward pass, so autograd spends nothing on the (unclipped)
    batch gradient that Opacus would discard. When the backward pass ends, the per-record gradients
    of each layer come from one batched product (Linear), one scatter (Embedding) or one product
    (LayerNorm), and every parameter's ``grad`` becomes the clipped sum
    ``Σ_i min(1, C/(‖g_i‖+1e-6))·g_i`` — Opacus's flat clip factor, ‖g_i‖ over all parameters —
    written as consecutive slices of one flat buffer (``flat_base``), so the optimizer's noise and
    scaling and the DP guards' checks are a few whole-buffer operations instead of one per tensor.
    Opacus's ``DPOptimizerFastGradientClipping`` (``BKOptimizer``) then adds N(0, σ²C²) per tensor,
    scales and counts the step as for its own ghost clipping. The clipped sum equals Opacus's
    ``hooks`` mode's (tests/test_dp_fast_path.py). Batch first; a layer used several times in one
    forward pass counts all its uses. Ghost norms (Gram matrices of the T tokens) measured slower
    than materialized per-record gradients for the built-in models (T ≤ 128, width ≤ 256, batch 64
    and 256), so there are none. A trainable weight used outside its layer's forward (weight tying
    by ``F.linear(x, emb.weight)``) is a constant to this path: its gradient there is left out.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean") -> None:
        super().__init__()
        if not bk_supported(module):
            raise ValueError(
                "the bk DP path computes per-sample gradients only for nn.Linear, nn.Embedding and "
                "nn.LayerNorm parameters; use an Opacus grad_sample_mode for this model"
            )
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.layers = [m for m in module.modules() if _trained(m)]
        #: Every trainable parameter, in the order of ``p._norm_sample`` (read by client.dp_guards).
        self.trainable_parameters = [p for m in self.layers for p in _trained(m)]
        self.per_sample_gradient_norms: torch.Tensor | None = None
        #: This batch's per-record weights in (0, 1] (reweighing), applied after clipping; None: all 1.
        self.record_weights: torch.Tensor | None = None
        self._taps: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._queued = False
        self._scratch = _Scratch()
        self._hooks = [m.register_forward_hook(self._tap) for m in self.layers]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        if self._queued:  # the last backward pass failed before its end: drop what it left
            self._taps, self._queued = {}, False
        params = self.trainable_parameters
        for p in params:  # constants for autograd: the hooks compute every gradient this step needs
            p.requires_grad_(False)
        try:
            return self._module(*args, **kwargs)
        finally:
            for p in params:
                p.requires_grad_(True)

    def _close(self) -> None:
        """Remove the hooks from the wrapped module (the name Opacus's GradSampleModule uses); free the buffers."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._scratch = _Scratch()

    def _tap(self, layer: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (self.training and torch.is_grad_enabled()):
            return
        if not output.requires_grad:  # a first layer (nothing upstream to train): start the graph here
            output.requires_grad_(True)
        x = inputs[0].detach()

        def keep(grad: torch.Tensor) -> None:
            self._taps.setdefault(layer, []).append((x, grad))
            if not self._queued:  # _clip runs once, when this backward pass has finished
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._clip)

        output.register_hook(keep)

    def _clip(self) -> None:
        self._queued = False
        taps, self._taps = self._taps, {}
        batch = next(iter(taps.values()))[0][1].shape[0]
        parts: list[_Part] = []
        for layer in self.layers:
            uses = taps.get(layer)
            if uses is None:  # not used in this forward pass: every record's gradient is zero
                parts += [
                    (p, torch.zeros(batch, device=p.device, dtype=p.dtype), _zero_sum(p)) for p in _trained(layer)
                ]
            elif isinstance(layer, nn.Linear):
                parts += _bk_linear(layer, *_join_uses(uses), self._scratch)
            elif isinstance(layer, nn.Embedding):
                parts += _bk_embedding(layer, *_join_uses(uses), self._scratch)
            else:
                parts += _bk_layer_norm(layer, *_join_uses(uses), self._scratch)  # type: ignore[arg-type]
        # A mean-reduced loss hands each layer 1/B of every record's own gradient: scale back, as Opacus does.
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        per_param = torch.stack([n for _, n, _ in parts], dim=1) * scale  # (B, P)
        norms = torch.linalg.vector_norm(per_param, dim=1)
        weights = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale  # Opacus's clip factor
        if self.record_weights is not None:  # after clipping: record i moves the sum by at most w_i·C ≤ C
            weights = weights * self.record_weights.to(weights)
        like = self.trainable_parameters[0]
        one_buffer = all(q.dtype == like.dtype and q.device == like.device for q, _, _ in parts)
        size = sum(q.numel() for q, _, _ in parts)
        flat = torch.empty(size, dtype=like.dtype, device=like.device) if one_buffer else None
        start = 0
        for (p, _, write), n in zip(parts, per_param.unbind(1), strict=True):
            out = flat[start : start + p.numel()] if flat is not None else p.new_empty(p.numel())
            write(weights, out)
            p.grad = out.view_as(p)
            p._norm_sample = n  # type: ignore[attr-defined]  # per-record coverage, read by client.dp_guards
            start += p.numel()
        self.per_sample_gradient_norms = norms

    def empty_batch(self) -> None:
        """The state after a zero-record batch: clipped sum zero, no per-record norms (noise only)."""
        for p in self.trainable_parameters:
            p.grad = torch.zeros_like(p)
            p._norm_sample = torch.zeros(0, device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
        self.per_sample_gradient_norms = torch.zeros(0)


def _trained(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=False) if p.requires_grad]


def _zero_sum(p: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    return lambda w, out: out.zero_()


def _join_uses(uses: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's inputs and output gradients as (B, T, ·) (ids: (B, T)), its uses joined along T."""
    if len(uses) == 1 and uses[0][1].dim() == 3 and uses[0][0].dim() == (2 if uses[0][0].dtype == torch.long else 3):
        return uses[0]  # the common case, already in shape
    a = [
        x.reshape(x.shape[0], -1) if x.dtype == torch.long else x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in uses
    ]
    g = [y.reshape(y.shape[0], -1, y.shape[-1]) for _, y in uses]
    if len(uses) == 1:
        return a[0], g[0]
    return torch.cat(a, dim=1), torch.cat(g, dim=1)


def _records(p: nn.Parameter, per: torch.Tensor) -> _Part:
    """A parameter's materialized per-record gradients ``per`` (B, …)."""
    flat = per.reshape(per.shape[0], -1)
    return p, torch.linalg.vector_norm(flat, dim=1), lambda w, out: torch.mv(flat.T, w, out=out)


class _Scratch:
    """Per-parameter buffers for per-record gradients, kept across steps.

    Fresh multi-megabyte tensors every step cost more than the products written into them (the
    allocator maps and faults in new pages each time); Poisson batches vary in size, so each buffer
    grows to the largest batch seen and a step uses its first B rows.
    """

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}

    def __call__(self, p: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(id(p))
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != like.dtype:
            buf = torch.empty(shape, device=like.device, dtype=like.dtype)
            self._bufs[id(p)] = buf
        return buf[: shape[0]]


def _bk_linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, scratch: _Scratch) -> list[_Part]:
    parts = []
    w = layer.weight
    if w.requires_grad:
        if a.shape[1] == 1:  # one token: g aᵀ is an outer product, ‖g aᵀ‖ = ‖g‖·‖a‖
            a1, g1 = a[:, 0], g[:, 0]
            norm = torch.linalg.vector_norm(a1, dim=1) * torch.linalg.vector_norm(g1, dim=1)
            parts.append((w, norm, lambda c, out: torch.mm((g1 * c.unsqueeze(1)).T, a1, out=out.view(w.shape))))
        else:
            per = scratch(w, (a.shape[0], *w.shape), g)
            parts.append(_records(w, torch.bmm(g.transpose(1, 2), a, out=per)))
    if layer.bias is not None and layer.bias.requires_grad:
        parts.append(_records(layer.bias, g[:, 0] if g.shape[1] == 1 else g.sum(1)))
    return parts


def _bk_embedding(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, scratch: _Scratch) -> list[_Part]:
    b = ids.shape[0]
    rows, d = layer.weight.shape
    if layer.padding_idx is not None:  # the padding row receives no gradient
        g = g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    slot = ids + torch.arange(b, device=ids.device).unsqueeze(1) * rows  # record i's table: rows i·R…(i+1)·R
    per = scratch(layer.weight, (b, rows, d), g).zero_()
    per.view(b * rows, d).index_add_(0, slot.reshape(-1), g.reshape(-1, d))
    return [_records(layer.weight, per)]


def _bk_layer_norm(layer: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, scratch: _Scratch) -> list[_Part]:
    parts = []
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
        parts.append(_records(layer.weight, (g * normed).sum(1)))
    if layer.bias is not None and layer.bias.requires_grad:
        parts.append(_records(layer.bias, g.sum(1)))
    return parts


class BKOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for precomputed clipped sums, with its per-tensor loops as whole-buffer ops.

    The noise is drawn exactly as Opacus draws it (``torch.normal`` per tensor, in parameter order,
    from ``generator``), so with the same generator state the noised step equals Opacus's. When the
    clipped sums are one flat buffer (``BKModule``), the noised gradients are one too.
    """

    def accumulate(self) -> None:
        params = self.params
        if params[0].summed_grad is None:  # BKModule wrote a fresh tensor: take it over instead of copying
            for p in params:
                p.summed_grad, p.grad = p.grad, None
        else:
            torch._foreach_add_([p.summed_grad for p in params], [p.grad for p in params])

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        params = self.params
        if self.secure_mode:  # Opacus's own noise (2n draws per coordinate), never reached by train_local
            super().add_noise()
            return
        summed = [p.summed_grad for p in params]
        base = flat_base(summed)
        if base is None:
            noise = [
                torch.normal(0, std, size=s.shape, device=s.device, generator=self.generator, dtype=s.dtype)
                if std > 0
                else torch.zeros_like(s)
                for s in summed
            ]
            for p, noised in zip(params, torch._foreach_add(summed, noise), strict=True):
                p.grad = noised.view_as(p)
            return
        noised = torch.empty_like(base)
        start = 0
        for p, s in zip(params, summed, strict=True):
            out = noised[start : start + s.numel()]
            if std > 0:
                torch.normal(0, std, size=s.shape, generator=self.generator, out=out.view(s.shape))
            p.grad = out.view_as(p)
            start += s.numel()
        if std > 0:
            noised.add_(base)  # noise + clipped sum: Opacus adds the same two values
        else:
            noised.copy_(base)

    def scale_grad(self) -> None:
        if self.loss_reduction != "mean":
            return
        grads = [p.grad for p in self.params]
        base = flat_base(grads)
        divisor = self.expected_batch_size * self.accumulated_iterations
        if base is not None:
            base.div_(divisor)
        else:
            torch._foreach_div_(grads, divisor)


class PrivacyEngine(OpacusPrivacyEngine):
    """Opacus's ``PrivacyEngine`` with one more ``grad_sample_mode``: ``"bk"`` (``BKModule``).

    For ``"bk"``, ``make_private`` returns ``(BKModule, BKOptimizer, DPDataLoader)``; all but the
    clipped sum is Opacus's own, set up as its ``make_private`` sets it up: the module validator,
    the Poisson data loader (drawing from ``data_loader``'s generator), the noise (from
    ``noise_generator``) and the accountant's step hook with q = 1/len(loader). Flat clipping of a
    mean-reduced loss only (what DP-SGD here uses).
    """

    def make_private(self, *, grad_sample_mode: str = "hooks", **kwargs: Any) -> Any:
        if grad_sample_mode != BK_MODE:
            return super().make_private(grad_sample_mode=grad_sample_mode, **kwargs)
        return self._make_private_bk(**kwargs)

    def _make_private_bk(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        noise_generator: torch.Generator | None = None,
        criterion: nn.Module | None = None,  # any mean-reduced loss: BKModule reads only layer gradients
        poisson_sampling: bool = True,
        clipping: str = "flat",
        loss_reduction: str = "mean",
    ) -> tuple[BKModule, BKOptimizer, DataLoader]:
        if clipping != "flat" or loss_reduction != "mean":
            raise ValueError('grad_sample_mode="bk" supports flat clipping of a mean-reduced loss only')
        ModuleValidator.validate(module, strict=True)  # e.g. BatchNorm would mix records within a batch
        wrapped = BKModule(module, max_grad_norm=max_grad_norm)
        loader = DPDataLoader.from_data_loader(data_loader) if poisson_sampling else data_loader
        self.dataset = data_loader.dataset
        sample_rate = 1 / len(loader)
        dp_optimizer = BKOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=int(len(data_loader.dataset) * sample_rate),  # type: ignore[arg-type]
            loss_reduction="mean",
            generator=noise_generator,
        )
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return wrapped, dp_optimizer, loader
