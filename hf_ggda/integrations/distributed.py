"""Process-group helpers on top of Accelerate (no home-made process pool).

Under ``accelerate launch`` / ``torchrun`` the environment names the rank and world size;
``PartialState`` initialises the process group (gloo on CPU, nccl on GPUs). In a plain single
process every helper is a no-op.
"""

from __future__ import annotations

import os

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
