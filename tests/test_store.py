"""Resumable gradient store: interruption, truncation, fingerprints; and its safety rules
(never touch files it did not write, a per-folder lock, shards that check their own index,
read-only reading). Paths that are files and untrusted manifests: tests/test_reliability.py."""

from __future__ import annotations

import builtins
import errno
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import hf_ggda.atomic as atomic_module
import hf_ggda.store as store_module
from hf_ggda.errors import (
    CorruptShardError,
    StoreChangedError,
    StoreFolderNotEmptyError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.store import GradientStore, atomic_write_bytes
from hf_ggda.store_guard import LOCK_NAME, request_hash

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


# -- safety: helpers ---------------------------------------------------------------------------
FP = {"model": "m0", "dataset": "d0"}


def _synthetic(path, fingerprint=None, num_shards=3, dim=4, seed=0, finish=True):
    """A small store written through the public API (no model): 2 groups per shard."""
    bounds = [(2 * i, 2 * i + 2) for i in range(num_shards)]
    store = GradientStore.create(path, fingerprint or FP, list(range(2 * num_shards)), bounds,
                                 dim, torch.float32, overwrite=True)
    data = torch.randn(2 * num_shards, dim, generator=torch.Generator().manual_seed(seed))
    for i, (a, b) in enumerate(bounds):
        store.write_shard(i, data[a:b])
    if finish:
        store.mark_complete()
    return store, data


def _create_args(num_shards=3, fingerprint=None):
    bounds = [(2 * i, 2 * i + 2) for i in range(num_shards)]
    return dict(fingerprint=fingerprint or FP, group_ids=list(range(2 * num_shards)),
                shard_bounds=bounds, dim=4, dtype=torch.float32)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: files with their bytes, folders as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _user_safetensors() -> bytes:
    return st_save({"weights": torch.ones(3)}, metadata={"owner": "me"})


# -- 1. files the store did not write ----------------------------------------------------------
def test_folder_of_user_files_without_manifest_is_refused_untouched(bert_setup, tmp_path):
    folder = tmp_path / "mine"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "shard-00000.safetensors").write_bytes(_user_safetensors())
    (folder / "shards" / "notes.txt").write_text("my notes")
    (folder / "results.csv").write_text("a,b\n1,2\n")
    before = _snapshot(folder)
    for write in (False, True):
        with pytest.raises(StoreFolderNotEmptyError) as info:
            GradientStore.create(folder, **_create_args(), overwrite=True, write=write)
        message = str(info.value)
        assert str(folder) in message and "empty folder" in message and "new path" in message
        assert "shards/shard-00000.safetensors" in message and "results.csv" in message
        assert isinstance(info.value, FileExistsError)
    with pytest.raises(StoreFolderNotEmptyError):
        engine(bert_setup).group_gradients(grouped(), store=str(folder), overwrite=True)
    assert _snapshot(folder) == before  # nothing deleted, overwritten or added (no lock file)


def test_overwrite_deletes_only_the_stores_own_shards(tmp_path):
    path = tmp_path / "s"
    _synthetic(path)
    user = {"notes.txt": b"keep me", "shards/mine.bin": b"\x00\x01",
            "shards/shard-00007.safetensors": _user_safetensors()}
    for name, data in user.items():
        (path / name).write_bytes(data)
    other = {"model": "m1", "dataset": "d0"}
    _, data = _synthetic(path, fingerprint=other, num_shards=2, seed=1)  # overwrite=True
    assert torch.equal(GradientStore.open(path).load(), data)
    assert not (path / "shards" / "shard-00002.safetensors").exists()  # the old store's own
    assert {name: (path / name).read_bytes() for name in user} == user
    before = _snapshot(path)
    with pytest.raises(StoreFolderNotEmptyError) as info:  # 8 shards would write shard-00007
        GradientStore.create(path, **_create_args(8, {"model": "m2"}), overwrite=True)
    assert "shards/shard-00007.safetensors" in str(info.value)
    assert "Move them out" in str(info.value) and "new path" in str(info.value)
    assert _snapshot(path) == before


# -- 3. shards check their own index -------------------------------------------------------------
def test_swapped_shards_are_detected_and_recomputed(bert_setup, tmp_path, monkeypatch):
    ds = grouped()
    full = engine(bert_setup).group_gradients(ds, store=str(tmp_path / "ref"))
    path = tmp_path / "s"
    engine(bert_setup).group_gradients(ds, store=str(path))
    one, two = (path / "shards" / f"shard-0000{i}.safetensors" for i in (1, 2))
    a, b = one.read_bytes(), two.read_bytes()
    store = GradientStore.open(path)
    assert store.read_shard(1).shape == store.read_shard(2).shape  # both valid, same shape
    one.write_bytes(b)
    two.write_bytes(a)
    store = GradientStore.open(path)
    with pytest.raises(CorruptShardError, match="swapped") as info:
        store.read_shard(1)
    assert "recomputed" in str(info.value)
    with pytest.raises(CorruptShardError, match="swapped"):
        store.load()
    assert store.missing_shards() == [1, 2]
    computed: list[int] = []
    shard_fn = GradientEngine._shard

    def counting(self, features, plan, bounds, *args):
        computed.append(plan.shards.index(bounds))
        return shard_fn(self, features, plan, bounds, *args)

    monkeypatch.setattr(GradientEngine, "_shard", counting)
    again = engine(bert_setup).group_gradients(ds, store=str(path))
    assert computed == [1, 2] and torch.equal(again.gradients, full.gradients)
    assert one.read_bytes() == a and two.read_bytes() == b


