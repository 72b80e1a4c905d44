"""Stable hashes of models, parameter selections, configs and datasets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from . import __version__

#: Elements copied to the CPU and hashed at a time: bounds the extra memory of hashing a large
#: (or GPU-resident) weight to one chunk.
_HASH_CHUNK = 1 << 22
#: Elements of a tensor hashed when it is hashed by a strided sample (opt-in only).
_SAMPLE_NUMEL = 4096


def hash_json(obj: Any) -> str:
    """Hash a JSON-serialisable object (keys sorted).

    Args:
        obj: Plain data.

    Returns:
        A 16-hex-digit blake2b digest.
    """
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _update_with_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed every byte of ``t`` to ``h``, a chunk at a time (streamed: no full copy).

    Args:
        h: A hashlib object.
        t: Any dense tensor (CPU or accelerator, any dtype).
    """
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _HASH_CHUNK):
        part = flat[start:start + _HASH_CHUNK].cpu().contiguous()
        h.update(part.view(torch.uint8).numpy())


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]],
                 sampled: Collection[str] = ()) -> str:
    """Hash named tensors: names, shapes, dtypes and every value (streamed).

    Args:
        named: (name, tensor) pairs, e.g. ``model.named_parameters()``.
        sampled: Names hashed by a strided sample of about 4,096 values instead (an opt-in
            shortcut: a change the sample misses goes unseen). Default: none.

    Returns:
        A 16-hex-digit digest that changes when any value of a tensor hashed in full changes.
    """
    h = hashlib.blake2b(digest_size=8)
    sampled = set(sampled)
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if name in sampled and t.numel() > _SAMPLE_NUMEL:
            t = t.detach().reshape(-1)[::t.numel() // _SAMPLE_NUMEL]
        _update_with_tensor(h, t)
    return h.hexdigest()


def hash_model(model: torch.nn.Module, sampled: Collection[str] = ()) -> str:
    """Hash every weight that can change the model's gradients: all parameters and buffers.

    Frozen weights are hashed in full too (an edited frozen base weight changes the gradients
    of the adapters), streamed a chunk at a time.

    Args:
        model: Any torch module.
        sampled: Names hashed by a strided sample only (opt-in; default none).

    Returns:
        A digest that changes when any parameter or buffer changes.
    """
    named = list(model.named_parameters()) + list(model.named_buffers())
    # PEFT keeps the frozen original of a `modules_to_save` layer beside the trained copy; the
    # original is not used in the forward pass (often a fresh random head), so it is skipped.
    saved = {n.split(".modules_to_save.")[0] for n, _ in named if ".modules_to_save." in n}
    named = [(n, t) for n, t in named
             if not (".original_module." in n and n.split(".original_module.")[0] in saved)]
    return hash_tensors(named, sampled)


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
