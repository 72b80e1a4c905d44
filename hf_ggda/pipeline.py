"""The one owner of the data path: score a fitted attributor, and write / read run folders.

Dataset → Task → Grouper → engine → store → Attributor → result → columns is written out once,
here: :func:`score_queries` and :func:`score_self` turn a fitted attributor into a result and
the dataset columns, and :class:`RunWriter` is the only code that writes a run folder (the CLI,
the demo and the recipes go through it); :func:`read_run` is the only code that reads one back.

A run folder is written into a hidden staging sibling (``.NAME.partial-PID-…``) by the main
process only; ``run.json`` (format, version, the entries and their kinds, the config and the
result's fingerprints) is written last, and the staging folder is then renamed into place. A
killed run leaves at most a staging folder, which is never read; a folder without a valid
``run.json`` is never read as a run. An existing folder is replaced only when it is empty or
is itself a run folder (one this project wrote); a folder holding anything else is refused, so
no user file is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union

from datasets import Dataset, load_from_disk

from .atomic import atomic_write_bytes, save_dataset_atomic
from .distributed import barrier, rank_and_world
from .errors import RunFolderError
from .logging import get_logger

logger = get_logger(__name__)

MANIFEST = "run.json"
RUN_FORMAT = "hf_ggda.run"
RUN_VERSION = 1
KINDS = ("dataset", "scores", "self_influence", "folder", "file")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_PARTIAL = ".hf_ggda_partial"
PathLike = Union[str, "os.PathLike[str]"]


# -- the scoring path ----------------------------------------------------------------------------
def score_queries(attributor: Any, train: Dataset, queries: Dataset, *, group_column: str,
                  drill_down: int = 0, top_k: int = 5,
                  self_influence: bool = False) -> tuple[Any, Dataset, Dataset]:
    """Score a fitted attributor's groups against queries, drill down, and make the columns.

    Args:
        attributor: A fitted :class:`~hf_ggda.attributors.base.Attributor`.
        train: The training rows it was fitted on.
        queries: The query rows.
        group_column: Column of ``train`` holding the group ids.
        drill_down: Point scores for the rows of this many top groups (0: none).
        top_k: Groups listed per query in the query columns.
        self_influence: Also compute group self-influence.

    Returns:
        (``GroupScores``, training rows with their ``ggda_*`` columns, queries with theirs).

    Raises:
        GGDAError: From the attributor (not fitted, bad queries, non-finite scores).
    """
    result = attributor.score(queries, self_influence=self_influence)
    if drill_down:
        result = attributor.refine(result, top_k=drill_down, query_dataset=queries)
    return (result, result.to_dataset_columns(train, group_column=group_column),
            result.to_query_columns(queries, k=top_k))


def score_self(attributor: Any, train: Dataset, *, group_column: str,
               drill_down: int = 0) -> tuple[Any, Dataset]:
    """Group self-influence of a fitted attributor (no query axis) and its columns.

    Returns:
        (``SelfInfluence``, training rows with ``ggda_self_influence`` / ``ggda_self_rank``).

    Raises:
        GGDAError: From the attributor.
    """
    result = attributor.self_influence(drill_top=drill_down)
    return result, result.to_dataset_columns(train, group_column=group_column)


# -- writing ------------------------------------------------------------------------------------
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (MANIFEST, _PARTIAL):
        raise RunFolderError(f"Bad run entry name {name!r}: one plain file or folder name "
                             "(letters, digits, '_', '.', '-').")
    return name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_run(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


@dataclass
class RunWriter:
    """Write one run folder atomically (use as a context manager).

    Entries are added with :meth:`dataset`, :meth:`result`, :meth:`file`, :meth:`json` or
    :meth:`folder` (a staging path for writers such as ``save_pretrained``). On leaving the
    ``with`` block without an error, ``run.json`` is written and the folder moved into place;
    on an error the staging folder is removed and nothing is changed. Only the main process
    writes; the others get a scratch folder that is dropped, and every process waits at the end.

    Attributes:
        target: The run folder to write.
        kind: What wrote it (``"attribute"``, ``"demo"``, ``"recipe:noisy_labels"``, ...).
        config: Settings saved in ``run.json`` (JSON values).
    """

    target: Path
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    _stage: Optional[Path] = None
    _entries: list[dict[str, str]] = field(default_factory=list)
    _fingerprints: dict[str, Any] = field(default_factory=dict)
    _writer: bool = True

    def __post_init__(self) -> None:
        self.target = Path(self.target)

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> RunWriter:
        self._writer = rank_and_world()[0] == 0
        if not self._writer:
            self._stage = Path(tempfile.mkdtemp(prefix="hf_ggda_rank_scratch_"))
            return self
        self._check_target()
        self._drop_stale_partials()
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        stage = parent / f".{self.target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        (stage / _PARTIAL).write_text(str(os.getpid()))
        self._stage = stage
        return self

    def __exit__(self, kind: Optional[type[BaseException]], err: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        stage = self._stage
        self._stage = None
        if stage is None:
            return
        if kind is not None or not self._writer:
            shutil.rmtree(stage, ignore_errors=True)
            if kind is None:
                barrier()
            return
        self._write_manifest(stage)
        (stage / _PARTIAL).unlink()
        self._swap_in(stage)
        logger.info("Wrote run folder %s (%s).", self.target,
                    ", ".join(e["name"] for e in self._entries))
        barrier()

    def _check_target(self) -> None:
        t = self.target
        if t.exists() and not t.is_dir():
            raise RunFolderError(f"The output {str(t)!r} is a file, not a folder; pass a new "
                                 "--output path.")
        if t.is_dir() and not _is_run(t) and any(t.iterdir()):
            found = sorted(p.name for p in t.iterdir())[:5]
            raise RunFolderError(
                f"The output folder {str(t)!r} holds files hf_ggda did not write as a run "
                f"({', '.join(found)}{', ...' if len(found) == 5 else ''}); nothing is deleted. "
                "Pass a new or empty --output folder (or the folder of an earlier run, which "
                "is replaced).")

    def _drop_stale_partials(self) -> None:
        """Remove staging folders of this target left by killed runs (ours only)."""
        for old in self.target.parent.glob(f".{self.target.name}.partial-*"):
            marker = old / _PARTIAL
            try:
                pid = int(marker.read_text())
            except (OSError, ValueError):
                continue  # not ours, or not readable: leave it
            if not _alive(pid):
                shutil.rmtree(old, ignore_errors=True)

    def _write_manifest(self, stage: Path) -> None:
        from . import __version__

        manifest = {"format": RUN_FORMAT, "format_version": RUN_VERSION, "kind": self.kind,
                    "hf_ggda_version": __version__, "created": time.time(),
                    "entries": self._entries, "config": self.config,
                    "fingerprints": self._fingerprints}
        text = json.dumps(manifest, indent=1, allow_nan=False, default=str)
        atomic_write_bytes(stage / MANIFEST, text.encode())

    def _swap_in(self, stage: Path) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(stage, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- entries --------------------------------------------------------------------------------
    def _add(self, name: str, kind: str) -> Path:
        if self._stage is None:
            raise RunFolderError("Add entries inside `with RunWriter(...) as run:`.")
        _check_name(name)
        if any(e["name"] == name for e in self._entries):
            raise RunFolderError(f"The run entry {name!r} is written twice.")
        self._entries.append({"name": name, "kind": kind})
        return self._stage / name

    def dataset(self, name: str, data: Dataset) -> None:
        """Add a ``save_to_disk`` dataset."""
        path = self._add(name, "dataset")
        if self._writer:
            data.save_to_disk(str(path))

    def result(self, name: str, result: Any) -> None:
        """Add a ``GroupScores`` (kind ``scores``) or ``SelfInfluence`` result."""
        kind = "self_influence" if getattr(result, "query_mode", "") == "self" else "scores"
        path = self._add(name, kind)
        self._fingerprints.setdefault(name, getattr(result, "fingerprints", {}))
        if self._writer:
            result.save_pretrained(path)

    def file(self, name: str, content: Union[str, bytes]) -> None:
        """Add a file with this content."""
        path = self._add(name, "file")
        if self._writer:
            path.write_bytes(content.encode() if isinstance(content, str) else content)

    def json(self, name: str, value: Any) -> None:
        """Add a JSON file (NaN and infinities refused)."""
        self.file(name, json.dumps(value, indent=1, allow_nan=False, default=str))

    def attributor_config(self, config: Any) -> None:
        """Add the attributor's config as ``ggda_config.json`` (as ``save_pretrained`` does)."""
        from .config import CLASS_KEY, CONFIG_NAME

        self.json(CONFIG_NAME, {CLASS_KEY: type(config).__name__, **config.to_dict()})

    def written_by(self, write: Callable[[Path], Any]) -> Any:
        """Let ``write(folder)`` write files at the top of the run (e.g. a card's README.md and
        plots); each new file or folder becomes an entry.

        Returns:
            What ``write`` returns.
        """
        if self._stage is None:
            raise RunFolderError("Add entries inside `with RunWriter(...) as run:`.")
        before = {p.name for p in self._stage.iterdir()}
        value = write(self._stage)
        for path in sorted(self._stage.iterdir()):
            if path.name not in before:
                self._add(path.name, "folder" if path.is_dir() else "file")
        return value

    def folder(self, name: str, write: Optional[Callable[[Path], Any]] = None) -> Path:
        """Add a folder; ``write(path)`` (e.g. ``model.save_pretrained``) fills it.

        Returns:
            The staging path of the folder (a scratch path on processes that do not write).
        """
        path = self._add(name, "folder")
        path.mkdir(parents=True, exist_ok=True)
        if write is not None:
            write(path)
        return path


