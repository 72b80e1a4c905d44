"""The hf-ggda command: demo, group and attribute end to end on local files; clean errors."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from datasets import load_from_disk

from hf_ggda import cli
from hf_ggda.cli import main
from hf_ggda.pipeline import read_run
from hf_ggda.testing import tiny_lora, tiny_model, tiny_tokenizer, toy_dataset
from hf_ggda.viewer import open_run


@pytest.fixture
def saved_model(tmp_path):
    tok = tiny_tokenizer("bert")
    tiny_model("bert", len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = tiny_lora("bert", len(tok), modules_to_save=("classifier",))  # same base weights
    model.save_pretrained(tmp_path / "adapter")
    toy_dataset(30).save_to_disk(str(tmp_path / "train"))
    toy_dataset(6, seed=5).to_json(str(tmp_path / "queries.jsonl"))
    return tmp_path


def test_demo_quick_writes_scored_dataset(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    train = load_from_disk(str(tmp_path / "demo" / "train"))
    assert len(train) == summary["train_rows"] == 96
    assert {"ggda_group_score", "ggda_group_rank", "ggda_self_influence"} <= \
        set(train.column_names)
    assert "Most helpful groups" in capsys.readouterr().out
    assert read_run(tmp_path / "demo").kind == "demo"  # written through hf_ggda.pipeline
    view = open_run(tmp_path / "demo")  # the demo's run opens in `hf-ggda view`
    assert view.mode == "query" and len(view.query_choices()) == summary["queries"]


def test_group_then_attribute(saved_model, capsys):
    d = saved_model
    assert main(["group", "random", "--data", str(d / "train"), "--output", str(d / "grouped"),
                 "--num-groups", "5", "--seed", "1"]) == 0
    assert main(["attribute", "influence", "--model", str(d / "base"), "--adapter",
                 str(d / "adapter"), "--train", str(d / "grouped"), "--queries",
                 str(d / "queries.jsonl"), "--output", str(d / "out"), "--max-length", "16",
                 "--store", str(d / "store"), "--drill-down", "1"]) == 0
    train = load_from_disk(str(d / "out" / "train"))
    queries = load_from_disk(str(d / "out" / "queries"))
    assert len(train) == 30 and len(queries) == 6
    assert len(set(train["ggda_group_rank"])) == 5
    assert sum(v is not None for v in train["ggda_point_score"]) >= 1
    assert all(len(t) == 5 for t in queries["ggda_top_groups"])
    assert (d / "store").exists()
    # self-influence reuses the same store (same request: nothing recomputed)
    assert main(["self-influence", "influence", "--model", str(d / "base"), "--adapter",
                 str(d / "adapter"), "--train", str(d / "grouped"), "--output",
                 str(d / "self"), "--max-length", "16", "--store", str(d / "store")]) == 0
    self_train = load_from_disk(str(d / "self" / "train"))
    assert None not in self_train["ggda_self_influence"]
    # no query axis: no query-based group score, and its own result folder
    assert "ggda_group_score" not in self_train.column_names
    assert (d / "self" / "self_influence").is_dir() and not (d / "self" / "scores").exists()
    assert main(["prune", "--run", str(d / "self"), "--fraction", "0.2", "--rank", "total",
                 "--output", str(d / "pruned")]) == 0
    report = json.loads((d / "pruned" / "pruning.json").read_text())
    assert report["ranked_by"].startswith("self-influence")
    top = max(zip(self_train["ggda_self_influence"], self_train["group_id"]))[1]
    assert str(top) == report["dropped_groups"][0]  # highest self-influence goes first
    assert main(["card", "--run", str(d / "self"), "--output", str(d / "card")]) == 0
    card = (d / "card" / "README.md").read_text()
    assert "Highest self-influence" in card and "Most helpful groups" not in card


@pytest.mark.parametrize("argv, message", [
    (["group", "random", "--data", "/nonexistent", "--output", "x"], "No dataset at"),
    (["group", "random", "--data", "{train}", "--output", "{out}", "--num-groups", "99"],
     "99"),
    (["group", "column", "--data", "{train}", "--output", "{out}", "--column", "nope"],
     "nope"),
    (["group", "random", "--data", "{train}", "--output", "{out}", "--num-groups", "0"], "0"),
    (["attribute", "influence", "--model", "/nonexistent", "--train", "{train}", "--queries",
      "{train}", "--output", "{out}"], "No model/adapter folder"),
    (["attribute", "influence", "--model", "{base}", "--train", "{train}", "--queries",
      "{train}", "--output", "{out}"], "group_id"),
    (["attribute", "influence", "--model", "{base}", "--train", "{train}", "--queries",
      "{train}", "--output", "{out}", "--group-column", "label", "--label-column", "nope"],
     "'nope'"),
    (["attribute", "influence", "--model", "{base}", "--train", "{train}", "--queries",
      "{train}", "--output", "{out}", "--group-column", "label", "--preconditioner", "bad"],
     "preconditioner"),
])
def test_bad_input_exits_2_with_message(saved_model, capsys, argv, message):
    """Each bad input: exit status 2, one message line, no traceback, no output folder."""
    argv = [a.format(train=saved_model / "train", out=saved_model / "o",
                     base=saved_model / "base") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-ggda: error:") and message in err
    assert "Traceback" not in err
    assert not (saved_model / "o").exists()  # nothing half-written


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_equal_one(saved_model):
    """`accelerate launch` (2 CPU processes, gloo) writes the scores of one process."""
    import shutil
    import subprocess
    import sys

    import torch

    from hf_ggda.scores import GroupScores

    d = saved_model
    assert main(["group", "random", "--data", str(d / "train"), "--output", str(d / "grouped"),
                 "--num-groups", "5"]) == 0
    args = ["attribute", "tracin", "--model", str(d / "base"), "--adapter", str(d / "adapter"),
            "--train", str(d / "grouped"), "--queries", str(d / "queries.jsonl"),
            "--max-length", "16", "--shard-rows", "6"]
    assert main([*args, "--output", str(d / "one")]) == 0
    launcher = shutil.which("accelerate") or f"{sys.prefix}/bin/accelerate"
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "cpu_2proc.yaml"
    cmd = [launcher, "launch", "--config_file", str(config),
           "-m", "hf_ggda.cli", *args, "--output", str(d / "two"), "--store", str(d / "st")]
    subprocess.run(cmd, check=True, timeout=300)
    one = GroupScores.from_pretrained(str(d / "one" / "scores")).matrix
    two = GroupScores.from_pretrained(str(d / "two" / "scores")).matrix
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


def test_store_for_another_request_is_a_clean_cli_error(saved_model, capsys):
    d = saved_model
    common = ["attribute", "influence", "--model", str(d / "base"), "--train", str(d / "train"),
              "--queries", str(d / "queries.jsonl"), "--max-length", "16", "--store",
              str(d / "st"), "--group-column", "label"]
    assert main([*common, "--output", str(d / "a")]) == 0
    assert main([*common, "--output", str(d / "b"), "--max-length", "12"]) == 2
    err = capsys.readouterr().err
    assert "was made for a different request" in err and "max_length" in err
    assert "Traceback" not in err and not (d / "b").exists()
    assert main([*common, "--output", str(d / "b"), "--max-length", "12", "--overwrite"]) == 0


def test_prune_and_card_from_an_attribute_run(saved_model, capsys):
    d = saved_model
    assert main(["group", "stratified", "--data", str(d / "train"), "--output",
                 str(d / "grouped"), "--num-groups", "6"]) == 0
    assert main(["attribute", "tracin", "--model", str(d / "base"), "--adapter",
                 str(d / "adapter"), "--train", str(d / "grouped"), "--queries",
                 str(d / "queries.jsonl"), "--output", str(d / "run"),
                 "--max-length", "16"]) == 0
    assert main(["prune", "--run", str(d / "run"), "--fraction", "0.3", "--balance-column",
                 "label", "--output", str(d / "pruned")]) == 0
    report = json.loads((d / "pruned" / "pruning.json").read_text())
    kept = load_from_disk(str(d / "pruned" / "kept"))
    dropped = load_from_disk(str(d / "pruned" / "dropped"))
    assert len(kept) + len(dropped) == 30 and len(dropped) > 0
    assert set(dropped["group_id"]) == {int(g) if g.isdigit() else g
                                        for g in report["dropped_groups"]}
    assert not set(kept["group_id"]) & set(dropped["group_id"])
    # the dropped groups are the least helpful per row among the scored ones
    train = load_from_disk(str(d / "run" / "train"))
    per_row = {g: s for g, s in zip(train["group_id"], train["ggda_group_score"])}
    sizes = {g: train["group_id"].count(g) for g in per_row}
    worst = min(per_row, key=lambda g: per_row[g] / sizes[g])
    assert worst in set(dropped["group_id"])
    assert main(["card", "--run", str(d / "run"), "--output", str(d / "card"),
                 "--model-name", "tiny-bert"]) == 0
    readme = (d / "card" / "README.md").read_text()
    assert "tiny-bert" in readme and (d / "card" / "score_distribution.png").stat().st_size > 0
    assert main(["card", "--run", str(d), "--output", str(d / "card2")]) == 2
    assert "not a complete run folder (no run.json)" in capsys.readouterr().err


def test_sources_ranks_named_sources(saved_model, capsys):
    d = saved_model
    train = toy_dataset(30).add_column("origin", [f"s{i % 3}" for i in range(30)])
    train.to_json(str(d / "train_sources.jsonl"))
    assert main(["sources", "influence", "--model", str(d / "base"), "--adapter",
                 str(d / "adapter"), "--train", str(d / "train_sources.jsonl"),
                 "--eval", f"dev={d / 'queries.jsonl'}", "--eval", str(d / "train"),
                 "--source-column", "origin", "--output", str(d / "src"), "--max-length", "16",
                 "--bootstrap", "50"]) == 0
    scored = load_from_disk(str(d / "src" / "train"))
    table = load_from_disk(str(d / "src" / "report" / "sources"))
    assert sorted(set(table["evaluation"])) == ["dev", "train"]
    assert len(table) == 6 and all(lo <= hi for lo, hi in zip(table["ci_low"],
                                                               table["ci_high"]))
    assert {"ggda_source_score", "ggda_source_rank", "ggda_source_score_dev"} <= \
        set(scored.column_names)
    assert "most harmful first" in capsys.readouterr().out
    # one source only: a one-line error naming the fix, exit 2
    toy_dataset(6).add_column("origin", ["a"] * 6).to_json(str(d / "one.jsonl"))
    assert main(["sources", "influence", "--model", str(d / "base"), "--adapter",
                 str(d / "adapter"), "--train", str(d / "one.jsonl"), "--eval",
                 str(d / "train"), "--source-column", "origin", "--output", str(d / "src3"),
                 "--max-length", "16"]) == 2
    assert "at least two sources" in capsys.readouterr().err


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_commands(child, (*path, name))


def test_every_command_help_ends_with_an_example_that_parses() -> None:
    parser = cli._build_parser()
    leaves = list(_leaf_commands(parser))
    assert len(leaves) >= 10
    for path, leaf in leaves:
        text = leaf.format_help()
        assert "example (after `hf-ggda demo`)" in text, path
        line = text.rsplit("example (after `hf-ggda demo`):", 1)[1].strip()
        argv = shlex.split(line)
        assert argv[0] == "hf-ggda" and tuple(argv[1:1 + len(path)]) == path, (path, line)
        parser.parse_args(argv[1:])  # every flag of the example exists (SystemExit otherwise)
