"""In-run group TracIn captured by ``GGDACallback(in_run=True)`` during real Trainer runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_ggda.attributors import TracIn, TracInConfig
from hf_ggda.errors import MissingColumnError
from hf_ggda.gradients import EngineConfig
from hf_ggda.integrations.cards import build_attribution_card
from hf_ggda.integrations.in_run import ROW_COLUMN, SLOT_KEY, history_curves, with_row_index
from hf_ggda.integrations.trainer import (
    HISTORY_NAME,
    IN_RUN_CHECKPOINTS,
    IN_RUN_DIR,
    IN_RUN_SCORES,
    GGDACallback,
)
from hf_ggda.params import ParameterSelection
from hf_ggda.pipeline import read_run
from hf_ggda.scores import GROUP_SCORE_COLUMN
from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_model, tiny_tokenizer, toy_dataset

BATCH, STEPS = 4, 4


class Recorder:
    """Wraps a collator and keeps a copy of every batch it makes (in the Trainer's order)."""

    def __init__(self, inner: Callable[[list[Any]], Any]) -> None:
        self.inner, self.batches = inner, []

    def __call__(self, features: list[Any]) -> Any:
        batch = self.inner(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


class Snapshots(TrainerCallback):
    """Keeps the selected weights at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, state: Any, model: torch.nn.Module) -> None:
        self.weights[state.global_step] = {n: p.detach().clone()
                                           for n, p in model.named_parameters()}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._keep(state, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._keep(state, kwargs["model"])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              **kwargs: Any) -> None:
        self.grads[state.global_step + 1] = {n: p.grad.detach().clone() for n, p in
                                             kwargs["model"].named_parameters()
                                             if p.grad is not None}


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _setup(double: bool = True, dropout: bool = False) -> dict[str, Any]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=2, seed=5, modules_to_save=("classifier",))
    if not dropout:
        _no_dropout(model)
    if double:
        model = model.double()
    task = SequenceClassificationTask(tok, max_length=16)
    raw = toy_dataset(16, seed=2)
    raw = raw.add_column("group_id", [f"g{i % 3}" for i in range(len(raw))])
    return {"tok": tok, "model": model, "task": task, "raw": raw,
            "eval": toy_dataset(5, seed=9)}


def _args(out: Path, **kwargs: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(out), use_cpu=True, report_to=[], max_steps=STEPS,
        per_device_train_batch_size=BATCH, learning_rate=0.05, lr_scheduler_type="linear",
        remove_unused_columns=False, save_strategy="no", logging_steps=1, seed=0,
        max_grad_norm=0.0,
        disable_tqdm=True, dataloader_num_workers=0, label_names=["labels"])
    base.update(kwargs)
    return TrainingArguments(**base)


def _train(s: dict[str, Any], out: Path, column: Optional[str], callback_kwargs: Any = None,
           **args: Any) -> dict[str, Any]:
    """Train with (``callback_kwargs`` given) or without in-run capture."""
    task, tok = s["task"], s["tok"]
    train = s["raw"] if column != ROW_COLUMN else with_row_index(s["raw"])
    tokenised = task.prepare(s["raw"])
    if column == ROW_COLUMN:  # point mode: the Trainer's rows carry their positions
        tokenised = with_row_index(tokenised)
    features = list(s.get("features", task.feature_columns))
    tokenised = tokenised.select_columns(features + ([column] if column else []))
    snaps, callbacks = Snapshots(), []
    collator: Callable[[list[Any]], Any] = s.get("collator") or DataCollatorWithPadding(tok)
    cb = None
    if callback_kwargs is not None:
        cb = GGDACallback(in_run=True, task=task, train_dataset=tokenised,
                          eval_dataset=s["eval"], group_column=column or "group_id",
                          **callback_kwargs)
        collator, callbacks = cb.data_collator(collator), [cb]
    recorder = Recorder(collator)
    trainer = Trainer(model=s["model"], args=_args(out, **args), train_dataset=tokenised,
                      data_collator=recorder, callbacks=[*callbacks, snaps],
                      compute_loss_func=s.get("compute_loss_func"))
    trainer.train()
    return {"cb": cb, "trainer": trainer, "batches": recorder.batches,
            "weights": snaps.weights, "grads": snaps.grads, "train": train}


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params,
                                                                 retain_graph=True)])


RowTerms = Callable[[torch.nn.Module, dict[str, torch.Tensor], list[dict[str, Any]]],
                    torch.Tensor]


def _classifier_terms(divisor: int) -> RowTerms:
    """Each row's term of the Trainer's loss of a classifier micro-batch: the model's mean CE,
    divided by the accumulation steps unless the model takes loss kwargs (then transformers
    leaves it undivided)."""
    def terms(model: torch.nn.Module, b: dict[str, torch.Tensor], step: list[Any]
              ) -> torch.Tensor:
        inputs = {k: v for k, v in b.items() if k not in (SLOT_KEY, "labels")}
        ce = F.cross_entropy(model(**inputs).logits, b["labels"], reduction="none")
        return ce / len(ce) / divisor
    return terms


def _by_hand(s: dict[str, Any], run: dict[str, Any], accum: int,
             terms: Optional[RowTerms] = None, selection: Any = "auto") -> torch.Tensor:
    """float64 autograd: Σ over the scored steps t of η_t uᵀ g_G,t, with u the summed eval
    loss gradient at the capture's weights and g_G,t the gradient of the Trainer's loss of
    step t, at the weights θ_(t-1), restricted to G's rows (``terms``: each row's term of
    that loss), checked against the gradient the Trainer really accumulated (no clipping)."""
    cb, task, trainer = run["cb"], s["task"], run["trainer"]
    terms = terms or _classifier_terms(1 if trainer.model_accepts_loss_kwargs else accum)
    model = copy.deepcopy(s["model"]).double().eval()
    names = ParameterSelection.resolve(model, selection).names
    params = [dict(model.named_parameters())[n] for n in names]
    ev = task.prepare(s["eval"]).select_columns(list(task.feature_columns))
    ev_batch = task.collate(ev[:])
    total = torch.zeros(len(cb.in_run.slot_of), dtype=torch.float64)
    for record in cb.history:
        model.load_state_dict(run["weights"][record.weights_step], strict=False)
        u = _flat_grad(task.per_row_loss(model, ev_batch).sum(), params)
        for step, lr in zip(record.steps, record.learning_rates):
            model.load_state_dict(run["weights"][step - 1], strict=False)
            step_grad = torch.zeros_like(u)
            batches = run["batches"][(step - 1) * accum:step * accum]
            for b in batches:
                rows = terms(model, b, batches)
                for slot in b[SLOT_KEY].unique().tolist():
                    g = _flat_grad(rows[b[SLOT_KEY] == slot].sum(), params)
                    step_grad += g
                    total[slot] += lr * float(u @ g)
            trained = torch.cat([run["grads"][step][n].reshape(-1) for n in names])
            torch.testing.assert_close(step_grad, trained, rtol=1e-10, atol=1e-14)
    return total


@pytest.mark.parametrize("accum", [1, 2])
def test_in_run_scores_equal_float64_by_hand(tmp_path: Path, accum: int) -> None:
    s = _setup()
    run = _train(s, tmp_path, "group_id", dict(every=2), gradient_accumulation_steps=accum)
    cb = run["cb"]
    # captures at θ_0, θ_2 and the start of the last step (θ_3); each scores the next step
    assert [r.weights_step for r in cb.history] == [0, 2, 3]
    assert [r.steps for r in cb.history] == [[1], [3], [4]]
    assert all(r.rows == BATCH * accum for r in cb.history)
    # η_t is the linear schedule's rate of step t
    assert [r.learning_rates[0] for r in cb.history] == pytest.approx(
        [0.05 * (STEPS - (t - 1)) / STEPS for t in (1, 3, 4)], rel=1e-12)
    scores = cb.in_run_scores
    assert scores.group_ids == ["g0", "g1", "g2"] and scores.query_mode == "sum"
    expected = _by_hand(s, run, accum)
    assert float(expected.abs().min()) > 0
    torch.testing.assert_close(scores.matrix[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(cb.in_run.history_matrix().sum(0), expected, rtol=1e-6, atol=0)
    # saved: GroupScores + history; the dataset columns work like post-hoc ones
    run_folder = read_run(tmp_path / IN_RUN_DIR)  # a run folder (hf_ggda.pipeline)
    assert run_folder.kind == "trainer:in_run"
    saved = run_folder.results[IN_RUN_SCORES]
    torch.testing.assert_close(saved.matrix, scores.matrix)
    history = json.loads(run_folder.paths[HISTORY_NAME].read_text())
    assert [c["weights_step"] for c in history["captures"]] == [0, 2, 3]
    listed = json.loads(run_folder.paths[IN_RUN_CHECKPOINTS].read_text())["checkpoints"]
    assert [c["step"] for c in listed] == [r.step for r in cb.records]
    card = run_folder.paths["README.md"].read_text()
    assert "in-run score of group" in card and "In-run group TracIn" in card
    scored = scores.to_dataset_columns(s["raw"])
    totals = dict(zip(scores.group_ids, scores.aggregated().tolist()))
    assert scored[GROUP_SCORE_COLUMN] == [totals[g] for g in s["raw"]["group_id"]]
    # the history as card curves: running totals of the most helpful / harmful group
    curves = history_curves(cb.history, scores.group_ids, k=1)
    best, worst = max(totals, key=totals.get), min(totals, key=totals.get)
    assert list(curves) == [f"in-run score of group {g} over training" for g in (best, worst)]
    for g, curve in zip((best, worst), curves.values()):
        assert list(curve.x) == [1.0, 3.0, 4.0]
        assert curve.y[-1] == pytest.approx(totals[g], rel=1e-12)
    _, images = build_attribution_card(scores, s["raw"], curves=curves)
    assert sum(name.startswith("curve_") for name in images) == 2


def test_steps_all_scores_every_step_against_the_latest_capture(tmp_path: Path) -> None:
    s = _setup()
    run = _train(s, tmp_path, "group_id", dict(every=2, in_run_steps="all"))
    cb = run["cb"]
    assert [r.weights_step for r in cb.history] == [0, 2, 3]
    assert [r.steps for r in cb.history] == [[1, 2], [3], [4]]
    assert [r.rows for r in cb.history] == [2 * BATCH, BATCH, BATCH]
    # step 2's gradient (at θ_1) is scored against u(θ_0)
    torch.testing.assert_close(cb.in_run_scores.matrix[0], _by_hand(s, run, 1),
                               rtol=1e-6, atol=0)


def _causal_terms(shifted: bool) -> RowTerms:
    """Each row's term of the Trainer's causal-LM loss: its summed next-token CE over the
    number of target tokens of the step (transformers' ``num_items_in_batch``, which counts
    ``labels[..., 1:]`` only when it recognises the model's loss as a shifting one)."""
    def terms(model: torch.nn.Module, b: dict[str, torch.Tensor],
              step: list[dict[str, Any]]) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:],
                             reduction="none", ignore_index=-100)
        items = sum(int((x["labels"][:, 1:] if shifted else x["labels"]).ne(-100).sum())
                    for x in step)
        return ce.sum(1) / items
    return terms


