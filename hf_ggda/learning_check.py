"""Has the attributed model learned anything? A cheap check before attribution.

A classifier that predicts one class for every row (accuracy at the majority rate), or whose
training loss is not below the entropy of the labels, has learned nothing but the label
frequencies; its group scores then rank chance-level signals. :func:`check_model_learned`
runs the model (eval mode, no gradients) on a seeded sample of at most 256 training rows and
says so: a :class:`~hf_ggda.errors.ModelNotLearnedWarning`, or in strict mode a
:class:`~hf_ggda.errors.ModelNotLearnedError`. The result is kept in the scores' config
(``model_check``) and the attribution card repeats the warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from .errors import ModelNotLearnedError, ModelNotLearnedWarning
from .tasks import AttributionTask, SequenceClassificationTask

__all__ = ["LearningCheck", "check_model_learned"]

#: Rows the check runs the model on (a seeded sample of the training rows).
SAMPLE_ROWS = 256


@dataclass
class LearningCheck:
    """What :func:`check_model_learned` measured on the sampled training rows.

    Attributes:
        rows: Rows checked.
        accuracy: Share of rows whose argmax prediction is the label.
        majority_rate: Share of the most frequent label.
        predicted_classes: Distinct predicted classes.
        mean_loss: Mean cross-entropy.
        label_entropy: Entropy of the label frequencies (the loss of predicting them).
        learned: False when the model predicts one class, is no better than the majority
            rate, or has a loss not below the label entropy.
    """

    rows: int
    accuracy: float
    majority_rate: float
    predicted_classes: int
    mean_loss: float
    label_entropy: float
    learned: bool

    def message(self) -> str:
        """The warning text, with the figures and the fix."""
        return (f"The model has not learned this task: on {self.rows} training rows it "
                f"predicts {self.predicted_classes} class(es), accuracy {self.accuracy:.3f} vs "
                f"the majority-class rate {self.majority_rate:.3f}, loss {self.mean_loss:.3f} "
                f"vs the label entropy {self.label_entropy:.3f}. Attributions of such a model "
                "rank nothing better than chance-level signals. Train it further (more steps, "
                "a higher learning rate, class-balanced batches) and check its accuracy "
                "before attributing.")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the scores' config and the card)."""
        return asdict(self)


def check_model_learned(model: torch.nn.Module, task: AttributionTask, dataset: Dataset,
                        strict: bool = False, seed: int = 0,
                        batch_size: int = 32) -> LearningCheck | None:
    """Check that a classifier predicts better than its label frequencies.

    Args:
        model: The model to be attributed.
        task: Its task; only a :class:`~hf_ggda.tasks.SequenceClassificationTask` with at
            least two classes (and two distinct labels in the rows) is checked.
        dataset: Training rows with the task's columns.
        strict: Raise instead of warning.
        seed: Seed of the row sample.
        batch_size: Rows per forward pass.

    Returns:
        The :class:`LearningCheck`, or None when the check does not apply.

    Raises:
        ModelNotLearnedError: ``strict`` and the model has not learned.
    """
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(task, SequenceClassificationTask) or not isinstance(num_labels, int) \
            or num_labels < 2 or len(dataset) == 0:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(dataset))[:SAMPLE_ROWS]).tolist()
    # in memory: the check writes no cache file beside a dataset loaded from disk
    prepared = task.prepare(dataset.select(rows).flatten_indices(keep_in_memory=True))
    features = prepared.select_columns([c for c in task.feature_columns
                                        if c in prepared.column_names])
    labels = np.asarray(prepared["labels"])
    if labels.dtype.kind == "f" or len(np.unique(labels)) < 2:
        return None
    if labels.min() < 0 or labels.max() >= num_labels:
        return None  # labels the head cannot take: the engine's validation names the rows
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, losses = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = task.collate(features[start:start + batch_size])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logits = model(**task.model_inputs(batch)).logits.float()
                preds.append(logits.argmax(-1).cpu())
                losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").cpu())
    finally:
        model.train(was_training)
    pred = torch.cat(preds).numpy()
    loss = float(torch.cat(losses).mean())
    if not math.isfinite(loss):  # a NaN model: the attribution pass names the rows
        return None
    freq = np.bincount(labels, minlength=num_labels) / len(labels)
    entropy = float(-sum(p * math.log(p) for p in freq if p > 0))
    accuracy = float((pred == labels).mean())
    check = LearningCheck(rows=len(labels), accuracy=accuracy, majority_rate=float(freq.max()),
                          predicted_classes=len(np.unique(pred)), mean_loss=loss,
                          label_entropy=entropy, learned=True)
    check.learned = not (check.predicted_classes == 1 or accuracy <= check.majority_rate
                         or loss >= entropy)
    if not check.learned:
        if strict:
            raise ModelNotLearnedError(check.message() + " (strict mode; pass strict=False "
                                       "to attribute it anyway)")
        warnings.warn(check.message(), ModelNotLearnedWarning, stacklevel=3)
    return check
