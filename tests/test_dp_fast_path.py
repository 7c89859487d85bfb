"""FedGuard's book-keeping DP-SGD path (``client.training.BKModule``) against Opacus.

The path replaces Opacus's per-sample-gradient engine for the built-in models, so its step must be
Opacus's step: on the same batch and with the noise generator in the same state, the clipped and
noised gradient equals Opacus's ``hooks`` mode's to float tolerance, with records both under and
over the clipping bound. The DP integrity guards must still catch a broken step on this path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client.training as training
from client.dp_guards import DPIntegrityError
from common.data import encode
from common.models import build_model
from common.privacy import plan_dp
from common.schema import DataSchema
from common.tokenizer import CLS_ID, PAD_ID, VOCAB_SIZE
from tests.helpers import tabular_config

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")

SIGMA = 0.7
BATCH = 24


def _tabular() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The default tabular model (default hyper-parameters) on a batch of numeric + categorical rows."""
    feats: list[dict[str, Any]] = [{"name": f"n{i}"} for i in range(5)]
    feats += [
        {"name": f"c{i}", "type": "categorical", "categories": [str(j) for j in range(k)]} for i, k in enumerate((3, 6))
    ]
    schema = DataSchema(task="tabular", features=feats, label="y", classes=["a", "b", "c"])
    torch.manual_seed(0)
    model = build_model("ft-transformer", schema)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(BATCH, 5, generator=g) * 2, torch.randint(0, 3, (BATCH, 1), generator=g),
                   torch.randint(0, 6, (BATCH, 1), generator=g)], dim=1).float()  # fmt: skip
    return model, x, torch.randint(0, 3, (BATCH,), generator=g)


def _tabular_missing() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The tabular model with missing = "token" features: NaN numerics take their feature's missing vector (a table
    row looked up for every record and masked), a missing category its extra code."""
    feats: list[dict[str, Any]] = [{"name": f"n{i}", "missing": "token" if i % 2 else "refuse"} for i in range(4)]
    feats.append({"name": "c", "type": "categorical", "categories": ["p", "q", "r"], "missing": "token"})
    schema = DataSchema(task="tabular", features=feats, label="y", classes=["a", "b"])
    torch.manual_seed(0)
    model = build_model("ft-transformer", schema)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(BATCH, 4, generator=g), torch.randint(0, 4, (BATCH, 1), generator=g)], dim=1)
    x[::2, 1] = float("nan")  # feature n1 missing in every other record
    x[1::3, 3] = float("nan")
    return model, x.float(), torch.randint(0, 2, (BATCH,), generator=g)


def _text() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The text model (small) on byte sequences with padding, so a repeated byte and PAD both occur."""
    schema = DataSchema(task="text", text_column="t", label="y", classes=["a", "b"])
    torch.manual_seed(0)
    model = build_model("text-transformer", schema, {"d_model": 16, "layers": 2, "heads": 2, "max_len": 20})
    g = torch.Generator().manual_seed(2)
    x = torch.randint(3, VOCAB_SIZE, (BATCH, 20), generator=g)
    x[:, 0] = CLS_ID
    x[::3, 12:] = PAD_ID
    x[1::3, 5:9] = 70  # the same byte several times in one record
    return model, x, torch.randint(0, 2, (BATCH,), generator=g)


class _Shared(nn.Module):
    """Every handled layer kind and the awkward cases: a Linear used twice in one forward pass, an
    Embedding with a padding row, a LayerNorm with affine parameters, a Linear without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=0)
        self.twice = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.twice(torch.tanh(self.twice(self.embed(ids))))
        return self.head(self.norm(h).mean(1))


def _shared() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 12, (BATCH, 7), generator=g)
    return _Shared(), ids, torch.randint(0, 3, (BATCH,), generator=g)


CASES = {
    "ft-transformer": _tabular,
    "missing-values": _tabular_missing,
    "text-transformer": _text,
    "shared-layers": _shared,
}


def _step(
    mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, seed: int, loss: Any = None
) -> Any:
    """One DP step on exactly (x, y); returns (noised, scaled gradients in parameter order, the wrapped module)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    noise = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                              max_grad_norm=clip, noise_generator=noise)  # fmt: skip
    dp_model, dp_opt, _ = training.PrivacyEngine().make_private(grad_sample_mode=mode, poisson_sampling=True, **kw)
    dp_opt.zero_grad()
    (loss or nn.functional.cross_entropy)(dp_model(x), y).backward()
    assert dp_opt.pre_step()  # clip, noise, scale, account: everything but the parameter update
    return [p.grad.detach().clone() for p in model.parameters()], dp_model