def _lm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """transformers' causal-LM loss without its float32 upcast (the test stays in float64)."""
    ce = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), labels[:, 1:],
                         reduction="sum", ignore_index=-100)
    return ce / num_items_in_batch


def test_conv1d_layers_of_a_causal_lm_equal_float64_by_hand(tmp_path: Path) -> None:
    """GPT-2 (Conv1D, W stored as (in, out)), full fine-tuning, a token-averaged loss over the
    accumulated micro-batches (a ``compute_loss_func``); the attributed weights and a bias
    sit in Conv1D layers."""
    tok = tiny_tokenizer("causal")
    model = _no_dropout(tiny_model("gpt2", tok.vocab_size, seed=3)).double()
    raw = toy_dataset(16, seed=4)
    s = {"tok": tok, "model": model, "task": CausalLMTask(tok, max_length=16),
         "raw": raw.add_column("group_id", [i % 5 for i in range(len(raw))]),
         "eval": toy_dataset(5, seed=9), "features": ("input_ids", "attention_mask"),
         "collator": DataCollatorForLanguageModeling(tok, mlm=False),
         "compute_loss_func": _lm_loss}
    selection = ["*c_attn.weight", "*mlp.c_fc.weight", "*mlp.c_proj.bias"]
    run = _train(s, tmp_path, "group_id", dict(every=2, selection=selection),
                 gradient_accumulation_steps=2, label_names=None)
    cb = run["cb"]
    assert cb.in_run.collector.tracked and all(t.transposed for t in cb.in_run.collector.tracked)
    assert [r.steps for r in cb.history] == [[1], [3], [4]]
    shifted = bool(getattr(run["trainer"], "_loss_shifts_labels", True))
    expected = _by_hand(s, run, 2, _causal_terms(shifted), selection)
    assert float(expected.abs().min()) > 0
    torch.testing.assert_close(cb.in_run_scores.matrix[0], expected, rtol=1e-6, atol=0)


