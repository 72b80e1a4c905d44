"""Model-free groupers: random, label-stratified random, and a user's own column."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset

from ..tasks import AttributionTask
from .base import Assignment, Grouper, GrouperConfig
from .partition import allocate_groups, check_k_setting, check_num_groups, column_values, factorize
from .registry import register_grouper


@dataclass
class RandomConfig(GrouperConfig):
    """Settings of :class:`RandomGrouper`.

    Attributes:
        num_groups: K.
        seed: Seed of the shuffle.
    """

    num_groups: int = field(default=8, metadata={"help": "Number of groups K."})
    seed: int = field(default=0, metadata={"help": "Seed of the random permutation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k_setting(self.num_groups)


@dataclass
class StratifiedConfig(GrouperConfig):
    """Settings of :class:`StratifiedGrouper`.

    Attributes:
        num_groups: K (split across labels).
        label_column: Column with the labels (any hashable type).
        allocation: ``"proportional"`` (groups per label in proportion to its rows) or
            ``"equal"``.
        seed: Seed of the shuffles.
    """

    num_groups: int = field(default=8, metadata={"help": "Number of groups K."})
    label_column: str = field(default="label", metadata={"help": "Column with the labels."})
    allocation: str = field(default="proportional", metadata={
        "help": "Split K across labels 'proportional'ly to their sizes or 'equal'ly."})
    seed: int = field(default=0, metadata={"help": "Seed of the random permutations."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k_setting(self.num_groups)
        if self.allocation not in ("proportional", "equal"):
            raise ValueError("allocation must be 'proportional' or 'equal', got "
                             f"{self.allocation!r}.")


@dataclass
class ColumnConfig(GrouperConfig):
    """Settings of :class:`ColumnGrouper`.

    Attributes:
        column: Existing column whose values define the groups (source, domain, file...).
    """

    column: str = field(default="source", metadata={
        "help": "Column whose distinct values are the groups (ids in sorted value order)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.column:
            raise ValueError("column must be a non-empty column name.")


def random_partition(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Return ids 0..K-1 for n rows: a random permutation dealt round-robin (sizes differ by <= 1).

    Args:
        n: Rows.
        k: Groups.
        rng: Random generator.

    Returns:
        (n,) int64 ids.

    Raises:
        GroupingError: K < 1 or K > n.
    """
    check_num_groups(k, n)
    ids = np.empty(n, dtype=np.int64)
    ids[rng.permutation(n)] = np.arange(n) % k
    return ids


class RandomGrouper(Grouper):
    """Random groups of near-equal sizes (sizes differ by at most one), seeded."""

    name = "random"
    config_class = RandomConfig
    config: RandomConfig

    def _group(self, dataset: Dataset, model: Optional[torch.nn.Module],
               task: Optional[AttributionTask], context: dict[str, Any]) -> Assignment:
        k = self.config.num_groups
        ids = random_partition(len(dataset), k, np.random.default_rng(self.config.seed))
        return Assignment(ids, k)


class StratifiedGrouper(Grouper):
    """Random groups within each label: every group holds one label; K split across labels."""

    name = "stratified"
    config_class = StratifiedConfig
    config: StratifiedConfig

    def required_columns(self) -> list[str]:
        return [self.config.label_column]

    def _group(self, dataset: Dataset, model: Optional[torch.nn.Module],
               task: Optional[AttributionTask], context: dict[str, Any]) -> Assignment:
        cfg = self.config
        classes, inverse = factorize(column_values(dataset, cfg.label_column),
                                        cfg.label_column)
        check_num_groups(cfg.num_groups, len(dataset))
        counts = np.bincount(inverse, minlength=len(classes))
        shares = allocate_groups({i: int(c) for i, c in enumerate(counts)}, cfg.num_groups,
                                 cfg.allocation, what="label")
        rng = np.random.default_rng(cfg.seed)
        ids = np.empty(len(dataset), dtype=np.int64)
        class_of_group: dict[int, Any] = {}
        offset = 0
        for ci, value in enumerate(classes):
            rows = np.flatnonzero(inverse == ci)
            ids[rows] = offset + random_partition(len(rows), shares[ci], rng)
            class_of_group.update({offset + j: value for j in range(shares[ci])})
            offset += shares[ci]
        extra = {"class_of_group": class_of_group,
                 "groups_per_class": {classes[i]: s for i, s in shares.items()}}
        return Assignment(ids, cfg.num_groups, extra)


class ColumnGrouper(Grouper):
    """Groups from an existing column: value -> id 0..K-1 in sorted order of the values.

    Any hashable type works (lists compare as tuples); nulls raise
    :class:`~hf_ggda.errors.GroupingError`. ``describe().extra["values"]`` maps id -> value.
    """

    name = "column"
    config_class = ColumnConfig
    config: ColumnConfig

    def required_columns(self) -> list[str]:
        return [self.config.column]

    def _group(self, dataset: Dataset, model: Optional[torch.nn.Module],
               task: Optional[AttributionTask], context: dict[str, Any]) -> Assignment:
        values, ids = factorize(column_values(dataset, self.config.column),
                                 self.config.column)
        return Assignment(ids, len(values), {"values": dict(enumerate(values))})


register_grouper(RandomGrouper)
register_grouper(StratifiedGrouper)
register_grouper(ColumnGrouper)
