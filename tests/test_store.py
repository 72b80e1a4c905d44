"""Resumable gradient store: interruption, truncation, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from hf_ggda.errors import CorruptShardError, StoreMismatchError, StoreNotFoundError
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.store import GradientStore

from .test_engine import grouped


class Boom(RuntimeError):
    pass


def engine(setup, **kw):
    model, task = setup
    return GradientEngine(model, task, config=EngineConfig(shard_rows=8, **kw))


def test_interrupted_store_resumes_only_missing_shards(bert_setup, tmp_path, monkeypatch):
    ds = grouped()
    full = engine(bert_setup).group_gradients(ds, store=str(tmp_path / "ref"))
    ref_files = {p.name: p.read_bytes() for p in (tmp_path / "ref" / "shards").iterdir()}
    assert len(ref_files) == 4  # groups of 8,7,7,7,7,1 rows in shards of >= 8 rows

    calls: list[int] = []
    original = GradientStore.write_shard

    def failing(self, index, grads):
        if len(calls) == 2:
            raise Boom("killed")
        calls.append(index)
        original(self, index, grads)

    monkeypatch.setattr(GradientStore, "write_shard", failing)
    with pytest.raises(Boom):
        engine(bert_setup).group_gradients(ds, store=str(tmp_path / "s"))
    monkeypatch.setattr(GradientStore, "write_shard", original)
    store = GradientStore.open(tmp_path / "s")
    assert not store.complete
    with pytest.raises(CorruptShardError, match="incomplete"):
        store.load()
    assert store.missing_shards() == [2, 3]

    computed: list[int] = []
    shard_fn = GradientEngine._shard

    def counting(self, features, plan, bounds, *args):
        computed.append(plan.shards.index(bounds))
        return shard_fn(self, features, plan, bounds, *args)

    monkeypatch.setattr(GradientEngine, "_shard", counting)
    resumed = engine(bert_setup).group_gradients(ds, store=str(tmp_path / "s"))
    assert computed == [2, 3]
    assert torch.equal(resumed.gradients, full.gradients)
    files = {p.name: p.read_bytes() for p in (tmp_path / "s" / "shards").iterdir()}
    assert files == ref_files  # bit-identical shards, no temp files left
    computed.clear()
    reused = engine(bert_setup, batch_size=3).group_gradients(ds, store=str(tmp_path / "s"))
    assert computed == [] and torch.equal(reused.gradients, full.gradients)


def test_truncated_shard_is_detected_and_recomputed(bert_setup, tmp_path):
    ds = grouped()
    path = tmp_path / "s"
    full = engine(bert_setup).group_gradients(ds, store=str(path))
    shard = path / "shards" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError):
        GradientStore.open(path).read_shard(1)
    again = engine(bert_setup).group_gradients(ds, store=str(path))
    assert torch.equal(again.gradients, full.gradients)
    assert shard.read_bytes() == data


def test_flipped_byte_fails_checksum(bert_setup, tmp_path):
    path = tmp_path / "s"
    engine(bert_setup).group_gradients(grouped(), store=str(path))
    shard = path / "shards" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert GradientStore.open(path).missing_shards() == [0]


def test_store_from_another_request_is_refused(bert_setup, tmp_path):
    ds = grouped()
    path = str(tmp_path / "s")
    engine(bert_setup).group_gradients(ds, store=path)
    other = grouped().map(lambda r: {"group_id": r["group_id"] % 2})
    with pytest.raises(StoreMismatchError) as err:
        engine(bert_setup).group_gradients(other, store=path)
    assert "grouping" in str(err.value) and "overwrite=True" in str(err.value)
    model, _ = bert_setup
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.1)
    with pytest.raises(StoreMismatchError, match="model"):
        engine(bert_setup).group_gradients(ds, store=path)
    redone = engine(bert_setup).group_gradients(ds, store=path, overwrite=True)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["group_ids"]) == len(redone.group_ids)


def test_missing_store_path_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        GradientStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="not a gradient store"):
        GradientStore.open(tmp_path / "empty")


def test_shard_from_another_request_never_verifies(bert_setup, tmp_path):
    ds = grouped()
    engine(bert_setup).group_gradients(ds, store=str(tmp_path / "a"))
    other = ds.map(lambda r: {"group_id": r["group_id"] if r["group_id"] != 9 else 4})
    engine(bert_setup).group_gradients(other, store=str(tmp_path / "b"))
    # same shape, valid checksum, but written for the other request
    shard = "shards/shard-00000.safetensors"
    (tmp_path / "b" / shard).write_bytes((tmp_path / "a" / shard).read_bytes())
    store = GradientStore.open(tmp_path / "b")
    with pytest.raises(CorruptShardError, match="request"):
        store.read_shard(0)