def _by_definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, seed: int) -> Any:
    """The DP-SGD step from its definition, one backward pass per record (no per-sample engine).

    Returns (Σ_i min(1, C/(‖g_i‖+1e-6))·g_i + N(0, σ²C²)) / B per tensor, the noise drawn as Opacus
    draws it (``torch.normal`` per tensor, in parameter order), and every record's norm ‖g_i‖.
    """
    model = copy.deepcopy(model).train()
    total = [torch.zeros_like(p) for p in model.parameters()]
    norms = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
    noise = torch.Generator().manual_seed(seed)
    step = [(t + torch.normal(0, SIGMA * clip, size=t.shape, generator=noise)) / len(y) for t in total]
    return step, torch.stack(norms).float()


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-6) for u, v in zip(a, b, strict=True))


def _clip_at_median(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """A bound that clips about half the records and leaves the other half unchanged."""
    _, norms = _by_definition(model, x, y, clip=1.0, seed=0)
    clip = float(norms.median())
    assert (norms < clip * 0.97).sum() >= 3 and (norms > clip * 1.03).sum() >= 3
    return clip


@pytest.mark.parametrize("case", ["ft-transformer", "missing-values", "text-transformer"])
def test_bk_step_equals_opacus_hooks_step(case: str) -> None:
    model, x, y = CASES[case]()
    clip = _clip_at_median(model, x, y)
    want, norms = _by_definition(model, x, y, clip, seed=11)
    opacus, _ = _step("hooks", model, x, y, clip, seed=11)
    bk, wrapped = _step(training.BK_MODE, model, x, y, clip, seed=11)
    assert _close(opacus, want)  # the reference is DP-SGD as defined
    assert _close(bk, opacus), max(float((a - b).abs().max()) for a, b in zip(bk, opacus, strict=True))
    assert torch.allclose(wrapped.per_sample_gradient_norms, norms, rtol=1e-4)


def test_bk_step_equals_opacus_with_public_class_weights() -> None:
    """``train.class_weights`` (a per-record loss weight, mean over the batch) scales each record alike."""
    model, x, y = CASES["ft-transformer"]()
    loss = training.PerSampleWeightedCE([0.5, 2.0, 1.0])
    clip = _clip_at_median(model, x, y)
    opacus, _ = _step("hooks", model, x, y, clip, seed=3, loss=loss)
    bk, _ = _step(training.BK_MODE, model, x, y, clip, seed=3, loss=loss)
    assert _close(bk, opacus)
    assert not _close(bk, _step(training.BK_MODE, model, x, y, clip, seed=3)[0])  # the weights matter


def test_bk_step_is_exact_for_shared_layers_padding_and_affine_norms() -> None:
    """Against the definition: Opacus's own embedding sampler gives the padding row a per-sample
    gradient that autograd (and so the model's real gradient) does not, so it differs here."""
    model, x, y = CASES["shared-layers"]()
    clip = _clip_at_median(model, x, y)
    want, norms = _by_definition(model, x, y, clip, seed=11)
    bk, wrapped = _step(training.BK_MODE, model, x, y, clip, seed=11)
    assert _close(bk, want)
    assert torch.allclose(wrapped.per_sample_gradient_norms, norms, rtol=1e-4)
    assert torch.all(bk[0][0] == want[0][0])  # the padding row: noise alone, as in the definition


@pytest.mark.parametrize("case", ["ft-transformer", "shared-layers"])
def test_a_wrong_clipping_constant_or_noise_is_detected(case: str) -> None:
    """The comparison can fail: a 2% larger C, or other noise draws, no longer match the step."""
    model, x, y = CASES[case]()
    clip = _clip_at_median(model, x, y)
    want, _ = _by_definition(model, x, y, clip, seed=11)
    assert _close(_step(training.BK_MODE, model, x, y, clip, seed=11)[0], want)
    assert not _close(_step(training.BK_MODE, model, x, y, clip * 1.02, seed=11)[0], want)
    assert not _close(_step(training.BK_MODE, model, x, y, clip, seed=12)[0], want)


def test_physical_batches_give_the_same_step_as_one_batch() -> None:
    """A logical batch run as three physical ones (virtual steps) accumulates the same clipped sum."""
    model, x, y = CASES["ft-transformer"]()
    clip = _clip_at_median(model, x, y)
    whole, _ = _step(training.BK_MODE, model, x, y, clip, seed=5)
    m = copy.deepcopy(model).train()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    dp_model, dp_opt, _ = training.PrivacyEngine().make_private(
        grad_sample_mode=training.BK_MODE,
        module=m,
        optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=clip,
        noise_generator=torch.Generator().manual_seed(5),
    )
    for i, part in enumerate(torch.arange(len(y)).chunk(3)):
        dp_opt.zero_grad()
        nn.functional.cross_entropy(dp_model(x[part]), y[part]).backward()
        dp_opt.signal_skip_step(do_skip=i < 2)
        dp_opt.pre_step()
    assert _close([p.grad for p in m.parameters()], whole)


def test_auto_mode_trains_builtin_models_on_the_bk_path_under_the_guards(tabular_csv: Path) -> None:
    """A real local round: the accountant records the plan's releases and every guard passes."""
    cfg = tabular_config(model={"name": "ft-transformer"})
    assert training.resolve_grad_sample_mode(cfg) == training.BK_MODE
    data = encode(pd.read_csv(tabular_csv), cfg.data.schema_)
    plan = plan_dp(len(data), cfg.dp, batch_size=cfg.train.logical_batch_size(len(data)), local_epochs=1, rounds=2)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    before = [p.detach().clone() for p in model.parameters()]
    result = training.train_local(model, data, cfg, plan, torch.device("cpu"))
    assert result.history == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert result.guards is not None and result.guards.steps == plan.steps_per_round
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(m._forward_hooks for m in model.modules())  # nothing left on the model that is sent


def _sabotage_bk(monkeypatch: pytest.MonkeyPatch, tamper: Any) -> None:
    class Sabotaged(training.PrivacyEngine):
        def make_private(self, **kwargs: Any) -> Any:
            module, optimizer, loader = super().make_private(**kwargs)
            assert isinstance(module, training.BKModule)
            tamper(module, optimizer)
            return module, optimizer, loader

    monkeypatch.setattr(training, "PrivacyEngine", Sabotaged)


@pytest.mark.parametrize(
    ("check", "tamper"),
    [
        ("noise", lambda module, opt: setattr(opt, "noise_multiplier", 0.0)),
        ("clipping", lambda module, opt: setattr(module, "max_grad_norm", 1e6)),
    ],
)
def test_guards_refuse_a_broken_bk_step(
    tabular_csv: Path, monkeypatch: pytest.MonkeyPatch, check: str, tamper: Any
) -> None:
    cfg = tabular_config(dp={"target_epsilon": 4.0, "delta": 1e-4, "max_grad_norm": 0.01})
    data = encode(pd.read_csv(tabular_csv), cfg.data.schema_)
    plan = plan_dp(len(data), cfg.dp, batch_size=cfg.train.logical_batch_size(len(data)), local_epochs=1, rounds=2)
    model = build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)
    _sabotage_bk(monkeypatch, tamper)
    with pytest.raises(DPIntegrityError) as err:
        training.train_local(model, data, cfg, plan, torch.device("cpu"))
    assert err.value.check == check