def test_training_is_bit_identical_with_and_without_capture(tmp_path: Path) -> None:
    # float32 and dropout on: the capture must neither touch the gradients nor draw RNG
    captured = _train(_setup(double=False, dropout=True), tmp_path / "in_run", "group_id",
                      dict(every=1, in_run_steps="all"), gradient_accumulation_steps=2,
                      max_steps=2)
    again = _train(_setup(double=False, dropout=True), tmp_path / "plain2", None,
                   gradient_accumulation_steps=2, max_steps=2)
    assert captured["cb"].in_run_scores is not None
    assert len(captured["cb"].history) == 2
    for step, weights in again["weights"].items():
        for name, value in weights.items():
            assert torch.equal(value, captured["weights"][step][name]), (step, name)
    losses = [e["loss"] for e in captured["trainer"].state.log_history if "loss" in e]
    assert losses == [e["loss"] for e in again["trainer"].state.log_history if "loss" in e]
    assert sorted(again["weights"]) == [0, 1, 2]


@pytest.mark.parametrize("factorised_dim", [None, 4])
def test_capture_at_checkpoints_equals_post_hoc_tracin(tmp_path: Path,
                                                       factorised_dim: Optional[int]) -> None:
    """Point mode, captures at the saved checkpoints: each capture is post-hoc TracIn over
    that checkpoint on the next step's rows (the Trainer's mean loss: ÷ batch rows), also
    with the factorised projection (the same seeded per-layer matrices)."""
    s = _setup()
    engine = EngineConfig(factorised_dim=factorised_dim, batch_size=2)
    run = _train(s, tmp_path, ROW_COLUMN, dict(every=2, in_run_config=engine),
                 save_strategy="steps", save_steps=2, save_only_model=True)
    cb = run["cb"]
    assert cb.in_run_scores.group_ids == list(range(16))
    assert (cb.in_run.engine.factorised is not None) == (factorised_dim is not None)
    assert cb.in_run_scores.config["factorised_dim"] == factorised_dim
    compared = 0
    for i, record in enumerate(cb.history):
        folder = tmp_path / f"checkpoint-{record.weights_step}"
        if not folder.is_dir():
            continue
        rows = run["batches"][record.steps[0] - 1][SLOT_KEY].tolist()
        config = TracInConfig(checkpoints=[str(folder)], learning_rates=record.learning_rates,
                              batch_size=3, factorised_dim=factorised_dim)
        model = s["model"].eval()
        post = TracIn(model, s["task"], config).fit(
            run["train"].select(rows), group_column=ROW_COLUMN).score(s["eval"],
                                                                     aggregate="sum")
        in_run = cb.in_run.history_matrix()[i]
        assert sorted(rows) == post.group_ids
        torch.testing.assert_close(in_run[post.group_ids] * BATCH, post.matrix[0],
                                   rtol=1e-6, atol=0)
        others = [r for r in range(16) if r not in rows]
        assert float(in_run[others].abs().max()) == 0.0
        compared += 1
    assert compared == 1  # θ_2 (θ_0 and θ_3 are not checkpoints)


