"""Grouping features of an attribution pass, kept beside its per-example store.

``Attributor.fit(..., grouper=GradKMeansGrouper(...), store=...)`` takes the grouper's
features from the attribution pass itself (no pass of its own). A fit that resumes from
that store reads the per-example vectors back instead of running the pass, so the features
were not seen; without this cache the grouper then needs a forward pass over every row to
recompute them. The cache file ``grouping-features.safetensors`` sits in the component's
store folder; its metadata names the points store's fingerprint, the grouper's settings and
the pass sign, and a file whose key, version, shape or values do not fit is ignored (the
features are recomputed and the file is rewritten; it is a file this project wrote, in a
folder it owns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..fingerprint import hash_json
from ..logging import get_logger

logger = get_logger(__name__)

#: Name of the cache file inside a component's store folder.
FEATURES_FILE = "grouping-features.safetensors"
_VERSION = "1"


def features_key(points_fingerprint: dict[str, Any], grouper: Any, sign: float) -> str:
    """What the pass features depend on: the per-example pass, the grouper, the sign.

    Args:
        points_fingerprint: Fingerprint of the per-example result (model, task, rows, ...).
        grouper: The grouper whose ``pass_tap`` computed the features.
        sign: The pass's training sign (see ``Attributor.train_sign``).

    Returns:
        A hex digest.
    """
    return hash_json([points_fingerprint, grouper.name, grouper.config.fingerprint_dict(),
                      float(sign), _VERSION])


def save_pass_features(folder: Path, key: str, features: np.ndarray) -> None:
    """Write the features (atomically) into ``folder``.

    Args:
        folder: The component's store folder.
        key: :func:`features_key` of the pass.
        features: (n, d) grouping features.

    Raises:
        OSError: The file cannot be written.
    """
    from safetensors.torch import save

    data = save({"features": torch.from_numpy(np.ascontiguousarray(features,
                                                                    dtype=np.float32))},
                metadata={"version": _VERSION, "key": key})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / FEATURES_FILE, data)


def load_pass_features(folder: Path, key: str, num_rows: int) -> Optional[np.ndarray]:
    """The cached features of this pass, or None when absent or not this pass's.

    Args:
        folder: The component's store folder.
        key: :func:`features_key` of the pass being resumed.
        num_rows: Rows the features must have.

    Returns:
        (num_rows, d) float32 features, or None (the caller recomputes them).
    """
    from safetensors import SafetensorError, safe_open

    path = folder / FEATURES_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != _VERSION or meta.get("key") != key \
                    or set(f.keys()) != {"features"}:
                logger.info("Grouping features in %s are from another pass; recomputing.",
                            path)
                return None
            feats = f.get_tensor("features")
    except (SafetensorError, OSError, ValueError) as err:
        logger.warning("Unreadable grouping features %s (%s); recomputing.", path, err)
        return None
    if feats.dim() != 2 or feats.shape[0] != num_rows or feats.dtype != torch.float32 \
            or not bool(torch.isfinite(feats).all()):
        logger.warning("Grouping features %s have the wrong shape or values; recomputing.",
                       path)
        return None
    return feats.numpy()
