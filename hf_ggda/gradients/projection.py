"""Seeded random projections generated in blocks (no d × p matrix held when d is large)."""

from __future__ import annotations

from typing import Optional

import torch

#: Keep the whole projection matrix in memory when it is at most this many bytes.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


class RandomProjector:
    """Projects (N, d) vectors to (N, p) with a seeded Rademacher or Gaussian matrix / sqrt(p).

    The matrix is defined block by block (``block_rows`` input coordinates at a time), each
    block drawn from a CPU generator seeded by (seed, block index), so the same seed gives the
    same projection on any device and in any process. Inner products are preserved in
    expectation.

    Args:
        dim_in: d, the gradient dimension.
        dim_out: p, the projected dimension.
        kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Seed of the projection.
        block_rows: Input coordinates per generated block.
        cache_bytes: Keep the full matrix when it fits in this many bytes.

    Raises:
        ValueError: Unknown ``kind`` or non-positive dimensions.
    """

    def __init__(self, dim_in: int, dim_out: int, kind: str = "rademacher", seed: int = 0,
                 block_rows: int = 8192, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection kind must be 'rademacher' or 'gaussian', got {kind!r}.")
        if dim_in < 1 or dim_out < 1:
            raise ValueError(f"projection dims must be >= 1, got {dim_in} -> {dim_out}.")
        self.dim_in, self.dim_out, self.kind, self.seed = dim_in, dim_out, kind, seed
        self.block_rows = block_rows
        self._cache: Optional[torch.Tensor] = None
        self._cache_ok = dim_in * dim_out * 8 <= cache_bytes

    def config_dict(self) -> dict[str, object]:
        """Settings that change the projection (fingerprints)."""
        return {"dim_out": self.dim_out, "kind": self.kind, "seed": self.seed,
                "block_rows": self.block_rows}

    def _block(self, index: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "gaussian":
            block = torch.randn(rows, self.dim_out, generator=gen, dtype=torch.float64)
        else:
            block = torch.randint(0, 2, (rows, self.dim_out), generator=gen).to(torch.float64)
            block = block * 2 - 1
        return (block / self.dim_out ** 0.5).to(dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Return the full (d, p) matrix (small problems and tests only)."""
        blocks = []
        for i, start in enumerate(range(0, self.dim_in, self.block_rows)):
            rows = min(self.block_rows, self.dim_in - start)
            blocks.append(self._block(i, rows, dtype))
        return torch.cat(blocks)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Project (N, d) to (N, p) in x's dtype and device.

        Raises:
            ValueError: ``x`` does not have d columns.
        """
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"Expected vectors of size {self.dim_in}, got {x.shape[-1]}.")
        if self._cache_ok:
            if self._cache is None or self._cache.dtype != x.dtype \
                    or self._cache.device != x.device:
                self._cache = self.matrix(x.dtype).to(x.device)
            return x @ self._cache
        out = torch.zeros(*x.shape[:-1], self.dim_out, dtype=x.dtype, device=x.device)
        for i, start in enumerate(range(0, self.dim_in, self.block_rows)):
            rows = min(self.block_rows, self.dim_in - start)
            out += x[..., start:start + rows] @ self._block(i, rows, x.dtype).to(x.device)
        return out
