"""In-run group TracIn: score groups during the ``Trainer``'s own forward/backward passes.

At a *capture* the callback takes the gradient u = ∇θ Σ_q f(q; θ) of the evaluation
measurement (the task's, summed over the evaluation rows; optionally factorised-projected) at
the current weights θ_s with the project's :class:`~hf_ggda.gradients.GradientEngine`. During
the next optimizer step (its forward/backward passes are the Trainer's, nothing is re-run),
hooks on the engine's tracked layers split that step's gradient by the rows of each group and
add

    score[G] += η · uᵀ g_G,        g_G = Σ_{i ∈ G} ∂L_step/∂θ restricted to row i's terms,

with L_step the loss the Trainer really back-propagates in that step, whatever its reduction
(the model's batch mean, a token average over ``num_items_in_batch``, the division by the
gradient-accumulation steps where transformers applies it), so Σ_G uᵀ g_G = uᵀ ∇L_step: the
scores of one step add up to the first-order change of the evaluation measurement that step
caused; and η the learning rate the scheduler set for that step. Under several processes each
scores its own rows and the sums are divided by the world size, as DDP averages gradients.
For a linear layer y = W a the hook never forms a gradient:
uᵀ g_row = Σ_tokens (∂L/∂y)ᵀ U a, one matmul per layer. The gradient is the raw one
(before clipping; SGD's direction, not Adam's update). Sign: a positive score means the group
helps (its update lowered the evaluation loss), as everywhere in hf_ggda.

Captures are taken at the weights θ_s of steps s = 0, every, 2·every, … and at the start of
the last step; with ``steps="capture"`` only the step after each capture is scored (exactly
TracIn over the checkpoints θ_s with the rows of step s + 1), with ``steps="all"`` every step
is scored against the latest capture's u (every training row counts; u is up to ``every``
steps old).

The group of each row travels with the batch: :class:`GroupCollator` wraps the Trainer's data
collator, turns the group column (or, in point mode, the :data:`ROW_COLUMN` added by
:func:`with_row_index`) into a tensor under :data:`SLOT_KEY`, and a forward pre-hook on the
model removes it before the model sees the batch. Nothing of the training changes: the hooks
only read activations and output gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from datasets import Dataset

from ..errors import MissingColumnError
from ..gradients import EngineConfig, GradientCollector, GradientEngine
from ..gradients.hooks import TrackedLayer
from ..logging import get_logger
from ..params import SelectionSpec
from ..scores import GroupScores
from ..tasks import AttributionTask
from .cards import Curve
from .distributed import all_reduce_sum, rank_and_world

logger = get_logger(__name__)

#: Batch key of the (B,) group slots; removed from the model's inputs by a pre-hook.
SLOT_KEY = "ggda_group_slot"
#: Column of dataset row positions (point mode), added by :func:`with_row_index`.
ROW_COLUMN = "ggda_row"
_EVAL_GROUP = "_ggda_eval_group"


def with_row_index(dataset: Dataset) -> Dataset:
    """Add :data:`ROW_COLUMN` (each row's position) so point-mode capture can name rows.

    Args:
        dataset: The Trainer's training rows.

    Returns:
        ``dataset`` with the column (replaced when present).
    """
    if ROW_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(ROW_COLUMN)
    return dataset.add_column(ROW_COLUMN, list(range(len(dataset))))


class GroupCollator:
    """Wraps a data collator so each batch carries its rows' group slots under
    :data:`SLOT_KEY` (the group column itself never reaches the inner collator).

    Args:
        inner: The Trainer's collator (e.g. ``DataCollatorWithPadding``).
        column: The group column (or :data:`ROW_COLUMN` in point mode).
        slot_of: Map group id -> slot (column of the score vector).

    Rows without ``column`` at all (the Trainer's own evaluation batches) pass through
    without slots.

    Raises:
        MissingColumnError: (when called) Some rows of a batch lack ``column``.
        KeyError: (when called) A group id was not in the training dataset.
    """

    def __init__(self, inner: Callable[[list[Any]], Any], column: str,
                 slot_of: Mapping[Any, int]) -> None:
        self.inner, self.column, self.slot_of = inner, column, slot_of

    def __call__(self, features: list[Mapping[str, Any]]) -> Any:
        """Collate ``features`` with the inner collator and add the group slots."""
        if not any(self.column in f for f in features):
            return self.inner(list(features))  # not training rows: no slots
        rows, slots = [], []
        for f in features:
            if self.column not in f:
                raise MissingColumnError(self.column, list(f), role=(
                    "group column of every row of a training batch"))
            value = f[self.column]
            value = value.item() if hasattr(value, "item") else value
            if value not in self.slot_of:
                raise KeyError(f"Group {value!r} of a training batch is not in the "
                               "train_dataset given to GGDACallback.")
            slots.append(self.slot_of[value])
            rows.append({k: v for k, v in f.items() if k != self.column})
        batch = self.inner(rows)
        batch[SLOT_KEY] = torch.tensor(slots, dtype=torch.long)
        return batch


@dataclass
class CaptureRecord:
    """One capture of the in-run history.

    Attributes:
        weights_step: Global step s of the weights θ_s that u was taken at.
        steps: The optimizer steps scored against this u.
        learning_rates: η of each of those steps.
        rows: Training rows seen in those steps (on all processes).
        scores: (K,) this capture's contribution to the scores (summed over evaluation
            groups).
        query_scores: (m, K) contributions per evaluation group (None without groups).
    """

    weights_step: int
    steps: list[int]
    learning_rates: list[float]
    rows: int
    scores: list[float]
    query_scores: Optional[list[list[float]]] = None


class InRunCapture:
    """The capture state of one training run (used by ``GGDACallback(in_run=True)``).

    Args:
        task: Attribution task (its measurement defines u; its prepare/collate read
            ``eval_dataset``).
        eval_dataset: Raw evaluation rows; u is their summed measurement's gradient.
        group_ids: The K group ids (sorted), the columns of the scores.
        group_column: Name of the group column (recorded in the scores).
        every: Capture every this many optimizer steps.
        steps: ``"capture"`` (score the step after each capture) or ``"all"``.
        selection: Parameters to attribute (the engine's spec; ``"auto"``: PEFT adapters or
            the trainable ones). They must all sit in Linear / Conv1D layers.
        engine_config: Settings of the u pass (batch size, ``factorised_dim``).
        eval_group_column: Column of ``eval_dataset``: one u per evaluation group (scores
            m × K, query mode ``"groups"``) instead of one for the whole set.
        eval_sample: Evaluation rows per capture (None: all). Capture c takes the rotating
            window of rows c·s … c·s + s − 1 (mod n) and scales its gradient by n / s: an
            estimate of u (unbiased when the rows are in random order; shuffle a sorted set
            first) that costs s / n of the full pass; every row is used once every ⌈n / s⌉
            captures. Summed evaluation sets only.

    Raises:
        ValueError: ``every`` < 1, unknown ``steps``, a dense ``projection_dim``, or
            ``eval_sample`` < 1 or with ``eval_group_column``.
        MissingColumnError: ``eval_group_column`` is not a column of ``eval_dataset``.
    """

    def __init__(self, task: AttributionTask, eval_dataset: Dataset, group_ids: Sequence[Any],
                 group_column: str, every: int = 1, steps: str = "capture",
                 selection: SelectionSpec = "auto",
                 engine_config: Optional[EngineConfig] = None,
                 eval_group_column: Optional[str] = None,
                 eval_sample: Optional[int] = None) -> None:
        if eval_sample is not None and (eval_sample < 1 or eval_group_column is not None):
            raise ValueError("eval_sample must be >= 1 and applies to a summed evaluation set "
                             f"(no eval_group_column); got {eval_sample}.")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        if steps not in ("capture", "all"):
            raise ValueError(f"steps must be 'capture' or 'all', got {steps!r}.")
        config = engine_config or EngineConfig()
        if config.projection_dim is not None:
            raise ValueError("In-run capture projects inside the hooks: use factorised_dim, "
                             "not projection_dim.")
        self.task, self.every, self.steps, self.selection = task, every, steps, selection
        self.config = config
        if eval_group_column is not None and eval_group_column not in eval_dataset.column_names:
            raise MissingColumnError(eval_group_column, eval_dataset.column_names,
                                     role="evaluation group column")
        self.eval_group_column = eval_group_column
        self.eval_column = eval_group_column or _EVAL_GROUP
        self.eval_dataset = eval_dataset if eval_group_column else \
            eval_dataset.add_column(_EVAL_GROUP, [0] * len(eval_dataset))
        self.eval_ids: list[Any] = ["all"]
        self.eval_sample = eval_sample if eval_sample and eval_sample < len(eval_dataset) \
            else None
        self.group_ids, self.group_column = list(group_ids), group_column
        self.slot_of = {g: i for i, g in enumerate(self.group_ids)}
        self.engine: Optional[GradientEngine] = None
        self.collector: Optional[GradientCollector] = None
        self.history: list[CaptureRecord] = []
        self.total: Optional[torch.Tensor] = None
        self._u: Optional[torch.Tensor] = None
        self._u_step = -1
        self._part: Optional[torch.Tensor] = None  # (m, K) of the open capture
        self._step_buffer: Optional[torch.Tensor] = None  # (K, m) of the armed step
        self._step_rows = 0
        self._armed = False
        self._slots: Optional[torch.Tensor] = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pre_hooked: set[int] = set()

    # -- model hooks ---------------------------------------------------------------------------
    def attach_input_hook(self, model: torch.nn.Module) -> None:
        """Register (once per model) the pre-hook that removes :data:`SLOT_KEY` from the
        model's inputs and keeps it for the layer hooks; it stays for evaluation calls."""
        if id(model) in self._pre_hooked:
            return
        self._pre_hooked.add(id(model))

        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
                     ) -> tuple[tuple, dict[str, Any]]:
            if SLOT_KEY not in kwargs:
                self._slots = None
                return args, kwargs
            kwargs = dict(kwargs)
            self._slots = kwargs.pop(SLOT_KEY)
            if self._armed and torch.is_grad_enabled() and module.training:
                self._step_rows += int(self._slots.shape[0])
            return args, kwargs

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def start(self, model: torch.nn.Module) -> None:
        """Build the engine over ``model`` and hook its tracked layers.

        Raises:
            ValueError: Selected parameters outside Linear / Conv1D layers.
            NoParametersError: The selection matched nothing.
        """
        self.attach_input_hook(model)
        self.stop()
        self.engine = GradientEngine(model, self.task, self.selection, self.config)
        collector = self.engine.new_collector()
        if collector.fallback:
            raise ValueError(f"In-run capture splits gradients inside Linear / Conv1D layers; "
                             f"{len(collector.fallback)} selected parameters lie outside them "
                             f"({collector.fallback[:3]}...). Select layer weights only.")
        self.collector = collector
        self.history, self._u, self._u_step = [], None, -1  # a new run starts a new history
        self.total, self._part = None, None
        for index, layer in enumerate(collector.tracked):
            self._handles.append(layer.module.register_forward_hook(self._layer_hook(index)))

    def stop(self) -> None:
        """Remove the layer hooks (the input pre-hook stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._armed = False

    def _layer_hook(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (self._armed and output.requires_grad and torch.is_grad_enabled()):
                return
            slots = self._slots
            if slots is None:
                raise RuntimeError("A training batch reached the model without group slots: "
                                   "pass data_collator=callback.data_collator(collator), set "
                                   "remove_unused_columns=False and keep the group column.")
            a = inputs[0].detach()
            assert self.collector is not None
            if a.shape[0] != slots.shape[0]:
                raise RuntimeError(f"Layer {self.collector.tracked[index].name!r} got inputs "
                                   f"of leading size {a.shape[0]} for a batch of "
                                   f"{slots.shape[0]} rows; in-run capture needs row-major "
                                   "layer inputs.")
            output.register_hook(lambda grad: self._add_rows(index, a, grad, slots))
        return hook

    def _add_rows(self, index: int, a: torch.Tensor, grad: torch.Tensor,
                  slots: torch.Tensor) -> None:
        """Add uᵀ g_row of layer ``index`` for every row into the step buffer (no return value:
        the gradient flowing on is untouched)."""
        assert self._u is not None and self._step_buffer is not None
        assert self.collector is not None
        with torch.no_grad():
            view: TrackedLayer = self.collector.views[index]
            dtype = self._u.dtype
            a, go = self.collector.project_pair(index, a.to(dtype), grad.to(dtype))
            bsz = a.shape[0]
            a = a.reshape(bsz, -1, a.shape[-1])
            go = go.reshape(bsz, -1, go.shape[-1])
            u, m = self._u, self._u.shape[0]
            rows = torch.zeros(bsz, m, dtype=dtype, device=a.device)
            if view.weight is not None:
                d_in, d_out = a.shape[-1], go.shape[-1]
                u_w = u[:, view.weight[0]:view.weight[1]]
                # (d_in, m·d_out): every u's weight block as a map of the layer input
                if view.transposed:  # Conv1D: W is (in, out), y = a W
                    u_in = u_w.reshape(m, d_in, d_out).permute(1, 0, 2).reshape(d_in, m * d_out)
                else:  # y = a Wᵀ, W is (out, in)
                    u_in = u_w.reshape(m * d_out, d_in).T
                mapped = (a @ u_in).view(bsz, a.shape[1], m, d_out)
                rows += (mapped * go[:, :, None, :]).sum((1, 3))
            if view.bias is not None:
                rows += go.sum(1) @ u[:, view.bias[0]:view.bias[1]].T
            self._step_buffer.index_add_(0, slots.to(rows.device), rows)

    # -- the schedule --------------------------------------------------------------------------
    def is_capture(self, weights_step: int, max_steps: int) -> bool:
        """Whether u is (re)taken at the weights of ``weights_step``."""
        return weights_step % self.every == 0 or weights_step == max_steps - 1

    def step_begin(self, model: torch.nn.Module, weights_step: int, max_steps: int) -> None:
        """Before optimizer step ``weights_step + 1``: take u when due and arm the hooks."""
        if self.engine is None:
            self.start(model)
        if self.is_capture(weights_step, max_steps):
            self._close_record()
            self._u = self._eval_gradient(model)
            self._u_step = weights_step
            self._part = torch.zeros(self._u.shape[0], len(self.group_ids),
                                     dtype=self._u.dtype, device=self._u.device)
            if self.total is None:
                self.total = torch.zeros_like(self._part)
            self.history.append(CaptureRecord(weights_step, [], [], 0, []))
        self._armed = self._u is not None and (self.steps == "all" or
                                               self._u_step == weights_step)
        if self._armed:
            assert self._u is not None
            self._step_buffer = torch.zeros(len(self.group_ids), self._u.shape[0],
                                            dtype=self._u.dtype, device=self._u.device)
            self._step_rows = 0

    def step_end(self, step: int, learning_rate: float) -> None:
        """After optimizer step ``step`` (learning rate ``learning_rate``): bank its scores."""
        if not self._armed:
            return
        assert self._step_buffer is not None and self._part is not None and self.history
        record = self.history[-1]
        record.steps.append(step)
        record.learning_rates.append(learning_rate)
        record.rows += self._step_rows
        self._part += learning_rate * self._step_buffer.T
        self._armed, self._step_buffer = False, None

    def _close_record(self) -> None:
        """Sum the last capture over processes (÷ world: the update averages their
        gradients) and add it to the total."""
        if not self.history or self.total is None or self._part is None:
            return
        record = self.history[-1]
        _, world = rank_and_world()
        rows = torch.tensor([float(record.rows)], dtype=self.total.dtype,
                            device=self.total.device)
        part, rows = all_reduce_sum(self._part) / world, all_reduce_sum(rows)
        record.scores, record.rows = part.sum(0).tolist(), int(rows.item())
        if self.eval_group_column is not None:
            record.query_scores = part.tolist()
        self.total += part
        self._part = None

    def _eval_gradient(self, model: torch.nn.Module) -> torch.Tensor:
        """u: (m, p) gradients of the evaluation measurement summed over each evaluation
        group (m = 1 without groups) at the current weights."""
        assert self.engine is not None
        was_training = model.training
        model.eval()
        rows, scale = self.eval_dataset, 1.0
        if self.eval_sample is not None:  # the rotating window of this capture, scaled n / s
            n, size = len(self.eval_dataset), self.eval_sample
            start = len(self.history) * size
            rows = self.eval_dataset.select([(start + k) % n for k in range(size)])
            scale = n / size
        try:
            grads = self.engine.group_gradients(rows, self.eval_column, fn="measurement")
        finally:
            model.train(was_training)
        if self.eval_group_column is not None:
            self.eval_ids = list(grads.group_ids)
        u = grads.gradients.detach().clone()
        return u * scale if scale != 1.0 else u

    # -- results -------------------------------------------------------------------------------
    def finish(self) -> GroupScores:
        """Close the last capture, remove the hooks and return the scores (query mode
        ``"sum"`` for one summed evaluation set, ``"groups"`` per evaluation group).

        Raises:
            RuntimeError: Training never started.
        """
        if self.total is None or self.engine is None:
            raise RuntimeError("In-run capture never started (no training step ran).")
        self._close_record()
        self.history = [r for r in self.history if r.steps or r.rows]
        self.stop()
        scored = [s for r in self.history for s in r.steps]
        config: dict[str, Any] = {
            "attributor_type": "tracin_in_run", "every": self.every, "steps": self.steps,
            "factorised_dim": self.config.factorised_dim, "eval_sample": self.eval_sample,
            "selection": self.engine.selection.how,
            "captures": [r.weights_step for r in self.history], "scored_steps": scored,
            "gradient": "raw (unclipped) gradient of the Trainer's loss",
            "learning_rates": [lr for r in self.history for lr in r.learning_rates]}
        seen = int(sum(r.rows for r in self.history))
        logger.info("In-run TracIn: %d captures, %d scored steps, %d rows, %d groups.",
                    len(self.history), len(scored), seen, len(self.group_ids))
        grouped = self.eval_group_column is not None
        return GroupScores(self.total.detach().cpu().clone(), self.group_ids, self.eval_ids,
                           config=config, query_mode="groups" if grouped else "sum",
                           group_column=self.group_column,
                           query_group_column=self.eval_group_column,
                           fingerprints={"eval_dataset": self.eval_dataset._fingerprint})

    def history_matrix(self) -> torch.Tensor:
        """(captures, K) per-capture contributions (rows sum to the scores)."""
        return torch.tensor([r.scores for r in self.history], dtype=torch.float64)


def build_capture(task: Optional[AttributionTask], train: Optional[Dataset],
                  eval_dataset: Optional[Dataset], group_column: str, every: int,
                  steps: str, selection: SelectionSpec, config: Optional[EngineConfig],
                  eval_group_column: Optional[str],
                  eval_sample: Optional[int] = None) -> InRunCapture:
    """The capture state of ``GGDACallback(in_run=True)``: groups from ``train``'s
    ``group_column`` (sorted), else point mode over its :data:`ROW_COLUMN`.

    Raises:
        ValueError: ``task``, ``train`` or ``eval_dataset`` missing (or as
            :class:`InRunCapture`).
        MissingColumnError: ``train`` has neither column.
    """
    if task is None or train is None or eval_dataset is None:
        raise ValueError("in_run=True needs task=, train_dataset= (the Trainer's rows with "
                         "the group column) and eval_dataset= (raw evaluation rows).")
    if group_column in train.column_names:
        ids = sorted(set(train[group_column]))
    elif ROW_COLUMN in train.column_names:
        group_column, ids = ROW_COLUMN, sorted(train[ROW_COLUMN])
    else:
        raise MissingColumnError(group_column, train.column_names, role=(
            "group column for in-run capture (or add row positions with "
            "hf_ggda.integrations.in_run.with_row_index for point mode)"))
    return InRunCapture(task, eval_dataset, ids, group_column, every, steps, selection, config,
                        eval_group_column, eval_sample)


def history_curves(history: Sequence[CaptureRecord], group_ids: Sequence[Any],
                   k: int = 2) -> dict[str, Curve]:
    """Cumulative in-run score over the training steps of the ``k`` most helpful and the
    ``k`` most harmful groups, as curves for :func:`~hf_ggda.integrations.cards.
    write_attribution_card` (``curves=``): which groups helped or hurt when.

    Args:
        history: ``callback.history``.
        group_ids: The score columns (``callback.in_run_scores.group_ids``).
        k: Groups per side.

    Returns:
        {title: Curve} with x = the last step each capture scored, y = the running total.

    Raises:
        ValueError: An empty history, or records that do not have one score per group.
    """
    kept = [r for r in history if r.steps]
    if not kept or any(len(r.scores) != len(group_ids) for r in kept):
        raise ValueError("history_curves needs captures with one score per group.")
    running = torch.tensor([r.scores for r in kept], dtype=torch.float64).cumsum(0)
    order = torch.argsort(running[-1], descending=True, stable=True).tolist()
    picked = order[:k] + [i for i in order[::-1][:k] if i not in order[:k]]
    steps = [float(r.steps[-1]) for r in kept]
    return {f"in-run score of group {group_ids[i]} over training": Curve(
        steps, running[:, i].tolist(), xlabel="optimizer step",
        ylabel="cumulative in-run TracIn score") for i in picked}
