"""Group and per-example gradients against exact references (loops of batch-1 backward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_ggda.errors import (
    EmptyDatasetError,
    MissingColumnError,
    ModelStateError,
    NonFiniteError,
)
from hf_ggda.gradients import EngineConfig, GradientEngine, RandomProjector
from hf_ggda.testing import toy_dataset

from .conftest import loop_gradients, make_setup

GROUPS_37 = [i % 5 if i < 36 else 9 for i in range(37)]  # uneven sizes + a singleton


def grouped(n: int = 37):
    ds = toy_dataset(n)
    return ds.add_column("group_id", GROUPS_37[:n])


def group_sums(ref: torch.Tensor, ids: list, groups: list) -> torch.Tensor:
    g = torch.tensor(groups)
    return torch.stack([ref[g == k].sum(0) for k in ids])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_per_example_and_group_gradients_match_loop(arch):
    model, task = make_setup(arch, ("classifier",) if arch == "bert" else ())
    ds = grouped()
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=8))
    ref = loop_gradients(model, task, ds, engine.selection.parameters(model))
    assert ref.abs().sum(1).min() > 0  # every row has a non-trivial gradient
    point = engine.per_example_gradients(ds)
    torch.testing.assert_close(point.gradients, ref, rtol=1e-6, atol=1e-12)
    group = engine.group_gradients(ds)
    assert group.group_ids == [0, 1, 2, 3, 4, 9]
    assert group.sizes.tolist() == [8, 7, 7, 7, 7, 1]
    torch.testing.assert_close(group.gradients, group_sums(ref, group.group_ids, GROUPS_37),
                               rtol=1e-6, atol=1e-12)


def test_many_small_groups_per_batch(bert_setup):
    """Batches holding >= 4 groups take the bmm + index_add path; still exact."""
    model, task = bert_setup
    ds = toy_dataset(37)
    ds = ds.add_column("group_id", [i // 2 for i in range(37)])  # pairs and a singleton
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=8))
    ref = loop_gradients(model, task, ds, engine.selection.parameters(model))
    group = engine.group_gradients(ds)
    torch.testing.assert_close(group.gradients, group_sums(ref, group.group_ids,
                                                           ds["group_id"]),
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_and_row_order_do_not_change_results(bert_setup, batch_size):
    model, task = bert_setup
    ds = grouped()
    base = GradientEngine(model, task, config=EngineConfig(batch_size=8)).group_gradients(ds)
    eng = GradientEngine(model, task, config=EngineConfig(batch_size=batch_size))
    torch.testing.assert_close(eng.group_gradients(ds).gradients, base.gradients,
                               rtol=1e-6, atol=1e-12)
    perm = np.random.default_rng(batch_size).permutation(len(ds)).tolist()
    torch.testing.assert_close(eng.group_gradients(ds.select(perm)).gradients, base.gradients,
                               rtol=1e-6, atol=1e-12)
    point = eng.per_example_gradients(ds.select(perm)).gradients
    torch.testing.assert_close(point, eng.per_example_gradients(ds).gradients[perm],
                               rtol=1e-6, atol=1e-12)


def test_selected_parameters_outside_linear_layers_use_autograd():
    """LayerNorm / embedding parameters (no hook) still give exact per-group gradients."""
    model, task = make_setup("bert", ("classifier",))
    names = [n for n, _ in model.named_parameters()
             if "lora_" in n or "LayerNorm" in n or "word_embeddings" in n]
    ds = grouped()
    engine = GradientEngine(model, task, selection=names, config=EngineConfig(batch_size=8))
    assert engine.selection.names == tuple(names)
    ref = loop_gradients(model, task, ds, engine.selection.parameters(model))
    torch.testing.assert_close(engine.per_example_gradients(ds).gradients, ref,
                               rtol=1e-6, atol=1e-12)
    group = engine.group_gradients(ds)
    torch.testing.assert_close(group.gradients, group_sums(ref, group.group_ids, GROUPS_37),
                               rtol=1e-6, atol=1e-12)


def test_full_finetune_of_gpt2_conv1d_weights():
    """Selecting GPT-2's own Conv1D weights (fan_in_fan_out layout) is exact too."""
    model, task = make_setup("gpt2")
    names = [n for n, _ in model.named_parameters() if "c_proj.weight" in n or "c_fc" in n]
    ds = grouped(12)
    engine = GradientEngine(model, task, selection=names, config=EngineConfig(batch_size=5))
    ref = loop_gradients(model, task, ds, engine.selection.parameters(model))
    torch.testing.assert_close(engine.per_example_gradients(ds).gradients, ref,
                               rtol=1e-6, atol=1e-12)


