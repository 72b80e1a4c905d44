"""DataInf (Kwon et al. 2024): a closed-form, per-module inverse of the empirical Fisher.

Per block b (the parameters of one linear module, or one other selected tensor), with the
per-row gradients g_i of the n training rows and H_b ≈ Σ_i g_i g_iᵀ (summed loss), DataInf
swaps the order of inversion and averaging:

    (H_b + λI)⁻¹ v ≈ (1/λ) [ v − (1/n) Σ_i (g_iᵀ v) / (λ/n + ‖g_i‖²) · g_i ].

This is the mean of the Sherman–Morrison inverses of (g_i g_iᵀ + (λ/n) I), divided by n; it is
linear (and symmetric) in v, so scores stay additive over groups. The per-row gradients come
from the hooks one batch at a time and are dropped after use; nothing per-row is stored.
"""

from __future__ import annotations

import torch

from ..gradients.hooks import GradientCollector
from ..logging import get_logger
from .base import CurvatureContext, CurvatureError, Preconditioner
from .registry import register_preconditioner

logger = get_logger(__name__)


class DataInf(Preconditioner):
    """DataInf, applied to query vectors at score time (one streaming pass over the rows).

    Args:
        damping: λ > 0 for the summed-loss Hessian (λ/n for the mean-loss Fisher of the paper).

    Raises:
        ValueError: ``damping`` is not positive.
    """

    name = "datainf"
    side = "query"

    def __init__(self, damping: float = 1e-3) -> None:
        super().__init__(damping)
        if self.damping <= 0:
            raise ValueError(f"DataInf needs damping > 0, got {damping}.")
        self.ctx: CurvatureContext | None = None
        self.blocks: list[torch.Tensor] = []

    def fit(self, ctx: CurvatureContext) -> None:
        """Record the blocks (one per linear module, one per other tensor)."""
        collector = GradientCollector(ctx.model, ctx.engine.selection, ctx.engine.dtype)
        offsets = ctx.engine.selection.offsets()
        dev = ctx.engine.device
        blocks = []
        for t in collector.tracked:
            parts = [torch.arange(sl[0], sl[1], device=dev) for sl in (t.weight, t.bias)
                     if sl is not None]
            blocks.append(torch.cat(parts))
        for name in collector.fallback:
            s, e = offsets[name]
            blocks.append(torch.arange(s, e, device=dev))
        self.blocks = blocks
        self.ctx = ctx
        self.fitted = True

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return the DataInf estimate of (H + λI)⁻¹ V (one pass over the training rows).

        Raises:
            NotFittedError: Not fitted.
            CurvatureError: A training loss is NaN/Inf.
        """
        self._require_fitted()
        ctx = self.ctx
        assert ctx is not None
        engine = ctx.engine
        n = ctx.num_rows
        lam_row = self.damping / n
        work = vectors.to(engine.dtype)
        acc = torch.zeros_like(work)
        collector = GradientCollector(ctx.model, engine.selection, engine.dtype)
        with ctx.differentiable(), collector:
            for batch in ctx.batches(desc="DataInf"):
                collector.reset()
                losses = engine.task.per_row_loss(ctx.model, batch)
                if not torch.isfinite(losses.detach()).all():
                    raise CurvatureError("A training loss is NaN/Inf in the DataInf pass.")
                rows = losses.shape[0]
                grads = torch.zeros(rows, engine.selection.numel, dtype=engine.dtype,
                                    device=engine.device)
                collector.backward(losses, torch.arange(rows), grads, per_example=True)
                for idx in self.blocks:
                    g = grads[:, idx]
                    coef = (work[:, idx] @ g.T) / (lam_row + (g * g).sum(1))
                    acc[:, idx] += coef @ g
        return ((work - acc / n) / self.damping).to(vectors.dtype)


register_preconditioner(DataInf)
