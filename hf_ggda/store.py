"""``GradientStore``: sharded safetensors + a JSON manifest, resumable, never half-read.

Layout of a store folder::

    manifest.json                  fingerprint, group ids, shard bounds, dim, dtype, complete,
                                   request (hash of all the rest)
    shards/shard-00000.safetensors one tensor "gradients" (groups in shard x dim) + a record
                                   of its checksum, shard index and request hash
    .ggda-store.lock               the per-folder lock (``filelock``)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a reader sees either the old complete file or the new complete file. A shard
whose shape, checksum, request or index does not match is treated as missing and recomputed
(a shard swapped with another shard of the same store included).

Safety (see :mod:`hf_ggda.store_guard`): the store deletes or replaces only files it wrote and
refuses a folder of someone else's files; manifests read back are validated; creating,
overwriting, placing a shard and marking the store complete each happen under the folder's lock
after checking that the manifest on disk is still this run's, so two processes never interleave
on one store, while the ranks of one distributed run write their own shards side by side.
Reading a complete store writes nothing (no lock either): a read-only folder loads fine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .atomic import atomic_write_bytes
from .atomic import write_temp as _write_temp
from .errors import (
    CorruptShardError,
    StoreChangedError,
    StoreFolderNotEmptyError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreReadOnlyError,
)
from .logging import get_logger
from .store_guard import (
    CONTENT_KEYS,
    FORMAT_VERSION,
    MANIFEST,
    SHARDS_DIR,
    blocking_entries,
    check_store_path,
    folder_lock,
    foreign_entries,
    not_empty_message,
    own_shard_files,
    read_manifest,
    read_only_message,
    request_hash,
    stale_temp_files,
)

logger = get_logger(__name__)

__all__ = ["FORMAT_VERSION", "MANIFEST", "GradientStore", "atomic_write_bytes"]

#: Seconds a writer waits for another process to release a store's lock.
LOCK_TIMEOUT_S = 60.0


def _checksum(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def _file_sig(path: Path) -> Optional[tuple[int, int, int]]:
    """(inode, size, mtime) of a file: a file replaced or rewritten gets another signature."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _dump(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


