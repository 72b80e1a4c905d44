"""Validation at the boundary (issue 18), part 1: configs (types, booleans, finite numbers,
unknown keys, config files read back) and datasets / models (splits, nulls, labels against the
head, token ids and lengths against the model, meta weights).

Every case asserts the typed error of hf_ggda.errors, that its message names the fix, and that
nothing was written. Files read back and the CLI: tests/test_validation_files.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_ggda.attributors import AttributorConfig, InfluenceConfig, TracInConfig, TRAKConfig
from hf_ggda.cli import TaskArgs
from hf_ggda.config import check_known_keys
from hf_ggda.errors import (
    ConfigError,
    ConfigTypeError,
    DatasetTypeError,
    GGDAError,
    LabelError,
    ModelInputError,
    ModelStateError,
    NullValueError,
)
from hf_ggda.gradients import EngineConfig
from hf_ggda.grouping import get_grouper
from hf_ggda.grouping.simple import RandomConfig
from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
from hf_ggda.testing import tiny_model, tiny_tokenizer, toy_dataset


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# -- configs: booleans -------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("false", False), ("False", False), (" no ", False),
                                         ("off", False), ("0", False), (0, False),
                                         ("true", True), ("TRUE", True), ("yes", True),
                                         (1, True)])
def test_bool_strings_are_parsed_never_truthy_by_accident(text, value):
    assert InfluenceConfig(cosine=text).cosine is value
    assert InfluenceConfig.from_dict({"attributor_type": "influence", "cosine": text}).cosine \
        is value
    args = argparse.Namespace()  # a --config file's value goes through from_args too
    cfg = InfluenceConfig.from_args(args, {"attributor_type": "influence", "cosine": text})
    assert cfg.cosine is value
    assert EngineConfig(strict=text).strict is value


@pytest.mark.parametrize("bad", ["maybe", "", "f", 2, -1, 0.5, [], None])
def test_bool_option_refuses_anything_else(bad):
    with pytest.raises(ConfigTypeError) as info:
        InfluenceConfig(cosine=bad)
    message = str(info.value)
    assert "InfluenceConfig.cosine" in message and "true or false" in message
    assert repr(bad) in message and isinstance(info.value, TypeError)


# -- configs: wrong types ----------------------------------------------------------------------
# (config class, field, bad value, expected type words, fix words)
WRONG_TYPES = [
    (InfluenceConfig, "batch_size", "16", "an integer", "without quotes"),
    (InfluenceConfig, "batch_size", 16.0, "an integer", "such as 16"),
    (InfluenceConfig, "batch_size", True, "an integer", "not true/false"),
    (InfluenceConfig, "projection_dim", 2.5, "an integer or null", "without decimals"),
    (InfluenceConfig, "damping", "0.1", "a finite number", "without quotes"),
    (InfluenceConfig, "damping", [0.1], "a finite number", "pass a finite number"),
    (InfluenceConfig, "preconditioner", ["kfac"], "a string", "single string"),
    (InfluenceConfig, "preconditioner", 3, "a string", "quoted"),
    (InfluenceConfig, "selection", 5, "a string or a list of strings", "pass"),
    (InfluenceConfig, "selection", ["lora", 3], "a string or a list of strings", "pass"),
    (TracInConfig, "checkpoints", "ckpt-1", "a list of strings", "[...]"),
    (TracInConfig, "learning_rates", ["0.1"], "a list of finite numbers or null", "quotes"),
    (TRAKConfig, "kernel_sample_size", "256", "an integer", "without quotes"),
    (EngineConfig, "shard_rows", 1.5, "an integer", "without decimals"),
    (RandomConfig, "num_groups", "8", "an integer", "without quotes"),
    (TaskArgs, "max_length", 12.0, "an integer", "such as 12"),
    (TaskArgs, "text_column", ["text"], "a string", "single string"),
]


@pytest.mark.parametrize("cls, name, bad, expected, fix", WRONG_TYPES,
                         ids=[f"{c.__name__}.{n}={b!r}" for c, n, b, _, _ in WRONG_TYPES])
def test_wrong_config_types_name_field_type_value_and_fix(cls, name, bad, expected, fix,
                                                          tmp_path):
    for build in (lambda: cls(**{name: bad}),
                  lambda: cls.from_dict({**_required(cls), name: bad})):
        with pytest.raises(ConfigTypeError) as info:
            build()
        message = str(info.value)
        assert f"{cls.__name__}.{name}" in message and expected in message
        assert repr(bad)[:30] in message and fix in message
        assert isinstance(info.value, (TypeError, ValueError, GGDAError))
    assert not os.listdir(tmp_path)


def _required(cls):
    return {"attributor_type": cls().attributor_type} if issubclass(cls, AttributorConfig) \
        else {}


def test_assignment_after_construction_is_checked_and_keeps_the_old_value():
    cfg = InfluenceConfig(damping=0.5)
    with pytest.raises(ConfigError, match="finite"):
        cfg.damping = float("nan")
    with pytest.raises(ConfigTypeError, match="an integer"):
        cfg.batch_size = "8"
    assert cfg.damping == 0.5 and cfg.batch_size == 16


def test_numbers_are_normalised_not_refused():
    import numpy as np

    cfg = InfluenceConfig(damping=1, batch_size=np.int64(4), projection_dim=None)
    assert cfg.damping == 1.0 and isinstance(cfg.damping, float)
    assert cfg.batch_size == 4 and type(cfg.batch_size) is int
    assert TracInConfig(checkpoints=[Path("a")], learning_rates=[1]).checkpoints == ["a"]


# -- configs: NaN / Inf -----------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda v: InfluenceConfig(damping=v),
    lambda v: InfluenceConfig(lissa_scale=v),
    lambda v: TRAKConfig(damping=v),
    lambda v: TracInConfig(checkpoints=["a", "b"], learning_rates=[0.1, v]),
    lambda v: InfluenceConfig.from_dict({"attributor_type": "influence", "damping": v}),
], ids=["if-damping", "lissa-scale", "trak-damping", "tracin-rates", "from-dict"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -math.inf])
def test_non_finite_float_settings_are_refused(build, value):
    with pytest.raises(ConfigError) as info:
        build(value)
    message = str(info.value)
    assert "finite" in message and "pass a finite value" in message
    assert not isinstance(info.value, ConfigTypeError)  # a value error, not a type error


# -- configs: unknown keys --------------------------------------------------------------------
@pytest.mark.parametrize("key, closest", [("dampng", "damping"), ("Damping", "damping"),
                                          ("projection-dim", "projection_dim"),
                                          ("batchsize", "batch_size"),
                                          ("precondtioner", "preconditioner")])
def test_unknown_key_names_the_closest_valid_key(key, closest):
    for build in (lambda: InfluenceConfig.from_dict({"attributor_type": "influence", key: 1}),
                  lambda: AttributorConfig.from_dict({"attributor_type": "influence", key: 1})):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert f"Unknown InfluenceConfig options [{key!r}]" in message
        assert f"did you mean {closest!r}?" in message and "Fix the spelling" in message


def test_unknown_key_far_from_every_field_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        check_known_keys({"zzzz": 1}, [TaskArgs, InfluenceConfig], where="options")
    assert "no valid option is close" in str(info.value) and "'max_length'" in str(info.value)
    with pytest.raises(ConfigError, match="must be strings"):
        check_known_keys({1: 2}, [TaskArgs], where="options")


# -- configs read back from files ---------------------------------------------------------------
CONFIG_FILES = {
    "bad json": ('{"damping": 0.1,', "not valid JSON"),
    "not an object": ("[1, 2]", "not an object"),
    "NaN literal": ('{"attributor_type": "influence", "damping": NaN}', "NaN is not a JSON"),
    "another class": ('{"class": "TracInConfig", "attributor_type": "influence"}',
                      "TracInConfig.from_pretrained"),
    "mistyped key": ('{"attributor_type": "influence", "cosin": true}', "did you mean 'cosine'"),
    "string for int": ('{"attributor_type": "influence", "seed": "3"}', "without quotes"),
    "not utf-8": (b"\xff\xfe{", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_config_file_read_back_is_validated(case, tmp_path):
    content, words = CONFIG_FILES[case]
    path = tmp_path / "ggda_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(tmp_path)
    for load in (lambda: InfluenceConfig.from_pretrained(tmp_path),
                 lambda: AttributorConfig.from_pretrained(path)):
        with pytest.raises(ConfigError) as info:
            load()
        assert words in str(info.value)
    assert _snapshot(tmp_path) == before


def test_saved_config_round_trips(tmp_path):
    cfg = InfluenceConfig(damping=0.25, cosine=True, selection=["lora_A"])
    cfg.save_pretrained(tmp_path)
    assert AttributorConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / "ggda_config.json").read_text())["class"] == "InfluenceConfig"


# -- datasets at the boundary -----------------------------------------------------------------
def _cls_task():
    return SequenceClassificationTask(tiny_tokenizer("bert"), max_length=16)


def _rows(text, label):
    return Dataset.from_dict({"text": text, "label": label})


# (name, call, error type, words the message must contain)
DATASETS = [
    ("DatasetDict", lambda: _cls_task().prepare(DatasetDict({"train": toy_dataset(4),
                                                             "test": toy_dataset(2)})),
     DatasetTypeError, ["DatasetDict", "dataset['train']"]),
    ("IterableDataset", lambda: _cls_task().prepare(toy_dataset(4).to_iterable_dataset()),
     DatasetTypeError, ["IterableDataset", "streaming=True"]),
    ("pandas frame", lambda: _cls_task().prepare(pd.DataFrame({"text": ["a"], "label": [0]})),
     DatasetTypeError, ["DataFrame", "Dataset.from_pandas"]),
    ("dict", lambda: _cls_task().prepare({"text": ["a"], "label": [0]}), DatasetTypeError,
     ["Dataset.from_dict"]),
    ("grouper DatasetDict", lambda: get_grouper("random", num_groups=2).assign(
        DatasetDict({"train": toy_dataset(4)})), DatasetTypeError, ["dataset['train']"]),
    ("None text", lambda: _cls_task().prepare(_rows(["a b", None, "c"], [0, 1, 2])),
     NullValueError, ["'text'", "rows [1]", "dataset.filter"]),
    ("None label", lambda: _cls_task().prepare(_rows(["a", "b"], [None, 1])), NullValueError,
     ["'label'", "rows [0]", "is not None"]),
    ("None prompt", lambda: CausalLMTask(tiny_tokenizer("causal"), prompt_column="p",
                                         response_column="r").prepare(
        Dataset.from_dict({"p": ["a", None], "r": ["b", "c"]})), NullValueError,
     ["'p'", "rows [1]"]),
    ("negative labels", lambda: _cls_task().prepare(_rows(["a", "b", "c"], [0, -1, 2])),
     LabelError, ["negative class ids [-1]", "rows [1]", "class_encode_column"]),
    ("-100 on a classifier", lambda: _cls_task().prepare(_rows(["a", "b"], [-100, 1])),
     LabelError, ["-100", "silently contribute nothing", "dataset.filter"]),
    ("NaN regression target", lambda: _cls_task().prepare(_rows(["a", "b"],
                                                                [0.5, float("nan")])),
     LabelError, ["NaN or Inf", "rows [1]"]),
]


@pytest.mark.parametrize("name, call, error, words", DATASETS, ids=[d[0] for d in DATASETS])
def test_dataset_boundary_errors(name, call, error, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{name}: {word!r} not in {info.value}"
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_causal_lm_keeps_minus_100_masking():
    task = CausalLMTask(tiny_tokenizer("causal"), prompt_column="p", response_column="r")
    prepared = task.prepare(Dataset.from_dict({"p": ["the market"], "r": ["shares up"]}))
    assert prepared["labels"][0][:2] == [-100, -100]
    task.validate(prepared, tiny_model("gpt2", len(tiny_tokenizer("causal"))))


# -- data against the model (task.validate, run before any pass) --------------------------------
def _bert(**kwargs):
    tok = tiny_tokenizer("bert")
    return tiny_model("bert", kwargs.pop("vocab", len(tok)), **kwargs)


def _multi_label():
    model = _bert()
    model.config.problem_type = "multi_label_classification"
    return model


def _meta():
    with torch.device("meta"):
        return _bert()


# (name, model, rows, task max_length, error type, words)
AGAINST_MODEL = [
    ("label beyond the head", _bert, _rows(["a", "b", "c"], [0, 7, 2]), 16, LabelError,
     ["reach 7", "rows [1]", "3 outputs", "num_labels=8"]),
    ("float labels on a classifier", _bert, _rows(["a", "b"], [0.0, 1.0]), 16, LabelError,
     ["floats", "classifier with 3 outputs", "cast_column", "num_labels=1"]),
    ("class ids on a 1-output head", lambda: _bert(num_labels=1), _rows(["a", "b"], [0, 1]), 16,
     LabelError, ["1 output", "regression head", "num_labels=2", "cast the labels to float"]),
    ("multi-label head", _multi_label, _rows(["a"], [0]), 16, LabelError,
     ["multi-label", "single_label_classification"]),
    ("tokenizer larger than the embeddings", lambda: _bert(vocab=5), _rows(["market"], [0]), 16,
     ModelInputError, ["embedding table has 5 rows", "resize_token_embeddings"]),
    ("rows longer than the positions", _bert, _rows(["the " * 80], [0]), 200, ModelInputError,
     ["82 tokens", "cover 64 positions", "max_length to at most 64"]),
    ("weights on the meta device", _meta, _rows(["a"], [0]), 16, ModelStateError,
     ["'meta' device", "to_empty", "load_state_dict"]),
]


@pytest.mark.parametrize("name, model, rows, max_length, error, words", AGAINST_MODEL,
                         ids=[a[0] for a in AGAINST_MODEL])
def test_data_against_the_model(name, model, rows, max_length, error, words, tmp_path,
                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = SequenceClassificationTask(tiny_tokenizer("bert"), max_length=max_length)
    prepared = task.prepare(rows)
    with pytest.raises(error) as info:
        task.validate(prepared, model())
    for word in words:
        assert word in str(info.value), f"{name}: {word!r} not in {info.value}"
    assert not os.listdir(tmp_path)


def test_matching_data_and_model_pass():
    task = _cls_task()
    task.validate(task.prepare(toy_dataset(12)), _bert())
    task.validate(task.prepare(_rows(["a", "b"], [0.5, -1.5])), _bert(num_labels=1))
    with pytest.raises(ModelStateError):
        task.check_model(_meta())


def test_checks_follow_selected_and_shuffled_rows():
    data = _rows(["a", None, "c", "d"], [0, 1, -1, 2])
    _cls_task().prepare(data.select([0, 3]))  # the bad rows are not in this selection
    with pytest.raises(NullValueError, match=r"rows \[0\]"):  # positions of the selection
        _cls_task().prepare(data.select([1, 0]))
    with pytest.raises(LabelError, match=r"rows \[1\]"):
        _cls_task().prepare(data.select([3, 2, 0]))


def test_model_groupers_validate_the_data_against_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = _rows(["a b", "c d", "e f", "g h"], [0, 1, 2, 9])
    with pytest.raises(LabelError, match="num_labels=10"):
        get_grouper("grad-kmeans", num_groups=2).assign(rows, model=_bert(), task=_cls_task())
    with pytest.raises(ModelStateError, match="meta"):
        get_grouper("kmeans-repr", num_groups=2).assign(rows.select([0, 1, 2]), model=_meta(),
                                                         task=_cls_task())
    assert not os.listdir(tmp_path)


def test_fit_names_labels_beyond_the_head_before_the_learning_check():
    """Found by the fuzz test: with some labels in range, the learning check ran the model on
    an out-of-range label first (a raw IndexError); the engine's validation now names them."""
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction

    rows = _rows(["market web game", "phone team"], [0, 3]).add_column("group_id", [0, 1])
    with pytest.raises(LabelError, match=r"reach 3 at rows \[1\]"):
        InfluenceFunction(_bert(), _cls_task(), InfluenceConfig()).fit(rows)
