"""Pruning from group scores: order, budget, balance, and the kept / dropped rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_ggda.errors import GroupingError, MissingColumnError
from hf_ggda.pruning import choose_groups, prune_dataset, prune_order
from hf_ggda.scores import GroupScores


def test_prune_order_least_helpful_per_row_first() -> None:
    scores, sizes = np.array([-4.0, -1.0, 3.0]), np.array([8, 1, 3])
    assert prune_order(scores, sizes, "per-row").tolist() == [1, 0, 2]
    assert prune_order(scores, sizes, "total").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="rank"):
        prune_order(scores, sizes, "mean")


def test_choose_groups_keeps_to_the_budget_within_each_label() -> None:
    sizes = np.array([10, 2, 2, 2, 5, 5, 5, 5])
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    order = np.array([0, 4, 1, 5, 2, 3, 6, 7])
    # label 0 (16 rows, budget 3.2): the 10-row group overshoots and is skipped; 2 + 2 rows
    # overshoot by less than half a group. Label 1 (20 rows, budget 4): one group of 5.
    assert choose_groups(order, sizes, 0.2, classes) == [1, 2, 4]
    assert choose_groups(order, sizes, 0.2) == [0]  # one budget of 7.2 rows: 10 rows
    assert choose_groups(order, sizes, 0.0) == []
    with pytest.raises(ValueError, match="fraction"):
        choose_groups(order, sizes, 1.0)


def _scored() -> tuple[Dataset, GroupScores]:
    # 4 groups of 5 rows, labels constant within groups; two queries
    train = Dataset.from_dict({"text": [f"row {i}" for i in range(20)],
                               "label": [0] * 10 + [1] * 10,
                               "group_id": [g for g in ("a", "b", "c", "d") for _ in range(5)]})
    matrix = torch.tensor([[1.0, -3.0, 2.0, 0.5], [1.0, -1.0, -4.0, 0.5]])  # sums 2, -4, -2, 1
    scores = GroupScores(matrix=matrix, group_ids=["a", "b", "c", "d"], query_ids=[0, 1])
    return train, scores


def test_prune_dataset_drops_the_least_helpful_groups() -> None:
    train, scores = _scored()
    res = prune_dataset(train.shuffle(seed=0), scores, 0.5)
    assert res.dropped_groups == ["b", "c"] and res.dropped_fraction == 0.5
    assert sorted(set(res.kept["group_id"])) == ["a", "d"]
    assert len(res.kept) + len(res.dropped) == 20
    # within each label: label 0 holds a (+2) and b (-4), label 1 holds c (-2) and d (+1)
    res = prune_dataset(train, scores, 0.5, balance_column="label")
    assert sorted(res.dropped_groups) == ["b", "c"]
    res = prune_dataset(train, scores, 0.25)
    assert res.dropped_groups == ["b"] and res.dropped_fraction == 0.25


def test_prune_dataset_bad_input() -> None:
    train, scores = _scored()
    with pytest.raises(MissingColumnError, match="balance column 'source'"):
        prune_dataset(train, scores, 0.2, balance_column="source")
    with pytest.raises(GroupingError, match="no scores"):
        prune_dataset(train.map(lambda r: {"group_id": r["group_id"] + "x"}), scores, 0.2)
    mixed = train.map(lambda r, i: {"label": i % 2}, with_indices=True)
    with pytest.raises(GroupingError, match="mix values of 'label'"):
        prune_dataset(mixed, scores, 0.2, balance_column="label")
