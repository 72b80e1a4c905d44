"""Within-group gradient coherence: how well one group gradient stands for its members.

GGDA treats a group G as one unit through g_G = Σ_{i∈G} ∇ℓ_i; the error of doing so grows with
the spread of the members' gradients. The figure here is the mean cosine between a member's
gradient and its group's gradient (1 = all members point the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset

from ..logging import get_logger
from ..tasks import GROUP_COLUMN, check_columns
from .partition import column_values

if TYPE_CHECKING:  # pragma: no cover
    from ..gradients import GradientEngine

logger = get_logger(__name__)


@dataclass
class CoherenceResult:
    """Within-group gradient coherence of a grouping, measured on sampled rows.

    Attributes:
        mean: Mean over the counted rows of cos(g_i, g_G(i)).
        per_group: Group id -> mean cosine of its counted rows.
        rows: Rows counted.
        sampled: Rows sampled.
        groups: Groups with at least one counted row.
        skipped: Sampled rows not counted (zero gradient, or alone in their group when
            ``exclude_self``).
        exclude_self: Whether g_G(i) left row i out.
    """

    mean: float
    per_group: dict[Any, float] = field(default_factory=dict)
    rows: int = 0
    sampled: int = 0
    groups: int = 0
    skipped: int = 0
    exclude_self: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        return asdict(self)


def coherence_from_gradients(gradients: torch.Tensor, groups: Sequence[Any],
                             exclude_self: bool = False) -> CoherenceResult:
    """Mean cosine of per-example gradients to the sum of their group's gradients.

    For rows i = 1..m with gradients g_i and groups G(i), let g_G = Σ_{j : G(j) = G} g_j (the
    sum over the *given* rows of that group; minus g_i when ``exclude_self``). The result is
    (1/m') Σ_i cos(g_i, g_G(i)) over the m' rows where both vectors are non-zero.

    Args:
        gradients: (m, p) per-example gradients (projected or not).
        groups: (m,) group of each row.
        exclude_self: Leave row i out of its own group sum (rows alone in their group are then
            skipped); without it, a row alone in its group counts with cosine 1.

    Returns:
        The coherence figures.

    Raises:
        ValueError: ``groups`` does not have one entry per gradient row, or there are no rows.
    """
    g = gradients.detach().to(torch.float64).cpu()
    if g.ndim != 2 or g.shape[0] != len(groups):
        raise ValueError(f"Expected (m, p) gradients for {len(groups)} rows, got "
                         f"{tuple(g.shape)}.")
    if g.shape[0] == 0:
        raise ValueError("No rows to measure coherence on.")
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inv = torch.as_tensor(inverse, dtype=torch.long)
    sums = torch.zeros(len(uniq), g.shape[1], dtype=torch.float64).index_add_(0, inv, g)
    target = sums[inv] - g if exclude_self else sums[inv]
    norm_g, norm_t = g.norm(dim=1), target.norm(dim=1)
    valid = (norm_g > 0) & (norm_t > 0)
    if exclude_self:
        valid &= torch.bincount(inv, minlength=len(uniq))[inv] > 1
    cos = (g * target).sum(1) / (norm_g * norm_t).clamp(min=1e-300)
    per_group: dict[Any, float] = {}
    for k, gid in enumerate(uniq.tolist()):
        rows = valid & (inv == k)
        if rows.any():
            per_group[gid] = float(cos[rows].mean())
    counted = int(valid.sum())
    mean = float(cos[valid].mean()) if counted else float("nan")
    return CoherenceResult(mean=mean, per_group=per_group, rows=counted, sampled=len(groups),
                           groups=len(per_group), skipped=len(groups) - counted,
                           exclude_self=exclude_self)


def sample_rows(n: int, sample: Optional[int], seed: int = 0) -> np.ndarray:
    """Return sorted row indices of a seeded uniform sample of ``sample`` rows (None: all)."""
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be >= 1 or None, got {sample}.")
    if sample is None or sample >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def group_coherence(engine: "GradientEngine", dataset: Dataset,
                    group_column: str = GROUP_COLUMN, sample: Optional[int] = 256,
                    seed: int = 0, exclude_self: bool = False) -> CoherenceResult:
    """Within-group gradient coherence of a grouping, on a seeded sample of rows.

    Exactly what it computes: draw ``sample`` rows uniformly without replacement (seeded; all
    rows if ``sample`` is None or >= n); compute their per-example gradients g_i of the
    training loss with respect to the engine's selected parameters (LoRA adapters by default)
    with :meth:`~hf_ggda.gradients.GradientEngine.per_example_gradients` (projected if the
    engine projects); for each group G, g_G = the sum of the gradients of the *sampled* rows of
    G; return the mean over sampled rows i of cos(g_i, g_G(i)) (see
    :func:`coherence_from_gradients`, also for ``exclude_self``). A row alone in its group
    among the sampled rows has cosine 1, so compare groupings at the same K and sample.

    Args:
        engine: The gradient engine (model, task, parameter selection).
        dataset: Raw rows with a group column.
        group_column: Column with the group ids.
        sample: Rows to sample (None: all rows).
        seed: Seed of the sample.
        exclude_self: Compare g_i with g_G - g_i instead.

    Returns:
        The coherence figures.

    Raises:
        MissingColumnError: No group column.
        EmptyDatasetError: No rows.
        ValueError: ``sample`` < 1.
    """
    check_columns(dataset, [group_column])
    rows = sample_rows(len(dataset), sample, seed)
    subset = dataset.select(rows) if len(rows) < len(dataset) else dataset
    grads = engine.per_example_gradients(subset).gradients
    result = coherence_from_gradients(grads, column_values(subset, group_column),
                                      exclude_self=exclude_self)
    logger.info("Group coherence on %d sampled rows: %.4f.", len(rows), result.mean)
    return result


def compare_groupings(engine: "GradientEngine", grouped: Mapping[str, Dataset],
                      group_column: str = GROUP_COLUMN, sample: Optional[int] = 256,
                      seed: int = 0, exclude_self: bool = False) -> dict[str, CoherenceResult]:
    """Coherence of several groupings of the same rows, on one shared gradient sample.

    The per-example gradients of the sampled rows are computed once (from the first dataset)
    and each grouping is scored on them exactly as in :func:`group_coherence`.

    Args:
        engine: The gradient engine.
        grouped: Name -> the same rows with a group column (e.g. outputs of several groupers).
        group_column: Column with the group ids.
        sample: Rows to sample (None: all).
        seed: Seed of the sample.
        exclude_self: See :func:`coherence_from_gradients`.

    Returns:
        Name -> coherence figures.

    Raises:
        ValueError: No datasets, or they differ in length.
        MissingColumnError: A dataset has no group column.
        EmptyDatasetError: No rows.
    """
    if not grouped:
        raise ValueError("Pass at least one grouped dataset.")
    lengths = {name: len(ds) for name, ds in grouped.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"The grouped datasets differ in length: {lengths}.")
    for ds in grouped.values():
        check_columns(ds, [group_column])
    first = next(iter(grouped.values()))
    rows = sample_rows(len(first), sample, seed)
    subset = first.select(rows) if len(rows) < len(first) else first
    grads = engine.per_example_gradients(subset).gradients
    out = {}
    for name, ds in grouped.items():
        groups = np.asarray(column_values(ds, group_column))[rows]
        out[name] = coherence_from_gradients(grads, groups.tolist(), exclude_self=exclude_self)
        logger.info("Group coherence of %s on %d sampled rows: %.4f.", name, len(rows),
                    out[name].mean)
    return out
