"""hf_ggda.atomic: the atomic writers every module shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_ggda import store_guard
from hf_ggda.atomic import atomic_write_bytes, save_dataset_atomic, temp_prefix
from hf_ggda.integrations import hub
from hf_ggda.testing import toy_dataset


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_temp_names_are_the_ones_a_store_recognises() -> None:
    # a gradient store tells its own leftovers by this prefix (hf_ggda.store_guard)
    from hf_ggda import atomic

    assert store_guard.host_tag is atomic.host_tag  # one copy, shared with the store
    assert temp_prefix("x").startswith(".x.") and temp_prefix("x").endswith(f".{os.getpid()}.")


def test_save_dataset_atomic_replaces_a_folder(tmp_path: Path) -> None:
    from datasets import load_from_disk

    out = save_dataset_atomic(toy_dataset(4), tmp_path / "rows")
    save_dataset_atomic(toy_dataset(6, seed=1), out)
    assert len(load_from_disk(str(out))) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["rows"]
    assert hub.save_dataset_atomic is save_dataset_atomic  # the old import path still works
