"""Streams (IterableDataset): same group gradients as the in-memory engine, 1 or 2 processes."""

from __future__ import annotations

import os

import pytest
import torch

from hf_ggda.errors import EmptyDatasetError, GroupingError
from hf_ggda.gradients import (
    EngineConfig,
    GradientEngine,
    random_stream_groups,
    stream_group_gradients,
)
from hf_ggda.testing import toy_dataset

from .conftest import make_setup
from .test_distributed import _free_port
from .test_engine import grouped


def test_stream_equals_in_memory_engine(bert_setup):
    model, task = bert_setup
    ds = grouped()
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=5))
    ref = engine.group_gradients(ds)
    got = stream_group_gradients(engine, ds.to_iterable_dataset(num_shards=3), chunk_rows=11)
    assert got.group_ids == ref.group_ids and got.sizes.tolist() == ref.sizes.tolist()
    torch.testing.assert_close(got.gradients, ref.gradients, rtol=1e-6, atol=1e-12)


def test_stream_with_string_sources_and_random_groups(bert_setup):
    model, task = bert_setup
    ds = toy_dataset(20).add_column("source", ["web", "books", "news", "web"] * 5)
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4))
    ref = engine.group_gradients(ds, group_column="source")
    got = stream_group_gradients(engine, ds.to_iterable_dataset(), group_column="source")
    assert got.group_ids == ["books", "news", "web"]
    torch.testing.assert_close(got.gradients, ref.gradients, rtol=1e-6, atol=1e-12)
    stream = random_stream_groups(toy_dataset(20).to_iterable_dataset(), 4, seed=1)
    ids = [r["group_id"] for r in stream]
    assert ids == [r["group_id"] for r in random_stream_groups(
        toy_dataset(20).to_iterable_dataset(), 4, seed=1)]
    assert set(ids) <= {0, 1, 2, 3} and len(set(ids)) > 1
    with pytest.raises(GroupingError):
        random_stream_groups(toy_dataset(2).to_iterable_dataset(), 0)
    with pytest.raises(EmptyDatasetError):
        stream_group_gradients(engine, iter([]))


def _stream_worker(out_dir: str) -> None:
    from hf_ggda.distributed import rank_and_world

    torch.set_num_threads(1)
    rank, _ = rank_and_world()
    model, task = make_setup("bert", ("classifier",))
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4))
    got = stream_group_gradients(engine, grouped().to_iterable_dataset(num_shards=4))
    torch.save({"g": got.gradients, "sizes": got.sizes.tolist()},
               os.path.join(out_dir, f"r{rank}.pt"))


def test_stream_two_processes_equal_one(tmp_path):
    from accelerate import debug_launcher

    model, task = make_setup("bert", ("classifier",))
    ref = GradientEngine(model, task).group_gradients(grouped())
    os.environ["MASTER_PORT"] = _free_port()
    debug_launcher(_stream_worker, args=(str(tmp_path),), num_processes=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r{rank}.pt")
        assert got["sizes"] == ref.sizes.tolist()  # every row exactly once
        torch.testing.assert_close(got["g"], ref.gradients, rtol=0, atol=1e-8)
