"""``GGDACallback``: record what TracIn needs while a ``transformers.Trainer`` trains.

At every save the callback notes the ``checkpoint-N`` folder the Trainer just wrote (for a
PEFT model it holds ``adapter_model.safetensors``; nothing is saved twice) and the learning
rate used for step N, in ``<output_dir>/ggda_checkpoints.json`` (atomic write). Optionally it
runs an attribution when training ends and saves the scores and the scored data::

    callback = GGDACallback(task=task, train_dataset=raw_train, query_dataset=raw_queries,
                            grouper=get_grouper("random", num_groups=8))
    trainer = Trainer(model, args, train_dataset=tokenised, callbacks=[callback])
    trainer.train()
    scores = GroupScores.from_pretrained(f"{args.output_dir}/ggda_scores")

The learning rate of step N is the one logged at step N in ``state.log_history`` (what
``trainer_state.json`` holds), else the optimizer's rate read just after step N's update
(before the scheduler moves it), else the last one logged before N. The checkpoint list is
read back and validated by :mod:`.checkpoint_manifest`. With ``in_run=True`` the callback
also scores groups inside the Trainer's own passes (:mod:`hf_ggda.integrations.in_run`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..atomic import atomic_write_bytes, save_dataset_atomic
from ..attributors import AttributorConfig, TracInConfig, get_attributor, get_attributor_config
from ..attributors.checkpoints import learning_rate_at
from ..errors import MissingColumnError
from ..gradients import EngineConfig
from ..grouping import Grouper
from ..logging import get_logger
from ..params import SelectionSpec
from ..pipeline import RunWriter
from ..scores import GroupScores
from ..tasks import GROUP_COLUMN, AttributionTask
from .cards import write_attribution_card
from .checkpoint_manifest import (  # re-exported: the callback's public names
    MANIFEST_NAME,
    MANIFEST_VERSION,
    CheckpointRecord,
    read_checkpoint_manifest,
    tracin_config_from_manifest,
)
from .in_run import CaptureRecord, GroupCollator, InRunCapture, build_capture, history_curves

__all__ = [
    "HISTORY_NAME",
    "IN_RUN_CHECKPOINTS",
    "IN_RUN_DIR",
    "IN_RUN_SCORES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "SCORED_QUERY_DIR",
    "SCORED_TRAIN_DIR",
    "SCORES_DIR",
    "CheckpointRecord",
    "GGDACallback",
    "read_checkpoint_manifest",
    "tracin_config_from_manifest",
]

logger = get_logger(__name__)

SCORES_DIR = "ggda_scores"
SCORED_TRAIN_DIR = "ggda_scored_train"
SCORED_QUERY_DIR = "ggda_scored_queries"
IN_RUN_DIR = "ggda_in_run"
#: Entries of the in-run run folder (written by :class:`hf_ggda.pipeline.RunWriter`).
IN_RUN_SCORES = "scores"
HISTORY_NAME = "history.json"
IN_RUN_CHECKPOINTS = "checkpoints.json"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

AttributorSpec = Union[str, Mapping[str, Any], AttributorConfig]



def _output_dir(args: Any) -> Path:
    """The Trainer's output folder (``TrainingArguments.output_dir``; its default when unset)."""
    return Path(args.output_dir or "trainer_output")

