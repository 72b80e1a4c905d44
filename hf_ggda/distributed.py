"""Rank, world size and the collectives, on top of Accelerate (no home-made process pool).

The one home of process-group code: every module that needs the rank, a barrier or a
reduction imports it from here (this module imports nothing else of ``hf_ggda``).

Under ``accelerate launch`` / ``torchrun`` the environment names the rank and world size;
``PartialState`` initialises the process group (gloo on CPU, nccl on GPUs). In a plain single
process every helper is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world() -> tuple[int, int]:
    """Return (rank, world size), initialising Accelerate's state when launched."""
    if _launched() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_index() -> int:
    """Return this process's global rank (0 when not distributed), initialising nothing.

    Returns:
        The rank from an initialised Accelerate state, else from ``RANK``, else 0.
    """
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:  # initialised by the user or by us
            return int(PartialState().process_index)
    except Exception:  # pragma: no cover - accelerate always importable here
        pass
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Return True on the process that logs and writes shared files."""
    return process_index() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _reduce(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType") -> torch.Tensor:
    """Reduce ``tensor`` in place over processes; a CPU tensor under nccl travels through the
    process's GPU and back (nccl reduces device memory only)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved.cpu())
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place and return it (no-op in a single process)."""
    return _reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(value: int) -> int:
    """The largest of every process's ``value`` (``value`` itself in a single process).

    Every process must call it, e.g. to agree on a width that only some processes know
    because only they saw data.
    """
    return int(_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX).item())


def all_gather_object(obj: Any, world: int) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when ``world`` is 1).

    Every process must call it with the same ``world`` (from :func:`rank_and_world`).
    """
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts
