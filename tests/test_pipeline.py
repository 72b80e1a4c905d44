"""hf_ggda.pipeline: the one writer and reader of run folders (atomic, untrusted on read)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from hf_ggda.errors import RunFolderError
from hf_ggda.pipeline import MANIFEST, RunWriter, read_run
from hf_ggda.scores import GroupScores


def _scores() -> GroupScores:
    return GroupScores(matrix=torch.arange(6.0).reshape(2, 3), group_ids=[0, 1, 2],
                       query_ids=[0, 1], fingerprints={"model": "abc"})


def _write(target: Path, rows: int = 4) -> None:
    with RunWriter(target, kind="test", config={"k": 3}) as run:
        run.dataset("train", Dataset.from_dict({"x": list(range(rows))}))
        run.result("scores", _scores())
        run.json("summary.json", {"rows": rows})
        run.folder("card", lambda p: (p / "README.md").write_text("# card"))


def test_a_run_reads_back_whole(tmp_path: Path) -> None:
    _write(tmp_path / "run")
    got = read_run(tmp_path / "run")
    assert got.kind == "test" and got.config == {"k": 3}
    assert got.datasets["train"]["x"] == [0, 1, 2, 3]
    assert torch.equal(got.results["scores"].matrix, _scores().matrix)
    assert got.fingerprints["scores"] == {"model": "abc"}
    assert json.loads(got.paths["summary.json"].read_text()) == {"rows": 4}
    assert (got.paths["card"] / "README.md").read_text() == "# card"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left


def test_rewriting_a_run_replaces_it_but_user_folders_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "run", rows=4)
    _write(tmp_path / "run", rows=7)  # an earlier run is replaced
    assert len(read_run(tmp_path / "run").datasets["train"]) == 7
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match=r"did not write.*nothing is deleted"):
        _write(mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        _write(tmp_path / "afile")


def test_an_error_inside_the_block_changes_nothing(tmp_path: Path) -> None:
    _write(tmp_path / "run", rows=4)
    with pytest.raises(ZeroDivisionError), RunWriter(tmp_path / "run", kind="test") as run:
        run.dataset("train", Dataset.from_dict({"x": [9]}))
        _ = 1 / 0
    assert read_run(tmp_path / "run").datasets["train"]["x"] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _slow_writer(target: str) -> None:
    with RunWriter(Path(target), kind="test") as run:
        run.dataset("train", Dataset.from_dict({"x": [1, 2]}))
        Path(target + ".started").write_text("1")
        time.sleep(60)  # killed here, before run.json is written
        run.json("summary.json", {})


def test_a_killed_write_is_never_read_as_a_run(tmp_path: Path) -> None:
    target = tmp_path / "run"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(str(target),))
    proc.start()
    deadline = time.time() + 120
    while not Path(str(target) + ".started").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not target.exists()  # nothing at the run's path; the staging folder is hidden
    staged = list(tmp_path.glob(".run.partial-*"))
    assert len(staged) == 1
    with pytest.raises(RunFolderError, match=r"does not exist|not a complete run"):
        read_run(target)
    with pytest.raises(RunFolderError, match="not a complete run"):
        read_run(staged[0])  # a staging folder has no run.json either
    _write(target)  # the next write completes and clears the dead writer's staging folder
    assert read_run(target).datasets["train"]["x"] == [0, 1, 2, 3]
    assert not list(tmp_path.glob(".run.partial-*"))


@pytest.mark.parametrize("edit, message", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: json.dumps({**m, "format_version": 99}), "format_version 99"),
    (lambda m: json.dumps({**m, "format": "other"}), "not an hf_ggda run manifest"),
    (lambda m: json.dumps({**m, "entries": [{"name": "../outside", "kind": "file"}]}),
     "Bad run entry name"),
    (lambda m: json.dumps({**m, "entries": [{"name": "/etc", "kind": "folder"}]}),
     "Bad run entry name"),
    (lambda m: json.dumps({**m, "entries": [{"name": "gone", "kind": "dataset"}]}),
     "missing or points outside"),
    (lambda m: json.dumps({**m, "entries": [{"name": "train", "kind": "exe"}]}), "bad entries"),
])
def test_a_hand_edited_manifest_is_refused(tmp_path: Path, edit, message: str) -> None:
    _write(tmp_path / "run")
    path = tmp_path / "run" / MANIFEST
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(RunFolderError, match=message):
        read_run(tmp_path / "run")


def test_an_entry_that_links_outside_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "run")
    (tmp_path / "secret").mkdir()
    card = tmp_path / "run" / "card"
    for p in card.iterdir():
        p.unlink()
    card.rmdir()
    card.symlink_to(tmp_path / "secret")
    with pytest.raises(RunFolderError, match="outside the folder"):
        read_run(tmp_path / "run")
