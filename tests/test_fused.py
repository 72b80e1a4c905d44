"""Fused passes against their multi-pass references.

* K-FAC factors taken in the group pass = K-FAC fitted in a pass of its own;
* EK-FAC with its eigenvalues from the per-row vectors of the pass (point mode, one-pass
  grouping) = EK-FAC with its own two passes;
* one-pass Grad-K-Means (features from the attribution pass's output-layer gradients,
  group vectors summed from per-example vectors) = Grad-K-Means's own forward pass + a group
  pass: the same groups, the same group vectors, the same scores;
* the number of passes over the training rows each method makes (counted, not assumed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, TracIn, TracInConfig
from hf_ggda.curvature import EKFAC, KFAC, CurvatureContext
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.grouping import GradKMeansGrouper
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset


def _setup(n: int = 24) -> tuple[torch.nn.Module, SequenceClassificationTask, Dataset]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=2, modules_to_save=["classifier"])
    return model.double().eval(), SequenceClassificationTask(tok, max_length=16), \
        toy_dataset(n, seed=3)


@pytest.fixture(autouse=True)
def _no_learning_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass counts are of the attribution passes: the fit's learning check (one forward over
    at most 256 rows, hf_ggda.learning_check) is switched off here."""
    import hf_ggda.attributors.base as base

    monkeypatch.setattr(base, "check_model_learned", lambda *args, **kwargs: None)


