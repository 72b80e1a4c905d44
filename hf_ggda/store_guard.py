"""What a gradient-store folder may hold, and the checks that keep other people's files safe.

:mod:`hf_ggda.store` builds on these rules:

* **Ownership.** The store only deletes or replaces files it wrote itself: ``manifest.json``,
  its lock file, shards named ``shards/shard-NNNNN.safetensors`` that the manifest lists or
  whose safetensors header carries the store's ``ggda`` record, and its own temp files
  (``.<name>.<host>.<pid>.<random>.tmp``). Anything else in the folder is *foreign*: a folder
  with foreign files and no manifest is refused, and foreign files are never touched.
* **Manifests are untrusted input.** A manifest read back is checked against a schema, its
  format version must be known, and (format 2 on) it must match its own request hash, so bad
  JSON, an unknown version or a hand edit raises :class:`~hf_ggda.errors.ManifestError`.
* **One writer at a time.** Every change of a store's state happens under a per-folder
  ``filelock`` lock held for a short critical section only (never across a collective), so
  the ranks of one distributed run write their shards side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock, Timeout
from safetensors import safe_open

from .atomic import host_tag
from .errors import (
    ManifestError,
    StoreLockedError,
    StorePathError,
    StoreReadOnlyError,
)
from .fingerprint import hash_json

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
LOCK_NAME = ".ggda-store.lock"
#: 2: the manifest records its own request hash. 1 (no hash) is still read and resumed.
FORMAT_VERSION = 2
KNOWN_VERSIONS = (1, 2)
#: Fields that define what a store holds; two manifests with equal fields are one request.
CONTENT_KEYS = ("fingerprint", "group_ids", "shard_bounds", "dim", "dtype")
DTYPES = ("float16", "bfloat16", "float32", "float64")
#: A temp file of another host's writer is only removed once it is this old (seconds).
STALE_TEMP_S = 3600.0

_SHARD_RE = re.compile(r"shard-(\d{5})\.safetensors")
_OWNER_RE = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


def _fix(path: Path) -> str:
    return (f"If {str(path)!r} is a gradient store you no longer need, delete that folder and "
            "rerun; otherwise pass another (new or empty) store path.")


def request_hash(manifest: dict[str, Any]) -> str:
    """Hash of everything a manifest says except its mutable ``complete`` flag and the hash.

    Args:
        manifest: A manifest dict.

    Returns:
        The hash that the manifest (format 2) and each of its shards carry.
    """
    return hash_json({k: v for k, v in manifest.items() if k not in ("complete", "request")})


def check_store_path(path: Path) -> None:
    """Refuse a store path that is a file or lies under a file.

    Args:
        path: The store folder (it need not exist).

    Raises:
        StorePathError: ``path`` or one of its existing ancestors is not a folder.
    """
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        where = "" if probe == path else f" (it lies under {str(probe)!r}, which is a file)"
        raise StorePathError(
            f"The store path {str(path)!r} is not a folder{where}: a gradient store is a "
            "folder. Pass a new path or an empty folder; the file is left as it is.")


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """Read and validate the manifest of the store at ``path``.

    Args:
        path: The store folder.

    Returns:
        The manifest, or None if the folder holds none.

    Raises:
        ManifestError: The manifest is not a file, not JSON, of an unknown format version, or
            fails the schema or its own hash.
    """
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        return None
    if mpath.is_symlink() or not mpath.is_file():
        raise ManifestError(f"{str(mpath)!r} is not a regular file, so it is no manifest "
                            f"hf_ggda wrote. {_fix(path)}")
    try:
        obj = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"The store manifest {str(mpath)!r} is not valid JSON ({err}); "
                            f"hf_ggda never replaces a file it cannot read. {_fix(path)}") from err
    return validate_manifest(obj, mpath)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _schema_problem(obj: dict[str, Any], version: int) -> Optional[str]:
    """The first way ``obj`` breaks the manifest schema, or None."""
    required = {"format_version", "complete", *CONTENT_KEYS} | ({"request"} if version >= 2
                                                                  else set())
    if required - obj.keys():
        return f"lacks the fields {sorted(required - obj.keys())}"
    if obj.keys() - required:
        return f"has fields no hf_ggda manifest has: {sorted(obj.keys() - required)}"
    ids = obj["group_ids"]
    bounds = obj["shard_bounds"]
    if not isinstance(obj["fingerprint"], dict):
        return "has a fingerprint that is not an object"
    if not isinstance(ids, list) or not all(_is_int(g) or isinstance(g, str) for g in ids):
        return "has group_ids that are not a list of integers and strings"
    if len({(type(g).__name__, g) for g in ids}) != len(ids):
        return "has duplicate group_ids"
    if not isinstance(bounds, list) or not all(
            isinstance(b, list) and len(b) == 2 and all(map(_is_int, b)) for b in bounds):
        return "has shard_bounds that are not a list of [start, stop] integer pairs"
    edges = [0] + [b for pair in bounds for b in pair] + [len(ids)]
    if any(edges[i] != edges[i + 1] for i in range(0, len(edges), 2)) or \
            any(start >= stop for start, stop in bounds):
        return (f"has shard_bounds {bounds[:3]}{'...' if len(bounds) > 3 else ''} that do not "
                f"cut the {len(ids)} groups into consecutive, non-empty shards")
    if not _is_int(obj["dim"]) or obj["dim"] < 1:
        return f"has dim {obj['dim']!r}, not a positive integer"
    if obj["dtype"] not in DTYPES:
        return f"has dtype {obj['dtype']!r}, not one of {list(DTYPES)}"
    if not isinstance(obj["complete"], bool):
        return f"has complete = {obj['complete']!r}, not true or false"
    return None


def validate_manifest(obj: Any, mpath: Path) -> dict[str, Any]:
    """Check a parsed manifest against the schema of the format version it names.

    Args:
        obj: The parsed JSON.
        mpath: Where it was read (for the message).

    Returns:
        ``obj``, now known to be a well-formed manifest.

    Raises:
        ManifestError: Unknown format version, schema violation or a request-hash mismatch.
    """
    where = f"The store manifest {str(mpath)!r}"
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} is not a JSON object. {_fix(mpath.parent)}")
    version = obj.get("format_version")
    if not _is_int(version) or version not in KNOWN_VERSIONS:
        raise ManifestError(
            f"{where} has format_version {version!r}; this hf_ggda reads versions "
            f"{list(KNOWN_VERSIONS)} only (a newer hf_ggda wrote it, or it was edited by "
            f"hand). Upgrade hf_ggda to read it. {_fix(mpath.parent)}")
    problem = _schema_problem(obj, version)
    if problem is None and version >= 2 and obj["request"] != request_hash(obj):
        problem = ("does not match its own request hash: it was edited by hand after "
                   "hf_ggda wrote it")
    if problem is not None:
        raise ManifestError(f"{where} {problem}. Restore the file hf_ggda wrote, or: "
                            f"{_fix(mpath.parent)}")
    return obj


def is_tagged_shard(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose header carries the store's ``ggda`` record.

    Args:
        path: A file named like a shard.

    Returns:
        True for a shard some gradient store wrote (only its header is read).
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("ggda", "null"))
    except Exception:  # not safetensors (or unreadable): not a file the store can vouch for
        return False
    return isinstance(meta, dict) and {"checksum", "shard", "request"} <= meta.keys()


def _is_own_temp(name: str, top: bool) -> bool:
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    if top:
        return name.startswith(f".{MANIFEST}.")
    return re.match(r"\.shard-\d{5}\.safetensors\.", name) is not None


def _own_shard(entry: os.DirEntry, listed: Optional[int]) -> bool:
    match = _SHARD_RE.fullmatch(entry.name)
    if match is None or not entry.is_file(follow_symlinks=False):
        return False
    return (listed is not None and int(match.group(1)) < listed) or is_tagged_shard(
        Path(entry.path))


def foreign_entries(path: Path, listed: Optional[int]) -> list[str]:
    """Entries of a store folder that the store did not write.

    Args:
        path: The store folder.
        listed: Number of shards the folder's manifest lists (None: no manifest).

    Returns:
        Their paths relative to ``path`` (folders end in ``/``), sorted.
    """
    if not path.is_dir():
        return []
    out: list[str] = []
    with os.scandir(path) as entries:
        for entry in entries:
            regular = entry.is_file(follow_symlinks=False)
            if (entry.name in (MANIFEST, LOCK_NAME) and regular) or \
                    (_is_own_temp(entry.name, top=True) and regular):
                continue
            if entry.name == SHARDS_DIR and entry.is_dir(follow_symlinks=False):
                continue
            out.append(entry.name + ("/" if entry.is_dir() else ""))
    shards = path / SHARDS_DIR
    if shards.is_dir() and not shards.is_symlink():
        with os.scandir(shards) as entries:
            for entry in entries:
                regular = entry.is_file(follow_symlinks=False)
                if (_is_own_temp(entry.name, top=False) and regular) or _own_shard(entry, listed):
                    continue
                out.append(f"{SHARDS_DIR}/{entry.name}" + ("/" if entry.is_dir() else ""))
    return sorted(out)


def blocking_entries(foreign: list[str], num_shards: int) -> list[str]:
    """The foreign entries a store of ``num_shards`` shards would have to overwrite.

    Args:
        foreign: Output of :func:`foreign_entries`.
        num_shards: Shards of the store about to be written.

    Returns:
        A ``shards`` entry that is no folder, and foreign files at the store's shard names.
    """
    def blocks(entry: str) -> bool:
        name = entry.rstrip("/")
        if name == SHARDS_DIR:
            return True
        match = _SHARD_RE.fullmatch(name[len(SHARDS_DIR) + 1:]) \
            if name.startswith(SHARDS_DIR + "/") else None
        return match is not None and int(match.group(1)) < num_shards
    return [e for e in foreign if blocks(e)]


def not_empty_message(path: Path, entries: list[str], has_manifest: bool) -> str:
    """The message of a :class:`StoreFolderNotEmptyError`.

    Args:
        path: The store folder.
        entries: The foreign entries (relative paths).
        has_manifest: Whether the folder holds a store (then only ``entries`` are in the way).

    Returns:
        A message that names the folder, the files and the fix.
    """
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    if has_manifest:
        return (f"The gradient store at {str(path)!r} cannot be replaced: it would overwrite "
                f"{shown}, which hf_ggda did not write. Move them out of the folder, or choose "
                "an empty folder or a new path for the store.")
    return (f"The folder {str(path)!r} is not empty and holds no gradient store (no "
            f"{MANIFEST}): it has files hf_ggda did not write ({shown}). The store never "
            "deletes or overwrites files it did not write: choose an empty folder or a new "
            "path for the store.")


def own_shard_files(path: Path, listed: int) -> list[Path]:
    """Shard files of the store at ``path`` (listed by its manifest or tagged as the store's).

    Args:
        path: The store folder.
        listed: Number of shards its manifest lists.

    Returns:
        The files the store may delete when it is replaced.
    """
    shards = path / SHARDS_DIR
    if not shards.is_dir() or shards.is_symlink():
        return []
    with os.scandir(shards) as entries:
        return sorted(Path(e.path) for e in entries if _own_shard(e, listed))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def stale_temp_files(path: Path) -> list[Path]:
    """The store's own temp files whose writer is gone (never a live writer's file).

    A temp file is stale when its name names no writer (an older hf_ggda), when its writer ran
    on this host and that process has ended, or when another host wrote it over
    :data:`STALE_TEMP_S` seconds ago.

    Args:
        path: The store folder.

    Returns:
        The stale temp files.
    """
    out = []
    for folder, top in ((path, True), (path / SHARDS_DIR, False)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if not (entry.is_file(follow_symlinks=False) and _is_own_temp(entry.name, top)):
                    continue
                owner = _OWNER_RE.search(entry.name)
                if owner is None:
                    stale = True
                elif owner.group("host") == host_tag():
                    stale = not _alive(int(owner.group("pid")))
                else:
                    stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S
                if stale:
                    out.append(Path(entry.path))
    return sorted(out)


@contextlib.contextmanager
def folder_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the store folder's lock (``filelock``) for the duration of the block.

    Args:
        path: The store folder (must exist).
        timeout: Seconds to wait for another process to release it.

    Raises:
        StoreLockedError: Another process held the lock for over ``timeout`` seconds.
        StoreReadOnlyError: The lock file cannot be created (the folder is read-only).
    """
    lock_path = path / LOCK_NAME
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as err:
        raise StoreLockedError(
            f"The gradient store at {str(path)!r} is locked by another process (lock file "
            f"{str(lock_path)!r}) for over {timeout:g} s. Wait for the other run to finish, or "
            "pass another store path. If no other process uses this folder, end the hung "
            "process that holds the lock.") from err
    except PermissionError as err:
        raise StoreReadOnlyError(read_only_message(path, err)) from err
    try:
        yield
    finally:
        lock.release()


def read_only_message(path: Path, err: OSError) -> str:
    """The message of a :class:`StoreReadOnlyError`.

    Args:
        path: The store folder.
        err: The refused write.

    Returns:
        A message that names the folder and the fix.
    """
    return (f"The gradient store at {str(path)!r} must be written (it is new, incomplete or "
            f"being replaced) but the folder is not writable ({err}). Make the folder writable "
            "or pass another store path; a complete store is read without write permission.")