class GGDACallback(TrainerCallback):
    """Records checkpoints and learning rates for TracIn; optionally attributes at the end.

    Without ``query_dataset`` the callback only writes the manifest. With it, at the end of
    training it groups ``train_dataset`` (with ``grouper``, or by ``group_column``), fits the
    attributor on the recorded checkpoints (TracIn) or on the final model (other methods),
    scores the queries, and saves ``ggda_scores/`` (GroupScores), ``ggda_scored_train/`` and
    ``ggda_scored_queries/`` (``save_to_disk``) in the output_dir. Under several processes
    every process computes its share; only the main one writes files.

    Args:
        task: The attribution task (how raw rows become losses).
        train_dataset: The *raw* training rows (the Trainer's are usually tokenised).
        query_dataset: Raw query rows to attribute (None: record checkpoints only).
        grouper: Assigns ``group_id`` at the end of training (None: use ``group_column``).
        group_column: Existing group column of ``train_dataset`` when ``grouper`` is None.
        attributor: A method name, config dict or config (default ``"tracin"``); a TracIn
            config without checkpoints gets the recorded ones and their learning rates.
        aggregate: ``"sum"`` to score the whole query set at once (see ``Attributor.score``).
        query_group_column: Score query groups instead of rows.
        top_k: Groups per query in the scored query columns.
        store: Folder for the gradient stores (None: in memory).
        self_influence: Also compute each group's self-influence.
        in_run: Also score groups during training (:mod:`hf_ggda.integrations.in_run`):
            needs ``task``, ``eval_dataset`` and ``train_dataset`` (the Trainer's rows with
            ``group_column``; without it, rows with :data:`~.in_run.ROW_COLUMN`: point
            mode), and ``data_collator=callback.data_collator(collator)`` in the Trainer.
            Results: :attr:`in_run_scores`, :attr:`history` and ``ggda_in_run/``.
        eval_dataset: Raw evaluation rows whose summed measurement in-run capture follows.
        every: Take the evaluation gradient every this many optimizer steps (and at the
            start of the last one).
        in_run_steps: ``"capture"`` (score the step after each capture: TracIn at those
            weights) or ``"all"`` (score every step against the latest capture).
        selection: Parameters in-run capture attributes (the engine's spec).
        in_run_config: Engine settings of the evaluation pass (batch size,
            ``factorised_dim``).
        eval_group_column: Score per evaluation group (m × K) instead of the summed set.
        eval_sample: Evaluation rows per capture, a rotating window scaled to the whole set
            (None: all rows; see :class:`~.in_run.InRunCapture`).

    Raises:
        ValueError: ``query_dataset`` without ``task`` / ``train_dataset``, ``in_run``
            without ``task`` / ``train_dataset`` / ``eval_dataset``, or a bad attributor spec.
        MissingColumnError: No ``grouper`` and ``train_dataset`` lacks ``group_column``
            (end-of-training attribution), or in point mode lacks ``ROW_COLUMN``.
    """

    def __init__(self, task: Optional[AttributionTask] = None,
                 train_dataset: Optional[Dataset] = None,
                 query_dataset: Optional[Dataset] = None, grouper: Optional[Grouper] = None,
                 group_column: str = GROUP_COLUMN, attributor: AttributorSpec = "tracin",
                 aggregate: Optional[str] = None, query_group_column: Optional[str] = None,
                 top_k: int = 5, store: Optional[str] = None,
                 self_influence: bool = False, in_run: bool = False,
                 eval_dataset: Optional[Dataset] = None, every: int = 1,
                 in_run_steps: str = "capture", selection: SelectionSpec = "auto",
                 in_run_config: Optional[EngineConfig] = None,
                 eval_group_column: Optional[str] = None,
                 eval_sample: Optional[int] = None) -> None:
        if query_dataset is not None and (task is None or train_dataset is None):
            raise ValueError("End-of-training attribution needs task=, train_dataset= (raw "
                             "rows) and query_dataset=.")
        self.in_run: Optional[InRunCapture] = None
        self.in_run_scores: Optional[GroupScores] = None
        if in_run:
            self.in_run = build_capture(task, train_dataset, eval_dataset, group_column,
                                        every, in_run_steps, selection, in_run_config,
                                        eval_group_column, eval_sample)
        if train_dataset is not None and grouper is None and \
                not (in_run and query_dataset is None) and \
                group_column not in train_dataset.column_names:
            raise MissingColumnError(group_column, train_dataset.column_names,
                                     role="group column (or pass grouper=)")
        self.attributor_config = attributor if isinstance(attributor, AttributorConfig) \
            else get_attributor_config(attributor)
        self.task, self.train_dataset, self.query_dataset = task, train_dataset, query_dataset
        self.grouper, self.group_column = grouper, group_column
        self.aggregate, self.query_group_column = aggregate, query_group_column
        self.top_k, self.store, self.self_influence = top_k, store, self_influence
        self.records: list[CheckpointRecord] = []
        self.scores: Optional[GroupScores] = None
        self.scored_train: Optional[Dataset] = None
        self._step_lr: Optional[tuple[int, float]] = None
        self._attribution: Optional[dict[str, Any]] = None

    # -- manifest ------------------------------------------------------------------------------
    def _manifest(self, args: TrainingArguments) -> dict[str, Any]:
        return {"format_version": MANIFEST_VERSION, "output_dir": str(args.output_dir),
                "checkpoints": [asdict(r) for r in self.records],
                "attribution": self._attribution}

    def _write(self, args: TrainingArguments, state: TrainerState) -> None:
        if state.is_world_process_zero:
            atomic_write_bytes(_output_dir(args) / MANIFEST_NAME,
                               json.dumps(self._manifest(args), indent=1).encode())

    def _learning_rate(self, state: TrainerState) -> tuple[Optional[float], str]:
        step = state.global_step
        history = sorted((e for e in state.log_history
                          if "learning_rate" in e and "step" in e), key=lambda e: e["step"])
        exact = [e for e in history if int(e["step"]) == step]
        if exact:
            return float(exact[-1]["learning_rate"]), "log_history"
        if self._step_lr is not None and self._step_lr[0] == step:
            return self._step_lr[1], "optimizer"
        before = learning_rate_at([e for e in history if int(e["step"]) <= step], step)
        if before is not None:
            return before, "log_history_before"
        return None, "none"

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """Start a manifest, keeping records of an earlier run up to a resumed step."""
        root = _output_dir(args)
        kept: list[CheckpointRecord] = []
        if (root / MANIFEST_NAME).exists() and state.global_step > 0:
            try:
                kept = [r for r in read_checkpoint_manifest(root)
                        if r.step <= state.global_step and (root / r.path).is_dir()]
            except ValueError as err:
                logger.warning("Ignoring the old manifest: %s", err)
        self.records, self._step_lr = kept, None
        if kept:
            logger.info("Resumed GGDA manifest with checkpoints %s.", [r.step for r in kept])
        if self.in_run is not None:
            column = self.in_run.group_column
            if args.remove_unused_columns and column not in (args.label_names or []):
                raise ValueError(f"In-run capture needs the {column!r} column in the batches: "
                                 "set remove_unused_columns=False in TrainingArguments.")
            if args.gradient_checkpointing or args.fp16:
                raise ValueError("In-run capture reads the output gradients of one backward "
                                 "pass: train without gradient_checkpointing and without fp16 "
                                 "loss scaling (bf16 is fine).")
            if state.global_step > 0:
                logger.warning("Resumed at step %d: in-run scores cover the steps from here "
                               "on only.", state.global_step)
            self.in_run.start(_model(kwargs))

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, **kwargs: Any) -> None:
        """Note the learning rate just used (the scheduler has not stepped yet)."""
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        lr: Optional[float] = None
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            lr = float(optimizer.param_groups[0]["lr"])
        elif scheduler is not None and hasattr(scheduler, "get_last_lr"):
            lr = float(scheduler.get_last_lr()[0])
        if lr is not None and math.isfinite(lr):
            self._step_lr = (state.global_step + 1, lr)
        if self.in_run is not None:
            if lr is None or not math.isfinite(lr):
                raise ValueError("In-run capture needs the optimizer's learning rate; the "
                                 "Trainer passed no optimizer with param_groups.")
            self.in_run.step_end(state.global_step + 1, lr)

    def on_init_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        """In-run capture: hook the model's inputs, so that batches carrying group slots
        also work in ``trainer.evaluate()`` before training."""
        if self.in_run is not None and kwargs.get("model") is not None:
            self.in_run.attach_input_hook(kwargs["model"])

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        """In-run capture: take the evaluation gradient when due and arm the layer hooks."""
        if self.in_run is not None:
            self.in_run.step_begin(_model(kwargs), state.global_step, state.max_steps)

    def on_save(self, args: TrainingArguments, state: TrainerState,
                control: TrainerControl, **kwargs: Any) -> None:
        """Record the checkpoint just written and rewrite the manifest."""
        root = _output_dir(args)
        name = f"checkpoint-{state.global_step}"
        folder = root / name
        if not folder.is_dir():
            logger.warning("Trainer saved but %s does not exist (hyper-parameter search or a "
                           "custom save?); not recorded for TracIn.", folder)
            return
        lr, source = self._learning_rate(state)
        if lr is None:
            logger.warning("No learning rate known at step %d; set logging_steps so that "
                           "it is logged.", state.global_step)
        record = CheckpointRecord(step=state.global_step, path=name, learning_rate=lr,
                                  learning_rate_source=source, epoch=state.epoch,
                                  adapter=any((folder / f).exists() for f in _ADAPTER_FILES))
        kept = [r for r in self.records if r.step != record.step]
        gone = [r.step for r in kept if not (root / r.path).is_dir()]
        if gone:
            logger.info("Checkpoints %s were rotated away (save_total_limit); dropped from the "
                        "TracIn manifest.", gone)
        self.records = sorted([r for r in kept if r.step not in gone] + [record],
                              key=lambda r: r.step)
        self._write(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Finish in-run capture, run the configured attribution (when a query dataset was
        given) and save them."""
        if self.in_run is not None:
            self._finish_in_run(args, state)
        self._write(args, state)
        model = kwargs.get("model")
        if self.query_dataset is None:
            return
        if model is None:
            raise ValueError("The Trainer passed no model to on_train_end.")
        was_training = model.training
        model.eval()  # dropout off: per-row gradients must be deterministic
        try:
            self._attribute(model, args, state)
        finally:
            model.train(was_training)

    # -- attribution ---------------------------------------------------------------------------
    def resolved_attributor_config(self, args: TrainingArguments) -> AttributorConfig:
        """The attributor config, with the recorded checkpoints filled in for TracIn.

        Raises:
            ValueError: A recorded checkpoint has no learning rate.
        """
        cfg = self.attributor_config
        if not isinstance(cfg, TracInConfig) or cfg.checkpoints or cfg.trainer_output_dir:
            return cfg
        if not self.records:
            logger.warning("No checkpoint was saved during training: TracIn uses the final "
                           "weights only. Set save_strategy='steps' and save_steps.")
            return cfg
        missing = [r.step for r in self.records if r.learning_rate is None]
        if missing:
            raise ValueError(f"No learning rate recorded for checkpoints at steps {missing}.")
        root = _output_dir(args)
        rates = [float(r.learning_rate) for r in self.records if r.learning_rate is not None]
        return replace(cfg, checkpoints=[str(root / r.path) for r in self.records],
                       learning_rates=rates)

    def _attribute(self, model: torch.nn.Module, args: TrainingArguments,
                   state: TrainerState) -> None:
        assert self.task is not None and self.train_dataset is not None
        assert self.query_dataset is not None
        train, column = self.train_dataset, self.group_column
        if self.grouper is not None:
            train = self.grouper.assign(train, model=model, task=self.task)
            column = GROUP_COLUMN
        config = self.resolved_attributor_config(args)
        attributor = get_attributor(model, self.task, config)
        attributor.fit(train, group_column=column, store=self.store)
        scores = attributor.score(self.query_dataset, aggregate=self.aggregate,
                                  query_group_column=self.query_group_column,
                                  self_influence=self.self_influence)
        self.scores = scores
        self.scored_train = scores.to_dataset_columns(train, group_column=column)
        root = _output_dir(args)
        written = {"scores": SCORES_DIR, "scored_train": SCORED_TRAIN_DIR}
        if state.is_world_process_zero:
            scores.save_pretrained(root / SCORES_DIR)
            save_dataset_atomic(self.scored_train, root / SCORED_TRAIN_DIR)
            if scores.query_mode != "sum":
                queries = scores.to_query_columns(self.query_dataset, k=self.top_k)
                save_dataset_atomic(queries, root / SCORED_QUERY_DIR)
                written["scored_queries"] = SCORED_QUERY_DIR
        self._attribution = {"method": config.attributor_type, "step": state.global_step,
                             "num_groups": scores.num_groups,
                             "num_queries": scores.num_queries, **written}
        self._write(args, state)
        logger.info("GGDA %s at step %d: %d queries x %d groups saved in %s.",
                    config.attributor_type, state.global_step, scores.num_queries,
                    scores.num_groups, root / SCORES_DIR)

    # -- in-run capture --------------------------------------------------------------------
    def data_collator(self, inner: Callable[[list[Any]], Any]) -> GroupCollator:
        """Wrap the Trainer's data collator so batches carry their rows' groups.

        Args:
            inner: The collator the Trainer would use (e.g. ``DataCollatorWithPadding``).

        Returns:
            The collator to pass as the Trainer's ``data_collator``.

        Raises:
            ValueError: The callback was made without ``in_run=True``.
        """
        if self.in_run is None:
            raise ValueError("data_collator() is for GGDACallback(in_run=True, ...).")
        return GroupCollator(inner, self.in_run.group_column, self.in_run.slot_of)

    @property
    def history(self) -> list[CaptureRecord]:
        """The in-run captures (empty without ``in_run``)."""
        return self.in_run.history if self.in_run is not None else []

    def _finish_in_run(self, args: TrainingArguments, state: TrainerState) -> None:
        """Write ``ggda_in_run/`` as a run folder (:class:`~hf_ggda.pipeline.RunWriter`: the
        scores, the per-capture history, the checkpoint list and a card with the history
        plot; every process enters, the main one writes)."""
        assert self.in_run is not None
        scores = self.in_run.finish()
        self.in_run_scores = scores
        history = {"sign_convention": scores.sign_convention, "group_ids": scores.group_ids,
                   "captures": [asdict(r) for r in self.in_run.history]}
        with RunWriter(_output_dir(args) / IN_RUN_DIR, "trainer:in_run",
                       config=dict(scores.config)) as run:
            run.result(IN_RUN_SCORES, scores)
            run.json(HISTORY_NAME, history)
            run.json(IN_RUN_CHECKPOINTS, self._manifest(args))  # ggda_checkpoints.json's
            run.written_by(lambda folder: self._in_run_card(folder, scores))
        self._attribution = {**(self._attribution or {}), "in_run": IN_RUN_DIR}

    def _in_run_card(self, folder: Path, scores: GroupScores) -> Path:
        """The in-run card: top groups and, with one summed evaluation set, the running
        scores of the most helpful and harmful groups over the steps."""
        assert self.in_run is not None and self.train_dataset is not None
        curves = history_curves(self.in_run.history, scores.group_ids) \
            if scores.query_mode == "sum" and any(r.steps for r in self.in_run.history) else {}
        return write_attribution_card(
            folder, scores, self.train_dataset, group_column=self.in_run.group_column,
            curves=curves, pretty_name="In-run group TracIn",
            grouping=f"the Trainer's {self.in_run.group_column!r} column")


def _model(kwargs: Mapping[str, Any]) -> torch.nn.Module:
    model = kwargs.get("model")
    if model is None:
        raise ValueError("The Trainer passed no model to the callback.")
    return model
