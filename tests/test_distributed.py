"""Multi-process (2 CPU processes, gloo) equals single-process, via accelerate.debug_launcher."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch.multiprocessing.spawn import ProcessException

from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.testing import toy_dataset

from .conftest import make_setup
from .test_engine import grouped

N_ROWS = 37


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _scores(model, task) -> dict:
    """Identity and EK-FAC influence scores (EK-FAC statistics fitted on each process's share
    of the batches, then summed) of 6 queries against the K = 5 groups."""
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction

    queries = toy_dataset(6, seed=11)
    out = {}
    for name, extra in (("identity", {}), ("ekfac", {"damping": 1e-3})):
        attributor = InfluenceFunction(model, task, InfluenceConfig(
            preconditioner=name, batch_size=4, **extra)).fit(grouped(N_ROWS))
        out[name] = attributor.score(queries).matrix
    # factorised vectors, Grad-K-Means inside the pass, EK-FAC from the kept per-row vectors:
    # the features, factors and eigenvalues are each summed over the processes' rows
    from hf_ggda.grouping import GradKMeansGrouper

    one_pass = InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="ekfac", damping=1e-3, batch_size=4, factorised_dim=2)).fit(
        toy_dataset(N_ROWS, seed=3), grouper=GradKMeansGrouper(num_groups=5, seed=0))
    out["ekfac-factorised-one-pass"] = one_pass.score(queries).matrix
    return out


def _curvature_batches(model, task) -> int:
    """Batches of the curvature fit this process takes (of 10 batches of 4 rows)."""
    from hf_ggda.curvature import CurvatureContext

    ctx = CurvatureContext(GradientEngine(model, task, config=EngineConfig(batch_size=4)),
                           grouped(N_ROWS))
    return sum(1 for _ in ctx.batches(this_process=True))


def _worker(out_dir: str, use_store: bool) -> None:
    from hf_ggda.distributed import rank_and_world

    # forked after the parent used torch's thread pool: one thread avoids an OpenMP deadlock
    torch.set_num_threads(1)

    rank, world = rank_and_world()
    model, task = make_setup("bert", ("classifier",))
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4, shard_rows=6))
    store = os.path.join(out_dir, "store") if use_store else None
    result = engine.group_gradients(grouped(N_ROWS), store=store)
    point = engine.per_example_gradients(grouped(N_ROWS))
    torch.save({"group": result.gradients, "point": point.gradients, "world": world,
                "sizes": result.sizes.tolist(), "scores": _scores(model, task),
                "curvature_batches": _curvature_batches(model, task)},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("use_store", [False, True])
def test_two_processes_equal_one(tmp_path, use_store):
    from accelerate import debug_launcher

    model, task = make_setup("bert", ("classifier",))
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4, shard_rows=6))
    single = engine.group_gradients(grouped(N_ROWS))
    single_point = engine.per_example_gradients(grouped(N_ROWS))
    single_scores = _scores(model, task)
    os.environ["MASTER_PORT"] = _free_port()
    debug_launcher(_worker, args=(str(tmp_path), use_store), num_processes=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2
        assert sum(got["sizes"]) == N_ROWS  # every row counted exactly once
        torch.testing.assert_close(got["group"], single.gradients, rtol=0, atol=1e-8)
        torch.testing.assert_close(got["point"], single_point.gradients, rtol=0, atol=1e-8)
        assert got["curvature_batches"] == 5  # 10 batches of 4 rows, split in two
        for name, matrix in single_scores.items():  # EK-FAC: statistics summed over ranks
            torch.testing.assert_close(got["scores"][name], matrix, rtol=1e-8, atol=1e-8)
    if use_store:
        shards = sorted(p.name for p in (tmp_path / "store" / "shards").iterdir())
        assert all(name.endswith(".safetensors") for name in shards)  # no temp files left


def _dying_worker(out_dir: str) -> None:
    from hf_ggda.distributed import rank_and_world
    from hf_ggda.store import GradientStore

    torch.set_num_threads(1)
    rank, _ = rank_and_world()
    original = GradientStore.write_shard

    def write_then_die(self, index, grads):
        if rank == 1 and index >= 3:  # rank 1 dies mid-shard: a temp file and no shard
            tmp = self.shard_path(index).parent / f".{self.shard_path(index).name}.x.tmp"
            tmp.write_bytes(b"half a shard")
            raise RuntimeError("rank 1 killed")
        original(self, index, grads)

    GradientStore.write_shard = write_then_die
    model, task = make_setup("bert", ("classifier",))
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4, shard_rows=6))
    engine.group_gradients(grouped(N_ROWS), store=os.path.join(out_dir, "store"))


def test_killed_rank_leaves_no_half_shard_and_rerun_resumes(tmp_path):
    from accelerate import debug_launcher

    from hf_ggda.store import GradientStore

    model, task = make_setup("bert", ("classifier",))
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4, shard_rows=6))
    reference = engine.group_gradients(grouped(N_ROWS), store=str(tmp_path / "ref"))
    os.environ["MASTER_PORT"] = _free_port()
    # the launcher re-raises the worker's failure (rank 1's RuntimeError, or an exited rank)
    with pytest.raises(ProcessException):
        debug_launcher(_dying_worker, args=(str(tmp_path),), num_processes=2)
    store = GradientStore.open(tmp_path / "store")
    assert not store.complete
    present = [i for i in range(store.num_shards) if store.shard_path(i).exists()]
    assert 3 not in present and store.missing_shards()  # the dying shard never landed
    for i in present:  # every shard on disk is whole
        torch.testing.assert_close(store.read_shard(i), GradientStore.open(
            tmp_path / "ref").read_shard(i), rtol=0, atol=0)
    resumed = engine.group_gradients(grouped(N_ROWS), store=str(tmp_path / "store"))
    assert torch.equal(resumed.gradients, reference.gradients)
    assert not list((tmp_path / "store" / "shards").glob(".*.tmp"))
