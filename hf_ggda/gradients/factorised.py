"""Factorised projection of linear-layer gradients inside the hooks (never forms G).

For a linear layer y = W a (+ b) applied at every token, a group's weight gradient is
G = Σ_rows Σ_t g_t a_tᵀ (d_out × d_in). With seeded per-layer matrices P_in (d_in × k_in) and
P_out (d_out × k_out), its factorised projection is

    P_outᵀ G P_in = Σ_rows Σ_t (P_outᵀ g_t)(P_inᵀ a_t)ᵀ      (k_out × k_in),

computed by projecting the layer input and the output gradient *before* the outer product, so
neither the group's nor any row's full d_out × d_in gradient exists at any point (the idea
published as LoGra). As a map on the row-major flattened G it is the dense projection by the
Kronecker matrix P_out ⊗ P_in, whose entries have variance 1/(k_out k_in), so inner products
are preserved in expectation (Johnson–Lindenstrauss, per layer). A side with k >= d is not
projected. The bias gradient Σ g_t becomes P_outᵀ Σ g_t (k_out).

Selected parameters outside linear layers (embeddings, norms, prompt vectors) are projected
densely by a seeded :class:`~hf_ggda.gradients.projection.RandomProjector` after their
(small) gradients are formed by autograd.

Each layer's seed is derived from the projection seed and the layer's module name, so the
matrices are the same in every process, on every device and in every run; the fingerprint
holds the seed, the sizes and the per-layer dimensions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .projection import RandomProjector


@dataclass
class LayerProjection:
    """One tracked layer's projections and its slices in the projected vector.

    Attributes:
        name: Module name.
        d_in: Input width (0 when the weight is not selected: bias only).
        d_out: Output width.
        p_in: (d_in, k_in) matrix, None for the identity.
        p_out: (d_out, k_out) matrix, None for the identity.
        weight: [start, stop) of the k_out × k_in block (row-major), None without weight.
        bias: [start, stop) of the k_out bias block, None without bias.
    """

    name: str
    d_in: int
    d_out: int
    p_in: Optional[torch.Tensor]
    p_out: Optional[torch.Tensor]
    weight: Optional[tuple[int, int]]
    bias: Optional[tuple[int, int]]

    @property
    def k_in(self) -> int:
        """Projected input width."""
        return self.d_in if self.p_in is None else int(self.p_in.shape[1])

    @property
    def k_out(self) -> int:
        """Projected output width."""
        return self.d_out if self.p_out is None else int(self.p_out.shape[1])

    def project(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project inputs (..., d_in) and output gradients (..., d_out) of this layer."""
        if self.p_in is not None:
            a = a @ self.p_in.to(device=a.device, dtype=a.dtype)
        if self.p_out is not None:
            g = g @ self.p_out.to(device=g.device, dtype=g.dtype)
        return a, g


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's matrices: a hash of the projection seed and the module name."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class FactorisedProjector:
    """Per-layer input / output-gradient projections for a list of tracked linear layers.

    Args:
        layers: (module name, d_in (0: bias not weight), d_out, has weight, has bias) of each
            tracked layer, in the collector's order.
        fallback_dim: Total size of the selected parameters outside linear layers.
        k: Projected size per side (k_in = k_out = k; a side with d <= k is kept).
        kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection seed.
        fallback_k: Dense projection size of the fallback parameters (None: k * k).

    Raises:
        ValueError: ``k`` < 1 or unknown ``kind``.
    """

    def __init__(self, layers: Sequence[tuple[str, int, int, bool, bool]], fallback_dim: int,
                 k: int, kind: str = "rademacher", seed: int = 0,
                 fallback_k: Optional[int] = None) -> None:
        if k < 1:
            raise ValueError(f"factorised projection size k must be >= 1, got {k}.")
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection kind must be 'rademacher' or 'gaussian', got {kind!r}.")
        self.k, self.kind, self.seed = k, kind, seed
        self.layers: list[LayerProjection] = []
        pos = 0
        for name, d_in, d_out, has_w, has_b in layers:
            s = layer_seed(seed, name)
            p_in = self._matrix(d_in, s) if has_w and d_in > k else None
            p_out = self._matrix(d_out, s + 1) if d_out > k else None
            layer = LayerProjection(name, d_in if has_w else 0, d_out, p_in, p_out, None, None)
            if has_w:
                layer.weight = (pos, pos + layer.k_out * layer.k_in)
                pos = layer.weight[1]
            if has_b:
                layer.bias = (pos, pos + layer.k_out)
                pos = layer.bias[1]
            self.layers.append(layer)
        self.linear_dim = pos
        self.fallback_dim = fallback_dim
        self.fallback: Optional[RandomProjector] = None
        fk = fallback_k if fallback_k is not None else k * k
        if fallback_dim > fk:
            self.fallback = RandomProjector(fallback_dim, fk, kind, layer_seed(seed, "fallback"))

    def _matrix(self, d: int, seed: int) -> torch.Tensor:
        return RandomProjector(d, self.k, self.kind, seed).matrix(torch.float64)

    @property
    def dim_out(self) -> int:
        """Size p of the projected vectors: Σ_layers k_out·k_in (+ k_out) + fallback."""
        fb = self.fallback.dim_out if self.fallback is not None else self.fallback_dim
        return self.linear_dim + fb

    @property
    def collect_dim(self) -> int:
        """Columns the collector accumulates: projected layers + unprojected fallback."""
        return self.linear_dim + self.fallback_dim

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Project the fallback columns of a collected (N, collect_dim) block."""
        if self.fallback is None:
            return out
        return torch.cat([out[:, :self.linear_dim],
                          self.fallback.project(out[:, self.linear_dim:])], 1)

    def config_dict(self) -> dict[str, Any]:
        """Settings that change the projection (fingerprints), per-layer sizes included."""
        return {"kind": self.kind, "seed": self.seed, "k": self.k, "mode": "factorised",
                "layers": [[lp.name, lp.k_in, lp.k_out] for lp in self.layers],
                "fallback": None if self.fallback is None else self.fallback.config_dict()}

    def kronecker(self, index: int) -> torch.Tensor:
        """The dense (d_out·d_in, k_out·k_in) matrix P_out ⊗ P_in of layer ``index`` (tests)."""
        lp = self.layers[index]
        p_out = lp.p_out if lp.p_out is not None else torch.eye(lp.d_out, dtype=torch.float64)
        p_in = lp.p_in if lp.p_in is not None else torch.eye(lp.d_in, dtype=torch.float64)
        return torch.kron(p_out, p_in)
