"""Tests of hf_ggda.grouping: groupers as Dataset.map, caching, errors, coherence."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk

from hf_ggda.errors import (
    ColumnTypeError,
    EmptyDatasetError,
    GroupingError,
    MissingColumnError,
    NotFittedError,
)
from hf_ggda.gradients import GradientEngine, RandomProjector
from hf_ggda.grouping import (
    GROUPERS,
    ColumnGrouper,
    GradKMeansConfig,
    Grouper,
    OutputGradientProjector,
    RandomGrouper,
    allocate_groups,
    capped_assign,
    coherence_from_gradients,
    compare_groupings,
    fit_kmeans,
    get_grouper,
    group_coherence,
    model_weights_hash,
    sample_rows,
)
from hf_ggda.tasks import GROUP_COLUMN, CausalLMTask, SequenceClassificationTask, find_head
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

K = 5


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer("bert")


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    m = tiny_lora("bert", tok.vocab_size, modules_to_save=["classifier"])
    return m.eval()


@pytest.fixture(scope="module")
def task(tok: Any) -> SequenceClassificationTask:
    return SequenceClassificationTask(tok, max_length=32)


@pytest.fixture(scope="module")
def data() -> Dataset:
    ds = toy_dataset(60, num_labels=3, seed=3)
    return ds.add_column("source", [f"src{(i * 7) % 4}" for i in range(len(ds))])


def _run(grouper: Grouper, ds: Dataset, model: Any, task: Any) -> Dataset:
    if grouper.uses_model:
        return grouper.assign(ds, model=model, task=task)
    return grouper.assign(ds)


SPECS = [("random", {"num_groups": K}), ("stratified", {"num_groups": K}),
         ("column", {"column": "source"}), ("kmeans-input", {"num_groups": K}),
         ("kmeans-repr", {"num_groups": K}), ("grad-kmeans", {"num_groups": K}),
         ("grad-kmeans", {"num_groups": K, "per_class": True, "balanced": True})]


# -- registry and configs -----------------------------------------------------------------------
def test_registry_and_configs() -> None:
    assert set(GROUPERS) == {"random", "stratified", "column", "kmeans-input", "kmeans-repr",
                             "grad-kmeans"}
    for name, cls in GROUPERS.items():
        assert cls.name == name
        for f in dataclasses.fields(cls.config_class):
            assert f.metadata.get("help"), (name, f.name)
    assert isinstance(get_grouper("grad_kmeans", num_groups=3).config, GradKMeansConfig)
    with pytest.raises(ValueError, match="Unknown grouper"):
        get_grouper("spectral")
    with pytest.raises(ValueError, match="num_clusters"):
        get_grouper("random", num_clusters=3)
    with pytest.raises(ValueError, match="not both"):
        RandomGrouper(RandomGrouper.config_class(num_groups=2), seed=1)
    with pytest.raises(ValueError, match="allocation"):
        get_grouper("stratified", allocation="sqrt")
    with pytest.raises(ValueError, match="projection"):
        get_grouper("grad-kmeans", projection="pca")
    with pytest.raises(ValueError, match="hash_params"):
        get_grouper("kmeans-repr", hash_params="some")


@pytest.mark.parametrize("name,kwargs", SPECS, ids=lambda x: str(x))
def test_grouper_contract(name: str, kwargs: dict, data: Dataset, model: Any,
                          task: Any) -> None:
    """Deterministic for a seed, every row exactly once, exactly K non-empty groups."""
    out1 = _run(get_grouper(name, **kwargs), data, model, task)
    grouper = get_grouper(name, **kwargs)
    out2 = _run(grouper, data, model, task)
    assert out1[GROUP_COLUMN] == out2[GROUP_COLUMN]
    assert len(out1) == len(data)
    assert out1.column_names == [*data.column_names, GROUP_COLUMN]
    for col in data.column_names:  # same rows, same order
        assert out1[col] == data[col]
    ids = np.asarray(out1[GROUP_COLUMN])
    k = kwargs.get("num_groups", len(set(data["source"])))
    assert ids.dtype == np.int64 and ids.min() == 0 and ids.max() == k - 1
    sizes = np.bincount(ids, minlength=k)
    assert (sizes > 0).all() and sizes.sum() == len(data)
    rep = grouper.describe()
    assert rep.num_groups == k and rep.num_rows == len(data) and rep.sizes == sizes.tolist()
    assert rep.size_min == sizes.min() and rep.size_max == sizes.max()
    assert rep.size_median == float(np.median(sizes))
    assert sum(rep.size_counts.values()) == k
    assert sum(s * c for s, c in rep.size_counts.items()) == len(data)
    assert rep.fingerprint == out1._fingerprint


def test_random_sizes_seed_and_replacing_group_column(data: Dataset) -> None:
    g = get_grouper("random", num_groups=7, seed=1)
    out = g.assign(data.add_column(GROUP_COLUMN, ["old"] * len(data)))
    sizes = np.bincount(out[GROUP_COLUMN])
    assert sizes.max() - sizes.min() <= 1 and len(sizes) == 7
    assert out.features[GROUP_COLUMN].dtype == "int64"
    assert out.column_names.count(GROUP_COLUMN) == 1
    other = get_grouper("random", num_groups=7, seed=2).assign(data)
    assert other[GROUP_COLUMN] != out[GROUP_COLUMN]
    assert other._fingerprint != out._fingerprint


def test_formatted_datasets(data: Dataset) -> None:
    """A torch-formatted dataset groups exactly like the plain one."""
    formatted = data.with_format("torch", columns=["label"], output_all_columns=True)
    for name, kw in [("stratified", {"num_groups": 4}), ("column", {"column": "label"})]:
        plain = get_grouper(name, **kw).assign(data)
        out = get_grouper(name, **kw).assign(formatted)
        assert out.with_format(None)[GROUP_COLUMN] == plain[GROUP_COLUMN]


def test_stratified_groups_are_pure_and_proportional(data: Dataset) -> None:
    g = get_grouper("stratified", num_groups=6)
    out = g.assign(data)
    labels, ids = np.asarray(out["label"]), np.asarray(out[GROUP_COLUMN])
    rep = g.describe()
    for gid in range(6):
        assert len(set(labels[ids == gid])) == 1
        assert rep.extra["class_of_group"][gid] == labels[ids == gid][0]
    counts = np.bincount(labels)
    shares = rep.extra["groups_per_class"]
    assert sum(shares.values()) == 6
    for c, s in shares.items():
        assert abs(s - 6 * counts[c] / len(data)) < 1 + 1e-9


def test_allocate_groups() -> None:
    assert allocate_groups({"a": 90, "b": 9, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    assert allocate_groups({0: 50, 1: 50}, 5) in ({0: 3, 1: 2}, {0: 2, 1: 3})
    assert allocate_groups({0: 10, 1: 4}, 4, "equal") == {0: 2, 1: 2}
    with pytest.raises(GroupingError, match=r"K=2 .* 3 label"):
        allocate_groups({0: 5, 1: 5, 2: 5}, 2, what="label")
    with pytest.raises(GroupingError, match=r"Class 1 has 2 rows .* K=6 .*n=12"):
        allocate_groups({0: 10, 1: 2}, 6, "equal")


# -- column grouper --------------------------------------------------------------------------------
def test_column_grouper_reproduces_mixture_of_sources() -> None:
    parts = []
    for i, (name, n) in enumerate([("wiki", 13), ("arxiv", 7), ("code", 21), ("books", 4)]):
        part = toy_dataset(n, seed=i)
        parts.append(part.add_column("source", [name] * n))
    mixed = concatenate_datasets(parts).shuffle(seed=0).flatten_indices()
    g = get_grouper("column", column="source", num_proc=2)
    out = g.assign(mixed)
    src, ids = out["source"], out[GROUP_COLUMN]
    values = g.describe().extra["values"]
    assert values == {0: "arxiv", 1: "books", 2: "code", 3: "wiki"}
    assert all(values[i] == s for i, s in zip(ids, src))
    sizes = dict(zip(*np.unique(ids, return_counts=True)))
    assert sizes == {0: 7, 1: 4, 2: 21, 3: 13}


def test_column_grouper_value_types_and_nulls() -> None:
    ds = Dataset.from_dict({"year": [2021, 2019, 2021, 2020], "tags": [[1, 2], [3], [1, 2], [3]]})
    g = ColumnGrouper(column="year")
    assert g.assign(ds)[GROUP_COLUMN] == [2, 0, 2, 1]
    assert g.describe().extra["values"] == {0: 2019, 1: 2020, 2: 2021}
    g = ColumnGrouper(column="tags")
    assert g.assign(ds)[GROUP_COLUMN] == [0, 1, 0, 1]
    assert g.describe().extra["values"] == {0: (1, 2), 1: (3,)}
    with pytest.raises(GroupingError, match=r"nulls at rows \[1\]"):
        ColumnGrouper(column="src").assign(Dataset.from_dict({"src": ["a", None, "b"]}))
    with pytest.raises(GroupingError, match="nulls at rows"):
        ColumnGrouper(column="x").assign(Dataset.from_dict({"x": [1.0, float("nan")]}))


# -- errors ---------------------------------------------------------------------------------------
def test_errors(data: Dataset, model: Any, task: Any) -> None:
    with pytest.raises(GroupingError, match="K=0"):
        get_grouper("random", num_groups=0)
    with pytest.raises(GroupingError, match="K=0"):
        get_grouper("grad-kmeans", num_groups=0)
    for name in ("random", "stratified", "kmeans-input"):
        with pytest.raises(GroupingError, match=r"K=61 .*n=60"):
            get_grouper(name, num_groups=61).assign(data)
    with pytest.raises(GroupingError, match=r"K=61 .*n=60"):
        get_grouper("kmeans-repr", num_groups=61).assign(data, model=model, task=task)
    with pytest.raises(GroupingError, match=r"K=2 .* 3 label"):
        get_grouper("kmeans-input", num_groups=2, per_class=True).assign(data)
    tiny = data.select(range(20)).map(lambda r, i: {"label": 2 if i == 0 else i % 2},
                                      with_indices=True)
    with pytest.raises(GroupingError, match=r"Label .*2.* has 1 rows .* K=6 .*n=20"):
        get_grouper("stratified", num_groups=6, allocation="equal").assign(tiny)
    with pytest.raises(GroupingError, match=r"max_size=3 .*K=2 .*n=60"):
        get_grouper("kmeans-input", num_groups=2, max_size=3).assign(data)
    with pytest.raises(MissingColumnError, match="'topic'"):
        get_grouper("stratified", label_column="topic").assign(data)
    with pytest.raises(MissingColumnError, match="'domain'"):
        get_grouper("column", column="domain").assign(data)
    with pytest.raises(MissingColumnError, match="'body'"):
        get_grouper("kmeans-input", columns=["body"]).assign(data)
    with pytest.raises(MissingColumnError, match="'topic'"):
        get_grouper("grad-kmeans", per_class=True, label_column="topic").assign(
            data, model=model, task=task)
    empty = data.select([])
    for name, kw in SPECS:
        with pytest.raises(EmptyDatasetError):
            _run(get_grouper(name, **kw), empty, model, task)
    with pytest.raises(ValueError, match=r"model=\.\.\., task="):
        get_grouper("kmeans-repr").assign(data)
    with pytest.raises(NotFittedError):
        get_grouper("random").describe()
    mixed = Dataset.from_dict({"text": ["a b", "c"], "x": [1.0, 2.0]})
    with pytest.raises(ColumnTypeError, match="mix text"):
        get_grouper("kmeans-input", num_groups=1, columns=["text", "x"]).assign(mixed)


# -- k-means options -------------------------------------------------------------------------------
def test_kmeans_on_tensor_columns_finds_blobs() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0] * 6, [10.0] * 6, [-10.0] * 3 + [10.0] * 3])
    truth = rng.integers(0, 3, 45)
    x = centers[truth] + rng.normal(size=(45, 6))
    ds = Dataset.from_dict({"m": x.reshape(45, 2, 3).tolist(), "s": truth.astype(float)})
    out = get_grouper("kmeans-input", num_groups=3, columns=["m"]).assign(ds)
    ids = np.asarray(out[GROUP_COLUMN])
    for c in range(3):  # same partition as the truth
        assert len(set(ids[truth == c])) == 1
    assert len(set(ids)) == 3
    both = get_grouper("kmeans-input", num_groups=3, columns=["m", "s"])
    both.assign(ds)
    assert both.describe().extra["feature_dim"] == 7


def test_balanced_cap_and_per_class(data: Dataset) -> None:
    g = get_grouper("kmeans-input", num_groups=7, balanced=True)
    sizes = np.bincount(g.assign(data)[GROUP_COLUMN])
    assert sorted(set(sizes)) == [8, 9] and sizes.sum() == 60
    g = get_grouper("kmeans-input", num_groups=6, max_size=12)
    sizes = np.bincount(g.assign(data)[GROUP_COLUMN])
    assert sizes.max() <= 12 and len(sizes) == 6 and sizes.min() >= 1
    g = get_grouper("kmeans-input", num_groups=6, per_class=True, vectorizer="hashing")
    out = g.assign(data)
    labels, ids = np.asarray(out["label"]), np.asarray(out[GROUP_COLUMN])
    assert all(len(set(labels[ids == k])) == 1 for k in range(6))
    assert set(g.describe().extra["groups_per_class"]) == {0, 1, 2}


def test_capped_assign_and_duplicates() -> None:
    rng = np.random.default_rng(1)
    dist = rng.random((23, 4))
    labels = capped_assign(dist, balanced=True)
    assert sorted(np.bincount(labels, minlength=4)) == [5, 6, 6, 6]
    labels = capped_assign(dist, cap=6)
    assert np.bincount(labels).max() <= 6
    # fewer distinct points than K: still K non-empty groups, deterministic
    x = np.repeat(np.eye(3), [5, 4, 3], axis=0)
    res = fit_kmeans(x, 5, seed=0)
    assert sorted(set(res.labels.tolist())) == [0, 1, 2, 3, 4]
    assert np.array_equal(res.labels, fit_kmeans(x, 5, seed=0).labels)
    assert res.labels[0] == 0  # numbered by first occurrence


def test_num_proc_matches_single_process(data: Dataset, model: Any, task: Any) -> None:
    for name, kw in [("random", {"num_groups": K}), ("stratified", {"num_groups": K}),
                     ("column", {"column": "source"}), ("kmeans-input", {"num_groups": K}),
                     ("grad-kmeans", {"num_groups": K, "batch_size": 8})]:
        one = _run(get_grouper(name, **kw), data, model, task)
        two = _run(get_grouper(name, num_proc=2, **kw), data, model, task)
        assert one[GROUP_COLUMN] == two[GROUP_COLUMN], name
        assert one._fingerprint == two._fingerprint, name  # num_proc is not a setting
    assert torch.get_num_threads() >= 1


# -- caching -------------------------------------------------------------------------------------
def _count(monkeypatch: pytest.MonkeyPatch, task: Any, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(task, method)

    def counted(model: Any, batch: Any) -> Any:
        calls.append(len(batch["input_ids"]))
        return original(model, batch)

    monkeypatch.setattr(task, method, counted)
    return calls


@pytest.mark.parametrize("name,method", [("kmeans-repr", "embed"),
                                         ("grad-kmeans", "output_gradient")])
def test_second_run_is_a_cache_hit_and_lora_change_is_not(
        name: str, method: str, data: Dataset, model: Any, task: Any, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data.save_to_disk(str(tmp_path / "ds"))
    ds = load_from_disk(str(tmp_path / "ds"))
    mine = copy.deepcopy(model)
    calls = _count(monkeypatch, task, method)
    first = get_grouper(name, num_groups=4, batch_size=16).assign(ds, model=mine, task=task)
    assert sum(calls) == len(ds)
    calls.clear()
    second = get_grouper(name, num_groups=4, batch_size=16).assign(ds, model=mine, task=task)
    assert calls == []  # features loaded from the datasets cache
    assert second[GROUP_COLUMN] == first[GROUP_COLUMN]
    assert second._fingerprint == first._fingerprint
    # K is not a feature setting: a new K reuses the cached features
    get_grouper(name, num_groups=3, batch_size=16).assign(ds, model=mine, task=task)
    assert calls == []
    lora = next(p for n, p in mine.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora[0, 0] += 0.5
    third = get_grouper(name, num_groups=4, batch_size=16).assign(ds, model=mine, task=task)
    assert sum(calls) == len(ds)  # recomputed
    assert third._fingerprint != first._fingerprint


def test_model_weights_hash(model: Any) -> None:
    mine = copy.deepcopy(model)
    before = {p: model_weights_hash(mine, p) for p in ("all", "trainable")}
    named = dict(mine.named_parameters())
    frozen = next(n for n, p in named.items() if not p.requires_grad)
    lora = next(n for n in named if "lora_A" in n)
    with torch.no_grad():
        named[lora][0, 0] += 1e-3
    after = {p: model_weights_hash(mine, p) for p in ("all", "trainable")}
    assert after["all"] != before["all"] and after["trainable"] != before["trainable"]
    with torch.no_grad():
        named[frozen].view(-1)[0] += 1e-3
    assert model_weights_hash(mine, "all") != after["all"]
    with pytest.raises(ValueError, match="params"):
        model_weights_hash(mine, "some")


def test_cache_dir_for_in_memory_datasets(data: Dataset, model: Any, task: Any, tmp_path: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count(monkeypatch, task, "embed")
    for _ in range(2):
        get_grouper("kmeans-repr", num_groups=3, cache_dir=str(tmp_path)).assign(
            data, model=model, task=task)
    assert sum(calls) == len(data)
    assert len(list(tmp_path.glob("ggda-features-*.arrow"))) == 1


# -- output-gradient features --------------------------------------------------------------------
def test_output_gradient_feature_is_head_weight_gradient(model: Any, task: Any,
                                                         data: Dataset) -> None:
    prepared = task.prepare(data.select(range(4)))
    batch = task.collate(prepared.select_columns(list(task.feature_columns))[:])
    with torch.no_grad():
        err, feats = task.output_gradient(model, batch)
    exact = OutputGradientProjector("none", bias=True)(err, feats)
    head = find_head(model)
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss = task.per_row_loss(model, one).sum()
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        want = torch.cat([gw, gb[:, None]], 1).reshape(-1)
        torch.testing.assert_close(exact[i], want, atol=1e-5, rtol=1e-4)
    dense = OutputGradientProjector("dense", projection_dim=8, seed=3)(err, feats)
    p = RandomProjector(exact.shape[1], 8, seed=3).matrix(torch.float32)
    torch.testing.assert_close(dense, exact @ p, atol=1e-5, rtol=1e-4)


def test_factorised_projection_on_causal_lm() -> None:
    tok = tiny_tokenizer("causal")
    lm = tiny_lora("gpt2", tok.vocab_size).eval()
    lm_task = CausalLMTask(tok, max_length=16)
    ds = toy_dataset(24, seed=5)
    prepared = lm_task.prepare(ds.select(range(3)))
    batch = lm_task.collate(prepared[:])
    with torch.no_grad():
        err, feats = lm_task.output_gradient(lm, batch)
    proj = OutputGradientProjector("auto", err_dim=4, feat_dim=5, seed=1, bias=False)
    got = proj(err, feats)
    assert got.shape == (3, 20)
    p1 = RandomProjector(err.shape[-1], 4, seed=1).matrix(torch.float32)
    p2 = RandomProjector(feats.shape[-1], 5, seed=2).matrix(torch.float32)
    for i in range(3):
        g = err[i].T @ feats[i]  # (V, h) head-weight gradient of row i
        torch.testing.assert_close(got[i], (p1.T @ g @ p2).reshape(-1), atol=1e-5, rtol=1e-4)
    g = get_grouper("grad-kmeans", num_groups=4, err_dim=4, feat_dim=4)
    ids = g.assign(ds, model=lm, task=lm_task)[GROUP_COLUMN]
    assert sorted(set(ids)) == [0, 1, 2, 3] and len(ids) == 24
    assert g.describe().extra["feature_dim"] == 16


# -- coherence -----------------------------------------------------------------------------------
def test_coherence_from_gradients_values() -> None:
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    res = coherence_from_gradients(g, [0, 0, 1, 1])
    c = 1 / math.sqrt(2)
    assert res.mean == pytest.approx((c + c + 1.0) / 3)  # zero row skipped
    assert res.per_group == pytest.approx({0: c, 1: 1.0}) and res.skipped == 1
    loo = coherence_from_gradients(g, [0, 0, 1, 1], exclude_self=True)
    assert loo.mean == pytest.approx(0.0) and loo.rows == 2
    assert coherence_from_gradients(g[:3], [0, 0, 0]).mean == pytest.approx(
        (3 + 1 + 3) / (3 * math.sqrt(10)))
    with pytest.raises(ValueError):
        coherence_from_gradients(g, [0, 1])
    assert sample_rows(10, None).tolist() == list(range(10))
    assert np.array_equal(sample_rows(50, 7, seed=1), sample_rows(50, 7, seed=1))


def test_group_coherence_and_describe(data: Dataset, model: Any, task: Any) -> None:
    engine = GradientEngine(model, task)
    g = get_grouper("random", num_groups=4)
    out = g.assign(data)
    res = group_coherence(engine, out, sample=25, seed=2)
    rows = sample_rows(len(out), 25, seed=2)
    grads = engine.per_example_gradients(out.select(rows)).gradients.double()
    ids = np.asarray(out[GROUP_COLUMN])[rows]
    want = []
    for i in range(len(rows)):
        total = grads[torch.as_tensor(ids == ids[i])].sum(0)
        want.append(float(torch.nn.functional.cosine_similarity(grads[i], total, dim=0)))
    assert res.sampled == 25 and res.rows == 25
    assert res.mean == pytest.approx(np.mean(want), rel=1e-6)
    rep = g.describe(engine, sample=25, seed=2)
    assert rep.coherence is not None and rep.coherence.mean == pytest.approx(res.mean)
    assert rep.to_dict()["coherence"]["mean"] == pytest.approx(res.mean)
    both = compare_groupings(engine, {"random": out, "label": out.map(
        lambda r: {GROUP_COLUMN: r["label"]})}, sample=25, seed=2)
    assert both["random"].mean == pytest.approx(res.mean)
    assert both["label"].mean > both["random"].mean
    with pytest.raises(MissingColumnError):
        group_coherence(engine, data)


# -- real data ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bbc_grad_kmeans_is_most_coherent() -> None:
    """BBC News, MiniLM-L6 + LoRA fine-tuned briefly: grad-kmeans > kmeans-repr > random."""
    from hf_ggda.data import load_bbc_news, load_minilm_classifier

    torch.manual_seed(0)
    bbc = load_bbc_news(limit=200, seed=0)
    lm, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8)
    bbc_task = SequenceClassificationTask(tokenizer, max_length=64)
    prepared = bbc_task.prepare(bbc).select_columns(list(bbc_task.feature_columns))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(200), 3))
    lm.train()
    for step in range(30):
        batch = bbc_task.collate(prepared[order[16 * step:16 * step + 16].tolist()])
        loss = bbc_task.per_row_loss(lm, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    grouped = {name: _run(get_grouper(name, num_groups=8), bbc, lm, bbc_task)
               for name in ("random", "kmeans-repr", "grad-kmeans")}
    coh = compare_groupings(GradientEngine(lm, bbc_task), grouped, sample=128, seed=0)
    assert coh["grad-kmeans"].mean > coh["kmeans-repr"].mean > coh["random"].mean, coh


def test_skewed_group_sizes_warn_with_the_fix() -> None:
    import numpy as np

    from hf_ggda.grouping.base import skew_warning

    skewed = np.array([182, 3, 3, 3, 2, 2, 1, 4])  # the README example's shape
    text = skew_warning(skewed)
    assert text is not None and "91% of the rows" in text and "--balanced" in text
    assert "max_size=50" in text  # twice the mean size
    assert "more even sizes" in (skew_warning(skewed, can_balance=False) or "")
    assert skew_warning(np.array([25] * 8)) is None
    assert skew_warning(np.array([30, 20, 25, 25, 22, 28, 24, 26])) is None
    assert skew_warning(np.array([100, 1, 1])) is None  # K < 4: nothing to compare


def test_cli_group_prints_the_skew_warning(tmp_path, capsys) -> None:
    from hf_ggda.cli import main
    from hf_ggda.testing import toy_dataset

    data = toy_dataset(30).add_column("src", [0] * 24 + [1, 2, 3, 4, 5, 6])
    data.save_to_disk(str(tmp_path / "d"))
    assert main(["group", "column", "--data", str(tmp_path / "d"), "--output",
                 str(tmp_path / "g"), "--column", "src"]) == 0
    err = capsys.readouterr().err
    assert "hf-ggda: warning: group sizes are very uneven" in err and "80% of the rows" in err
