"""Stable hashes of models, parameter selections, configs and datasets."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from . import __version__

#: Parameters larger than this are hashed by a strided sample unless they are selected.
_FULL_HASH_NUMEL = 1 << 20


def hash_json(obj: Any) -> str:
    """Hash a JSON-serialisable object (keys sorted).

    Args:
        obj: Plain data.

    Returns:
        A 16-hex-digit blake2b digest.
    """
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]], full: set[str] | None = None) -> str:
    """Hash named tensors; those not in ``full`` and large are hashed by a strided sample.

    Args:
        named: (name, tensor) pairs, e.g. ``model.named_parameters()``.
        full: Names always hashed in full (the selected parameters).

    Returns:
        A 16-hex-digit digest covering names, shapes, dtypes and values.
    """
    h = hashlib.blake2b(digest_size=8)
    full = full or set()
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if name not in full and flat.numel() > _FULL_HASH_NUMEL:
            step = flat.numel() // 4096
            flat = flat[::step]
        h.update(_tensor_bytes(flat))
    return h.hexdigest()


def hash_model(model: torch.nn.Module, selected: Iterable[str]) -> str:
    """Hash a model's weights (selected parameters in full, the rest by sample).

    Args:
        model: Any torch module.
        selected: Names of the selected parameters.

    Returns:
        A digest that changes when any selected weight changes.
    """
    named = list(model.named_parameters()) + list(model.named_buffers())
    # PEFT keeps the frozen original of a `modules_to_save` layer beside the trained copy; the
    # original is not used in the forward pass (often a fresh random head), so it is skipped.
    saved = {n.split(".modules_to_save.")[0] for n, _ in named if ".modules_to_save." in n}
    named = [(n, t) for n, t in named
             if not (".original_module." in n and n.split(".original_module.")[0] in saved)]
    return hash_tensors(named, full=set(selected))


def hash_array(values: Any) -> str:
    """Hash a 1-D array-like of numbers or strings."""
    arr = np.asarray(values)
    h = hashlib.blake2b(digest_size=8)
    h.update(str(arr.dtype).encode())
    if arr.dtype.kind in "OUS":
        h.update("\x1f".join(map(str, arr.tolist())).encode())
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def request_fingerprint(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return a fingerprint dict with the library version added."""
    out = dict(fields)
    out["hf_ggda_version"] = __version__
    return out
