"""DP integrity guards: check, on the node, that a DP-SGD round really ran as the ledger records it.

The accountant's ε is an upper bound *if* DP-SGD ran as planned. Nothing in Opacus itself checks that
every trainable parameter was clipped per sample, that noise of the planned scale was added, or that
a frozen pretrained base stayed frozen (Opacus + PEFT silently corrupted LoRA weights: Opacus issue
820). These guards do, on every real round, before the reply leaves the node. A failed guard raises
``DPIntegrityError`` (refusal code ``dp-integrity``): the ClientApp refuses the reply, the reason goes
to the node's local log, and the ledger release stays pending, i.e. counted, like any failed release.

Checks (``DPGuard``):

1. **coverage** (before each optimizer step): the DP optimizer holds exactly the model's trainable
   parameters, and each one carries fresh per-sample information for the current batch —
   ``p.grad_sample`` (hooks, ew, functorch) or ``p._norm_sample`` (ghost clipping), with the same
   batch dimension for all of them. A declared-trainable set (``trainable_names()``, pretrained
   models) must equal the set that requires gradients.
2. **clipping** (each step): ``‖Σ_i clip(g_i)‖₂ ≤ b·C``, for the clipped sum Opacus noises
   (``p.summed_grad``) over the b records of the logical batch and the *planned* C. Deterministic.
3. **noise** (each step, tested at the end of the round): the noise actually added is recovered
   exactly as ``z = s·p.grad − p.summed_grad`` (s: Opacus's loss-reduction scale), before the inner
   optimizer (SGD or Adam alike) uses ``p.grad``. With the planned σ and C, each coordinate of z is
   N(0, σ²C²), so per parameter tensor ``S_p = Σ_steps ‖z_p‖² / (σC)² ~ χ²(d_p·T)``. Each S_p is
   tested two-sided, lower tail (noise missing or too small: the privacy failure) and upper tail
   (noise of another scale: the release is not the one recorded), and so is their pooled sum
   ``~ χ²(d·T)``; each of the 2(P+1) one-sided tests runs at ``α / (2(P+1))`` for P tensors, so by
   Bonferroni an honest round fails with probability at most ``α`` (``FALSE_ALARM_RATE`` = 1e-6
   per round). A zero noise multiplier gives S ≈ 0 and fails; so does noise skipped on one tensor
   (for a tensor with d_p·T ≥ 2; a lone scalar updated once has too little noise to test alone).
4. **moved** (each step until all have): every trainable tensor was changed by at least one step of
   the inner optimizer (DP noise moves all of them); checked at the optimizer step itself, so a
   data-independent correction after it (FedProx's proximal pull, which may return the model to the
   global one) does not count. LoRA adapters are named in the message.
5. **frozen base** (end of round): a BLAKE2b checksum of every frozen parameter (the pretrained
   base) is unchanged.

Cost: a copy of the trainable parameters around the first optimizer step, one checksum pass over
the frozen ones at each end of the round, and per step a few operations on the ``bk`` path's two flat
buffers (``flat_base``), or two reductions per parameter tensor in Opacus's own modes
(``bench/dp_guards.py``: 1.9% of a round for the demo's tabular model at 250 steps per round, 0.6%
for MiniLM LoRA).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from scipy.stats import chi2
from torch import nn

from common.errors import FedGuardError

#: The noise check's false-alarm rate per round for an honest round (Bonferroni over all tests).
FALSE_ALARM_RATE = 1e-6
#: Relative slack on the clipping bound, for float32 rounding in the clipped sum.
CLIP_SLACK = 1e-3

_FIX = "do not send this update; check the Opacus/PEFT versions and the model's layers, then rerun the round"


class DPIntegrityError(FedGuardError):
    """A DP integrity guard failed: the update is not the DP release the ledger records."""

    code = "dp-integrity"

    def __init__(self, check: str, what: str) -> None:
        self.check = check
        # The check's name leads ``what``: it is what the node's request log keeps as the reason.
        super().__init__(f"DP integrity guard '{check}' failed: {what}", fix=_FIX)


@dataclass
class GuardReport:
    """What the guards saw in one round (for the node's log and the benchmark)."""

    steps: int = 0
    parameters: int = 0  # trainable tensors checked
    frozen: int = 0  # frozen tensors checksummed
    seconds: float = 0.0  # time spent in the guards
    noise_ratio: float = float("nan")  # Σ‖z‖² / (σ²C²·d·T): ≈ 1 for an honest round
    checks: list[str] = field(default_factory=list)


def _frozen_checksums(model: nn.Module) -> dict[str, str]:
    """A BLAKE2b digest of each frozen parameter's bytes (exact; no copy on CPU)."""
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        data = t.view(torch.uint8).numpy().data if t.numel() else b""
        out[name] = hashlib.blake2b(data, digest_size=16).hexdigest()
    return out


def flat_base(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D buffer of which ``tensors`` are consecutive, contiguous slices in this order, or None.

    FedGuard's ``bk`` DP path keeps a step's clipped sums, and its noised gradients, each in one
    buffer: the optimizer and these guards then work on two buffers instead of one tensor per
    parameter. Anything else (Opacus's own modes, a gradient replaced by another tensor) gets None and
    the per-tensor path.
    """
    base = getattr(tensors[0], "_base", None) if tensors else None
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    at, size = base.data_ptr(), base.element_size()
    for t in tensors:
        if getattr(t, "_base", None) is not base or t.data_ptr() != at or not t.is_contiguous():
            return None
        at += t.numel() * size
    return base if at == base.data_ptr() + base.numel() * size else None


def _batch_dim(p: torch.Tensor) -> int | None:
    gs = getattr(p, "grad_sample", None)
    if isinstance(gs, torch.Tensor):
        return int(gs.shape[0])
    if isinstance(gs, list) and gs:
        return sum(int(g.shape[0]) for g in gs)
    return None


class DPGuard:
    """Guards one DP-SGD round of ``model`` against the planned σ and C.

    Build it before ``make_private`` (it snapshots the model), ``attach`` it to the DP optimizer,
    and call ``finish`` after the last step; both raise ``DPIntegrityError``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        false_alarm_rate: float = FALSE_ALARM_RATE,
    ) -> None:
        t0 = time.perf_counter()
        self.sigma = float(noise_multiplier)
        self.clip = float(max_grad_norm)
        self.alpha = float(false_alarm_rate)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._unmoved = [p for _, p in self.trainable]  # not yet changed by an optimizer step
        self.noise_ss: torch.Tensor | None = None  # Σ_steps ‖z_p‖², in the DP optimizer's order
        self._noise_sq_flat: torch.Tensor | None = None  # Σ_steps z², per coordinate, of the steps with flat buffers
        self.base_sums = _frozen_checksums(model)
        self.report = GuardReport(parameters=len(self.trainable), frozen=len(self.base_sums))
        self._batch = 0  # records in the current logical batch (summed over physical batches)
        self._optimizer: DPOptimizer | None = None
        self._module: nn.Module | None = None  # the Opacus-wrapped model (ghost clipping keeps norms there)
        self._order: list[tuple[str, int]] = []  # (name, size) of each tensor, in the DP optimizer's order
        self._check_declared(model)
        self.report.seconds += time.perf_counter() - t0

    # -- checks -----------------------------------------------------------------
    def _fail(self, check: str, what: str) -> NoReturn:
        raise DPIntegrityError(check, what)

    def _check_declared(self, model: nn.Module) -> None:
        declared = getattr(model, "trainable_names", None)
        if not callable(declared):
            return
        want = set(declared())
        have = {n for n, _ in self.trainable}
        if want != have:
            extra, missing = sorted(have - want)[:3], sorted(want - have)[:3]
            self._fail(
                "coverage",
                f"trainable parameters differ from the model's declared set: extra {extra}, frozen {missing}",
            )

    def attach(self, optimizer: DPOptimizer, module: nn.Module) -> None:
        """Wrap ``optimizer.pre_step`` (clip, noise, scale, accountant hook) with the per-step checks."""
        if not isinstance(optimizer, DPOptimizer):
            self._fail("coverage", f"the optimizer is {type(optimizer).__name__}, not an Opacus DPOptimizer")
        ids = {id(p) for p in optimizer.params}
        want = {id(p) for _, p in self.trainable}
        if ids != want:
            outside = sorted(self.names.get(i, "?") for i in want - ids)[:3]
            self._fail("coverage", f"{len(want - ids)} trainable parameter(s) outside the DP optimizer, e.g. {outside}")
        normed = getattr(module, "trainable_parameters", None)  # ghost clipping: the tensors whose norms clip
        if isinstance(optimizer, DPOptimizerFastGradientClipping) and normed is not None:
            missing = want - {id(p) for p in normed}
            if missing:
                names = sorted(self.names.get(i, "?") for i in missing)[:3]
                self._fail(
                    "coverage", f"ghost clipping leaves {len(missing)} trainable tensor(s) unclipped, e.g. {names}"
                )
        self._optimizer = optimizer
        self._module = module
        self._order = [(self.names.get(id(p), "?"), p.numel()) for p in optimizer.params]
        original: Callable[..., Any] = optimizer.pre_step

        def pre_step(closure: Callable[[], float] | None = None) -> Any:
            t0 = time.perf_counter()
            self._before_step(optimizer)
            self.report.seconds += time.perf_counter() - t0
            stepped = original(closure)
            if stepped:
                t0 = time.perf_counter()
                self._after_noise(optimizer)
                self.report.seconds += time.perf_counter() - t0
            return stepped

        optimizer.pre_step = pre_step  # type: ignore[method-assign]

        inner = optimizer.original_optimizer
        inner_step: Callable[..., Any] = inner.step

        def step(*args: Any, **kwargs: Any) -> Any:
            """The inner optimizer's step (SGD, Adam); notes which tensors it has moved so far."""
            if not self._unmoved:
                return inner_step(*args, **kwargs)
            t0 = time.perf_counter()
            pending = self._unmoved
            before = [p.detach().clone() for p in pending]
            self.report.seconds += time.perf_counter() - t0
            out = inner_step(*args, **kwargs)
            t0 = time.perf_counter()
            self._unmoved = [p for p, old in zip(pending, before, strict=True) if torch.equal(p.detach(), old)]
            self.report.seconds += time.perf_counter() - t0
            return out

        inner.step = step  # type: ignore[method-assign]

    def _before_step(self, opt: DPOptimizer) -> None:
        """Coverage: every trainable parameter has per-sample information for this batch."""
        if isinstance(opt, DPOptimizerFastGradientClipping):
            norms = getattr(self._module, "per_sample_gradient_norms", None)
            if norms is None:
                self._fail("coverage", "ghost clipping computed no per-sample gradient norms for this batch")
            b = int(norms.shape[0])
            for p in opt.params:
                ns = getattr(p, "_norm_sample", None)
                if ns is None or int(ns.shape[0]) != b:
                    self._fail(
                        "coverage", f"parameter '{self.names.get(id(p), '?')}' has no per-sample norm for this batch"
                    )
            self._module.per_sample_gradient_norms = None  # type: ignore[union-attr]  # fresh next batch
        else:
            dims = {}
            for p in opt.params:
                d = _batch_dim(p)
                if d is None:
                    self._fail("coverage", f"parameter '{self.names.get(id(p), '?')}' received no per-sample gradients")
                dims[id(p)] = d
            if len(set(dims.values())) > 1:
                self._fail("coverage", f"per-sample gradients disagree on the batch size: {sorted(set(dims.values()))}")
            b = next(iter(dims.values()), 0)
        self._batch += b

    def _after_noise(self, opt: DPOptimizer) -> None:
        """Clipping bound now; the noise actually added is accumulated for the end-of-round test."""
        b, self._batch = self._batch, 0
        scale = float(opt.expected_batch_size * opt.accumulated_iterations) if opt.loss_reduction == "mean" else 1.0
        params = opt.params
        with torch.no_grad():
            summed = [p.summed_grad for p in params]
            flat_sum = flat_base(summed)
            flat_grad = flat_base([p.grad for p in params]) if flat_sum is not None else None
            if flat_sum is not None and flat_grad is not None:  # the bk path: two buffers, a few operations
                neg_z = torch.add(flat_sum, flat_grad, alpha=-scale)  # minus the noise actually added
                if self._noise_sq_flat is None:
                    self._noise_sq_flat = torch.zeros_like(neg_z)
                self._noise_sq_flat.addcmul_(neg_z, neg_z)  # per coordinate; summed per tensor at the end of the round
                signal = float(torch.linalg.vector_norm(flat_sum))
            else:
                for p in params:
                    if p.summed_grad is None or p.grad is None:
                        self._fail("noise", f"parameter '{self.names.get(id(p), '?')}' has no clipped sum or gradient")
                grads = [p.grad.view_as(s) for p, s in zip(params, summed, strict=True)]
                z_list = torch._foreach_sub(torch._foreach_mul(grads, scale), summed)  # the noise actually added
                noise_sq = torch.stack(torch._foreach_norm(z_list)).double().square()
                self.noise_ss = noise_sq if self.noise_ss is None else self.noise_ss + noise_sq
                signal = float(torch.stack(torch._foreach_norm(summed)).double().square().sum()) ** 0.5
        bound = b * self.clip * (1 + CLIP_SLACK) + 1e-6
        if signal > bound:
            self._fail(
                "clipping",
                f"the clipped gradient sum has norm {signal:.4g} > b·C = {b}·{self.clip:g} at step "
                f"{self.report.steps + 1}: per-sample clipping did not hold",
            )
        self.report.steps += 1

    def _noise_sums(self) -> torch.Tensor | None:
        """Σ_steps ‖z_p‖² per tensor, in the DP optimizer's order, over every step of the round."""
        total = self.noise_ss
        if self._noise_sq_flat is not None:
            lengths = torch.tensor([n for _, n in self._order], device=self._noise_sq_flat.device)
            flat = torch.segment_reduce(self._noise_sq_flat.double(), "sum", lengths=lengths)
            total = flat if total is None else total + flat
        return total

    def _check_noise(self) -> None:
        steps = self.report.steps
        if steps == 0 or self.sigma <= 0:
            return
        self.noise_ss = self._noise_sums()
        self._noise_sq_flat = None
        if self.noise_ss is None:
            return
        # Each tensor, and all of them pooled (the most sensitive to a global change of scale): 2(P+1)
        # one-sided tests at α/(2(P+1)) each, so an honest round fails with probability ≤ α.
        names = [n for n, _ in self._order] + ["all trainable tensors"]
        df = np.array([numel * steps for _, numel in self._order], dtype=np.float64)
        stat = self.noise_ss.cpu().numpy() / (self.sigma * self.clip) ** 2  # S_p ~ χ²(d_p·T) if honest
        df, stat = np.append(df, df.sum()), np.append(stat, stat.sum())
        per_test = self.alpha / (2 * len(df))
        lo, hi = chi2.ppf(per_test, df), chi2.isf(per_test, df)
        self.report.noise_ratio = float(stat[-1] / df[-1])
        bad = np.flatnonzero((stat < lo) | (stat > hi))
        if bad.size:
            i = int(bad[0])
            side = "missing or too small" if stat[i] < lo[i] else "larger than planned"
            self._fail(
                "noise",
                f"noise on '{names[i]}' is {side}: Σ‖z‖²/(σC)² = {stat[i]:.4g} for χ²({df[i]:.0f}) "
                f"(ratio {stat[i] / df[i]:.3g}, accepted [{lo[i] / df[i]:.3g}, {hi[i] / df[i]:.3g}] at a "
                f"false-alarm rate of {self.alpha:g} per round); planned σ = {self.sigma:g}, C = {self.clip:g}"
                + (f"; {bad.size} test(s) failed" if bad.size > 1 else ""),
            )

    def finish(self, model: nn.Module) -> GuardReport:
        """End-of-round checks: noise share, every trainable tensor moved, frozen base unchanged."""
        t0 = time.perf_counter()
        if self._optimizer is None:
            self._fail("coverage", "the guard was never attached to a DP optimizer")
        self._check_noise()
        self.report.checks.append("noise")
        if self.report.steps and self._unmoved:
            names = [self.names.get(id(p), "?") for p in self._unmoved]
            kind = "LoRA adapter" if any(".lora_" in n for n in names) else "trainable parameter"
            self._fail(
                "moved",
                f"{len(names)} {kind}(s) never changed in {self.report.steps} DP steps, e.g. {names[:3]}",
            )
        self.report.checks.append("moved")
        now = _frozen_checksums(model)
        if now != self.base_sums:
            changed = sorted(n for n in set(now) | set(self.base_sums) if now.get(n) != self.base_sums.get(n))
            self._fail(
                "frozen-base",
                f"{len(changed)} frozen tensor(s) changed during training (checksum), e.g. {changed[:3]}",
            )
        self.report.checks.extend(["coverage", "clipping", "frozen-base"])
        self.report.seconds += time.perf_counter() - t0
        return self.report