def test_in_run_errors(tmp_path: Path) -> None:
    s = _setup(double=False)
    tokenised = s["task"].prepare(s["raw"]).select_columns(
        [*s["task"].feature_columns, "group_id"])
    with pytest.raises(ValueError, match="eval_dataset"):
        GGDACallback(in_run=True, task=s["task"], train_dataset=tokenised)
    with pytest.raises(MissingColumnError):
        GGDACallback(in_run=True, task=s["task"], eval_dataset=s["eval"],
                     train_dataset=tokenised.remove_columns("group_id"))
    with pytest.raises(ValueError, match="every"):
        GGDACallback(in_run=True, task=s["task"], eval_dataset=s["eval"],
                     train_dataset=tokenised, every=0)
    with pytest.raises(ValueError, match="in_run=True"):
        GGDACallback().data_collator(DataCollatorWithPadding(s["tok"]))
    cb = GGDACallback(in_run=True, task=s["task"], eval_dataset=s["eval"],
                      train_dataset=tokenised)
    collate = cb.data_collator(DataCollatorWithPadding(s["tok"]))
    bare = {k: v for k, v in tokenised[0].items() if k != "group_id"}
    with pytest.raises(MissingColumnError):
        collate([bare, tokenised[1]])
    assert SLOT_KEY not in collate([bare])  # e.g. the Trainer's own evaluation rows
    batch = collate([tokenised[0], tokenised[1]])
    assert batch[SLOT_KEY].tolist() == [0, 1] and "group_id" not in batch
    # the Trainer would drop the group column, or the collator was not wrapped
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        _run_with(cb, s, tokenised, tmp_path / "drop", remove_unused_columns=True)
    plain = GGDACallback(in_run=True, task=s["task"], eval_dataset=s["eval"],
                         train_dataset=tokenised)
    with pytest.raises(RuntimeError, match="without group slots"):
        Trainer(model=s["model"], args=_args(tmp_path / "plain"),
                train_dataset=tokenised.remove_columns("group_id"),
                data_collator=DataCollatorWithPadding(s["tok"]), callbacks=[plain]).train()
    # selected parameters outside linear layers cannot be split inside the hooks
    bad = GGDACallback(in_run=True, task=s["task"], eval_dataset=s["eval"],
                       train_dataset=tokenised, selection=["*word_embeddings*"])
    with pytest.raises(ValueError, match="outside"):
        _run_with(bad, s, tokenised, tmp_path)


