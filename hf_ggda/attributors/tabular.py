"""``TensorTask``: rows of numeric feature vectors for plain torch models (tests, tabular data).

The model is any module mapping a (B, d) float tensor to (B, out) outputs, e.g. an
``nn.Linear`` for ridge or logistic regression, where leave-group-out refits are exact and
attribution methods can be checked against the real effect of removing a group.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from datasets import Dataset

from ..fingerprint import hash_json
from ..tasks import PASSTHROUGH, AttributionTask, Batch, check_columns

LOSSES = ("mse", "logistic", "cross_entropy")


class TensorTask(AttributionTask):
    """Regression or classification on a column of float vectors.

    Args:
        feature_column: Column of equal-length float lists.
        label_column: Column of targets (floats for ``mse``, 0/1 for ``logistic``, class ids
            for ``cross_entropy``).
        loss: ``"mse"`` (squared error summed over outputs), ``"logistic"`` (binary
            cross-entropy on one logit) or ``"cross_entropy"``.

    Raises:
        ValueError: Unknown loss.
    """

    feature_columns = ("inputs", "labels")

    def __init__(self, feature_column: str = "x", label_column: str = "y",
                 loss: str = "mse") -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        self.feature_column = feature_column
        self.label_column = label_column
        self.loss = loss

    def config_dict(self) -> dict[str, Any]:
        """Settings that change the numbers."""
        return {"task": type(self).__name__, "feature_column": self.feature_column,
                "label_column": self.label_column, "loss": self.loss}

    def prepare(self, dataset: Dataset) -> Dataset:
        """Rename the feature / label columns to ``inputs`` / ``labels``.

        Raises:
            EmptyDatasetError: No rows.
            MissingColumnError: A column is absent.
        """
        check_columns(dataset, [self.feature_column, self.label_column])
        x, y = self.feature_column, self.label_column
        remove = [c for c in dataset.column_names if c not in PASSTHROUGH]
        return dataset.map(
            lambda rows: {"inputs": rows[x], "labels": rows[y]}, batched=True,
            remove_columns=remove, desc="Preparing tensors",
            new_fingerprint=hash_json([dataset._fingerprint, self.config_dict(), "prepare-v1"]))

    def collate(self, columns: Mapping[str, list[Any]]) -> Batch:
        """Stack rows into ``inputs`` (B, d) and ``labels`` (B,) tensors."""
        labels = torch.tensor(list(columns["labels"]))
        if self.loss == "cross_entropy":
            labels = labels.long()
        return {"inputs": torch.tensor([list(r) for r in columns["inputs"]]), "labels": labels}

    def model_inputs(self, batch: Batch) -> Batch:
        """The model's only input."""
        return {"inputs": batch["inputs"]}

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return the (B, out) outputs (inputs cast to the model's dtype)."""
        dtype = next(model.parameters()).dtype
        return model(batch["inputs"].to(dtype))

    def per_row_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Per-row squared error / binary cross-entropy / cross-entropy (B,)."""
        return self._loss_of(self.forward(model, batch), batch["labels"])

    def margin(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Log-odds of the correct outcome (B,) (classification losses only).

        Raises:
            TypeError: The loss is ``mse``.
        """
        out = self.forward(model, batch)
        labels = batch["labels"]
        if self.loss == "logistic":
            return (2 * labels.to(out.dtype) - 1) * out.squeeze(-1)
        if self.loss == "cross_entropy":
            correct = out.gather(1, labels[:, None]).squeeze(1)
            others = out.scatter(1, labels[:, None], float("-inf"))
            return correct - torch.logsumexp(others, dim=1)
        raise TypeError("A margin needs a classification loss ('logistic' or 'cross_entropy').")

    def embed(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The raw feature vectors."""
        return batch["inputs"].float()

    def output_gradient(self, model: torch.nn.Module,
                        batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / d outputs, input of the last linear layer) per row."""
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("output_gradient needs a model with an nn.Linear output layer.")
        captured: list[torch.Tensor] = []
        handle = linears[-1].register_forward_hook(lambda m, i, o: captured.append(i[0]))
        try:
            with torch.enable_grad():
                out = self.forward(model, batch).detach().requires_grad_(True)
                err, = torch.autograd.grad(self._loss_of(out, batch["labels"]).sum(), out)
        finally:
            handle.remove()
        return err.float(), captured[-1].detach().float()

    def _loss_of(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, labels, reduction="none")
        target = labels.to(out.dtype)
        if self.loss == "logistic":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), target, reduction="none")
        return ((out - target.reshape(len(target), -1)) ** 2).sum(-1)
