"""Validation at the boundary (issue 18), part 2: files read back (scores.json and its tensors,
ggda_checkpoints.json and trainer_state.json, attribution-card inputs) and the CLI (one
``hf-ggda: error:`` line, exit 2, ``--debug``; output paths; data against the model).

Every refusal asserts the typed error of hf_ggda.errors, that its message names the fix, and
that nothing was written.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save as st_save
from transformers import TrainerControl, TrainerState

from hf_ggda.attributors import trainer_checkpoints
from hf_ggda.attributors.checkpoints import confined_path, learning_rate_of_checkpoint
from hf_ggda.cli import main
from hf_ggda.errors import CheckpointManifestError, ScoresFileError
from hf_ggda.integrations.cards import md_code, md_text, write_attribution_card
from hf_ggda.integrations.trainer import (
    MANIFEST_NAME,
    GGDACallback,
    read_checkpoint_manifest,
    tracin_config_from_manifest,
)
from hf_ggda.scores import GroupScores
from hf_ggda.testing import toy_dataset

from . import test_cli

saved_model = test_cli.saved_model  # the CLI tests' fixture, shared


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _scores(with_points: bool = False) -> GroupScores:
    gen = torch.Generator().manual_seed(0)
    extra = dict(point_scores=torch.randn(2, 2, generator=gen, dtype=torch.float64),
                 point_rows=[4, 9], point_groups=[1, 1]) if with_points else {}
    return GroupScores(matrix=torch.randn(2, 3, generator=gen, dtype=torch.float64),
                       group_ids=[0, 1, 2], query_ids=[0, 1], config={"attributor_type": "x"},
                       fingerprints={"model": "m"}, **extra)


# -- GroupScores.from_pretrained ----------------------------------------------------------------
@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.5])
def test_scores_with_unknown_format_version_are_refused(tmp_path, version):
    _scores().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "scores.json").read_text())
    meta["format_version"] = version
    (tmp_path / "scores.json").write_text(json.dumps(meta))
    before = _snapshot(tmp_path)
    with pytest.raises(ScoresFileError) as info:
        GroupScores.from_pretrained(tmp_path)
    message = str(info.value)
    assert f"format_version {version!r}" in message and "Upgrade hf_ggda" in message
    assert "re-run the attribution" in message and isinstance(info.value, ValueError)
    assert _snapshot(tmp_path) == before


def _edit(key, value):
    return lambda m: m.__setitem__(key, value)


# name: (edit of scores.json, words of the message)
SCORE_EDITS = {
    "group ids shorter than the matrix": (_edit("group_ids", [0, 1]), "2 group ids for 3"),
    "query ids longer than the matrix": (_edit("query_ids", [0, 1, 2]), "3 query ids for 2"),
    "duplicate group ids": (_edit("group_ids", [0, 0, 2]), "duplicate"),
    "null group id": (_edit("group_ids", [0, None, 2]), "finite numbers or strings"),
    "list as a group id": (_edit("group_ids", [0, [1], 2]), "finite numbers or strings"),
    "bool group id": (_edit("group_ids", [0, True, 2]), "finite numbers or strings"),
    "group ids not a list": (_edit("group_ids", "012"), "'group_ids' must be list"),
    "unknown query mode": (_edit("query_mode", "all"), "query_mode 'all'"),
    "groups mode without column": (_edit("query_mode", "groups"), "query_group_column"),
    "config not an object": (_edit("config", [1]), "'config' must be dict"),
    "column not a string": (_edit("group_column", 3), "'group_column' must be str"),
    "extra field": (_edit("note", "mine"), "unknown fields ['note']"),
    "missing field": (lambda m: m.pop("fingerprints"), "missing fields ['fingerprints']"),
    "point rows without point scores": (_edit("point_rows", [1]), "point_rows"),
}


@pytest.mark.parametrize("edit", sorted(SCORE_EDITS))
def test_hand_edited_scores_json_is_refused(tmp_path, edit):
    _scores().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "scores.json").read_text())
    change, words = SCORE_EDITS[edit]
    change(meta)
    (tmp_path / "scores.json").write_text(json.dumps(meta))
    before = _snapshot(tmp_path)
    with pytest.raises(ScoresFileError) as info:
        GroupScores.from_pretrained(tmp_path)
    assert words in str(info.value) and "Restore the folder" in str(info.value)
    assert _snapshot(tmp_path) == before


# name: (bytes of scores.json or None, bytes of scores.safetensors or None, words)
SCORE_FILES = {
    "bad json": (b'{"group_ids": [0,', None, "not valid JSON"),
    "NaN literal": (b'{"group_ids": [NaN]}', None, "NaN is not a JSON number"),
    "not an object": (b"[1, 2, 3]", None, "not an object"),
    "not utf-8": (b"\xff\xfe", None, "not valid JSON"),
    "garbage tensors": (None, b"not safetensors", "cannot be read as safetensors"),
    "no matrix": (None, st_save({"other": torch.zeros(2, 3)}), "must hold a 'matrix'"),
    "integer matrix": (None, st_save({"matrix": torch.zeros(2, 3, dtype=torch.int64)}),
                       "not floating point"),
    "1-D matrix": (None, st_save({"matrix": torch.zeros(6)}), "must be 2-D"),
    "matrix of another shape": (None, st_save({"matrix": torch.zeros(2, 4)}),
                                "does not match its tensors"),
}


@pytest.mark.parametrize("case", sorted(SCORE_FILES))
def test_broken_score_files_are_refused(tmp_path, case):
    _scores().save_pretrained(tmp_path)
    meta, tensors, words = SCORE_FILES[case]
    if meta is not None:
        (tmp_path / "scores.json").write_bytes(meta)
    if tensors is not None:
        (tmp_path / "scores.safetensors").write_bytes(tensors)
    before = _snapshot(tmp_path)
    with pytest.raises(ScoresFileError) as info:
        GroupScores.from_pretrained(tmp_path)
    assert words in str(info.value) and "re-run the attribution" in str(info.value)
    assert _snapshot(tmp_path) == before


def test_valid_scores_still_round_trip(tmp_path):
    scores = _scores(with_points=True)
    scores.save_pretrained(tmp_path)
    back = GroupScores.from_pretrained(tmp_path)
    assert torch.equal(back.matrix, scores.matrix) and back.point_rows == [4, 9]


# -- ggda_checkpoints.json and trainer_state.json -------------------------------------------------
def _manifest(root: Path, records: list[dict], version: object = 1) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(
        {"format_version": version, "output_dir": str(root), "checkpoints": records,
         "attribution": None}))


def _record(path: object, step: int = 2, lr: object = 0.1) -> dict:
    return {"step": step, "path": path, "learning_rate": lr,
            "learning_rate_source": "log_history", "epoch": 1.0, "adapter": False}


@pytest.mark.parametrize("path, words", [
    ("../outside", "leaves its folder"), ("checkpoint-2/../../outside", "leaves its folder"),
    ("..\\outside", "leaves its folder"), ("/etc", "is absolute"),
    ("C:\\Windows", "is absolute"), ("C:outside", "is absolute"), ("", "is not a path"),
    (5, "is not a path"), (None, "is not a path")])
def test_checkpoint_paths_outside_the_trainer_folder_are_refused(tmp_path, path, words):
    root = tmp_path / "run"
    (root / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "outside").mkdir()  # exists: it must be refused, not merely not found
    _manifest(root, [_record("checkpoint-2", 2), _record(path, 4)])
    before = _snapshot(tmp_path)
    for call in (lambda: read_checkpoint_manifest(root),
                 lambda: tracin_config_from_manifest(root)):
        with pytest.raises(CheckpointManifestError) as info:
            call()
        message = str(info.value)
        assert words in message and "Restore" in message
        assert "TracInConfig(checkpoints=[...])" in message
    # a resumed Trainer run ignores the poisoned manifest (warning) instead of following it
    callback = GGDACallback()
    state = TrainerState()
    state.global_step = 4
    callback.on_train_begin(SimpleNamespace(output_dir=str(root)), state, TrainerControl())
    assert callback.records == []
    assert _snapshot(tmp_path) == before


def test_checkpoint_paths_inside_the_folder_are_followed(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "sub").mkdir()
    assert confined_path(tmp_path, "sub/../checkpoint-2", "m") == \
        tmp_path / "sub/../checkpoint-2"
    _manifest(tmp_path, [_record("./checkpoint-2")])
    assert tracin_config_from_manifest(tmp_path).checkpoints == \
        [str(tmp_path / "checkpoint-2")]


@pytest.mark.parametrize("records, version, words", [
    ([_record("checkpoint-2")], 2, "format_version 2"),
    ([_record("checkpoint-2")], None, "format_version None"),
    ([_record("checkpoint-2", lr=float("nan"))], 1, "learning_rate=nan"),
    ([_record("checkpoint-2", lr="0.1")], 1, "learning_rate='0.1'"),
    ([_record("checkpoint-2", step=-1)], 1, "step=-1"),
    ([{**_record("checkpoint-2"), "extra": 1}], 1, "must have the fields"),
    (["checkpoint-2"], 1, "must have the fields"),
])
def test_hand_edited_checkpoint_manifest_is_refused(tmp_path, records, version, words):
    (tmp_path / "checkpoint-2").mkdir()
    _manifest(tmp_path, records, version)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointManifestError) as info:
        read_checkpoint_manifest(tmp_path)
    assert words in str(info.value) and "restore it" in str(info.value).lower()
    assert _snapshot(tmp_path) == before


BOTH = ("trainer_checkpoints", "learning_rate_of_checkpoint")
TRAINER_STATES = [  # (trainer_state.json, words, readers)
    ("{not json", "not valid JSON", BOTH), ("[1]", "not the Trainer's state", BOTH),
    ('{"log_history": 3}', "not a list", BOTH),
    ('{"global_step": 2, "log_history": [{"step": 2, "learning_rate": NaN}]}',
     "finite rate", BOTH),
    ('{"global_step": 2, "log_history": [{"step": "2", "learning_rate": 0.1}]}',
     "integer step", BOTH),
    ('{"global_step": "2", "log_history": []}', "not an integer",
     ("learning_rate_of_checkpoint",)),  # trainer_checkpoints takes steps from folder names
]


@pytest.mark.parametrize("state, words, read",
                         [(s, w, r) for s, w, readers in TRAINER_STATES for r in readers])
def test_bad_trainer_state_is_refused(tmp_path, state, words, read):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(state)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointManifestError) as info:
        if read == "trainer_checkpoints":
            trainer_checkpoints(tmp_path)
        else:
            learning_rate_of_checkpoint(tmp_path / "checkpoint-2")
    assert words in str(info.value) and "restore" in str(info.value).lower()
    assert _snapshot(tmp_path) == before


# -- attribution cards: what goes into Markdown / HTML is escaped --------------------------------
EVIL = ["<script>alert(1)</script>", "[click](javascript:alert(1))", "a|b", "`tick``",
        "![t](http://tracker.example/p.png)", "$x$ and $y$"]


def test_card_escapes_group_ids_model_names_and_rows(tmp_path):
    k = len(EVIL)
    train = Dataset.from_dict({"text": [f"<b>row</b> ![x](http://t.example/{i}.png)"
                                        for i in range(2 * k)],
                               "label": ["<i>lab</i>"] * (2 * k),
                               "group_id": EVIL * 2})
    scores = GroupScores(matrix=torch.linspace(-1, 1, k, dtype=torch.float64)[None],
                         group_ids=EVIL, query_ids=[0],
                         config={"attributor_type": "tracin", "note": "```\n<img src=x>"})
    readme = write_attribution_card(tmp_path / "card", scores, train, top_k=k,
                                    model_name="<img src=x onerror=alert(1)>`x`",
                                    pretty_name="# <h1>title</h1>",
                                    curves={"$bad$ <u>": ([0, 1], [0, 1])})
    text = readme.read_text().split("---", 2)[2]  # the Markdown body, after the YAML
    body = text.split("<details>")[0] + text.split("</details>")[1]  # outside the JSON fence
    # group ids and the model name are code spans (shown literally, delimiters longer than
    # any backtick run inside); everything else is escaped text
    spans = [md_code(g) for g in EVIL] + [md_code("<img src=x onerror=alert(1)>`x`",
                                                  table=True)]
    for span in spans:
        assert span in body, span
        body = body.replace(span, "")
    for raw in ("<script", "<img", "<b>", "<i>", "<h1>", "<u>", "](javascript", "![t](",
                "![x](http", "$bad$"):
        assert raw not in body, raw
    assert "&lt;b&gt;row&lt;/b&gt; \\!\\[x\\](http" in body and "\\# &lt;h1&gt;" in body
    fence = "````"  # the config holds ``` so its fence is longer
    assert f"{fence}json" in text and text.count(fence) == 2
    assert (tmp_path / "card" / "top_bottom_groups.png").stat().st_size > 0  # $ not mathtext


@pytest.mark.parametrize("value", [*EVIL, "", "``", "plain", "a\nb"])
def test_md_helpers_escape_everything_that_renders(value):
    import re

    text = md_text(value)
    assert "<" not in text and ">" not in text and "\n" not in text
    assert "](" not in text.replace("\\]", "") and "|" not in text.replace("\\|", "")
    span = md_code(value, table=True)
    if not value:
        assert span == "(empty)"
        return
    run = max((len(r) for r in re.findall(r"`+", value)), default=0)
    delim = "`" * (run + 1)
    assert span.startswith(delim) and not span.startswith(delim + "`")
    assert span.endswith(delim) and "\n" not in span


# -- the CLI: one line, exit 2, before any computation ------------------------------------------
def _attribute_args(d: Path, **extra: str) -> list[str]:
    args = ["attribute", "influence", "--model", str(d / "base"), "--train", str(d / "train"),
            "--queries", str(d / "queries.jsonl"), "--max-length", "16", "--group-column",
            "label", "--output", str(d / "o")]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-ggda")]
    assert len(lines) == 1 and lines[0].startswith("hf-ggda: error: "), err
    return lines[0]


@pytest.mark.parametrize("options, words", [
    ({"dampng": 0.1}, "did you mean 'damping'"),
    ({"cosine": "maybe"}, "InfluenceConfig.cosine must be true or false"),
    ({"batch_size": "16"}, "without quotes"),
    ({"reduction": 5}, "TaskArgs.reduction must be a string"),
    ({"damping": "NaN"}, "without quotes"),
    ([1, 2], "not an object"),
    ("{broken", "not valid JSON"),
])
def test_cli_config_file_errors_exit_2(saved_model, capsys, options, words):
    d = saved_model
    cfg = d / "cfg.json"
    cfg.write_text(options if isinstance(options, str) else json.dumps(options))
    before = _snapshot(d)
    assert main(_attribute_args(d, config=str(cfg))) == 2
    assert words in _one_error_line(capsys)
    assert _snapshot(d) == before


def test_cli_string_false_in_config_file_is_false(saved_model):
    d = saved_model
    (d / "cfg.json").write_text(json.dumps({"class": "InfluenceConfig", "cosine": "false",
                                            "seed": 3}))
    assert main(_attribute_args(d, config=str(d / "cfg.json"))) == 0
    saved = json.loads((d / "o" / "ggda_config.json").read_text())
    assert saved["cosine"] is False and saved["seed"] == 3


@pytest.mark.parametrize("extra, words", [
    (["--top-k", "0"], "--top-k: must be >= 1"), (["--drill-down", "-1"], "must be >= 0"),
    (["--num-labels", "0"], "must be >= 1"), (["--dampng", "1"], "unrecognized arguments"),
    (["--batch-size", "x"], "invalid int value")])
def test_cli_bad_option_values_are_one_line(saved_model, capsys, extra, words):
    d = saved_model
    before = _snapshot(d)
    with pytest.raises(SystemExit) as info:
        main(_attribute_args(d) + extra)
    assert info.value.code == 2
    line = _one_error_line(capsys)
    assert words in line and "--help" in line
    assert _snapshot(d) == before


def test_cli_nan_damping_is_refused_before_any_pass(saved_model, capsys):
    d = saved_model
    before = _snapshot(d)
    assert main(_attribute_args(d, damping="nan", store=str(d / "st"))) == 2
    assert "must be a finite number" in _one_error_line(capsys)
    assert _snapshot(d) == before


def test_cli_labels_beyond_the_head_are_refused_before_any_pass(saved_model, capsys):
    d = saved_model
    rows = toy_dataset(6, seed=5).to_dict()
    rows["label"][2] = 5  # the saved model has 3 classes
    Dataset.from_dict(rows).to_json(str(d / "q5.jsonl"))
    before = _snapshot(d)
    argv = _attribute_args(d, store=str(d / "st"))
    argv[argv.index("--queries") + 1] = str(d / "q5.jsonl")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "Labels reach 5 at rows [2]" in line and "num_labels=6" in line
    assert not (d / "st").exists() and not (d / "o").exists()
    assert set(_snapshot(d)) - set(before) <= {p for p in _snapshot(d) if "cache-" in p}


def test_cli_output_that_is_a_file_or_an_input_is_refused(saved_model, capsys):
    d = saved_model
    (d / "o").write_bytes(b"mine")
    run = d / "run"
    toy_dataset(8).save_to_disk(str(run / "train"))
    before = _snapshot(d)
    assert main(_attribute_args(d)) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    argv = _attribute_args(d)
    argv[argv.index("--train") + 1] = str(run / "train")
    argv[argv.index("--output") + 1] = str(run)  # re-scoring a run in place
    assert main(argv) == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert main(["group", "random", "--data", str(run / "train"), "--output",
                 str(run / "train"), "--num-groups", "2"]) == 2
    assert "pass another --output folder" in _one_error_line(capsys)
    assert main(["prune", "--run", str(run), "--output", str(d / "o" / "x")]) == 2
    assert "lies under" in _one_error_line(capsys)
    assert _snapshot(d) == before


def test_cli_debug_shows_the_traceback(saved_model, capsys):
    argv = ["group", "random", "--data", "/nonexistent", "--output", str(saved_model / "x")]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("hf-ggda: error:")
    assert main(argv) == 2
    assert "No dataset at" in _one_error_line(capsys)


def test_cli_unexpected_errors_are_one_line_too(saved_model, capsys, monkeypatch):
    import hf_ggda.cli as cli

    def boom(args):
        raise TypeError("internal bug")

    monkeypatch.setattr(cli, "_group", boom)
    argv = ["group", "random", "--data", str(saved_model / "train"), "--output",
            str(saved_model / "g")]
    assert main(argv) == 1  # not bad input: told apart from the exit-2 input errors
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error (a bug" in err[0]
    assert "TypeError: internal bug" in err[0] and "--debug" in err[0]
    with pytest.raises(TypeError, match="internal bug"):  # --debug: the traceback itself
        main(["--debug", *argv])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_group", interrupted)
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_unreadable_data_and_model_folders_are_one_line(saved_model, capsys):
    d = saved_model
    (d / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{broken\n')
    (d / "notamodel").mkdir()
    (d / "notamodel" / "config.json").write_text("{}")
    before = _snapshot(d)
    assert main(["group", "random", "--data", str(d / "bad.jsonl"), "--output", str(d / "g"),
                 "--num-groups", "2"]) == 2
    line = _one_error_line(capsys)
    assert "Cannot read --data" in line and "JSON parse error" in line
    assert "well-formed .json/.jsonl" in line
    argv = _attribute_args(d)
    argv[argv.index("--model") + 1] = str(d / "notamodel")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "Cannot load the model" in line and "written by save_pretrained" in line
    assert _snapshot(d) == before
