"""A small, seeded fine-tuning loop (for recipes, benchmarks and the demo).

Users train with ``transformers.Trainer`` (see :mod:`hf_ggda.integrations.trainer`); this loop
exists so that recipes can retrain many times quickly and reproducibly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from datasets import Dataset

from .logging import progress
from .tasks import AttributionTask


def default_steps(num_rows: int, batch_size: int, epochs: float = 3.0, minimum: int = 100,
                  maximum: int = 2000) -> int:
    """The step count :func:`finetune` uses when given none: ``epochs`` passes over the rows,
    at least ``minimum`` steps (small datasets need several epochs before a LoRA classifier
    stops predicting the majority class) and at most ``maximum``.

    Raises:
        ValueError: ``num_rows`` or ``batch_size`` < 1.
    """
    if num_rows < 1 or batch_size < 1:
        raise ValueError(f"num_rows and batch_size must be >= 1, got {num_rows}, {batch_size}.")
    return int(min(max(math.ceil(epochs * num_rows / batch_size), minimum), maximum))


def finetune(model: torch.nn.Module, task: AttributionTask, dataset: Dataset,
             steps: Optional[int] = None,
             batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
             weight_decay: float = 0.0, desc: Optional[str] = "Fine-tuning",
             on_step: Optional[Callable[[int], None]] = None) -> list[float]:
    """Train the trainable parameters (e.g. LoRA + head) with AdamW on seeded mini-batches.

    Args:
        model: The model; parameters with ``requires_grad`` are trained.
        task: Supplies batches and per-row losses (the batch loss is their mean).
        dataset: Raw training rows.
        steps: Optimiser steps (None: :func:`default_steps` of the rows and batch size).
        batch_size: Rows per step (epochs are reshuffled).
        lr: AdamW learning rate.
        seed: Seed of the row order (and of dropout).
        weight_decay: AdamW weight decay.
        desc: Progress bar label (None: no bar).
        on_step: Called with the step number (1-based) after every optimiser step.

    Returns:
        The loss of every step. The model is left in eval mode.

    Raises:
        ValueError: No trainable parameters, or ``steps`` < 1.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters to fine-tune.")
    if steps is None:
        steps = default_steps(len(dataset), batch_size)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    prepared = task.prepare(dataset)
    prepared = prepared.select_columns(
        [c for c in task.feature_columns if c in prepared.column_names])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in progress(range(1, steps + 1), desc=desc, disable=desc is None):
        if len(order) < batch_size:
            order += gen.permutation(len(prepared)).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        batch = task.collate(prepared[rows])
        loss = task.per_row_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


def finetune_with_snapshots(model: torch.nn.Module, task: AttributionTask, dataset: Dataset,
                            steps: int, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                            snapshots: int = 1, desc: Optional[str] = None
                            ) -> tuple[list[float], list[dict[str, Any]]]:
    """:func:`finetune` (same batches and updates) that also keeps copies of the trained
    parameters at ``snapshots`` evenly spaced steps, the last after the final step: the
    checkpoints of GGDA-TracIn.

    Args:
        model: The model; parameters with ``requires_grad`` are trained.
        task: Supplies batches and per-row losses.
        dataset: Raw training rows.
        steps: Optimiser steps.
        batch_size: Rows per step.
        lr: AdamW learning rate.
        seed: Seed of the row order and of dropout.
        snapshots: Number of snapshots.
        desc: Progress bar label (None: no bar).

    Returns:
        (loss of every step, snapshots as {parameter name: tensor} in training order).

    Raises:
        ValueError: No trainable parameters, ``steps`` < 1 or ``snapshots`` not in 1..steps.
    """
    if not 1 <= snapshots <= max(steps, 1):
        raise ValueError(f"snapshots must be in 1..steps ({steps}), got {snapshots}.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    at = {round(steps * (k + 1) / snapshots) for k in range(snapshots)}
    kept: list[dict[str, Any]] = []

    def keep(step: int) -> None:
        if step in at:
            kept.append({n: p.detach().clone() for n, p in named})

    losses = finetune(model, task, dataset, steps, batch_size, lr, seed, desc=desc,
                      on_step=keep)
    return losses, kept
