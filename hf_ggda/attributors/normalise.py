"""Normalised scores that stay additive over groups.

Raw gradient dot products on large models are dominated by the few rows with huge gradient
norms, so LLM attribution usually normalises both sides. Normalising a *group's* summed
gradient would break additivity (a group's score would no longer be the sum of its members'),
so here every row is normalised *before* it enters its group's sum:

    τ̂(G, q) = Σ_{i ∈ G} u(q)ᵀ M⁻¹ g_i / (‖u(q)‖ · ‖g_i‖),

with, per the ``normalize`` setting,

* ``"unit"``: ‖v‖ = the Euclidean norm of the (projected) gradient, so with the identity
  preconditioner each member contributes its gradient cosine with the query;
* ``"preconditioned"``: ‖v‖ = √(vᵀ M⁻¹ v), the norm in the metric of the fitted preconditioner
  (M⁻¹ = (H + λI)⁻¹ for K-FAC / EK-FAC; equal to ``"unit"`` for the identity).

The training pass is the per-example pass the one-pass grouping already uses (one pass, the
per-row vectors on disk with a store); the group vectors are then the weighted sums
Σ_i g_i / ‖g_i‖, so ``score(G) = Σ_{i ∈ G} score({i})`` holds exactly, as for raw scores.
Query rows are normalised the same way; summed queries (``aggregate="sum"``, query groups)
are sums of normalised rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import torch
from datasets import Dataset

from ..curvature import Preconditioner
from ..errors import MissingColumnError

if TYPE_CHECKING:
    from ..gradients.engine import GradientEngine, GroupGradients, RowFn

#: Values of ``AttributorConfig.normalize``.
NORMALIZE_KINDS: tuple[Optional[str], ...] = (None, "unit", "preconditioned")

RowChunks = Callable[[], Iterator[tuple[list[int], torch.Tensor]]]


def check_normalize(value: Optional[str]) -> None:
    """Validate a ``normalize`` setting.

    Raises:
        ValueError: Not one of :data:`NORMALIZE_KINDS`.
    """
    if value not in NORMALIZE_KINDS:
        raise ValueError(f"normalize must be None, 'unit' or 'preconditioned', got {value!r}: "
                         "'unit' divides every row's gradient by its norm, 'preconditioned' "
                         "by its norm in the preconditioner's metric.")


def metric_norms(vectors: torch.Tensor, kind: str,
                 preconditioner: Optional[Preconditioner]) -> torch.Tensor:
    """Norms of raw (N, p) row vectors under ``kind`` (see the module docstring).

    Args:
        vectors: Raw (untransformed) gradients, one row each.
        kind: ``"unit"`` or ``"preconditioned"``.
        preconditioner: The fitted preconditioner (None: identity).

    Returns:
        (N,) norms, in the vectors' dtype.
    """
    if kind == "unit" or preconditioner is None:
        return vectors.norm(dim=1)
    squared = (vectors * preconditioner.apply(vectors)).sum(1)
    return squared.clamp(min=0).sqrt()


def inverse_norms(norms: torch.Tensor) -> torch.Tensor:
    """1 / norm, with 0 for rows whose gradient is zero (they contribute nothing either way)."""
    return torch.where(norms > 0, 1.0 / norms.clamp(min=torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(norms))


def row_weights(chunks: RowChunks, num_rows: int, kind: str,
                preconditioner: Optional[Preconditioner]) -> np.ndarray:
    """The weight 1 / ‖g_i‖ of every training row, read chunk by chunk (bounded memory).

    Args:
        chunks: Yields (dataset rows, raw per-row vectors), e.g.
            :meth:`~hf_ggda.gradients.engine.GroupGradients.point_chunks`.
        num_rows: Rows of the dataset.
        kind: ``"unit"`` or ``"preconditioned"``.
        preconditioner: The fitted preconditioner (None: identity).

    Returns:
        (num_rows,) float64 weights.

    Raises:
        ValueError: A row is missing from ``chunks``.
    """
    weights = np.full(num_rows, np.nan)
    for rows, vectors in chunks():
        norms = metric_norms(vectors, kind, preconditioner)
        weights[rows] = inverse_norms(norms.double()).cpu().numpy()
    missing = np.flatnonzero(np.isnan(weights))
    if missing.size:
        raise ValueError(f"Per-row vectors missing for rows {missing[:10].tolist()}.")
    return weights


def normalise_rows(vectors: torch.Tensor, kind: Optional[str],
                   preconditioner: Optional[Preconditioner]) -> torch.Tensor:
    """Divide raw (N, p) row vectors by their norms (no-op when ``kind`` is None)."""
    if kind is None:
        return vectors
    return vectors * inverse_norms(metric_norms(vectors, kind, preconditioner))[:, None]


def normalised_query_gradients(engine: "GradientEngine", dataset: Dataset, fn: "RowFn",
                               mode: str, column: Optional[str], how: Optional[str],
                               preconditioner: Optional[Preconditioner]) -> "GroupGradients":
    """Query vectors under ``normalize``: every row normalised, then summed per query group
    (or over all rows, ``mode="sum"``) so scores stay additive over query rows too.

    Args:
        engine: The component's gradient engine.
        dataset: Raw query rows.
        fn: The query measurement.
        mode: ``"rows"``, ``"groups"`` or ``"sum"``.
        column: The query group column (``"groups"`` / ``"sum"``).
        how: The ``normalize`` setting.
        preconditioner: The fitted preconditioner (for ``"preconditioned"``).

    Raises:
        MissingColumnError: The query group column is absent.
    """
    grads = engine.per_example_gradients(dataset, fn=fn)
    grads.gradients = normalise_rows(grads.gradients, how, preconditioner)
    if mode == "rows":
        return grads
    if column not in dataset.column_names:
        raise MissingColumnError(str(column), dataset.column_names, role="query group column")
    return engine.sum_into_groups(grads, dataset, str(column), fn)
