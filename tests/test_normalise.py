"""Normalised scores (additive over groups) and curvature from another dataset.

* A group's normalised score = Σ of its members' normalised point scores (float64);
* both equal a by-hand computation from batch-1 gradients: Σ_i uᵀM⁻¹g_i / (‖u‖ ‖g_i‖), the
  norms Euclidean (``unit``) or in the preconditioner's metric (``preconditioned``);
* summed queries and query groups are sums of normalised query rows; drill-down rows sum to
  their group;
* ``fit(curvature_dataset=B)`` gives the same preconditioner as fitting on B itself, and the
  fingerprint says which rows the curvature came from.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_ggda.attributors import (
    TRAK,
    InfluenceConfig,
    InfluenceFunction,
    TracIn,
    TracInConfig,
    TRAKConfig,
)
from hf_ggda.errors import DatasetTypeError
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.tasks import GROUP_COLUMN, SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, SequenceClassificationTask, Dataset, Dataset]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=2, modules_to_save=["classifier"])
    train = toy_dataset(18, seed=3).add_column(GROUP_COLUMN, [i % 4 for i in range(18)])
    queries = toy_dataset(5, seed=9)
    return model.double().eval(), SequenceClassificationTask(tok, max_length=16), train, queries


def _batch1_gradients(model: torch.nn.Module, task: SequenceClassificationTask,
                      data: Dataset, fn: str) -> torch.Tensor:
    """Per-row gradients from a loop of batch-1 passes (the reference)."""
    engine = GradientEngine(model, task, "auto", EngineConfig(batch_size=1))
    rows = [engine.group_gradients(data.select([i]).add_column("one", [0]), "one",
                                   fn=fn).gradients[0] for i in range(len(data))]
    return torch.stack(rows)


def _by_hand(attr: InfluenceFunction | TracIn, model: torch.nn.Module,
             task: SequenceClassificationTask, train: Dataset, queries: Dataset,
             kind: str) -> torch.Tensor:
    g = _batch1_gradients(model, task, train.remove_columns(GROUP_COLUMN), "loss")
    u = _batch1_gradients(model, task, queries, "measurement")
    apply = attr.inverse_hvp if isinstance(attr, InfluenceFunction) else (lambda v: v)

    def norms(v: torch.Tensor) -> torch.Tensor:
        return v.norm(dim=1) if kind == "unit" else (v * apply(v)).sum(1).sqrt()

    point = (apply(u) @ g.T) / norms(u)[:, None] / norms(g)[None, :]
    groups = np.asarray(train[GROUP_COLUMN])
    return torch.stack([point[:, groups == k].sum(1) for k in sorted(set(groups))], 1)


CASES = [("identity", "unit"), ("kfac", "preconditioned"), ("ekfac", "preconditioned"),
         ("ekfac", "unit")]


@pytest.mark.parametrize("pre,kind", CASES)
def test_normalised_group_scores_are_sums_of_normalised_member_scores(setup, pre, kind):
    model, task, train, queries = setup
    cfg = dict(preconditioner=pre, damping=0.0 if pre == "identity" else 0.1,
               normalize=kind, batch_size=5)
    attr = InfluenceFunction(model, task, InfluenceConfig(**cfg)).fit(train)
    group = attr.score(queries).matrix.double()
    want = _by_hand(attr, model, task, train, queries, kind)
    torch.testing.assert_close(group, want, rtol=1e-6, atol=1e-9)

    point_data = train.remove_columns(GROUP_COLUMN).add_column(GROUP_COLUMN,
                                                               list(range(len(train))))
    point = InfluenceFunction(model, task, InfluenceConfig(**cfg)).fit(point_data)
    pm = point.score(queries).matrix.double()
    ids = np.asarray(train[GROUP_COLUMN])
    summed = torch.stack([pm[:, ids == k].sum(1) for k in range(4)], 1)
    torch.testing.assert_close(group, summed, rtol=1e-6, atol=1e-9)


def test_normalised_scores_differ_from_raw_and_are_bounded_per_row(setup):
    model, task, train, queries = setup
    raw = InfluenceFunction(model, task, InfluenceConfig()).fit(train).score(queries).matrix
    unit = InfluenceFunction(model, task, InfluenceConfig(normalize="unit")).fit(train)
    matrix = unit.score(queries).matrix
    assert not torch.allclose(raw, matrix)
    sizes = torch.as_tensor(unit.group_sizes, dtype=matrix.dtype)
    assert bool((matrix.abs() <= sizes[None, :] + 1e-9).all())  # Σ of cosines


def test_summed_and_grouped_queries_sum_normalised_rows(setup):
    model, task, train, queries = setup
    attr = TracIn(model, task, TracInConfig(normalize="unit", batch_size=4)).fit(train)
    rows = attr.score(queries).matrix
    total = attr.score(queries, aggregate="sum").matrix
    torch.testing.assert_close(total[0], rows.sum(0), rtol=1e-6, atol=1e-9)
    qg = queries.add_column("qg", [0, 1, 0, 1, 1])
    grouped = attr.score(qg, query_group_column="qg").matrix
    torch.testing.assert_close(grouped[0], rows[[0, 2]].sum(0), rtol=1e-6, atol=1e-9)


def test_normalised_drill_down_rows_sum_to_their_group(setup):
    model, task, train, queries = setup
    attr = InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="kfac", damping=0.1, normalize="preconditioned")).fit(train)
    scores = attr.score(queries)
    refined = attr.refine(scores, group_ids=[2])
    torch.testing.assert_close(refined.point_scores.sum(1), scores.matrix[:, 2],
                               rtol=1e-6, atol=1e-9)


def test_normalize_settings_are_checked():
    with pytest.raises(ValueError, match="normalize must be None, 'unit' or 'preconditioned'"):
        InfluenceConfig(normalize="cos")
    with pytest.raises(ValueError, match="does not apply to TRAK"):
        TRAKConfig(normalize="unit")
    with pytest.warns(FutureWarning, match="normalize='unit'"):
        cfg = InfluenceConfig(cosine=True)
    assert cfg.normalize == "unit"
    assert TRAK is not None


def test_curvature_from_another_dataset_equals_fitting_on_it(setup, tmp_path):
    model, task, train, _ = setup
    other = toy_dataset(14, seed=21).add_column(GROUP_COLUMN, [i % 3 for i in range(14)])
    cfg = InfluenceConfig(preconditioner="ekfac", damping=0.1, batch_size=4)
    mixed = InfluenceFunction(model, task, cfg).fit(train, curvature_dataset=other,
                                                    store=tmp_path / "s")
    direct = InfluenceFunction(model, task, cfg).fit(other)
    v = torch.randn(3, mixed.selection.numel, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed.inverse_hvp(v), direct.inverse_hvp(v), rtol=1e-6,
                               atol=1e-9)
    own = InfluenceFunction(model, task, cfg).fit(train)
    assert not torch.allclose(own.inverse_hvp(v), mixed.inverse_hvp(v))
    fp = mixed._require_fit().parts[0].fingerprint
    assert fp["curvature_dataset"] == other._fingerprint
    again = InfluenceFunction(model, task, cfg).fit(train, store=tmp_path / "s")
    torch.testing.assert_close(again.inverse_hvp(v), own.inverse_hvp(v))  # cache not reused


def test_curvature_mix_and_bad_curvature_input(setup):
    model, task, train, _ = setup
    a, b = toy_dataset(10, seed=1), toy_dataset(10, seed=2)
    cfg = InfluenceConfig(preconditioner="kfac", damping=0.1)
    one = InfluenceFunction(model, task, cfg).fit(train, curvature_dataset=[(a, 1.0), (b, 3.0)])
    two = InfluenceFunction(model, task, cfg).fit(train, curvature_dataset=[(a, 1.0), (b, 3.0)])
    v = torch.ones(1, one.selection.numel, dtype=torch.float64)
    torch.testing.assert_close(one.inverse_hvp(v), two.inverse_hvp(v))  # seeded mix
    with pytest.raises(ValueError, match="fits no curvature"):
        TracIn(model, task, TracInConfig()).fit(train, curvature_dataset=a)
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        InfluenceFunction(model, task, cfg).fit(train, curvature_dataset=[(a, float("nan"))])
    with pytest.raises(DatasetTypeError):
        from datasets import DatasetDict
        InfluenceFunction(model, task, cfg).fit(train, curvature_dataset=DatasetDict(x=a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InfluenceConfig(normalize="unit")  # no deprecation warning on the new name