def write_dataset(data: Dataset, output: PathLike) -> Path:
    """Write one dataset (``hf-ggda group``'s output) atomically, from the main process only.

    Raises:
        OSError: The folder cannot be written.
    """
    out = Path(output)
    if rank_and_world()[0] == 0:
        save_dataset_atomic(data, out)
    barrier()
    return out


# -- reading ------------------------------------------------------------------------------------
@dataclass
class RunContents:
    """A run folder read back (every entry checked against ``run.json``).

    Attributes:
        folder: The run folder.
        kind: What wrote it.
        config: The settings saved with it.
        fingerprints: The results' fingerprints, by entry name.
        datasets: Datasets by entry name.
        results: ``GroupScores`` / ``SelfInfluence`` by entry name.
        paths: Paths of the ``file`` and ``folder`` entries, by name.
    """

    folder: Path
    kind: str
    config: dict[str, Any]
    fingerprints: dict[str, Any]
    datasets: dict[str, Dataset]
    results: dict[str, Any]
    paths: dict[str, Path]


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise RunFolderError(
            f"{str(folder)!r} is not a complete run folder (no {MANIFEST}): it was not written "
            "by this version of hf_ggda, or its run did not finish. Rerun the command that "
            "writes it.")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{str(path)!r} is not valid JSON ({err}); rerun the command "
                             "that wrote the run.") from err
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise RunFolderError(f"{str(path)!r} is not an hf_ggda run manifest.")
    if data.get("format_version") != RUN_VERSION:
        raise RunFolderError(f"{str(path)!r} has format_version "
                             f"{data.get('format_version')!r}; this hf_ggda reads version "
                             f"{RUN_VERSION} only. Rerun with this version.")
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and e.get("kind") in KINDS and isinstance(e.get("name"), str)
            for e in entries):
        raise RunFolderError(f"{str(path)!r} lists bad entries; rerun the command.")
    return data