def test_projection_is_linear_and_blocked_equals_cached(bert_setup):
    model, task = bert_setup
    ds = grouped()
    full = GradientEngine(model, task).group_gradients(ds).gradients
    proj = GradientEngine(model, task, config=EngineConfig(projection_dim=32, seed=3))
    out = proj.group_gradients(ds).gradients
    matrix = RandomProjector(full.shape[1], 32, seed=3).matrix(torch.float64)
    torch.testing.assert_close(out, full @ matrix, rtol=1e-6, atol=1e-12)
    blocked = RandomProjector(full.shape[1], 32, seed=3, block_rows=50, cache_bytes=0)
    torch.testing.assert_close(blocked.project(full), full @ blocked.matrix(), rtol=1e-9,
                               atol=1e-12)
    assert not torch.equal(RandomProjector(full.shape[1], 32, seed=4).matrix(), matrix)


def test_half_precision_model_accumulates_in_float32():
    model, task = make_setup("bert", ("classifier",))
    model = model.to(torch.bfloat16)
    group = GradientEngine(model, task).group_gradients(grouped())
    assert group.gradients.dtype == torch.float32
    assert torch.isfinite(group.gradients).all()


def test_train_mode_is_switched_to_eval_and_restored(bert_setup):
    model, task = bert_setup
    model.train()
    ds = grouped()
    a = GradientEngine(model, task).group_gradients(ds).gradients
    b = GradientEngine(model, task).group_gradients(ds).gradients
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout off: deterministic
    assert model.training
    with pytest.raises(ModelStateError, match="train mode") as info:  # typed, a RuntimeError
        GradientEngine(model, task, config=EngineConfig(strict=True)).group_gradients(ds)
    assert isinstance(info.value, RuntimeError) and "call model.eval() first" in str(info.value)


def test_bad_inputs_raise_clear_errors(bert_setup):
    model, task = bert_setup
    engine = GradientEngine(model, task)
    with pytest.raises(MissingColumnError, match="group_id"):
        engine.group_gradients(toy_dataset(5))
    with pytest.raises(EmptyDatasetError):
        engine.per_example_gradients(toy_dataset(5).select([]))

    def nan_loss(m, batch):
        loss = task.per_row_loss(m, batch)
        return loss * torch.where(batch["labels"] == 2, float("nan"), 1.0)

    ds = grouped()
    bad_rows = [i for i, y in enumerate(ds["label"]) if y == 2]
    with pytest.raises(NonFiniteError) as err:
        engine.group_gradients(ds, fn=nan_loss)
    assert sorted(err.value.rows)[:3] == sorted(bad_rows)[:3] or \
        set(err.value.rows) <= set(bad_rows)


def test_negative_control_batch_mean_loss_breaks_invariance(bert_setup):
    """A task built on the HF batch-mean ``.loss`` gives batch-size dependent 'gradients'.

    The batch-mean loss is spread over the rows, so a batch's total is the mean (what
    ``loss.backward()`` differentiates), not the sum of the rows' losses.
    """
    model, task = bert_setup

    def batch_mean(m, batch):
        loss = m(**batch).loss
        size = batch["labels"].shape[0]
        return loss.expand(size) / size

    ds = grouped()
    a = GradientEngine(model, task, config=EngineConfig(batch_size=1)).group_gradients(
        ds, fn=batch_mean).gradients
    b = GradientEngine(model, task, config=EngineConfig(batch_size=8)).group_gradients(
        ds, fn=batch_mean).gradients
    assert not torch.allclose(a, b, rtol=1e-3)


def test_scalar_loss_is_rejected(bert_setup):
    model, task = bert_setup
    with pytest.raises(ValueError, match="one loss per row"):
        GradientEngine(model, task).group_gradients(grouped(), fn=lambda m, b: m(**b).loss)