# -- 4. reading needs no write permission --------------------------------------------------------
def _chmod_denies_writes(tmp_path: Path) -> bool:
    """False as root (with CAP_DAC_OVERRIDE), where file modes deny nothing."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_bytes(b"")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    return False


def test_complete_store_in_read_only_folder_loads(tmp_path):
    if os.geteuid() == 0 and not _chmod_denies_writes(tmp_path):
        pytest.skip("root ignores file modes; test_reading_a_complete_store_makes_no_write_call "
                    "covers this case")
    path = tmp_path / "s"
    _, data = _synthetic(path)
    before = _snapshot(path)
    folders = [path, path / "shards"]
    try:
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(0o444)
        for f in folders:
            f.chmod(0o555)
        assert torch.equal(GradientStore.open(path).load(), data)
        store = GradientStore.create(path, **_create_args())  # resumes: nothing to write
        assert store.complete and store.missing_shards() == []
        store.mark_complete()
    finally:
        for f in folders:
            f.chmod(0o755)
    assert _snapshot(path) == before


def _forbid_writes_under(root: Path, monkeypatch) -> list[str]:
    """Make every write-like call on a path under ``root`` fail (and record it)."""
    root_s = str(root)
    attempts: list[str] = []

    def guard(path, what):
        if isinstance(path, (str, bytes, os.PathLike)) and \
                os.path.abspath(os.fsdecode(path)).startswith(root_s):
            attempts.append(f"{what} {path}")
            raise PermissionError(errno.EACCES, "read-only (test)", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            guard(file, f"open({mode!r})")
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            guard(path, "os.open")
        return real_os_open(path, flags, *args, **kwargs)

    def one_path(name, real):
        def fake(path, *args, **kwargs):
            guard(path, name)
            return real(path, *args, **kwargs)
        return fake

    def two_paths(name, real):
        def fake(src, dst, *args, **kwargs):
            guard(src, name)
            guard(dst, name)
            return real(src, dst, *args, **kwargs)
        return fake

    def fake_mkstemp(*args, dir=None, **kwargs):
        guard(dir or "", "mkstemp")
        return real_mkstemp(*args, dir=dir, **kwargs)

    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in ("unlink", "remove", "mkdir", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, one_path(f"os.{name}", getattr(os, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, two_paths(f"os.{name}", getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", one_path("rmtree", shutil.rmtree))
    monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)
    return attempts


def test_reading_a_complete_store_makes_no_write_call(bert_setup, tmp_path, monkeypatch):
    """Runs as root too: every write into the store folder is made to fail, and none happens."""
    path = tmp_path / "s"
    first = engine(bert_setup).group_gradients(grouped(), store=str(path))
    before = _snapshot(path)
    attempts = _forbid_writes_under(path, monkeypatch)
    with pytest.raises(PermissionError):  # the guard works
        (path / "probe").write_bytes(b"x")
    attempts.clear()
    assert torch.equal(GradientStore.open(path).load(), first.gradients)
    again = engine(bert_setup).group_gradients(grouped(), store=str(path))  # create + complete
    assert torch.equal(again.gradients, first.gradients)
    monkeypatch.undo()
    assert attempts == [] and _snapshot(path) == before


def test_incomplete_store_in_read_only_folder_raises_typed_error(tmp_path, monkeypatch):
    path = tmp_path / "s"
    _synthetic(path, finish=False)
    (path / "shards" / "shard-00002.safetensors").unlink()
    before = _snapshot(path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) in (
        path, path / "shards") else real_access(p, mode, *a, **k))
    with pytest.raises(StoreReadOnlyError) as info:
        GradientStore.create(path, **_create_args())
    assert "Make the folder writable" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, PermissionError)
    assert _snapshot(path) == before


def test_format_1_store_still_reads_and_resumes(tmp_path):
    path = tmp_path / "s"
    args = _create_args()
    manifest = {"format_version": 1, "fingerprint": args["fingerprint"],
                "group_ids": args["group_ids"], "shard_bounds": [list(b) for b in
                                                                 args["shard_bounds"]],
                "dim": 4, "dtype": "float32", "complete": False}  # no request hash in format 1
    atomic_write_bytes(path / "manifest.json", json.dumps(manifest).encode())
    store = GradientStore(path, manifest)
    data = torch.randn(6, 4)
    for i, (a, b) in enumerate(args["shard_bounds"]):
        store.write_shard(i, data[a:b])
    store.mark_complete()
    assert torch.equal(GradientStore.open(path).load(), data)
    resumed = GradientStore.create(path, **args)
    assert resumed.complete and resumed.missing_shards() == []


# -- 2. one writer at a time -------------------------------------------------------------------
def test_lock_held_by_another_process_raises_typed_error(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_TIMEOUT_S", 0.3)
    path = tmp_path / "s"
    store, _ = _synthetic(path, finish=False)
    (path / "shards" / "shard-00002.safetensors").unlink()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(path / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(path)
        with pytest.raises(StoreLockedError) as info:
            store.write_shard(2, torch.zeros(2, 4))
        assert str(path) in str(info.value) and "another store path" in str(info.value)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(StoreLockedError):
            GradientStore.create(path, **_create_args(fingerprint={"model": "x"}),
                                 overwrite=True)
        with pytest.raises(StoreLockedError):
            store.mark_complete()
        assert _snapshot(path) == before  # no shard, no temp file, manifest unchanged
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    store.write_shard(2, torch.zeros(2, 4))  # free again
    store.mark_complete()


def test_store_replaced_by_another_process_is_never_read_as_ours(tmp_path):
    path = tmp_path / "s"
    first, _ = _synthetic(path, finish=False)
    (path / "shards" / "shard-00002.safetensors").unlink()
    # meanwhile another process replaces the store with its own request and finishes it
    other, theirs = _synthetic(path, fingerprint={"model": "other"}, seed=5)
    before = _snapshot(path)
    for call in (lambda: first.write_shard(2, torch.zeros(2, 4)), first.mark_complete,
                 lambda: GradientStore.open(path, expect_request=first.request)):
        with pytest.raises(StoreChangedError) as info:
            call()
        assert "own path" in str(info.value)
    assert first.missing_shards() == [0, 1, 2]  # the other request's shards never verify
    assert _snapshot(path) == before
    assert torch.equal(GradientStore.open(path, expect_request=other.request).load(), theirs)


def _racer(path: str, seed: int, out: "multiprocessing.Queue") -> None:
    """One of two processes that write their own request into the same store, five times."""
    torch.set_num_threads(1)
    fingerprint = {"model": f"racer-{seed}"}
    data = torch.full((6, 4), float(seed))
    results = []
    for _ in range(5):
        try:
            store = GradientStore.create(path, **_create_args(fingerprint=fingerprint),
                                         overwrite=True)
            for i, (a, b) in enumerate(store.manifest["shard_bounds"]):
                if not store.has_shard(i):
                    store.write_shard(i, data[a:b])
                time.sleep(0.002)
            store.mark_complete()
            got = GradientStore.open(path, expect_request=store.request).load()
            results.append("ok" if torch.equal(got, data) else "WRONG")
        except (StoreChangedError, CorruptShardError) as err:
            results.append(type(err).__name__)
        except Exception as err:  # anything else is a failure of the contract
            results.append(f"unexpected {err!r}")
    out.put(results)


def test_two_processes_on_one_store_get_their_own_results_or_a_typed_error(tmp_path):
    path = str(tmp_path / "s")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(path, seed, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    flat = [r for rs in results for r in rs]
    assert len(flat) == 10 and "WRONG" not in flat
    assert all(r in ("ok", "StoreChangedError", "CorruptShardError") for r in flat), flat
    assert "ok" in flat
    final = GradientStore.open(path)
    if final.complete:  # whoever finished last: its own values, consistently
        values = final.load().unique().tolist()
        assert values in ([1.0], [2.0])


def test_stale_temp_files_are_removed_but_a_live_writers_are_kept(tmp_path):
    path = tmp_path / "s"
    _synthetic(path, finish=False)
    host = atomic_module.temp_prefix("x").split(".")[2]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"live": f"shards/.shard-00001.safetensors.{host}.{os.getpid()}.ab1.tmp",
             "dead": f"shards/.shard-00001.safetensors.{host}.{dead.pid}.ab2.tmp",
             "legacy": "shards/.shard-00002.safetensors.x.tmp",
             "other host, fresh": "shards/.shard-00002.safetensors.elsewhere.1.ab3.tmp",
             "other host, old": "shards/.shard-00002.safetensors.elsewhere.2.ab4.tmp",
             "manifest, dead": f".manifest.json.{host}.{dead.pid}.ab5.tmp"}
    for name in names.values():
        (path / name).write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(path / names["other host, old"], (old, old))
    GradientStore.create(path, **_create_args())  # resume: cleans up under the lock
    kept = {k for k, name in names.items() if (path / name).exists()}
    assert kept == {"live", "other host, fresh"}
    assert socket.gethostname()  # the host tag comes from it
    assert request_hash(json.loads((path / "manifest.json").read_text())) == \
        GradientStore.open(path).request
