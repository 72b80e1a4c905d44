"""The top-k groups of every query, without the m × K score matrix.

:meth:`hf_ggda.attributors.Attributor.score` with ``top_k=k`` scores the queries chunk by chunk
and keeps only each query's k best groups: memory m × k instead of m × K, for many queries
against many groups (or point mode, K = n). The values are exactly the top-k entries of the
full matrix (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from datasets import Dataset, List, Value

from .scores import TOP_GROUPS_COLUMN, TOP_SCORES_COLUMN


@dataclass
class TopGroupScores:
    """Each query's k highest-scoring groups.

    Attributes:
        values: (m, k) scores, best first.
        indices: (m, k) column indices into ``group_ids``.
        group_ids: The K fitted group ids.
        query_ids: The m query ids (row positions).
        sign_convention: The project's sign convention (positive = the group helps).
        config: The attributor's settings.
    """

    values: torch.Tensor
    indices: torch.Tensor
    group_ids: list[Any]
    query_ids: list[Any]
    sign_convention: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        """m."""
        return int(self.values.shape[0])

    def top_k(self, query_index: int, k: Optional[int] = None) -> list[tuple[Any, float]]:
        """(group id, score) pairs of one query, best first (at most the kept k).

        Raises:
            IndexError: ``query_index`` is out of range.
        """
        if not 0 <= query_index < self.num_queries:
            raise IndexError(f"query_index {query_index} out of range for {self.num_queries} "
                             "queries.")
        keep = self.values.shape[1] if k is None else min(k, self.values.shape[1])
        return [(self.group_ids[int(i)], float(v)) for v, i in
                zip(self.values[query_index, :keep], self.indices[query_index, :keep])]

    def to_query_columns(self, query: Dataset) -> Dataset:
        """Add ``ggda_top_groups`` and ``ggda_top_scores`` to the scored query rows.

        Raises:
            ValueError: ``query`` does not have one row per scored query.
        """
        if len(query) != self.num_queries:
            raise ValueError(f"The query dataset has {len(query)} rows but the scores have "
                             f"{self.num_queries} queries.")
        pairs = [self.top_k(i) for i in range(self.num_queries)]
        id_feature = Value("string") if any(isinstance(g, str) for g in self.group_ids) \
            else Value("int64")
        out = query
        for name, values, feature in (
                (TOP_GROUPS_COLUMN, [[g for g, _ in p] for p in pairs], List(id_feature)),
                (TOP_SCORES_COLUMN, [[v for _, v in p] for p in pairs], List(Value("float64")))):
            if name in out.column_names:
                out = out.remove_columns(name)
            out = out.add_column(name, values, feature=feature)
        return out

