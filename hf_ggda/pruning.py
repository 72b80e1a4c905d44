"""Dataset pruning from group scores: drop the least helpful groups.

Groups are ordered by their score summed over the queries (> 0 helps, see
:data:`hf_ggda.SIGN_CONVENTION`), per row (score / size: a dense harm ranks first) or in
total, and dropped least helpful first until a share of the rows is gone. A group that would
overshoot that budget by more than half its size is skipped, so the dropped share stays close
to the target with uneven group sizes. With a balance column (e.g. the label, when groups are
made within labels) the budget applies to each of its values separately.

A :class:`~hf_ggda.self_influence.SelfInfluence` result prunes the other way round: groups of
*highest* self-influence (data the model finds most surprising) go first; no query score is
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from datasets import Dataset

from .errors import GroupingError, MissingColumnError
from .scores import GroupScores
from .self_influence import SelfInfluence

RANKS = ("per-row", "total")


def prune_order(group_scores: np.ndarray, sizes: np.ndarray, rank: str = "per-row"
                ) -> np.ndarray:
    """Group indices, least helpful first.

    Args:
        group_scores: (K,) scores summed over the queries (> 0 helps).
        sizes: (K,) group sizes.
        rank: ``"per-row"`` (score / size) or ``"total"``.

    Returns:
        (K,) indices.

    Raises:
        ValueError: Unknown ``rank``.
    """
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}.")
    key = group_scores / sizes if rank == "per-row" else group_scores
    return np.argsort(key, kind="stable")


def choose_groups(order: np.ndarray, sizes: np.ndarray, fraction: float,
                  owner: Optional[np.ndarray] = None) -> list[int]:
    """Walk ``order`` and take every group that brings the dropped rows closer to the budget.

    Args:
        order: Group indices, least helpful first.
        sizes: (K,) group sizes.
        fraction: Share of the rows to drop, in [0, 1).
        owner: (K,) balance value of each group (e.g. its label): the budget is ``fraction``
            of each value's rows. None: one global budget.

    Returns:
        Indices of the groups to drop.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    owner = np.zeros(len(sizes), dtype=np.int64) if owner is None else np.asarray(owner)
    chosen: list[int] = []
    for value in np.unique(owner):
        budget = fraction * sizes[owner == value].sum()
        total = 0
        for k in order:
            if owner[k] == value and total + sizes[k] / 2 < budget:
                chosen.append(int(k))
                total += int(sizes[k])
    return chosen


@dataclass
class PruneResult:
    """Rows kept and dropped by :func:`prune_dataset`.

    Attributes:
        kept: The remaining rows.
        dropped: The removed rows.
        dropped_groups: Ids of the removed groups, least helpful first.
        dropped_fraction: Share of rows removed.
    """

    kept: Dataset
    dropped: Dataset
    dropped_groups: list[Any]
    dropped_fraction: float


def prune_dataset(train: Dataset, scores: GroupScores | SelfInfluence, fraction: float,
                  rank: str = "per-row", balance_column: Optional[str] = None,
                  group_column: Optional[str] = None) -> PruneResult:
    """Drop the least helpful groups of ``train`` (about ``fraction`` of its rows).

    Args:
        train: The grouped training rows the scores were computed for.
        scores: Group scores (summed over the queries; least helpful dropped first), or a
            self-influence result (highest self-influence dropped first).
        fraction: Share of rows to drop, in [0, 1).
        rank: ``"per-row"`` or ``"total"`` (see :func:`prune_order`).
        balance_column: Budget the share within each value of this column (each group must
            hold one value, as with ``per_class`` grouping). None: one global budget.
        group_column: Column of group ids (default: the scores' own).

    Returns:
        The kept and dropped rows.

    Raises:
        MissingColumnError: The group or balance column is absent.
        GroupingError: Rows belong to groups without scores, or a group mixes balance values.
        ValueError: ``fraction`` or ``rank`` out of range.
    """
    column = group_column or scores.group_column
    for name, role in ((column, "group column"), (balance_column, "balance column")):
        if name is not None and name not in train.column_names:
            raise MissingColumnError(name, train.column_names, role=role)
    index = scores.group_index()
    ids = train[column]
    unknown = sorted({str(g) for g in ids if g not in index})
    if unknown:
        raise GroupingError(f"{len(unknown)} groups of the data have no scores (e.g. "
                            f"{unknown[:3]}); score this grouping of the data first.")
    of_row = np.array([index[g] for g in ids])
    sizes = np.bincount(of_row, minlength=scores.num_groups).astype(np.float64)
    owner = None
    if balance_column is not None:
        values = np.unique(np.asarray(train[balance_column]), return_inverse=True)[1]
        owner = np.full(scores.num_groups, -1, dtype=np.int64)
        owner[of_row] = values
        if not np.array_equal(owner[of_row], values):
            raise GroupingError(f"Some groups mix values of {balance_column!r}; group within "
                                f"it (per_class) or prune without a balance column.")
    totals = scores.aggregated().double().numpy()
    if isinstance(scores, SelfInfluence):  # most surprising first
        totals = -totals
    safe = np.where(sizes > 0, sizes, 1.0)
    order = [k for k in prune_order(totals, safe, rank) if sizes[k] > 0]
    drop = choose_groups(np.array(order, dtype=np.int64), sizes, fraction, owner)
    mask = np.isin(of_row, drop)
    dropped_set = set(drop)
    dropped_ids = [scores.group_ids[k] for k in order if k in dropped_set]
    return PruneResult(kept=train.select(np.flatnonzero(~mask)),
                       dropped=train.select(np.flatnonzero(mask)),
                       dropped_groups=dropped_ids,
                       dropped_fraction=float(mask.mean()) if len(mask) else 0.0)


__all__ = ["RANKS", "PruneResult", "choose_groups", "prune_dataset", "prune_order"]
