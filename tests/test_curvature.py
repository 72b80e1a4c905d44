"""Preconditioners against explicit Hessians: exact, K-FAC / EK-FAC, LiSSA, DataInf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers.pytorch_utils import Conv1D

from hf_ggda.attributors import TensorTask
from hf_ggda.curvature import (
    EKFAC,
    KFAC,
    CurvatureContext,
    CurvatureError,
    DataInf,
    ExactHessian,
    LiSSA,
    hessian_vector_products,
)
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset


def _ctx(model: torch.nn.Module, task: object, data: Dataset, batch_size: int = 8,
         selection: object = "auto") -> CurvatureContext:
    engine = GradientEngine(model, task, selection,  # type: ignore[arg-type]
                            config=EngineConfig(batch_size=batch_size))
    return CurvatureContext(engine, data)


def _lora_setup(n: int = 10) -> tuple[torch.nn.Module, SequenceClassificationTask, Dataset]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=1).double().eval()
    return model, SequenceClassificationTask(tok, max_length=16), toy_dataset(n, seed=2)


def _regression(n: int = 1000, d: int = 4, out: int = 1, seed: int = 0,
                conv: bool = False) -> tuple[torch.nn.Module, TensorTask, Dataset]:
    """A least-squares fitted linear model with MSE loss (K-FAC is near-exact here)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(d, out, generator=gen, dtype=torch.float64)
    y = x @ w + 0.7 * torch.randn(n, out, generator=gen, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, y).solution  # (d + 1, out)
    model: torch.nn.Module
    if conv:
        model = Conv1D(out, d).double()
        with torch.no_grad():
            model.weight.copy_(sol[:d])
            model.bias.copy_(sol[d])
    else:
        model = torch.nn.Linear(d, out).double()
        with torch.no_grad():
            model.weight.copy_(sol[:d].T)
            model.bias.copy_(sol[d])
    labels = y.squeeze(1).tolist() if out == 1 else y.tolist()
    data = Dataset.from_dict({"x": x.tolist(), "y": labels})
    return model, TensorTask(loss="mse"), data


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_exact_hessian_matches_autograd_and_linalg_solve() -> None:
    model, task, data = _lora_setup(8)
    ctx = _ctx(model, task, data, batch_size=3)  # the Hessian is summed over 3 batches
    exact = ExactHessian(damping=0.05)
    exact.fit(ctx)
    sel = ctx.engine.selection
    names, shapes = sel.names, sel.shapes
    batch = next(_ctx(model, task, data, batch_size=8).batches())

    class Summed(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, b: dict) -> torch.Tensor:
            return task.per_row_loss(self.inner, b).sum()

    wrapper = Summed(model)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        parts, pos = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            parts["inner." + name] = flat[pos:pos + size].reshape(shape)
            pos += size
        return torch.func.functional_call(wrapper, parts, (batch,))

    flat0 = torch.cat([p.detach().reshape(-1) for p in sel.parameters(model)])
    with ctx.differentiable(double_backward=True):
        reference = torch.autograd.functional.hessian(loss_of, flat0)
    torch.testing.assert_close(exact.matrix(), (reference + reference.T) / 2, rtol=1e-8,
                               atol=1e-12)
    v = torch.randn(3, sel.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solved = torch.linalg.solve(reference + 0.05 * torch.eye(sel.numel, dtype=torch.float64), v.T).T
    torch.testing.assert_close(exact.apply(v), solved, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(hessian_vector_products(ctx, v), v @ reference, rtol=1e-8,
                               atol=1e-12)


def test_exact_refuses_too_many_parameters() -> None:
    model, task, data = _lora_setup(4)
    with pytest.raises(ValueError, match="max_dim"):
        ExactHessian(max_dim=10).fit(_ctx(model, task, data))


@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kfac_ekfac_match_exact_on_linear_regression(cls: type, out: int) -> None:
    model, task, data = _regression(out=out)
    ctx = _ctx(model, task, data, batch_size=64)
    exact = ExactHessian(damping=1e-3)
    exact.fit(ctx)
    approx = cls(damping=1e-3)
    approx.fit(ctx)
    v = torch.randn(6, ctx.engine.selection.numel, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    assert _corr(approx.apply(v), exact.apply(v)) > 0.98


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kfac_sampled_rows(cls: type) -> None:
    """max_rows >= n is the exact fit; a 1/4 sample, scaled to n, stays close to it."""
    model, task, data = _regression(out=3)
    ctx = _ctx(model, task, data, batch_size=64)
    full, same, sampled = cls(damping=1e-3), cls(damping=1e-3, max_rows=5000), \
        cls(damping=1e-3, max_rows=250, seed=3)
    for pre in (full, same, sampled):
        pre.fit(ctx)
    v = torch.randn(6, ctx.engine.selection.numel, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same.apply(v), full.apply(v), rtol=1e-10, atol=0)
    assert _corr(sampled.apply(v), full.apply(v)) > 0.95
    ratio = sampled.apply(v).norm() / full.apply(v).norm()
    assert 0.8 < float(ratio) < 1.25  # the statistics are rescaled from 250 rows to n
    assert sampled.config_dict() != full.config_dict()  # different cache keys
    with pytest.raises(ValueError, match="max_rows"):
        cls(max_rows=0)


def test_kfac_conv1d_layout_matches_linear() -> None:
    lin, task, data = _regression(out=3)
    conv, _, _ = _regression(out=3, conv=True)
    torch.testing.assert_close(conv.weight.T, lin.weight)
    v_lin = torch.randn(4, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def to_conv(v: torch.Tensor) -> torch.Tensor:
        w = v[:, :12].reshape(-1, 3, 4).transpose(1, 2).reshape(-1, 12)
        return torch.cat([w, v[:, 12:]], 1)

    def from_conv(v: torch.Tensor) -> torch.Tensor:
        w = v[:, :12].reshape(-1, 4, 3).transpose(1, 2).reshape(-1, 12)
        return torch.cat([w, v[:, 12:]], 1)

    for cls in (KFAC, EKFAC):
        p_lin, p_conv = cls(damping=1e-2), cls(damping=1e-2)
        p_lin.fit(_ctx(lin, task, data))
        p_conv.fit(_ctx(conv, task, data))
        torch.testing.assert_close(from_conv(p_conv.apply(to_conv(v_lin))), p_lin.apply(v_lin),
                                   rtol=1e-8, atol=1e-12)


def test_kfac_on_lora_is_symmetric_positive_definite_and_batch_independent() -> None:
    model, task, data = _lora_setup(10)
    d = sum(p.numel() for p in GradientEngine(model, task).selection.parameters(model))
    eye = torch.eye(d, dtype=torch.float64)
    for cls in (KFAC, EKFAC):
        a, b = cls(damping=1e-3), cls(damping=1e-3)
        a.fit(_ctx(model, task, data, batch_size=3))
        b.fit(_ctx(model, task, data, batch_size=10))
        pa = a.apply(eye)
        torch.testing.assert_close(pa, b.apply(eye), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(pa, pa.T, rtol=1e-8, atol=1e-10)
        assert torch.linalg.eigvalsh((pa + pa.T) / 2).min() > 0


def test_kfac_parameters_outside_linear_modules_get_inverse_damping() -> None:
    model, task, data = _lora_setup(6)
    lora = r".*lora_[AB]\.default\.weight"
    ctx = _ctx(model, task, data, selection=[lora, r".*embeddings\.LayerNorm\.weight"])
    with pytest.raises(ValueError, match="not in linear modules"):
        KFAC(damping=0.0).fit(ctx)
    mixed = KFAC(damping=0.5)
    mixed.fit(ctx)
    only_lora = KFAC(damping=0.5)
    only_lora.fit(_ctx(model, task, data, selection=[lora]))
    offsets = ctx.engine.selection.offsets()
    ln = next(v for k, v in offsets.items() if "LayerNorm" in k)
    keep = torch.ones(ctx.engine.selection.numel, dtype=torch.bool)
    keep[ln[0]:ln[1]] = False
    v = torch.randn(2, len(keep), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = mixed.apply(v)
    torch.testing.assert_close(out[:, ~keep], v[:, ~keep] / 0.5)
    torch.testing.assert_close(out[:, keep], only_lora.apply(v[:, keep]), rtol=1e-10, atol=1e-12)


def test_curvature_cache_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, task, data = _lora_setup(8)
    ctx = _ctx(model, task, data)
    cache = tmp_path / "curvature-ekfac.safetensors"
    first = EKFAC(damping=1e-3)
    first.fit_or_load(ctx, cache)
    assert cache.exists()
    v = torch.randn(2, ctx.engine.selection.numel, dtype=torch.float64)
    caplog.set_level("INFO", logger="hf_ggda")
    other = EKFAC(damping=1e-2)  # damping is applied after the cached factors
    other.fit_or_load(ctx, cache)
    assert any("Loaded ekfac curvature" in r.getMessage() for r in caplog.records)
    fresh = EKFAC(damping=1e-2)
    fresh.fit(ctx)
    torch.testing.assert_close(other.apply(v), fresh.apply(v), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first.apply(v), other.apply(v))


def test_lissa_matches_exact() -> None:
    model, task, data = _lora_setup(10)
    ctx = _ctx(model, task, data, batch_size=10)
    exact = ExactHessian()
    exact.fit(ctx)
    eig = exact.eigenvalues
    assert eig is not None
    damping = float(max(0.0, -eig.min()) + 0.25 * eig.abs().max())
    exact.damping = damping
    v = torch.randn(2, eig.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = exact.apply(v)
    lissa = LiSSA(damping=damping, scale=None, depth=100)  # scale from a power iteration
    lissa.fit(ctx)
    assert lissa.scale is not None and lissa.scale > float(eig.abs().max())
    got = lissa.apply(v)
    assert float((got - target).norm() / target.norm()) < 1e-2
    # the sampled (stochastic) recursion is seeded: same seed, same answer
    sampled = [LiSSA(damping=damping, scale=lissa.scale, depth=5, batch_size=4, seed=1)
               for _ in range(2)]
    for s in sampled:
        s.fit(ctx)
    torch.testing.assert_close(sampled[0].apply(v), sampled[1].apply(v))


def test_lissa_divergence_is_reported() -> None:
    model, task, data = _lora_setup(6)
    lissa = LiSSA(damping=0.0, scale=1e-6, depth=200)
    lissa.fit(_ctx(model, task, data))
    with pytest.raises(CurvatureError, match="diverged"):
        lissa.apply(torch.ones(1, lissa.ctx.engine.selection.numel, dtype=torch.float64))


def test_datainf_matches_formula_from_per_example_gradients() -> None:
    model, task, data = _lora_setup(9)
    ctx = _ctx(model, task, data, batch_size=4)
    lam = 0.05
    pre = DataInf(damping=lam)
    pre.fit(ctx)
    engine = ctx.engine
    grads = engine.per_example_gradients(data).gradients  # (n, d)
    n = grads.shape[0]
    v = torch.randn(3, grads.shape[1], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    expected = torch.empty_like(v)
    # one block per LoRA module: each module's lora weight is its own parameter tensor
    for start, stop in engine.selection.offsets().values():
        g, vb = grads[:, start:stop], v[:, start:stop]
        coef = (vb @ g.T) / (lam / n + (g * g).sum(1))
        expected[:, start:stop] = (vb - coef @ g / n) / lam
    torch.testing.assert_close(pre.apply(v), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        DataInf(damping=0.0)
