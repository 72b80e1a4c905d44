"""Source attribution: linearity against point scores, row alignment, bootstrap, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, TracIn, TracInConfig
from hf_ggda.errors import (
    DatasetTypeError,
    EmptyDatasetError,
    GroupingError,
    MissingColumnError,
    NullValueError,
)
from hf_ggda.sources import (
    SOURCE_POINT_COLUMN,
    SOURCE_RANK_COLUMN,
    SOURCE_SCORE_COLUMN,
    RowAlignmentError,
    attribute_sources,
    bootstrap_interval,
)
from hf_ggda.tasks import ROW_COLUMN
from hf_ggda.testing import toy_dataset

N = 24


def _train(seed: int = 3) -> Dataset:
    data = toy_dataset(N, seed=seed)
    return data.add_column("source", [f"src-{i % 5}" for i in range(N)])


def _identity(model, task):
    return InfluenceFunction(model, task, InfluenceConfig(preconditioner="identity",
                                                          batch_size=8))


def test_source_scores_are_sums_of_their_rows_point_scores(bert_setup):
    model, task = bert_setup
    train, evaluation = _train(), toy_dataset(7, seed=11)
    report = attribute_sources(_identity(model, task), train, evaluation, "source",
                               bootstrap=0, drill_sources=0)
    point = _identity(model, task).fit(
        train.add_column("row", list(range(N))), group_column="row").score(evaluation)
    totals = point.matrix.sum(0)  # each row's score summed over the evaluation rows
    sources = train["source"]
    for r in report.table.to_list():
        expected = float(sum(totals[i] for i in range(N) if sources[i] == r["source"]))
        assert r["score"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert r["ci_low"] == r["ci_high"] == r["score"]  # no bootstrap: the point value
    assert sorted(report.table["source"]) == sorted(set(sources))
    assert report.table["rows"] == [sources.count(s) for s in report.table["source"]]


def test_drill_down_and_columns_line_up_after_shuffling(bert_setup):
    model, task = bert_setup
    train = _train()
    train = train.add_column(ROW_COLUMN, list(range(N)))
    evals = {"a": toy_dataset(5, seed=11), "b": toy_dataset(4, seed=12)}
    report = attribute_sources(_identity(model, task), train, evals, "source", bootstrap=50,
                               drill_sources=2)
    scored = report.to_dataset_columns(train)
    shuffled = report.to_dataset_columns(train.shuffle(seed=1))
    by_row = {r[ROW_COLUMN]: r for r in scored.to_list()}
    for r in shuffled.to_list():  # every value follows its row, not its position
        same = by_row[r[ROW_COLUMN]]
        for c in (SOURCE_SCORE_COLUMN, SOURCE_RANK_COLUMN, SOURCE_POINT_COLUMN,
                  f"{SOURCE_SCORE_COLUMN}_a", f"{SOURCE_SCORE_COLUMN}_b"):
            assert r[c] == same[c]
    # the drilled rows' point scores sum to their source's score, per evaluation
    for name in ("a", "b"):
        s = report.scores[name]
        assert report.flagged[name] and len(report.flagged[name]) <= 2
        for g in report.flagged[name]:
            cols = [j for j, pg in enumerate(s.point_groups) if pg == g]
            k = s.group_ids.index(g)
            torch.testing.assert_close(s.point_scores[:, cols].sum(1), s.matrix[:, k],
                                       rtol=1e-9, atol=1e-12)
        drilled = set(report.flagged[name])
        assert all(r[SOURCE_POINT_COLUMN] is not None for r in scored.to_list()
                   if r["source"] in set().union(*map(set, report.flagged.values())))
        assert drilled  # the flagged sources are the lowest-scored ones
        ranking = report.ranking(name)
        assert set(ranking[:len(drilled)]) == drilled
    # rank 1 = most helpful source (summed over evaluations)
    best = report.ranking()[-1]
    assert {r[SOURCE_RANK_COLUMN] for r in scored.to_list() if r["source"] == best} == {1}


def test_positions_are_refused_on_other_rows(bert_setup):
    model, task = bert_setup
    train = _train()
    report = attribute_sources(_identity(model, task), train, toy_dataset(4, seed=11),
                               "source", bootstrap=0, drill_sources=1)
    assert len(report.to_dataset_columns(train)) == N  # the same dataset: by position
    with pytest.raises(RowAlignmentError, match=ROW_COLUMN):
        report.to_dataset_columns(train.shuffle(seed=0))
    with pytest.raises(RowAlignmentError, match="not attributed"):
        report.to_dataset_columns(train.add_column(ROW_COLUMN, list(range(N)))
                                  .map(lambda r: {"source": "new"}))


def test_stale_columns_are_replaced(bert_setup):
    model, task = bert_setup
    train = _train()
    stale = train.add_column(f"{SOURCE_SCORE_COLUMN}_old", [0.0] * N)
    report = attribute_sources(_identity(model, task), stale, toy_dataset(4, seed=11),
                               "source", bootstrap=0, drill_sources=0)
    out = report.to_dataset_columns(stale)
    assert f"{SOURCE_SCORE_COLUMN}_old" not in out.column_names
    assert out[SOURCE_POINT_COLUMN] == [None] * N


def test_tracin_sources_and_card_files(bert_setup, tmp_path):
    model, task = bert_setup
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    attributor = TracIn(model, task, TracInConfig(learning_rates=[0.5, 0.5], batch_size=8),
                        checkpoints=[state, state])
    report = attribute_sources(attributor, _train(), toy_dataset(6, seed=11), "source",
                               bootstrap=20)
    for r in report.table.to_list():
        assert r["ci_low"] <= r["ci_high"]
        assert r["harmful"] == (r["ci_high"] < 0) and r["helpful"] == (r["ci_low"] > 0)
    report.save(tmp_path)
    assert (tmp_path / "sources.png").read_bytes()[:4] == b"\x89PNG"
    assert Dataset.load_from_disk(str(tmp_path / "sources")).num_rows == 5
    assert "| evaluation | source |" in report.to_markdown()


def test_bootstrap_interval_covers_the_sum_and_is_seeded():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(40, 3)) + np.array([1.0, 0.0, -1.0])
    low, high = bootstrap_interval(matrix, 400, 0.9, seed=1)
    again = bootstrap_interval(matrix, 400, 0.9, seed=1)
    np.testing.assert_array_equal(low, again[0])
    assert np.all(low <= matrix.sum(0)) and np.all(matrix.sum(0) <= high)
    assert high[2] < 0 < low[0]  # clear effects are clear


@pytest.mark.parametrize("case, error, match", [
    ("null", NullValueError, "source"),
    ("nan", GroupingError, "NaN"),
    ("one", GroupingError, "at least two sources"),
    ("missing", MissingColumnError, "source"),
    ("empty-eval", EmptyDatasetError, "evaluation set 'evaluation' has no rows"),
    ("empty-train", EmptyDatasetError, "no rows"),
    ("dict", DatasetTypeError, "train"),
])
def test_bad_input_is_a_typed_error(bert_setup, case, error, match):
    model, task = bert_setup
    train, evaluation = toy_dataset(6, seed=3), toy_dataset(3, seed=11)
    values = {"null": ["a", None, "b", "a", "b", "a"],
              "nan": [1.0, float("nan"), 2.0, 1.0, 2.0, 1.0],
              "one": ["a"] * 6}.get(case, ["a", "b"] * 3)
    if case != "missing":
        train = train.add_column("source", values)
    if case == "empty-eval":
        evaluation = evaluation.select([])
    if case == "empty-train":
        train = train.select([])
    if case == "dict":
        train = DatasetDict({"train": train})
    with pytest.raises(error, match=match):
        attribute_sources(_identity(model, task), train, evaluation, "source")
