"""``GradientStore``: sharded safetensors + a JSON manifest, resumable, never half-read.

Layout of a store folder::

    manifest.json                  fingerprint, group ids, shard bounds, dim, dtype, complete
    shards/shard-00000.safetensors one tensor "gradients" (groups in shard × dim) + checksum

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a reader sees either the old complete file or the new complete file. A shard
whose checksum or shape does not match is treated as missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .fingerprint import hash_json
from .errors import CorruptShardError, StoreMismatchError, StoreNotFoundError
from .logging import get_logger

logger = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace`` (no partial files).

    Raises:
        OSError: The write failed (e.g. disk full); the previous file, if any, is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checksum(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


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
        self._valid: set[int] = set()
        #: Ties shards to this manifest: a shard left by another request never verifies.
        self.request = hash_json({k: v for k, v in manifest.items() if k != "complete"})

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], fingerprint: dict[str, Any],
               group_ids: Sequence[Any], shard_bounds: Sequence[tuple[int, int]], dim: int,
               dtype: torch.dtype, overwrite: bool = False,
               write: bool = True) -> "GradientStore":
        """Open ``path`` for writing; resume it if its fingerprint matches.

        Args:
            path: Store folder (created if needed).
            fingerprint: What the gradients depend on.
            group_ids: The K group ids, in row order of the stored matrix.
            shard_bounds: [start, stop) group ranges of each shard.
            dim: Columns of the stored matrix.
            dtype: Stored dtype.
            overwrite: Replace a store made for another request instead of raising.
            write: Write the manifest (only the main process should).

        Returns:
            The store.

        Raises:
            StoreMismatchError: An existing store differs and ``overwrite`` is False.
        """
        path = Path(path)
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "group_ids": [g if isinstance(g, (int, str)) else int(g) for g in group_ids],
            "shard_bounds": [list(b) for b in shard_bounds], "dim": int(dim),
            "dtype": str(dtype).replace("torch.", ""), "complete": False,
        }
        mpath = path / MANIFEST
        if mpath.exists():
            old = json.loads(mpath.read_text())
            same = {k: old.get(k) for k in manifest if k != "complete"} == \
                {k: v for k, v in manifest.items() if k != "complete"}
            if same:
                logger.info("Resuming gradient store %s.", path)
                if write:
                    cls._remove_temp_files(path)
                return cls(path, old)
            if not overwrite:
                saved = dict(old.get("fingerprint", {}))
                requested = dict(fingerprint)
                for key in ("dim", "dtype", "shard_bounds"):
                    saved[key], requested[key] = old.get(key), manifest[key]
                saved["num_groups"] = len(old.get("group_ids", []))
                requested["num_groups"] = len(manifest["group_ids"])
                raise StoreMismatchError(str(path), saved, requested)
        if write:
            # the new manifest lands first: if that write fails, the old store stays whole
            atomic_write_bytes(mpath, json.dumps(manifest, indent=1).encode())
            if mpath.exists() and (path / "shards").exists():
                logger.warning("Overwriting gradient store %s made for another request.", path)
                shutil.rmtree(path / "shards", ignore_errors=True)
        return cls(path, manifest)

    @staticmethod
    def _remove_temp_files(path: Path) -> None:
        """Delete temp files a killed writer left behind (never read: they are not shards)."""
        for tmp in (path / "shards").glob(".*.tmp") if (path / "shards").exists() else []:
            logger.info("Removing %s left by an interrupted run.", tmp.name)
            tmp.unlink(missing_ok=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "GradientStore":
        """Open an existing store for reading.

        Raises:
            StoreNotFoundError: ``path`` does not exist or holds no manifest.
            CorruptShardError: The manifest cannot be parsed.
        """
        mpath = Path(path) / MANIFEST
        if not Path(path).exists():
            raise StoreNotFoundError(f"No gradient store at {str(path)!r}: the folder does not "
                                     "exist. Run `fit` (or `hf-ggda attribute`) to create it.")
        if not mpath.exists():
            raise StoreNotFoundError(f"{str(path)!r} is not a gradient store (no {MANIFEST}). "
                                     "Pass the folder a previous run wrote.")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as err:
            raise CorruptShardError(f"The manifest {mpath} is unreadable ({err}); delete the "
                                    "store folder and recompute.") from err
        return cls(path, manifest)

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
        return self.path / "shards" / f"shard-{index:05d}.safetensors"

    def write_shard(self, index: int, gradients: torch.Tensor) -> None:
        """Write shard ``index`` atomically.

        Raises:
            ValueError: ``gradients`` has the wrong shape for this shard.
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
        atomic_write_bytes(self.shard_path(index), st_save({"gradients": t}, metadata=meta))
        self._valid.add(index)

    def read_shard(self, index: int) -> torch.Tensor:
        """Read and verify shard ``index``.

        Raises:
            CorruptShardError: The file is missing, truncated or fails its checksum.
        """
        p = self.shard_path(index)
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("ggda", "{}"))
                t = fh.get_tensor("gradients")
        except Exception as err:  # safetensors raises its own error types
            raise CorruptShardError(f"Shard {p} is missing or unreadable ({err}). Rerun the "
                                    "same command: missing shards are recomputed.") from err
        start, stop = self.manifest["shard_bounds"][index]
        if tuple(t.shape) != (stop - start, self.manifest["dim"]) or \
                meta.get("checksum") != _checksum(t) or meta.get("request") != self.request:
            raise CorruptShardError(f"Shard {p} fails its shape/checksum/request test. Rerun "
                                    "the same command: it will be recomputed.")
        return t

    def has_shard(self, index: int) -> bool:
        """Whether shard ``index`` exists and verifies (verification is cached)."""
        if index in self._valid:
            return True
        if not self.shard_path(index).exists():
            return False
        try:
            self.read_shard(index)
        except CorruptShardError as err:
            logger.warning("%s", err)
            return False
        self._valid.add(index)
        return True

    def missing_shards(self) -> list[int]:
        """Indices of shards that still have to be computed."""
        return [i for i in range(self.num_shards) if not self.has_shard(i)]

    def mark_complete(self) -> None:
        """Record in the manifest that every shard is present.

        Raises:
            CorruptShardError: Some shard is missing.
        """
        missing = self.missing_shards()
        if missing:
            raise CorruptShardError(f"Cannot finish the store: shards {missing} are missing.")
        self.manifest["complete"] = True
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def load(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """Return the full (K, dim) matrix.

        Raises:
            CorruptShardError: The store is incomplete or a shard is damaged.
        """
        if not self.complete:
            raise CorruptShardError(f"The store at {self.path} is incomplete (an interrupted "
                                    "run). Rerun the same command to finish it.")
        parts = [self.read_shard(i) for i in range(self.num_shards)]
        out = torch.cat(parts) if parts else torch.zeros(0, self.manifest["dim"])
        return out.to(device) if device is not None else out
