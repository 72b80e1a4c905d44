"""GGDACallback: checkpoint manifest during real Trainer runs, end-of-training attribution."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import load_from_disk
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_ggda.attributors import TracIn, TracInConfig, trainer_checkpoints
from hf_ggda.errors import MissingColumnError
from hf_ggda.grouping import get_grouper
from hf_ggda.integrations.trainer import (
    MANIFEST_NAME,
    SCORED_QUERY_DIR,
    SCORED_TRAIN_DIR,
    SCORES_DIR,
    GGDACallback,
    read_checkpoint_manifest,
    tracin_config_from_manifest,
)
from hf_ggda.scores import GROUP_SCORE_COLUMN, TOP_GROUPS_COLUMN, GroupScores
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

STEPS, SAVE_EVERY = 6, 2


def _args(output_dir: Path, **kwargs: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], max_steps=STEPS,
        save_strategy="steps", save_steps=SAVE_EVERY, save_total_limit=None, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=0.05, lr_scheduler_type="linear",
        save_only_model=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        label_names=["labels"])
    base.update(kwargs)
    return TrainingArguments(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny LoRA BERT trained for a few steps by a real Trainer with the callback."""
    out = tmp_path_factory.mktemp("run")
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=2, seed=5, modules_to_save=("classifier",))
    task = SequenceClassificationTask(tok, max_length=16)
    train, query = toy_dataset(16, seed=2), toy_dataset(3, seed=9)
    callback = GGDACallback(task=task, train_dataset=train, query_dataset=query,
                            grouper=get_grouper("random", num_groups=4, seed=0),
                            attributor=TracInConfig(batch_size=8), top_k=2)
    tokenised = task.prepare(train).select_columns(list(task.feature_columns))
    trainer = Trainer(model=model, args=_args(out), train_dataset=tokenised,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[callback])
    trainer.train()
    return {"out": out, "model": model, "task": task, "train": train, "query": query,
            "callback": callback}


def _logged_rate(checkpoint: Path) -> float:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    entries = [e for e in state["log_history"]
               if e.get("step") == state["global_step"] and "learning_rate" in e]
    assert len(entries) == 1
    return float(entries[0]["learning_rate"])


def test_manifest_lists_every_checkpoint_with_its_learning_rate(trained: dict[str, Any]
                                                                ) -> None:
    out = trained["out"]
    data = json.loads((out / MANIFEST_NAME).read_text())
    steps = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert [r["step"] for r in data["checkpoints"]] == steps
    records = read_checkpoint_manifest(out)
    folders = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [r.path for r in records] == [p.name for p in folders]
    for record, folder in zip(records, folders):
        assert record.adapter and (folder / "adapter_model.safetensors").exists()
        assert record.learning_rate == _logged_rate(folder)
        assert record.learning_rate_source == "log_history"
    rates = [r.learning_rate for r in records]
    assert len(set(rates)) == len(rates)  # linear decay: every checkpoint has its own rate
    _, from_state = trainer_checkpoints(out)
    assert rates == from_state
    # the optimizer's rate, read after the last update, is the logged one
    assert trained["callback"]._step_lr == (STEPS, rates[-1])
    assert data["attribution"]["method"] == "tracin"
    assert data["attribution"]["num_groups"] == 4
    assert not list(out.glob(f".{MANIFEST_NAME}.*"))  # atomic writes left no temp files