class GradientStore:
    """A folder of per-group gradient shards with a fingerprinted manifest.

    Use :meth:`create` to start or resume a computation, :meth:`open` to read a finished one.

    Args:
        path: Store folder.
        manifest: The manifest dict.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        #: shard index -> file signature at the time the shard verified
        self._valid: dict[int, tuple[int, int, int]] = {}
        #: Ties shards to this manifest: a shard left by another request never verifies.
        self.request: str = manifest.get("request") or request_hash(manifest)
        self._manifest_sig: Optional[tuple[int, int, int]] = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], fingerprint: dict[str, Any],
               group_ids: Sequence[Any], shard_bounds: Sequence[tuple[int, int]], dim: int,
               dtype: torch.dtype, overwrite: bool = False,
               write: bool = True) -> "GradientStore":
        """Open ``path`` for writing; resume it if its fingerprint matches.

        A folder that holds files the store did not write and no manifest is refused; with
        ``overwrite`` only the old store's own shards are deleted. A complete store of the same
        request is returned without writing anything (a read-only folder is fine).

        Args:
            path: Store folder (created if needed).
            fingerprint: What the gradients depend on.
            group_ids: The K group ids, in row order of the stored matrix.
            shard_bounds: [start, stop) group ranges of each shard.
            dim: Columns of the stored matrix.
            dtype: Stored dtype.
            overwrite: Replace a store made for another request instead of raising.
            write: Write the manifest (only the main process should); with False nothing is
                written, but every check runs, so all processes raise alike.

        Returns:
            The store.

        Raises:
            StoreMismatchError: An existing store differs and ``overwrite`` is False.
            StorePathError: ``path`` is a file, or lies under one.
            StoreFolderNotEmptyError: The folder holds files the store did not write and no
                manifest, or files a replacement would overwrite.
            ManifestError: The folder's manifest is unreadable, of an unknown version or edited.
            StoreLockedError: Another process holds the folder's lock too long.
            StoreReadOnlyError: The store must be written but the folder is read-only.
        """
        path = Path(path)
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "group_ids": [g if isinstance(g, (int, str)) else int(g) for g in group_ids],
            "shard_bounds": [list(b) for b in shard_bounds], "dim": int(dim),
            "dtype": str(dtype).replace("torch.", ""), "complete": False,
        }
        manifest = json.loads(json.dumps(manifest))  # exactly what a reader will see
        manifest["request"] = request_hash(manifest)
        check_store_path(path)
        old = read_manifest(path)
        action = cls._plan(path, old, manifest, overwrite)
        if not write or (action == "resume" and old is not None and old["complete"]):
            if write:
                logger.info("Resuming gradient store %s (complete: nothing to compute).", path)
            return cls(path, old if action == "resume" and old is not None else manifest)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError as err:
            raise StoreReadOnlyError(read_only_message(path, err)) from err
        for folder in (path, path / SHARDS_DIR):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise StoreReadOnlyError(read_only_message(
                    path, PermissionError(f"{str(folder)!r} is not writable")))
        with folder_lock(path, LOCK_TIMEOUT_S):
            old = read_manifest(path)  # again: another process may have changed it meanwhile
            action = cls._plan(path, old, manifest, overwrite)
            if action == "resume" and old is not None:
                logger.info("Resuming gradient store %s.", path)
                cls._remove_temp_files(path)
                return cls(path, old)
            # the new manifest lands first: if that write fails, the old store stays whole
            atomic_write_bytes(path / MANIFEST, _dump(manifest))
            if old is not None:
                logger.warning("Overwriting gradient store %s made for another request.", path)
                for shard in own_shard_files(path, len(old["shard_bounds"])):
                    shard.unlink(missing_ok=True)
                cls._remove_temp_files(path)
        return cls(path, manifest)

    @staticmethod
    def _plan(path: Path, old: Optional[dict[str, Any]], manifest: dict[str, Any],
              overwrite: bool) -> str:
        """Decide ``"fresh"``, ``"resume"`` or ``"overwrite"``, or raise why none is allowed.

        Raises:
            StoreFolderNotEmptyError: Foreign files and no manifest, or in the way.
            StoreMismatchError: Another request's store and ``overwrite`` is False.
        """
        if old is None:
            foreign = foreign_entries(path, None)
            if foreign:
                raise StoreFolderNotEmptyError(not_empty_message(path, foreign, False))
            return "fresh"
        same = all(old[k] == manifest[k] for k in CONTENT_KEYS)
        if not same and not overwrite:
            saved = dict(old["fingerprint"])
            requested = dict(manifest["fingerprint"])
            for key in ("dim", "dtype", "shard_bounds"):
                saved[key], requested[key] = old[key], manifest[key]
            saved["num_groups"] = len(old["group_ids"])
            requested["num_groups"] = len(manifest["group_ids"])
            raise StoreMismatchError(str(path), saved, requested)
        blocking = blocking_entries(foreign_entries(path, len(old["shard_bounds"])),
                                    len(manifest["shard_bounds"]))
        if blocking:
            raise StoreFolderNotEmptyError(not_empty_message(path, blocking, True))
        return "resume" if same else "overwrite"

    @staticmethod
    def _remove_temp_files(path: Path) -> None:
        """Delete temp files a killed writer left behind (never a live writer's file)."""
        for tmp in stale_temp_files(path):
            logger.info("Removing %s left by an interrupted run.", tmp.name)
            tmp.unlink(missing_ok=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str],
             expect_request: Optional[str] = None) -> "GradientStore":
        """Open an existing store for reading (writes nothing, takes no lock).

        Args:
            path: Store folder.
            expect_request: If given, the request hash the store must still hold (pass the
                ``request`` of the store a run wrote, to notice that another process replaced
                it since).

        Returns:
            The store.

        Raises:
            StoreNotFoundError: ``path`` does not exist or holds no manifest.
            StorePathError: ``path`` is a file.
            ManifestError: The manifest is unreadable, of an unknown version or edited.
            StoreChangedError: The store holds another request than ``expect_request``.
        """
        path = Path(path)
        check_store_path(path)
        if not path.exists():
            raise StoreNotFoundError(f"No gradient store at {str(path)!r}: the folder does not "
                                     "exist. Run `fit` (or `hf-ggda attribute`) to create it.")
        manifest = read_manifest(path)
        if manifest is None:
            raise StoreNotFoundError(f"{str(path)!r} is not a gradient store (no {MANIFEST}). "
                                     "Pass the folder a previous run wrote.")
        store = cls(path, manifest)
        if expect_request is not None and store.request != expect_request:
            raise StoreChangedError(cls._changed_message(path))
        return store

    @staticmethod
    def _changed_message(path: Path) -> str:
        return (f"The gradient store at {str(path)!r} was replaced by another process while "
                "this run was using it (its manifest is now for another request, or gone). "
                "Two runs must not share a store path: rerun this one with its own path.")

    def _check_still_ours(self) -> None:
        """Raise unless the manifest on disk is still this store's request.

        Raises:
            StoreChangedError: Another process replaced or removed the manifest.
            ManifestError: The manifest on disk is damaged.
        """
        sig = _file_sig(self.path / MANIFEST)
        if sig is not None and sig == self._manifest_sig:
            return
        disk = read_manifest(self.path) if sig is not None else None
        if disk is None or (disk.get("request") or request_hash(disk)) != self.request:
            raise StoreChangedError(self._changed_message(self.path))
        self._manifest_sig = sig

    # -- shards --------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self.manifest["shard_bounds"])

    @property
    def complete(self) -> bool:
        """Whether every shard was written and verified."""
        return bool(self.manifest.get("complete"))

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.path / SHARDS_DIR / f"shard-{index:05d}.safetensors"

    def write_shard(self, index: int, gradients: torch.Tensor) -> None:
        """Write shard ``index`` atomically.

        The file is written and flushed to a temp name without the lock; only the check that
        the store is still this request's and the final ``os.replace`` hold it, so ranks of
        one run writing different shards barely wait for each other.

        Raises:
            ValueError: ``gradients`` has the wrong shape for this shard.
            StoreChangedError: Another process replaced the store since it was opened.
            StoreLockedError: Another process holds the folder's lock too long.
            StoreReadOnlyError: The folder is not writable.
        """
        start, stop = self.manifest["shard_bounds"][index]
        expected = (stop - start, self.manifest["dim"])
        if tuple(gradients.shape) != expected:
            raise ValueError(f"Shard {index} must have shape {expected}, got "
                             f"{tuple(gradients.shape)}.")
        t = gradients.detach().cpu().contiguous().to(getattr(torch, self.manifest["dtype"]))
        # one metadata key: safetensors does not keep key order, and files must be bit-stable
        meta = {"ggda": json.dumps({"checksum": _checksum(t), "shard": index,
                                    "request": self.request}, sort_keys=True)}
        self._check_still_ours()
        target = self.shard_path(index)
        try:
            tmp = _write_temp(target, st_save({"gradients": t}, metadata=meta))
        except PermissionError as err:
            raise StoreReadOnlyError(read_only_message(self.path, err)) from err
        try:
            with folder_lock(self.path, LOCK_TIMEOUT_S):
                self._check_still_ours()
                os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        sig = _file_sig(target)
        if sig is not None:
            self._valid[index] = sig

    def read_shard(self, index: int) -> torch.Tensor:
        """Read and verify shard ``index``.

        Raises:
            CorruptShardError: The file is missing, truncated, fails its checksum, was made for
                another request or holds another shard of this store (swapped files).
        """
        p = self.shard_path(index)
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("ggda", "{}"))
                t = fh.get_tensor("gradients")
        except Exception as err:  # safetensors raises its own error types
            raise CorruptShardError(f"Shard {p} is missing or unreadable ({err}). Rerun the "
                                    "same command: missing shards are recomputed.") from err
        meta = meta if isinstance(meta, dict) else {}
        start, stop = self.manifest["shard_bounds"][index]
        shape = (stop - start, self.manifest["dim"])
        sig = _file_sig(p)
        known = sig is not None and self._valid.get(index) == sig  # verified, unchanged since
        if tuple(t.shape) != shape or t.dtype != getattr(torch, self.manifest["dtype"]):
            problem = (f"holds a {tuple(t.shape)} {t.dtype} tensor, not the {shape} "
                       f"{self.manifest['dtype']} one the manifest names")
        elif not known and meta.get("checksum") != _checksum(t):
            problem = "fails its checksum (the file was altered or damaged)"
        elif meta.get("request") != self.request:
            problem = "was written for another request than this store's manifest"
        elif meta.get("shard") != index:
            problem = (f"holds shard {meta.get('shard')!r}, not shard {index} (shard files "
                       "were swapped or copied)")
        else:
            return t
        raise CorruptShardError(f"Shard {p} {problem}. Rerun the same command: it will be "
                                "recomputed.")

    def adopt_verified(self, other: "GradientStore") -> None:
        """Trust the shards that ``other`` (an object of the same request, e.g. the writer's)
        wrote or verified, for as long as their files stay unchanged (no second checksum)."""
        if other.request == self.request and other.path.resolve() == self.path.resolve():
            self._valid.update(other._valid)

    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` exists and verifies (cached while the file is unchanged)."""
        sig = _file_sig(self.shard_path(index))
        if sig is None:
            self._valid.pop(index, None)
            return False
        if self._valid.get(index) == sig:
            return True
        try:
            self.read_shard(index)
        except CorruptShardError as err:
            logger.warning("%s", err)
            return False
        self._valid[index] = sig
        return True

    def missing_shards(self) -> list[int]:
        """Indices of shards that still have to be computed."""
        return [i for i in range(self.num_shards) if not self.has_shard(i)]

    def mark_complete(self) -> None:
        """Record in the manifest that every shard is present.

        A store already recorded complete whose shards all verify is left as it is (nothing is
        written, so this works on a read-only folder).

        Raises:
            CorruptShardError: Some shard is missing.
            StoreChangedError: Another process replaced the store since it was opened.
            StoreLockedError: Another process holds the folder's lock too long.
        """
        if self.complete and not self.missing_shards():
            return
        with folder_lock(self.path, LOCK_TIMEOUT_S):
            self._check_still_ours()
            missing = self.missing_shards()
            if missing:
                raise CorruptShardError(f"Cannot finish the store: shards {missing} are missing.")
            self.manifest["complete"] = True
            atomic_write_bytes(self.path / MANIFEST, _dump(self.manifest))

    def load(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """Return the full (K, dim) matrix (reads only; no write permission needed).

        Raises:
            CorruptShardError: The store is incomplete or a shard is damaged, swapped or made
                for another request.
        """
        if not self.complete:
            raise CorruptShardError(f"The store at {self.path} is incomplete (an interrupted "
                                    "run). Rerun the same command to finish it.")
        parts = [self.read_shard(i) for i in range(self.num_shards)]
        out = torch.cat(parts) if parts else torch.zeros(0, self.manifest["dim"])
        return out.to(device) if device is not None else out