def _run_with(cb: GGDACallback, s: dict[str, Any], tokenised: Dataset, out: Path,
              **args: Any) -> None:
    trainer = Trainer(model=s["model"], args=_args(out, **args), train_dataset=tokenised,
                      data_collator=cb.data_collator(DataCollatorWithPadding(s["tok"])),
                      callbacks=[cb])
    trainer.train()


def _two_process_worker(out_dir: str) -> None:
    from hf_ggda.integrations.distributed import rank_and_world

    torch.set_num_threads(1)  # forked after the parent used torch's thread pool
    rank, world = rank_and_world()
    s = _setup()
    run = _train(s, Path(out_dir) / "run", "group_id", dict(every=2),
                 average_tokens_across_devices=False)
    cb = run["cb"]
    torch.save({"world": world, "scores": cb.in_run_scores.matrix,
                "history": cb.in_run.history_matrix(),
                "rows": [r.rows for r in cb.history]}, Path(out_dir) / f"rank{rank}.pt")


def test_two_processes_equal_one(tmp_path: Path) -> None:
    """2 CPU processes (gloo, DDP) of batch 4 = 1 process of batch 8: the same rows per step
    and the averaged gradient, so the same in-run scores (each process's share ÷ world).
    Token averaging across devices is off: with it, transformers multiplies the loss of a
    model that ignores ``num_items_in_batch`` by the process count, so the two runs would
    train differently (in-run capture follows the gradient actually used either way)."""
    from accelerate import debug_launcher

    s = _setup()
    single = _train(s, tmp_path / "single", "group_id", dict(every=2),
                    per_device_train_batch_size=2 * BATCH,
                    average_tokens_across_devices=False)["cb"]
    debug_launcher(_two_process_worker, args=(str(tmp_path),), num_processes=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2
        assert got["rows"] == [r.rows for r in single.history] == [2 * BATCH] * 3
        torch.testing.assert_close(got["history"], single.in_run.history_matrix(),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(got["scores"], single.in_run_scores.matrix,
                                   rtol=1e-6, atol=0)


def test_bf16_mixed_precision_trains_the_same_and_scores_close_to_fp32(tmp_path: Path) -> None:
    """bf16 autocast: the hooks read bf16 activations and output gradients and score in
    float32; training is bit-identical with and without capture, and the scores agree with
    the fp32 run's to bf16 accuracy."""
    full = _train(_setup(double=False), tmp_path / "fp32", "group_id", dict(every=2))
    mixed = _train(_setup(double=False), tmp_path / "bf16", "group_id", dict(every=2),
                   bf16=True)
    plain = _train(_setup(double=False), tmp_path / "plain", None, bf16=True)
    for name, value in plain["weights"][STEPS].items():
        assert torch.equal(value, mixed["weights"][STEPS][name]), name
    ref = full["cb"].in_run_scores.matrix
    got = mixed["cb"].in_run_scores.matrix
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert not torch.equal(got, ref)  # bf16 passes really ran
    torch.testing.assert_close(got, ref, rtol=0.03, atol=0.01 * float(ref.abs().max()))


def test_per_evaluation_group_scores_are_the_scores_of_each_group_alone(tmp_path: Path
                                                                       ) -> None:
    """eval_group_column: one u per evaluation group (m × K, query mode "groups"); each row
    equals a run scored against that group's rows alone, and the rows sum to the whole set."""
    s = _setup()
    s["eval"] = s["eval"].add_column("topic", ["b", "a", "b", "a", "a"])
    grouped = _train(s, tmp_path / "grouped", "group_id",
                     dict(every=2, eval_group_column="topic"))["cb"]
    scores = grouped.in_run_scores
    assert scores.query_mode == "groups" and scores.query_ids == ["a", "b"]
    assert scores.query_group_column == "topic" and tuple(scores.matrix.shape) == (2, 3)
    assert len(grouped.history[0].query_scores) == 2
    whole = _train(_setup(), tmp_path / "whole", "group_id", dict(every=2))["cb"]
    torch.testing.assert_close(scores.matrix.sum(0), whole.in_run_scores.matrix[0],
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(grouped.in_run.history_matrix(), whole.in_run.history_matrix(),
                               rtol=1e-9, atol=0)
    for i, topic in enumerate(scores.query_ids):
        alone = _setup()
        alone["eval"] = s["eval"].filter(lambda r, t=topic: r["topic"] == t)
        one = _train(alone, tmp_path / topic, "group_id", dict(every=2))["cb"]
        torch.testing.assert_close(scores.matrix[i], one.in_run_scores.matrix[0],
                                   rtol=1e-9, atol=0)


def test_eval_sample_takes_rotating_windows_scaled_to_the_whole_set(tmp_path: Path) -> None:
    """eval_sample=s: capture c scores against the gradient of rows c·s … c·s+s−1 (mod n)
    × n/s — each capture equals that capture of a run whose evaluation set is the window."""
    s = _setup()
    sampled = _train(s, tmp_path / "sampled", "group_id", dict(every=2, eval_sample=2))["cb"]
    assert sampled.in_run_scores.config["eval_sample"] == 2
    windows = [[0, 1], [2, 3], [4, 0]]  # 5 evaluation rows, captures at θ_0, θ_2, θ_3
    for c, rows in enumerate(windows):
        ref_setup = _setup()
        ref_setup["eval"] = s["eval"].select(rows)
        ref = _train(ref_setup, tmp_path / f"ref{c}", "group_id", dict(every=2))["cb"]
        torch.testing.assert_close(
            torch.tensor(sampled.history[c].scores, dtype=torch.float64),
            2.5 * torch.tensor(ref.history[c].scores, dtype=torch.float64), rtol=1e-6, atol=0)
    # s >= n is the exact run
    full = _train(_setup(), tmp_path / "full", "group_id", dict(every=2, eval_sample=5))["cb"]
    exact = _train(_setup(), tmp_path / "exact", "group_id", dict(every=2))["cb"]
    torch.testing.assert_close(full.in_run_scores.matrix, exact.in_run_scores.matrix,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="eval_sample"):
        GGDACallback(in_run=True, task=s["task"], train_dataset=s["raw"], eval_dataset=s["eval"],
                     eval_sample=0)
