"""Atomic writes: a reader sees the old complete file (or folder) or the new one, never half.

The one home of the atomic writers (bottom layer: it imports only :mod:`hf_ggda.errors`).
Files go through a temp file in the same folder, flushed to disk and moved into place with
``os.replace``; dataset folders are saved into a temporary sibling folder and then
renamed into place, and only over a folder an earlier save wrote (or an empty one).

Temp files are named ``.<target>.<host>.<pid>.<random>.tmp``: the host and process in the
name let a gradient store (:mod:`hf_ggda.store_guard`) tell its own leftovers from other
people's files.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .errors import OutputPathError

__all__ = ["OUTPUT_MARKER", "atomic_write_bytes", "host_tag", "save_dataset_atomic",
           "temp_prefix", "write_temp"]

#: Written into every dataset folder :func:`save_dataset_atomic` saves: only a folder that
#: carries it (or an empty one) is ever replaced, so a user's own folder is never deleted.
OUTPUT_MARKER = ".hf_ggda_output"


def host_tag() -> str:
    """This machine's name as it appears in temp-file names.

    Returns:
        The host name with every character other than letters, digits and ``-`` replaced.
    """
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_prefix(target: str) -> str:
    """Prefix of the temp files written for ``target``: names the writing host and process.

    Args:
        target: File name the temp file will be moved to.

    Returns:
        ``.<target>.<host>.<pid>.`` (``mkstemp`` adds a random part and ``.tmp``).
    """
    return f".{target}.{host_tag()}.{os.getpid()}."


def write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a fresh temp file beside ``path`` (flushed to disk); return its name.

    Raises:
        OSError: The write failed; no temp file is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; use the usual mode
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace`` (no partial files).

    Raises:
        OSError: The write failed (e.g. disk full); the previous file, if any, is untouched.
    """
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything at ``target`` that hf_ggda did not write.

    Raises:
        OutputPathError: ``target`` is a file or a link, or a non-empty folder without the
            :data:`OUTPUT_MARKER` of an earlier hf_ggda save.
    """
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputPathError(
            f"The output path {str(target)!r} exists and is not a folder hf_ggda wrote (it is "
            "a file or a link). hf_ggda never deletes what it did not write: move it away or "
            "choose another output folder.")
    entries = sorted(os.listdir(target))
    if entries and OUTPUT_MARKER not in entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more"
                                          if len(entries) > 6 else "")
        raise OutputPathError(
            f"The output folder {str(target)!r} already holds files hf_ggda did not write "
            f"({shown}); saving there would delete them. hf_ggda never deletes what it did not "
            "write: move the folder away or choose another output folder.")


def save_dataset_atomic(dataset: Any, path: str | os.PathLike[str]) -> Path:
    """``save_to_disk`` into a temporary sibling folder, then move it into place.

    A reader never sees a half-written folder under ``path``: it sees the old complete folder,
    nothing (for the instant between the two renames when replacing), or the new one. Only a
    folder an earlier call wrote (it carries :data:`OUTPUT_MARKER`) or an empty one is
    replaced.

    Args:
        dataset: The rows to save (a ``datasets.Dataset``).
        path: Target folder.

    Returns:
        The target folder.

    Raises:
        OutputPathError: ``path`` is a file, a link, or a folder of files hf_ggda did not
            write (nothing is written then).
        OSError: The folder cannot be written; a previous folder at ``path`` is kept.
    """
    target = Path(path)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / OUTPUT_MARKER).write_text("Saved by hf_ggda (save_dataset_atomic); a later save "
                                         "may replace this folder.\n")
        _check_replaceable(target)  # again: another process may have put files there
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