def test_end_of_training_scores_equal_manual_tracin(trained: dict[str, Any]) -> None:
    out, model, task = trained["out"], trained["model"], trained["task"]
    saved = GroupScores.from_pretrained(out / SCORES_DIR)
    assert tuple(saved.matrix.shape) == (len(trained["query"]), 4)
    assert saved.config["attributor_type"] == "tracin"
    assert float(saved.matrix.abs().max()) > 0
    folders = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    manual_cfg = TracInConfig(checkpoints=[str(p) for p in folders], batch_size=8,
                              learning_rates=[_logged_rate(p) for p in folders])
    grouped = get_grouper("random", num_groups=4, seed=0).assign(trained["train"])
    model.eval()
    manual = TracIn(model, task, manual_cfg).fit(grouped).score(trained["query"])
    assert manual.group_ids == saved.group_ids
    torch.testing.assert_close(saved.matrix, manual.matrix, rtol=1e-5, atol=1e-7)
    # the checkpoints differ: weighting them with the wrong rates gives other scores
    wrong = TracIn(model, task, TracInConfig(checkpoints=manual_cfg.checkpoints, batch_size=8,
                                             learning_rates=manual_cfg.learning_rates[::-1]))
    assert not torch.allclose(wrong.fit(grouped).score(trained["query"]).matrix,
                              saved.matrix, rtol=1e-3)
    # the manifest helper builds the same config
    assert tracin_config_from_manifest(out, batch_size=8) == manual_cfg
    scored = load_from_disk(str(out / SCORED_TRAIN_DIR))
    assert len(scored) == len(trained["train"])
    totals = dict(zip(saved.group_ids, saved.aggregated().tolist()))
    for gid, value in zip(scored["group_id"], scored[GROUP_SCORE_COLUMN]):
        assert value == pytest.approx(totals[gid])
    queries = load_from_disk(str(out / SCORED_QUERY_DIR))
    assert [len(g) for g in queries[TOP_GROUPS_COLUMN]] == [2] * len(trained["query"])


def _fake_args(tmp_path: Path) -> Any:
    return SimpleNamespace(output_dir=str(tmp_path))


def test_on_save_rotation_and_optimizer_rate(tmp_path: Path) -> None:
    callback = GGDACallback()
    args, control = _fake_args(tmp_path), TrainerControl()
    state = TrainerState()
    callback.on_train_begin(args, state, control)
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state.global_step = step
        state.log_history.append({"step": step, "learning_rate": 0.1 * step})
        callback.on_save(args, state, control)
    # step 3 is not logged: the optimizer's rate just after step 3's update is used
    state.global_step = 2
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.25}])
    callback.on_optimizer_step(args, state, control, optimizer=optimizer)
    state.global_step = 3
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-1").rmdir()  # rotated away by save_total_limit
    callback.on_save(args, state, control)
    records = read_checkpoint_manifest(tmp_path)
    assert [(r.step, r.learning_rate, r.learning_rate_source) for r in records] == \
        [(2, 0.2, "log_history"), (3, 0.25, "optimizer")]
    assert not records[0].adapter
    # neither logged nor seen by the optimizer: the last logged rate before the step
    state.global_step = 4
    (tmp_path / "checkpoint-4").mkdir()
    callback.on_save(args, state, control)
    last = read_checkpoint_manifest(tmp_path)[-1]
    assert (last.step, last.learning_rate, last.learning_rate_source) == \
        (4, pytest.approx(0.2), "log_history_before")
    # a resumed run keeps the records up to the resumed step
    resumed = GGDACallback()
    state.global_step = 3
    resumed.on_train_begin(args, state, control)
    assert [r.step for r in resumed.records] == [2, 3]
    assert [Path(p).name for p in tracin_config_from_manifest(tmp_path).checkpoints] == \
        ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_callback_argument_errors(tmp_path: Path) -> None:
    train = toy_dataset(4)
    with pytest.raises(ValueError, match="train_dataset"):
        GGDACallback(query_dataset=train)
    tok = tiny_tokenizer("bert")
    task = SequenceClassificationTask(tok, max_length=16)
    with pytest.raises(MissingColumnError):
        GGDACallback(task=task, train_dataset=train, query_dataset=train)
    with pytest.raises(ValueError, match="Unknown attributor_type"):
        GGDACallback(attributor="nope")
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        read_checkpoint_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        read_checkpoint_manifest(tmp_path)