def _entry_path(folder: Path, name: str) -> Path:
    _check_name(name)
    path = folder / name
    root = folder.resolve()
    if path.is_symlink() or path.resolve().parent != root or not path.exists():
        raise RunFolderError(f"Run entry {name!r} of {str(folder)!r} is missing or points "
                             "outside the folder; rerun the command that wrote it.")
    return path


def read_run(folder: PathLike) -> RunContents:
    """Read a run folder written by :class:`RunWriter`.

    Raises:
        RunFolderError: No (or a bad) ``run.json``, an unknown version, an entry missing or
            outside the folder.
        ScoresFileError: A result fails its checks.
    """
    from .scores import GroupScores
    from .self_influence import SelfInfluence

    root = Path(folder)
    data = _manifest(root)
    config, prints = data.get("config"), data.get("fingerprints")
    out = RunContents(folder=root, kind=str(data.get("kind", "")),
                      config=config if isinstance(config, dict) else {},
                      fingerprints=prints if isinstance(prints, dict) else {},
                      datasets={}, results={}, paths={})
    for entry in data["entries"]:
        name, kind = entry["name"], entry["kind"]
        path = _entry_path(root, name)
        if kind == "dataset":
            loaded = load_from_disk(str(path))
            if not isinstance(loaded, Dataset):
                raise RunFolderError(f"Run entry {name!r} is not one dataset split.")
            out.datasets[name] = loaded
        elif kind in ("scores", "self_influence"):
            loader = GroupScores if kind == "scores" else SelfInfluence
            out.results[name] = loader.from_pretrained(path)
        else:
            out.paths[name] = path
    return out