class _RowCounter:
    """Counts rows through the model's forward (one pass over n rows = n)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += int(ids.shape[0]) if ids is not None else 0

    def passes(self, n: int) -> float:
        self.handle.remove()
        return self.rows / n


def _probe(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_factors_from_the_group_pass_equal_their_own_pass(cls: type) -> None:
    model, task, data = _setup()
    data = data.add_column("group_id", [i % 5 for i in range(len(data))])
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=7))
    ref = cls(damping=1e-3)
    ref.fit(CurvatureContext(engine, data))
    fused = cls(damping=1e-3)
    ctx = CurvatureContext(engine, data)
    tap = fused.pass_tap(ctx)
    groups = engine.group_gradients(data, taps=[tap])
    assert groups.fresh
    fused.fit_from_pass(ctx, tap)
    v = _probe(engine.dim)
    torch.testing.assert_close(fused.apply(v), ref.apply(v), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("max_rows", [None, 9])
def test_ekfac_eigenvalues_from_point_vectors_equal_the_second_pass(max_rows: int) -> None:
    model, task, data = _setup()
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=5))
    ref = EKFAC(damping=1e-3, max_rows=max_rows, seed=1)
    ref.fit(CurvatureContext(engine, data))
    fused = EKFAC(damping=1e-3, max_rows=max_rows, seed=1)
    ctx = CurvatureContext(engine, data)
    tap = fused.pass_tap(ctx)
    points = engine.per_example_gradients(data, taps=[tap])
    rows = list(range(len(data)))
    fused.fit_from_pass(ctx, tap, lambda: iter([(rows, points.gradients)]))
    v = _probe(engine.dim, seed=1)
    torch.testing.assert_close(fused.apply(v), ref.apply(v), rtol=1e-7, atol=1e-9)


def test_a_resumed_pass_is_not_fresh_and_the_curvature_is_refitted(tmp_path) -> None:
    model, task, data = _setup(12)
    data = data.add_column("group_id", [i % 3 for i in range(len(data))])
    cfg = InfluenceConfig(preconditioner="kfac", damping=1e-3, batch_size=4, shard_rows=4)
    first = InfluenceFunction(model, task, cfg).fit(data, store=str(tmp_path / "s"))
    (tmp_path / "s" / "component-0" / "curvature-kfac.safetensors").unlink()
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4, shard_rows=4))
    assert not engine.group_gradients(data, store=str(tmp_path / "s" / "component-0" /
                                                      "groups")).fresh
    again = InfluenceFunction(model, task, cfg).fit(data, store=str(tmp_path / "s"))
    q = data.select(range(3))
    torch.testing.assert_close(again.score(q).matrix, first.score(q).matrix, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("preconditioner", ["identity", "kfac", "ekfac"])
def test_one_pass_grad_kmeans_equals_the_two_pass_path(preconditioner: str) -> None:
    model, task, data = _setup(30)
    queries = toy_dataset(4, seed=9)
    cfg = InfluenceConfig(preconditioner=preconditioner, damping=1e-3, batch_size=8)
    grouper = GradKMeansGrouper(num_groups=4, seed=0, batch_size=8)
    grouped = grouper.assign(data, model=model, task=task)
    two = InfluenceFunction(model, task, cfg).fit(grouped)
    one = InfluenceFunction(model, task, cfg).fit(data, grouper=GradKMeansGrouper(
        num_groups=4, seed=0, batch_size=8))
    assert one.train_dataset["group_id"] == grouped["group_id"]
    assert one.group_ids == two.group_ids
    torch.testing.assert_close(one.score(queries).matrix, two.score(queries).matrix,
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(one.self_scores(), two.self_scores(), rtol=1e-8, atol=1e-10)


def test_one_pass_grouping_over_two_checkpoints(tmp_path) -> None:
    model, task, data = _setup(20)
    model.save_pretrained(str(tmp_path / "c1"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(1.1)
    model.save_pretrained(str(tmp_path / "c2"))
    cfg = TracInConfig(checkpoints=[str(tmp_path / "c1"), str(tmp_path / "c2")],
                       learning_rates=[0.5, 0.25], batch_size=8)
    grouped = GradKMeansGrouper(num_groups=3, seed=0).assign(data, model=model, task=task)
    two = TracIn(model, task, cfg).fit(grouped)
    one = TracIn(model, task, cfg).fit(data, grouper=GradKMeansGrouper(num_groups=3, seed=0))
    assert one.train_dataset["group_id"] == grouped["group_id"]
    q = toy_dataset(3, seed=4)
    torch.testing.assert_close(one.score(q).matrix, two.score(q).matrix, rtol=1e-8,
                               atol=1e-10)


@pytest.mark.parametrize("preconditioner,grouped,expected", [
    ("identity", True, 1.0), ("kfac", True, 1.0), ("ekfac", True, 2.0),
    ("ekfac", False, 1.0),  # point mode: the eigenvalues come from the per-row vectors
])
def test_passes_per_method(preconditioner: str, grouped: bool, expected: float) -> None:
    model, task, data = _setup(16)
    column = [i % 4 for i in range(16)] if grouped else list(range(16))
    data = data.add_column("group_id", column)
    counter = _RowCounter(model)
    InfluenceFunction(model, task, InfluenceConfig(
        preconditioner=preconditioner, damping=1e-3, batch_size=8)).fit(data)
    assert counter.passes(16) == pytest.approx(expected)


def test_one_pass_ekfac_makes_one_pass_with_grouping() -> None:
    model, task, data = _setup(16)
    counter = _RowCounter(model)
    att = InfluenceFunction(model, task, InfluenceConfig(preconditioner="ekfac", damping=1e-3,
                                                         batch_size=8))
    att.fit(data, grouper=GradKMeansGrouper(num_groups=4, seed=0))
    assert counter.passes(16) == pytest.approx(1.0)
    assert sorted(np.unique(att.train_dataset["group_id"]).tolist()) == [0, 1, 2, 3]


def test_one_pass_grouping_with_a_store_and_its_rerun(tmp_path) -> None:
    model, task, data = _setup(20)
    q = toy_dataset(3, seed=5)
    cfg = InfluenceConfig(preconditioner="ekfac", damping=1e-3, batch_size=8, shard_rows=6)
    memory = InfluenceFunction(model, task, cfg).fit(
        data, grouper=GradKMeansGrouper(num_groups=4, seed=0))
    disk = InfluenceFunction(model, task, cfg).fit(
        data, store=str(tmp_path / "s"), grouper=GradKMeansGrouper(num_groups=4, seed=0))
    assert (tmp_path / "s" / "component-0" / "points").is_dir()
    features = tmp_path / "s" / "component-0" / "grouping-features.safetensors"
    assert features.is_file()
    # the rerun reads the finished point store, the pass's cached grouping features and the
    # cached curvature: no pass at all
    counter = _RowCounter(model)
    again = InfluenceFunction(model, task, cfg).fit(
        data, store=str(tmp_path / "s"), grouper=GradKMeansGrouper(num_groups=4, seed=0))
    assert counter.passes(20) == pytest.approx(0.0)
    # without the feature cache (or with a damaged one) the grouper's own forward pass
    # recomputes the features, and the groups are the same
    for damage in (features.unlink, lambda: features.write_bytes(b"not safetensors")):
        damage()
        counter = _RowCounter(model)
        rerun = InfluenceFunction(model, task, cfg).fit(
            data, store=str(tmp_path / "s"), grouper=GradKMeansGrouper(num_groups=4, seed=0))
        assert counter.passes(20) == pytest.approx(1.0)
        assert rerun.train_dataset["group_id"] == memory.train_dataset["group_id"]
    # another grouper's settings are another key: its features are not taken from the cache
    counter = _RowCounter(model)
    InfluenceFunction(model, task, cfg).fit(
        data, store=str(tmp_path / "s"), grouper=GradKMeansGrouper(num_groups=4, seed=1))
    assert counter.passes(20) == pytest.approx(1.0)
    for att in (disk, again):
        assert att.train_dataset["group_id"] == memory.train_dataset["group_id"]
        torch.testing.assert_close(att.score(q).matrix, memory.score(q).matrix, rtol=1e-8,
                                   atol=1e-10)


@pytest.mark.parametrize("kernel", ["group", "exact", "sample"])
def test_trak_makes_one_pass_and_equals_its_kernel_pass(kernel: str) -> None:
    from hf_ggda.attributors import TRAK, TRAKConfig

    model, task, data = _setup(16)
    data = data.add_column("group_id", [i % 4 for i in range(16)])
    cfg = TRAKConfig(projection_dim=16, kernel=kernel, kernel_sample_size=10, damping=1e-3,
                     batch_size=8)
    counter = _RowCounter(model)
    fused = TRAK(model, task, cfg).fit(data)
    assert counter.passes(16) == pytest.approx(1.0)
    separate = TRAK(model, task, cfg)
    separate.point_pass = lambda: False  # type: ignore[method-assign]  # the kernel's own pass
    separate.prepare_pass = lambda *a: []  # type: ignore[method-assign,assignment]
    separate.fit(data)
    q = toy_dataset(3, seed=6)
    torch.testing.assert_close(fused.score(q).matrix, separate.score(q).matrix, rtol=1e-7,
                               atol=1e-9)


def test_drill_down_reads_the_fit_stored_rows(tmp_path) -> None:
    """A store-backed fit keeps its per-example vectors on disk: the drill-down reads them
    (no pass) and gives the point scores of recomputing them; the drilled rows sum to their
    groups' scores."""
    model, task, data = _setup(20)
    data = data.add_column("row", list(range(20)))
    q = toy_dataset(3, seed=5)
    cfg = InfluenceConfig(normalize="unit", batch_size=8, shard_rows=6)
    memory = InfluenceFunction(model, task, cfg).fit(
        data, grouper=GradKMeansGrouper(num_groups=4, seed=0))
    disk = InfluenceFunction(model, task, cfg).fit(
        data, store=str(tmp_path / "s"), grouper=GradKMeansGrouper(num_groups=4, seed=0))
    chosen = disk.group_ids[1:3]
    want = memory.refine(memory.score(q), group_ids=chosen, row_column="row")
    scores = disk.score(q)
    counter = _RowCounter(model)
    got = disk.refine(scores, group_ids=chosen, row_column="row")
    assert counter.passes(20) == pytest.approx(0.0)
    assert got.point_rows == want.point_rows
    torch.testing.assert_close(got.point_scores, want.point_scores, rtol=1e-8, atol=1e-10)
    groups = np.asarray(got.point_groups)
    for g in chosen:
        torch.testing.assert_close(got.point_scores[:, groups == g].sum(1),
                                   scores.matrix[:, disk.group_ids.index(g)], rtol=1e-8,
                                   atol=1e-10)
    # only the shards holding the wanted rows are read (6 rows a shard)
    chunks = list(disk._require_fit().parts[0].row_vectors(only={7}))
    assert [rows for rows, _ in chunks] == [list(range(6, 12))]
    # a store overwritten by another request: the drill-down recomputes the rows
    InfluenceFunction(model, task, InfluenceConfig(normalize="unit", batch_size=4,
                                                   shard_rows=6)).fit(
        data, store=str(tmp_path / "s"), overwrite=True,
        grouper=GradKMeansGrouper(num_groups=4, seed=0))
    counter = _RowCounter(model)
    again = disk.refine(scores, group_ids=chosen, row_column="row")
    assert counter.passes(20) > 0
    torch.testing.assert_close(again.point_scores, want.point_scores, rtol=1e-8, atol=1e-10)


def test_pass_feature_cache_refuses_what_is_not_this_pass(tmp_path) -> None:
    """The cache is read back only for its own key, shape and finite values, never through
    a link; anything else is None (the caller recomputes)."""
    from hf_ggda.attributors.pass_features import (
        FEATURES_FILE,
        load_pass_features,
        save_pass_features,
    )

    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_pass_features(tmp_path, "k1", feats)
    np.testing.assert_array_equal(load_pass_features(tmp_path, "k1", 4), feats)
    assert load_pass_features(tmp_path, "k2", 4) is None  # another pass or grouper
    assert load_pass_features(tmp_path, "k1", 5) is None  # another number of rows
    bad = feats.copy()
    bad[1, 2] = np.nan
    save_pass_features(tmp_path, "k1", bad)
    assert load_pass_features(tmp_path, "k1", 4) is None
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / FEATURES_FILE).symlink_to(tmp_path / FEATURES_FILE)
    assert load_pass_features(linked, "k1", 4) is None
    assert load_pass_features(tmp_path / "absent", "k1", 4) is None
