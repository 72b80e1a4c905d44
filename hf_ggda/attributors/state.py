"""What an attributor fits and keeps: components (model states) and the fitted parts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np
import torch
from datasets import Dataset

from ..curvature import Preconditioner
from ..errors import TokenizationMismatchError
from .checkpoints import Checkpoint


@dataclass
class Component:
    """One model state that scores are taken at, with its weight in the sum.

    Attributes:
        weight: w_c (a learning rate for TracIn, 1/C for an ensemble).
        checkpoint: Weights loaded for this component (None: the model as it is).
        seed: Projection seed of this component.
    """

    weight: float
    checkpoint: Optional[Checkpoint] = None
    seed: int = 0

    def activate(self, model: torch.nn.Module) -> ContextManager[None]:
        """Context in which the model holds this component's weights."""
        return self.checkpoint.activate(model) if self.checkpoint else contextlib.nullcontext()


@dataclass
class _Part:
    """What :meth:`Attributor.fit` keeps for one component."""

    raw: torch.Tensor  # (K, p) group vectors of the training function
    train: torch.Tensor  # (K, p) after the training-side transform
    preconditioner: Optional[Preconditioner]
    fingerprint: dict[str, Any]
    group_ids: list[Any] = field(default_factory=list)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: The fit's per-example vectors when a store holds them (``GroupGradients.point_chunks``
    #: of the pass): the drill-down reads its rows from there instead of recomputing them.
    row_vectors: Optional[Callable[..., Iterator[tuple[list[int], torch.Tensor]]]] = None


@dataclass
class _Fit:
    dataset: Dataset
    group_column: str
    group_ids: list[Any]
    sizes: np.ndarray
    parts: list[_Part]
    self_scores: Optional[torch.Tensor] = None
    task_config: dict[str, Any] = field(default_factory=dict)
    #: Which rows each group held (:func:`hf_ggda.alignment.group_signature`).
    group_signature: dict[str, Any] = field(default_factory=dict)
    #: :func:`hf_ggda.learning_check.check_model_learned` of the fitted model (None: n/a).
    model_check: Optional[dict[str, Any]] = None


def check_task_unchanged(now: dict[str, Any], at_fit: dict[str, Any]) -> None:
    """Queries must be prepared like the training rows (tokenizer, lengths, padding).

    Args:
        now: The task's :meth:`~hf_ggda.tasks.AttributionTask.config_dict` now.
        at_fit: The same at :meth:`~hf_ggda.attributors.Attributor.fit`.

    Raises:
        TokenizationMismatchError: The task's settings changed since ``fit``.
    """
    if now != at_fit:
        diff = {k: {"fit": at_fit.get(k), "now": now.get(k)}
                for k in sorted(set(now) | set(at_fit)) if now.get(k) != at_fit.get(k)}
        raise TokenizationMismatchError(
            f"Queries would be tokenised differently from the training rows: {diff}. "
            "Use the same task settings (tokenizer, max_length, padding side) for fit "
            "and score, or fit again.")
