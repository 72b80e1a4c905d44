"""Second-order curvature by double backward: Hessian-vector products, the exact Hessian and
LiSSA.

All products are with H = ∇²_θ Σ_i ℓ_i(θ), the Hessian of the *summed* training loss over the
selected parameters. Double backward runs under the math attention kernel (the fused CPU
attention kernels have no second derivative).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..logging import get_logger, progress
from ..tasks import Batch
from .base import CurvatureContext, CurvatureError, MatrixPreconditioner, Preconditioner
from .registry import register_preconditioner

logger = get_logger(__name__)


def _vjp_rows(flat: torch.Tensor, params: list[torch.nn.Parameter],
              vectors: torch.Tensor) -> torch.Tensor:
    """Return V J for J = d flat / d params (one row per vector), J symmetric for a Hessian."""
    if not flat.requires_grad:  # the gradient does not depend on the parameters: H = 0
        return torch.zeros_like(vectors)
    try:
        parts = torch.autograd.grad(flat, params, grad_outputs=vectors.to(flat.dtype),
                                    is_grads_batched=True, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        return torch.cat([p.reshape(len(vectors), -1) for p in parts], 1).to(vectors.dtype)
    except RuntimeError as err:  # an op without a batching rule: one product at a time
        logger.debug("Batched double backward failed (%s); looping over vectors.", err)
    rows = []
    for v in vectors:
        parts = torch.autograd.grad(flat, params, grad_outputs=v.to(flat.dtype),
                                    retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        rows.append(torch.cat([p.reshape(-1) for p in parts]))
    return torch.stack(rows).to(vectors.dtype)


def hessian_vector_products(ctx: CurvatureContext, vectors: torch.Tensor,
                            batches: Optional[Iterable[Batch]] = None,
                            chunk: int = 256) -> torch.Tensor:
    """Return (N, d) rows H v for (N, d) vectors V, H the Hessian of the summed training loss.

    Args:
        ctx: The training context.
        vectors: (N, d) vectors in the flat parameter layout.
        batches: Batches to sum the Hessian over (default: every training row).
        chunk: Vectors per batched double backward.

    Returns:
        (N, d) products, in the dtype of ``vectors``.

    Raises:
        CurvatureError: A training loss is NaN/Inf.
    """
    params = ctx.engine.selection.parameters(ctx.model)
    out = torch.zeros_like(vectors)
    with ctx.differentiable(double_backward=True):
        for batch in (ctx.batches() if batches is None else batches):
            losses = ctx.engine.task.per_row_loss(ctx.model, batch)
            if not torch.isfinite(losses.detach()).all():
                raise CurvatureError("A training loss is NaN/Inf in the Hessian pass; find the "
                                     "rows with GradientEngine.group_gradients.")
            grads = torch.autograd.grad(losses.sum(), params, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            for start in range(0, len(vectors), chunk):
                out[start:start + chunk] += _vjp_rows(flat, params, vectors[start:start + chunk])
    return out


class ExactHessian(MatrixPreconditioner):
    """The full d × d Hessian of the summed training loss (small models and tests only).

    Args:
        damping: λ.
        max_dim: Refuse to form the Hessian for more than this many parameters.
    """

    name = "exact"

    def __init__(self, damping: float = 0.0, max_dim: int = 4096) -> None:
        super().__init__(damping)
        if max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {max_dim}.")
        self.max_dim = max_dim

    def compute_matrix(self, ctx: CurvatureContext) -> torch.Tensor:
        """Form H column block by column block from Hessian-vector products of the identity.

        Raises:
            ValueError: More than ``max_dim`` selected parameters.
        """
        d = ctx.engine.selection.numel
        if d > self.max_dim:
            raise ValueError(f"The exact Hessian over {d} parameters needs a {d}×{d} matrix "
                             f"(more than max_dim={self.max_dim}). Use preconditioner='ekfac', "
                             "'kfac', 'lissa' or 'datainf', or select fewer parameters.")
        eye = torch.eye(d, dtype=ctx.engine.dtype, device=ctx.engine.device)
        hess = hessian_vector_products(ctx, eye)
        asym = (hess - hess.T).abs().max() / hess.abs().max().clamp(min=1e-300)
        if asym > 1e-6:
            logger.warning("The computed Hessian is not symmetric (relative %.2e).", float(asym))
        return hess


class LiSSA(Preconditioner):
    """LiSSA (Agarwal et al. 2017) as used for influence functions by Koh & Liang (2017).

    The recursion, run ``depth`` times from h_0 = v and averaged over ``repeat`` runs::

        h_j = v + (1 - d) h_{j-1} - H̃_j h_{j-1} / scale,    estimate = h_depth / scale

    with H̃_j the Hessian of the summed loss estimated on a sampled batch (n/b times the
    Hessian of the batch's summed loss), or on all rows when ``batch_size`` is None. Its fixed
    point is h/scale = (H + d·scale·I)⁻¹ v, so the recursion's damping is d = λ/scale for the
    requested λ. It converges when scale > λ_max(H + λI) and H + λI is positive definite.

    Args:
        damping: λ.
        scale: The recursion's scale; None estimates λ_max(H) by power iteration and uses
            1.5 × (|λ_max| + λ).
        depth: Recursion steps.
        repeat: Independent runs averaged.
        batch_size: Rows per sampled Hessian (None: all rows, deterministic).
        seed: Seed of the row sampling.

    Raises:
        ValueError: A setting is out of range.
    """

    name = "lissa"
    side = "query"

    def __init__(self, damping: float = 0.0, scale: Optional[float] = None, depth: int = 100,
                 repeat: int = 1, batch_size: Optional[int] = None, seed: int = 0,
                 power_iterations: int = 20) -> None:
        super().__init__(damping)
        if scale is not None and scale <= 0:
            raise ValueError(f"LiSSA scale must be > 0, got {scale}.")
        if depth < 1 or repeat < 1:
            raise ValueError(f"LiSSA depth and repeat must be >= 1, got {depth}, {repeat}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"LiSSA batch_size must be >= 1 or None, got {batch_size}.")
        self.scale, self.depth, self.repeat = scale, depth, repeat
        self.batch_size, self.seed, self.power_iterations = batch_size, seed, power_iterations
        self.ctx: Optional[CurvatureContext] = None

    def config_dict(self) -> dict[str, Any]:
        """Settings that change the result."""
        cfg = super().config_dict()
        cfg.update(scale=self.scale, depth=self.depth, repeat=self.repeat,
                   batch_size=self.batch_size, seed=self.seed)
        return cfg

    def fit(self, ctx: CurvatureContext) -> None:
        """Keep the context; estimate the scale when none was given."""
        self.ctx = ctx
        if self.scale is None:
            top = self._top_eigenvalue(ctx)
            self.scale = 1.5 * (top + self.damping)
            logger.info("LiSSA: |λ_max(H)| ≈ %.4g, using scale %.4g.", top, self.scale)
        self.fitted = True

    def _top_eigenvalue(self, ctx: CurvatureContext) -> float:
        gen = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, ctx.engine.selection.numel, generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(ctx.engine.dtype).to(ctx.engine.device)
        value = 0.0
        for _ in range(self.power_iterations):
            hv = hessian_vector_products(ctx, v)
            value = float(hv.norm())
            if value == 0.0:
                break
            v = hv / value
        return max(value, 1e-12)

    def _sampled_hvp(self, h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ctx = self.ctx
        assert ctx is not None
        if self.batch_size is None:
            return hessian_vector_products(ctx, h)
        n = ctx.num_rows
        rows = torch.randint(0, n, (self.batch_size,), generator=gen).tolist()
        return hessian_vector_products(ctx, h, ctx.batches(rows)) * (n / self.batch_size)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Run the recursion on all vectors at once.

        Raises:
            NotFittedError: :meth:`fit` was not called.
            CurvatureError: The recursion diverged (scale too small or H + λI indefinite).
        """
        self._require_fitted()
        assert self.scale is not None
        rec_damping = self.damping / self.scale
        total = torch.zeros_like(vectors)
        for r in range(self.repeat):
            gen = torch.Generator().manual_seed(self.seed + 7919 * r)
            h = vectors.clone()
            for _ in progress(range(self.depth), desc=f"LiSSA run {r + 1}/{self.repeat}",
                              unit="step"):
                h = vectors + (1.0 - rec_damping) * h - self._sampled_hvp(h, gen) / self.scale
                if not torch.isfinite(h).all():
                    raise CurvatureError(
                        f"The LiSSA recursion diverged (scale={self.scale:g}, damping="
                        f"{self.damping:g}). Raise the scale above the largest Hessian "
                        "eigenvalue, or the damping above minus the smallest.")
            total += h / self.scale
        return total / self.repeat


register_preconditioner(ExactHessian)
register_preconditioner(LiSSA)
