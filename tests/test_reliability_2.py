"""The bad-input contract, round two (issue 18): output folders the project did not write,
group ids and scores that are not finite numbers. Every case asserts the typed error, that its
message names the fix, and that nothing was written or lost."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from datasets import Dataset, load_from_disk

from hf_ggda.attributors import InfluenceConfig, InfluenceFunction
from hf_ggda.cli import main
from hf_ggda.errors import (
    GroupingError,
    ModelNotLearnedError,
    ModelNotLearnedWarning,
    NonFiniteError,
    NonFiniteScoresError,
    OutputPathError,
    RowAlignmentError,
)
from hf_ggda.grouping import get_grouper
from hf_ggda.integrations.cards import write_attribution_card
from hf_ggda.integrations.hub import OUTPUT_MARKER, save_dataset_atomic
from hf_ggda.scores import GroupScores
from hf_ggda.testing import toy_dataset
from hf_ggda.training import finetune

from .conftest import make_setup
from .test_cli import saved_model  # noqa: F401 (fixture)
from .test_store import _snapshot


def _rows(n: int = 4) -> Dataset:
    return Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "label": [0] * n})


# -- dataset folders are replaced only when hf_ggda wrote them -----------------------------------
def test_user_folder_at_an_output_path_is_never_deleted(tmp_path):
    mine = tmp_path / "out" / "train"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own work")
    _rows().save_to_disk(str(mine / "raw"))  # even a saved dataset of the user's is kept
    before = _snapshot(tmp_path)
    with pytest.raises(OutputPathError) as info:
        save_dataset_atomic(_rows(), mine)
    message = str(info.value)
    assert str(mine) in message and "notes.txt" in message
    assert "never deletes" in message and "choose another output folder" in message
    assert isinstance(info.value, ValueError)
    assert _snapshot(tmp_path) == before  # no temp folder left beside it either


def test_user_file_or_link_at_an_output_path_is_refused(tmp_path):
    (tmp_path / "train").write_text("my file")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    before = _snapshot(tmp_path)
    for target in (tmp_path / "train", tmp_path / "link"):
        with pytest.raises(OutputPathError, match="file or a link") as info:
            save_dataset_atomic(_rows(), target)
        assert "choose another output folder" in str(info.value)
    assert _snapshot(tmp_path) == before


def test_own_output_and_empty_folders_are_replaced(tmp_path):
    target = tmp_path / "kept"
    target.mkdir()  # empty: nothing to lose
    save_dataset_atomic(_rows(2), target)
    assert (target / OUTPUT_MARKER).is_file() and len(load_from_disk(str(target))) == 2
    save_dataset_atomic(_rows(3), target)  # a rerun replaces its own earlier output
    assert len(load_from_disk(str(target))) == 3
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # no temp or old folder left


# -- group ids that are no ids ------------------------------------------------------------------
NAN = float("nan")
BAD_GROUP_IDS = {
    "NaN among floats": ([0.0, 1.0, NAN] * 4, "NaN or Inf", "rows [2, 5, 8, 11] (4 of 12)"),
    "NaN among ints": ([NAN, 1] * 6, "NaN or Inf", "not a group id"),
    "Inf": ([0.0, math.inf, 1.0] * 4, "NaN or Inf", "cannot be stored"),
    "-Inf": ([-math.inf, 0.0, 1.0] * 4, "NaN or Inf", "rows [0, 3, 6, 9]"),
    "fractional floats": ([0.5, 0.7, 1.0] * 4, "fractional float ids", "would collide"),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUP_IDS))
def test_group_ids_that_are_no_ids_are_refused_before_anything_is_written(bert_setup, tmp_path,
                                                                          case):
    ids, kind, where = BAD_GROUP_IDS[case]
    data = toy_dataset(12).add_column("group_id", ids)
    attributor = InfluenceFunction(*bert_setup, InfluenceConfig())
    with pytest.raises(GroupingError) as info:
        attributor.fit(data, store=str(tmp_path / "store"))
    message = str(info.value)
    assert kind in message and where in message
    assert "Fill them" in message or "Cast the column" in message  # the fix
    assert os.listdir(tmp_path) == []  # no store folder started


def test_integral_float_group_ids_still_work(bert_setup):
    attributor = InfluenceFunction(*bert_setup, InfluenceConfig())
    attributor.fit(toy_dataset(12).add_column("group_id", [0.0, 1.0, 2.0] * 4))
    assert attributor.group_ids == [0.0, 1.0, 2.0]


def test_column_grouper_refuses_nan_like_null(tmp_path):
    data = Dataset.from_dict({"text": ["a", "b", "c"], "src": [1.0, NAN, 2.0]})
    with pytest.raises(GroupingError, match=r"nulls at rows \[1\]") as info:
        get_grouper("column", column="src").assign(data)
    assert "Fill them" in str(info.value)


# -- scores that overflow the dtype ---------------------------------------------------------------
def _huge_head_model():
    model, task = make_setup("bert", ("classifier",))
    model = model.float()
    with torch.no_grad():  # finite losses and gradients (~1e22), products beyond float32's 3.4e38
        for name, p in model.named_parameters():
            if "classifier" in name and "modules_to_save" in name:
                p.mul_(1e22)
    return model, task


def test_float32_overflow_in_scores_raises_a_typed_error(tmp_path):
    model, task = _huge_head_model()
    attributor = InfluenceFunction(model, task, InfluenceConfig()).fit(
        toy_dataset(12).add_column("group_id", [0, 1, 2] * 4), store=str(tmp_path / "s"))
    snapshot = _snapshot(tmp_path)
    # (call, where the message says the overflow is): chunks stop at the first bad one
    calls = {"score": (lambda: attributor.score(toy_dataset(3)), "query rows [1, 2] against"),
             "chunked score": (lambda: attributor.score(toy_dataset(3), query_chunk=1),
                               "query rows [1] against"),
             "self-influence": (attributor.self_scores, "Self-influence of groups [0, 1, 2]")}
    for name, (call, where) in calls.items():
        with pytest.raises(NonFiniteScoresError) as info:
            call()
        message = str(info.value)
        assert where in message and "NaN or infinite" in message, name
        assert "overflowed float32" in message, name
        assert "model.double()" in message and "normalize='unit'" in message, name
        assert isinstance(info.value, NonFiniteError)
        assert isinstance(info.value, FloatingPointError)
    assert _snapshot(tmp_path) == snapshot  # nothing written


def test_the_named_fix_for_overflow_works():
    model, task = _huge_head_model()
    model = model.double()
    scores = InfluenceFunction(model, task, InfluenceConfig()).fit(
        toy_dataset(12).add_column("group_id", [0, 1, 2] * 4)).score(toy_dataset(3))
    assert bool(torch.isfinite(scores.matrix).all()) and scores.matrix.abs().max() > 3.4e38


# -- per-row results land only on the rows they belong to -----------------------------------------
@pytest.fixture
def fitted(bert_setup):
    train = toy_dataset(12).add_column("group_id", [0, 1, 2] * 4)
    return InfluenceFunction(*bert_setup, InfluenceConfig()).fit(train), train


def test_query_columns_on_shuffled_or_other_queries_raise(fitted, tmp_path):
    attributor, _ = fitted
    queries = toy_dataset(4, seed=4)
    for scores in (attributor.score(queries), attributor.score(queries, query_chunk=2)):
        scores.save_pretrained(str(tmp_path / "s"))
        for result in (scores, GroupScores.from_pretrained(str(tmp_path / "s"))):
            for wrong in (queries.select([3, 2, 1, 0]), toy_dataset(4, seed=5)):
                with pytest.raises(RowAlignmentError) as info:
                    result.to_query_columns(wrong, k=2)
                message = str(info.value)
                assert "not the scored ones" in message and "wrong rows" in message
                assert "exactly as it was given to score()" in message
            extra = queries.add_column("note", ["x"] * 4)  # added columns do not matter
            out = result.to_query_columns(extra, k=2)
            assert out["ggda_top_groups"] == result.to_query_columns(queries, k=2)[
                "ggda_top_groups"]


def test_positional_drill_down_on_another_dataset_raises(fitted):
    attributor, train = fitted
    queries = toy_dataset(3, seed=4)
    refined = attributor.refine(attributor.score(queries), top_k=1)
    assert refined.point_key is None  # keyed by position in the fitted dataset
    drilled = attributor.self_influence(drill_top=1)
    for result, what in ((refined, "Point scores"), (drilled, "Point self-influence")):
        for wrong in (train.shuffle(seed=1), train.select(range(6))):
            with pytest.raises(RowAlignmentError) as info:
                result.to_dataset_columns(wrong)
            message = str(info.value)
            assert what in message and "row position" in message
            assert "attributor.train_dataset" in message and "row_column=" in message
        result.to_dataset_columns(train)  # the fitted dataset itself is fine


def test_keyed_drill_down_follows_rows_through_a_shuffle(bert_setup):
    train = toy_dataset(12).add_column("group_id", [0, 1, 2] * 4)
    train = train.add_column("__ggda_row__", list(range(12)))
    attributor = InfluenceFunction(*bert_setup, InfluenceConfig()).fit(train)
    refined = attributor.refine(attributor.score(toy_dataset(3, seed=4)), top_k=1)
    plain = refined.to_dataset_columns(train)
    shuffled = refined.to_dataset_columns(train.shuffle(seed=1))
    by_key = dict(zip(plain["__ggda_row__"], plain["ggda_point_score"]))
    assert dict(zip(shuffled["__ggda_row__"], shuffled["ggda_point_score"])) == by_key
    assert sum(v is not None for v in by_key.values()) == 4  # one group of 4 rows drilled


def test_stale_self_influence_columns_are_removed(fitted):
    attributor, train = fitted
    queries = toy_dataset(3, seed=4)
    earlier = attributor.self_influence(drill_top=1).to_dataset_columns(train)
    assert {"ggda_self_influence", "ggda_self_rank"} <= set(earlier.column_names)
    out = attributor.score(queries).to_dataset_columns(earlier)
    assert not {"ggda_self_influence", "ggda_self_rank", "ggda_point_self_influence"} & \
        set(out.column_names)
    fresh = attributor.score(queries, self_influence=True).to_dataset_columns(earlier)
    index = {g: i for i, g in enumerate(attributor.group_ids)}
    expected = attributor.self_scores().tolist()
    assert fresh["ggda_self_influence"] == [expected[index[g]] for g in fresh["group_id"]]


def test_group_columns_on_rows_grouped_differently_raise(fitted):
    attributor, train = fitted
    scores = attributor.score(toy_dataset(3, seed=4), self_influence=True)
    drilled = attributor.self_influence()
    regrouped = train.remove_columns("group_id").add_column(  # same K, same ids, other rows
        "group_id", [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    for result in (scores, drilled):
        with pytest.raises(RowAlignmentError) as info:
            result.to_dataset_columns(regrouped)
        message = str(info.value)
        assert "grouped differently" in message and "'group_id'" in message
        assert "attributor.train_dataset" in message and "fit again" in message
        shuffled = result.to_dataset_columns(train.shuffle(seed=1))  # any order is fine
        plain = result.to_dataset_columns(train)
        key = "ggda_group_score" if result is scores else "ggda_self_influence"
        assert sorted(zip(shuffled["text"], shuffled[key])) == sorted(zip(plain["text"],
                                                                          plain[key]))
        assert len(result.to_dataset_columns(train.select(range(5)))) == 5  # subsets by id


# -- a model that has not learned -----------------------------------------------------------------
def test_untrained_classifier_warns_strict_refuses_and_the_card_says_so(tmp_path):
    model, task = make_setup("bert", ("classifier",))  # random head: one predicted class
    train = toy_dataset(12).add_column("group_id", [0, 1, 2] * 4)
    with pytest.raises(ModelNotLearnedError) as info:
        InfluenceFunction(model, task, InfluenceConfig(strict=True)).fit(
            train, store=str(tmp_path / "store"))
    message = str(info.value)
    assert "has not learned" in message and "majority-class rate" in message
    assert "Train it further" in message and "strict=False" in message
    assert os.listdir(tmp_path) == []  # refused before any pass or store
    with pytest.warns(ModelNotLearnedWarning, match="label entropy"):
        attributor = InfluenceFunction(model, task, InfluenceConfig()).fit(train)
    scores = attributor.score(toy_dataset(2, seed=4))
    check = scores.config["model_check"]
    assert check["learned"] is False and check["predicted_classes"] == 1
    readme = write_attribution_card(tmp_path / "card", scores, train).read_text()
    assert "had not learned its task" in readme and "Train it further" in readme


def test_trained_classifier_passes_the_check_silently(tmp_path):
    model, task = make_setup("bert", ("classifier",))
    rows = toy_dataset(12)
    finetune(model, task, rows, steps=60, batch_size=12, lr=3e-2, desc=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelNotLearnedWarning)
        attributor = InfluenceFunction(model, task, InfluenceConfig(strict=True)).fit(
            rows.add_column("group_id", [0, 1, 2] * 4))
    check = attributor.score(toy_dataset(2, seed=4)).config["model_check"]
    assert check["learned"] is True and check["accuracy"] > check["majority_rate"]
    assert check["mean_loss"] < check["label_entropy"]


# -- CLI outputs: reruns replace their own output, never a user's folder ---------------------------
def _attribute_argv(d, out):
    return ["attribute", "influence", "--model", str(d / "base"), "--adapter", str(d / "adapter"),
            "--train", str(d / "train"), "--queries", str(d / "queries.jsonl"), "--output",
            str(out), "--max-length", "16", "--group-column", "label"]


def test_cli_rerun_into_its_own_output_replaces_it(saved_model):  # noqa: F811
    d = saved_model
    assert main(_attribute_argv(d, d / "run")) == 0
    assert main(_attribute_argv(d, d / "run")) == 0  # once refused: "ggda_config.json is a file"
    prune = ["prune", "--run", str(d / "run"), "--fraction", "0.2", "--output", str(d / "p")]
    assert main(prune) == 0 and main(prune) == 0
    assert (d / "run" / "run.json").is_file()  # a run folder hf_ggda.pipeline wrote
    assert len(load_from_disk(str(d / "run" / "train"))) == 30


def test_cli_output_folder_holding_user_files_is_refused_before_any_pass(saved_model,  # noqa: F811
                                                                        capsys):
    d = saved_model
    (d / "run" / "train").mkdir(parents=True)
    (d / "run" / "train" / "mine.csv").write_text("a,b\n")
    (d / "run" / "ggda_config.json").mkdir()  # a folder where the config file goes
    before = _snapshot(d / "run")
    assert main(_attribute_argv(d, d / "run")) == 2
    err = capsys.readouterr().err
    assert "hf-ggda: error:" in err and "Traceback" not in err
    assert "did not write" in err and "new or empty --output folder" in err
    (d / "run" / "ggda_config.json").rmdir()
    assert main(_attribute_argv(d, d / "run")) == 2
    err = capsys.readouterr().err
    assert "train" in err and "nothing is deleted" in err
    before.pop("ggda_config.json")
    assert _snapshot(d / "run") == before  # nothing written, the user's file kept


def test_cli_output_inside_an_input_dataset_folder_is_refused(saved_model, capsys):  # noqa: F811
    d = saved_model
    before = _snapshot(d / "train")
    assert main(_attribute_argv(d, d / "train")) == 2  # would write train/train, train/scores
    err = capsys.readouterr().err
    assert "would replace the input" in err and "another --output folder" in err
    assert _snapshot(d / "train") == before
