"""The factorised projection inside the hooks against explicit references.

* factorised = dense projection of the unprojected gradients by P_out ⊗ P_in per layer
  (float64), on tiny BERT (Linear), GPT-2 (Conv1D) and Llama, LoRA and full linear layers, in
  group and point mode, parameters outside linear layers projected densely;
* linearity on projected vectors: group vectors = sums of their members' point vectors;
* projected inner products within a stated Johnson–Lindenstrauss bound (fixed seed);
* K-FAC / EK-FAC in the projected space = K-FAC / EK-FAC of the explicitly projected model
  W = W₀ + P_out Z P_inᵀ (parameters Z) on a one-layer model.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from datasets import Dataset

from hf_ggda.attributors import TensorTask
from hf_ggda.curvature import EKFAC, KFAC, CurvatureContext
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.gradients.hooks import find_tracked
from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_model, tiny_tokenizer, toy_dataset

SELECTIONS = {"bert": ["bert.encoder.layer.0.attention.*", "*LayerNorm.weight"],
              "gpt2": "linear", "llama": "linear"}


def _setup(arch: str, lora: bool) -> tuple[Any, Any, Dataset, Any]:
    tok = tiny_tokenizer("bert" if arch == "bert" else "gpt2")
    model = tiny_lora(arch, tok.vocab_size, r=2) if lora else tiny_model(arch, tok.vocab_size)
    model = model.double().eval()
    data = toy_dataset(10, seed=4).add_column("group_id", [i % 3 for i in range(10)])
    task = SequenceClassificationTask(tok, max_length=12) if arch == "bert" else \
        CausalLMTask(tok, max_length=12)
    return model, task, data, ("auto" if lora else SELECTIONS[arch])


def _reference(dense: torch.Tensor, engine: GradientEngine) -> torch.Tensor:
    """Project unprojected (N, d) gradients layer by layer with P_out ⊗ P_in."""
    fz = engine.factorised
    assert fz is not None
    tracked, fallback = find_tracked(engine.model, engine.selection)
    out = torch.zeros(dense.shape[0], fz.dim_out, dtype=dense.dtype)
    for i, (t, lp) in enumerate(zip(tracked, fz.layers)):
        if t.weight is not None:
            w = dense[:, t.weight[0]:t.weight[1]]
            w = w.reshape(-1, lp.d_in, lp.d_out).transpose(1, 2) if t.transposed \
                else w.reshape(-1, lp.d_out, lp.d_in)
            out[:, lp.weight[0]:lp.weight[1]] = w.reshape(len(w), -1) @ fz.kronecker(i)
        if t.bias is not None:
            b = dense[:, t.bias[0]:t.bias[1]]
            out[:, lp.bias[0]:lp.bias[1]] = b if lp.p_out is None else b @ lp.p_out
    if fallback:
        offsets = engine.selection.offsets()
        fb = torch.cat([dense[:, offsets[n][0]:offsets[n][1]] for n in fallback], 1)
        out[:, fz.linear_dim:] = fb if fz.fallback is None else \
            fb @ fz.fallback.matrix(torch.float64)
    return out


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("lora", [True, False])
def test_factorised_equals_the_kronecker_projection(arch: str, lora: bool) -> None:
    model, task, data, selection = _setup(arch, lora)
    dense = GradientEngine(model, task, selection, EngineConfig(batch_size=4))
    fact = GradientEngine(model, task, selection, EngineConfig(batch_size=4, factorised_dim=3,
                                                               seed=5))
    assert fact.dim < dense.dim or lora
    for mode in ("group", "point"):
        if mode == "group":
            ref, got = dense.group_gradients(data), fact.group_gradients(data)
        else:
            ref, got = dense.per_example_gradients(data), fact.per_example_gradients(data)
        torch.testing.assert_close(got.gradients, _reference(ref.gradients, fact), rtol=1e-6,
                                   atol=1e-10)
    # linearity on the projected vectors, and the fingerprint names the projection
    points = fact.per_example_gradients(data)
    summed = fact.sum_into_groups(points, data)
    torch.testing.assert_close(summed.gradients, fact.group_gradients(data).gradients,
                               rtol=1e-9, atol=1e-12)
    assert fact.fingerprint(data, "x", "loss") != dense.fingerprint(data, "x", "loss")


def test_fallback_parameters_are_projected_densely_with_a_warning(caplog) -> None:
    model, task, _data, selection = _setup("bert", lora=False)
    engine = GradientEngine(model, task, selection, EngineConfig(batch_size=4,
                                                                 factorised_dim=2))
    assert engine.factorised is not None and engine.factorised.fallback_dim > 0
    assert "projected densely" in caplog.text


def test_projected_inner_products_within_a_jl_bound() -> None:
    """Per-example gradients of a 256 → 128 linear layer (d = 32,896; each row's weight
    gradient g aᵀ is rank one, the worst case for a Kronecker sketch). For unit x, the
    squared norm of (P_out ⊗ P_in)ᵀx has relative variance (1 + 2/k)² − 1 ≈ 4/k, so the
    error of an inner product has standard deviation σ ≈ 2/√k relative to ‖x‖‖y‖. Checked on
    one fixed seed at k = 64 (p = 4,160): every pair within 4σ, the root mean square within
    1.5σ, and the error shrinking as k grows."""
    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"x": torch.randn(12, 256, generator=gen).double().tolist(),
                              "y": torch.randn(12, 128, generator=gen).double().tolist()})
    model = torch.nn.Linear(256, 128).double()
    task = TensorTask(loss="mse")
    x = GradientEngine(model, task, "trainable", EngineConfig()).per_example_gradients(
        data).gradients
    norms = torch.outer(x.norm(dim=1), x.norm(dim=1))
    errors = {}
    for k in (16, 64):
        y = GradientEngine(model, task, "trainable", EngineConfig(factorised_dim=k)) \
            .per_example_gradients(data).gradients
        errors[k] = ((y @ y.T - x @ x.T).abs() / norms)
    sigma = 2 / math.sqrt(64)
    assert errors[64].max() <= 4 * sigma
    assert errors[64].pow(2).mean().sqrt() <= 1.5 * sigma
    assert errors[64].pow(2).mean() < errors[16].pow(2).mean()


class _Projected(torch.nn.Module):
    """y = W₀ a + b + P_out Z P_inᵀ a: gradients in Z are the factorised projection."""

    def __init__(self, base: torch.nn.Linear, p_in: torch.Tensor, p_out: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w0", base.weight.detach().clone())
        self.register_buffer("b0", base.bias.detach().clone())
        self.register_buffer("p_in", p_in)
        self.register_buffer("p_out", p_out)
        self.z = torch.nn.Linear(p_in.shape[1], p_out.shape[1], bias=False).double()
        torch.nn.init.zeros_(self.z.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w0.T + self.b0 + self.z(x @ self.p_in) @ self.p_out.T


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_projected_kfac_equals_kfac_of_the_projected_model(cls: type) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    data = Dataset.from_dict({"x": x.tolist(), "y": y.tolist()})
    base = torch.nn.Linear(6, 5, bias=True).double()
    task = TensorTask(loss="mse")
    fact = GradientEngine(base, task, ["weight"], EngineConfig(batch_size=8, factorised_dim=3))
    lp = fact.factorised.layers[0]
    pre = cls(damping=1e-2)
    pre.fit(CurvatureContext(fact, data))
    proj = _Projected(base, lp.p_in, lp.p_out)
    ref_engine = GradientEngine(proj, task, ["z.weight"], EngineConfig(batch_size=8))
    ref = cls(damping=1e-2)
    ref.fit(CurvatureContext(ref_engine, data))
    # the explicitly projected model's gradients are the factorised vectors
    torch.testing.assert_close(ref_engine.per_example_gradients(data).gradients,
                               fact.per_example_gradients(data).gradients, rtol=1e-9,
                               atol=1e-12)
    v = torch.randn(4, fact.dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(pre.apply(v), ref.apply(v), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("config", [
    {"attributor_type": "tracin"},
    {"attributor_type": "influence", "preconditioner": "ekfac", "damping": 1e-3},
    {"attributor_type": "trak", "damping": 1e-3},
])
def test_linearity_and_point_mode_on_factorised_vectors(config: dict) -> None:
    from hf_ggda.attributors import get_attributor

    model, task, data, _ = _setup("bert", lora=True)
    data = data.add_column("row", list(range(len(data))))
    queries = toy_dataset(3, seed=8)
    config = {**config, "factorised_dim": 2, "batch_size": 4}
    if config["attributor_type"] == "trak":
        config["kernel"] = "exact"  # the same kernel for groups and points
    grouped = get_attributor(model, task, config).fit(data).score(queries)
    points = get_attributor(model, task, config).fit(data, "row").score(queries)
    summed = torch.stack([points.matrix[:, [i for i, g in enumerate(data["group_id"])
                                           if g == k]].sum(1) for k in grouped.group_ids], 1)
    torch.testing.assert_close(grouped.matrix, summed, rtol=1e-7, atol=1e-10)


def test_chunked_and_top_k_scoring_equal_the_full_matrix() -> None:
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction

    model, task, data, _ = _setup("bert", lora=True)
    queries = toy_dataset(7, seed=11)
    cfg = InfluenceConfig(preconditioner="kfac", damping=1e-3, batch_size=4, factorised_dim=2)
    att = InfluenceFunction(model, task, cfg).fit(data)
    full = att.score(queries).matrix
    torch.testing.assert_close(att.score(queries, query_chunk=3).matrix, full, rtol=1e-12,
                               atol=1e-12)
    top = att.score(queries, top_k=2, query_chunk=2)
    values, index = torch.topk(full, 2, dim=1)
    torch.testing.assert_close(top.values, values, rtol=1e-12, atol=1e-12)
    assert top.indices.tolist() == index.tolist()
    cols = top.to_query_columns(queries)
    assert cols["ggda_top_groups"][0] == [att.group_ids[int(i)] for i in index[0]]
    # a memory budget sizes the chunks and gives the same numbers
    budget = InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="kfac", damping=1e-3, batch_size=4, factorised_dim=2,
        memory_budget=1 << 20)).fit(data)
    torch.testing.assert_close(budget.score(queries).matrix, full, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="per-row queries"):
        att.score(queries, aggregate="sum", top_k=2)


def test_factorised_store_resumes_bit_identically_and_is_fingerprinted(tmp_path) -> None:
    model, task, data, _ = _setup("bert", lora=True)
    cfg = EngineConfig(batch_size=4, shard_rows=3, factorised_dim=2)
    full = GradientEngine(model, task, config=cfg).group_gradients(
        data, store=str(tmp_path / "a"))
    partial = GradientEngine(model, task, config=cfg)
    partial.group_gradients(data, store=str(tmp_path / "b"))
    shards = sorted((tmp_path / "b" / "shards").glob("*.safetensors"))
    shards[-1].unlink()  # as if killed before the last shard
    resumed = GradientEngine(model, task, config=cfg).group_gradients(
        data, store=str(tmp_path / "b"))
    assert not resumed.fresh
    assert torch.equal(resumed.gradients, full.gradients)
    for a, b in zip(sorted((tmp_path / "a" / "shards").glob("*.safetensors")),
                    sorted((tmp_path / "b" / "shards").glob("*.safetensors"))):
        assert a.read_bytes() == b.read_bytes()
    from hf_ggda.errors import StoreMismatchError

    other_seed = EngineConfig(batch_size=4, shard_rows=3, factorised_dim=2, seed=1)
    with pytest.raises(StoreMismatchError):
        GradientEngine(model, task, config=other_seed).group_gradients(
            data, store=str(tmp_path / "a"))
