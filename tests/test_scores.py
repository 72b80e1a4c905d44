"""GroupScores: top-k, ranks, dataset columns aligned by id, persistence."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, load_from_disk

from hf_ggda import SIGN_CONVENTION
from hf_ggda.errors import MissingColumnError
from hf_ggda.scores import GroupScores


def _scores(**kwargs: object) -> GroupScores:
    matrix = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], dtype=torch.float64)
    base = dict(matrix=matrix, group_ids=["b", "a", "c"], query_ids=[0, 1],
                config={"attributor_type": "influence"}, fingerprints={"query": "x"})
    base.update(kwargs)
    return GroupScores(**base)  # type: ignore[arg-type]


def _train() -> Dataset:
    return Dataset.from_dict({"row": list(range(7)),
                              "group_id": ["a", "b", "c", "a", "b", "c", "a"],
                              "text": [f"t{i}" for i in range(7)]})


def test_top_k_ranks_and_aggregate() -> None:
    s = _scores()
    assert s.sign_convention == SIGN_CONVENTION
    assert s.top_k(0, 2) == [("c", 3.0), ("b", 1.0)]
    assert s.top_k(1, 1, largest=False) == [("c", -1.0)]
    # summed over queries: b=1.5, a=2.0, c=2.0 -> a and c tie; stable order keeps a first
    assert s.top_k(None, 3) == [("a", 2.0), ("c", 2.0), ("b", 1.5)]
    assert s.ranks().tolist() == [3, 1, 2]
    with pytest.raises(IndexError):
        s.top_k(5, 1)
    with pytest.raises(ValueError):
        s.top_k(0, 0)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="group ids"):
        _scores(group_ids=["a", "b"])
    with pytest.raises(ValueError, match="query ids"):
        _scores(query_ids=[0])
    with pytest.raises(ValueError, match="query_mode"):
        _scores(query_mode="mean")
    with pytest.raises(ValueError, match="self_influence"):
        _scores(self_influence=torch.zeros(2))


def test_dataset_columns_follow_group_ids_not_positions(tmp_path: object) -> None:
    s = _scores(self_influence=torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64),
                point_scores=torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
                point_rows=[4, 1], point_groups=["b", "b"], point_key="row")
    train = _train()
    out = s.to_dataset_columns(train)
    expect_score = {"a": -2.0 + 4.0, "b": 1.5, "c": 2.0}
    assert out["ggda_group_score"] == [expect_score[g] for g in train["group_id"]]
    assert out["ggda_group_rank"] == [{"a": 1, "c": 2, "b": 3}[g] for g in train["group_id"]]
    assert out["ggda_self_influence"] == [{"b": 10.0, "a": 20.0, "c": 30.0}[g]
                                          for g in train["group_id"]]
    assert out["ggda_point_score"] == [None, 6.0, None, None, 4.0, None, None]
    # a shuffled copy gets the same values per row
    shuffled = s.to_dataset_columns(train.shuffle(seed=3))
    by_row = {r["row"]: r for r in out}
    for r in shuffled:
        for col in ("ggda_group_score", "ggda_group_rank", "ggda_self_influence",
                    "ggda_point_score"):
            assert r[col] == by_row[r["row"]][col]
    # round trip through save_to_disk / load_from_disk keeps values and types
    path = str(tmp_path) + "/ds"  # type: ignore[operator]
    shuffled.save_to_disk(path)
    loaded = load_from_disk(path)
    assert loaded.features == shuffled.features
    assert loaded.to_dict() == shuffled.to_dict()
    # writing again replaces the columns instead of failing
    again = s.to_dataset_columns(out)
    assert again.column_names == out.column_names


def test_dataset_columns_without_extras_and_errors() -> None:
    s = _scores()
    out = s.to_dataset_columns(_train())
    assert "ggda_self_influence" not in out.column_names
    assert out["ggda_point_score"] == [None] * 7
    assert out.features["ggda_point_score"].dtype == "float64"
    with pytest.raises(MissingColumnError):
        s.to_dataset_columns(_train().remove_columns("group_id"))
    positional = _scores(point_scores=torch.ones(2, 1, dtype=torch.float64), point_rows=[9],
                         point_groups=["a"], point_key=None)
    with pytest.raises(ValueError, match="row position"):
        positional.to_dataset_columns(_train())


def test_query_columns_rows_groups_and_sum() -> None:
    s = _scores()
    q = Dataset.from_dict({"text": ["q0", "q1"]})
    out = s.to_query_columns(q, k=2)
    assert out["ggda_top_groups"] == [["c", "b"], ["a", "b"]]
    assert out["ggda_top_scores"] == [[3.0, 1.0], [4.0, 0.5]]
    with pytest.raises(ValueError, match="rows"):
        s.to_query_columns(Dataset.from_dict({"text": ["x"]}))
    grouped = _scores(query_ids=["x", "y"], query_mode="groups", query_group_column="qg")
    qg = Dataset.from_dict({"qg": ["y", "x", "y"]})
    out = grouped.to_query_columns(qg, k=1)
    assert out["ggda_top_groups"] == [["a"], ["c"], ["a"]]
    summed = GroupScores(torch.ones(1, 3), ["a", "b", "c"], ["all"], query_mode="sum")
    with pytest.raises(ValueError, match="summed"):
        summed.to_query_columns(q)


def test_integer_group_ids_in_query_columns() -> None:
    s = GroupScores(torch.tensor([[0.1, 0.3]]), [7, 3], [0])
    out = s.to_query_columns(Dataset.from_dict({"t": ["q"]}), k=2)
    assert out["ggda_top_groups"] == [[3, 7]]
    assert out.features["ggda_top_groups"].feature.dtype == "int64"


def test_save_and_load_round_trip(tmp_path: object) -> None:
    s = _scores(self_influence=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                point_scores=torch.tensor([[1.0], [2.0]], dtype=torch.float64),
                point_rows=[3], point_groups=["a"], point_key=None,
                query_mode="groups", query_group_column="qg")
    s.save_pretrained(str(tmp_path))
    loaded = GroupScores.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.matrix, s.matrix) and loaded.matrix.dtype == torch.float64
    assert torch.equal(loaded.self_influence, s.self_influence)  # type: ignore[arg-type]
    assert torch.equal(loaded.point_scores, s.point_scores)  # type: ignore[arg-type]
    for name in ("group_ids", "query_ids", "config", "fingerprints", "sign_convention",
                 "query_mode", "query_group_column", "point_rows", "point_groups", "point_key",
                 "group_column"):
        assert getattr(loaded, name) == getattr(s, name), name
    assert "influence" in repr(loaded)
    with pytest.raises(FileNotFoundError):
        GroupScores.from_pretrained(str(tmp_path) + "/missing")  # type: ignore[operator]