def test_an_empty_poisson_batch_is_a_noise_only_step() -> None:
    model, x, y = CASES["ft-transformer"]()
    m = copy.deepcopy(model).train()
    engine = training.PrivacyEngine()
    dp_model, dp_opt, _ = engine.make_private(
        grad_sample_mode=training.BK_MODE, module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=SIGMA, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    before = [p.detach().clone() for p in m.parameters()]
    training._noise_only_step_bk(dp_model, dp_opt)
    noise = torch.Generator().manual_seed(4)
    want = [b - 0.1 * torch.normal(0, SIGMA, size=b.shape, generator=noise) / 8 for b in before]
    assert _close(list(m.parameters()), want)
    assert engine.accountant.history == [(SIGMA, 1 / 3, 1)]


def test_models_with_other_trainable_layers_stay_on_opacus() -> None:
    conv = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    assert not training.bk_supported(conv)
    assert training.bk_supported(nn.Sequential(nn.Conv1d(2, 4, 3).requires_grad_(False), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="use an Opacus grad_sample_mode"):
        training.BKModule(conv, max_grad_norm=1.0)


def test_node_batches_hold_exactly_the_records_the_sampler_drew() -> None:
    """``Rows`` gathers a batch with one index per tensor: the same records, in the same order, as
    the default one-record-at-a-time fetch, record weights included; an empty Poisson draw is a
    batch of zero rows with the records' shape, which the noise-only step needs."""
    x, y, w = torch.randn(50, 4), torch.randint(0, 3, (50,)), torch.rand(50)
    drawn = [[7, 3, 3, 49], [0], list(range(50))]
    plain = DataLoader(TensorDataset(x, y, w), batch_sampler=drawn)
    fast = DataLoader(training.Rows(x, y, w), batch_sampler=drawn, collate_fn=training.Rows.collate)
    for (want_x, want_y, want_w), (got_x, got_y, got_w), idx in zip(plain, fast, drawn, strict=True):
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y) and torch.equal(got_w, want_w)
        assert torch.equal(got_y, y[idx])
    empty = DataLoader(training.Rows(x, y), batch_sampler=[[]], collate_fn=training.Rows.collate)
    ex, ey = next(iter(empty))
    assert ex.shape == (0, 4) and ey.shape == (0,)
