"""Baselines a user reaches for first, measured on the recipes' own data and model.

* cleanlab's ``find_label_issues`` / label-quality scores on out-of-fold predicted
  probabilities: K fresh fine-tunes (one per fold, the same settings as the recipe's own
  model), each predicting its held-out fold; the fine-tunes are counted in its cost.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from datasets import Dataset


def predict_probs(model: torch.nn.Module, task: Any, dataset: Dataset,
                  batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities (n, C) of a sequence classifier (eval mode)."""
    model.eval()
    prepared = task.prepare(dataset)
    prepared = prepared.select_columns([c for c in task.feature_columns
                                        if c in prepared.column_names])
    out = []
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            batch = task.collate(prepared[start:start + batch_size])
            out.append(torch.softmax(model(**task.model_inputs(batch)).logits.double(), -1))
    return torch.cat(out).numpy()


def out_of_fold_probs(train: Dataset, folds: int, seed: int,
                      fit: Callable[[Dataset, int], tuple[torch.nn.Module, Any]]
                      ) -> np.ndarray:
    """Out-of-fold predicted probabilities: fold f's rows are predicted by a model trained on
    the other folds.

    Args:
        train: Rows with (possibly noisy) labels.
        folds: K (>= 2).
        seed: Seed of the fold split (and, + fold, of each fine-tune).
        fit: (training rows, seed) -> (trained model, task).

    Returns:
        (n, C) probabilities.

    Raises:
        ValueError: ``folds`` < 2 or more folds than rows.
    """
    if not 2 <= folds <= len(train):
        raise ValueError(f"folds must be in 2..{len(train)}, got {folds}.")
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(np.arange(len(train)) % folds)
    probs = None
    for f in range(folds):
        held = np.flatnonzero(fold_of == f)
        model, task = fit(train.select(np.flatnonzero(fold_of != f)), seed + 1 + f)
        p = predict_probs(model, task, train.select(held))
        if probs is None:
            probs = np.zeros((len(train), p.shape[1]))
        probs[held] = p
    assert probs is not None
    return probs


def cleanlab_scores(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ranking and its flagged set.

    Args:
        labels: (n,) given labels.
        probs: (n, C) out-of-fold probabilities.

    Returns:
        (suspicion (n,): 1 − label quality, higher = inspect earlier; flagged (n,) bool from
        ``find_label_issues``).

    Raises:
        ImportError: cleanlab is not installed (``pip install -e ".[recipes]"``).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probs = probs / probs.sum(1, keepdims=True)
    quality = get_label_quality_scores(labels, probs)
    flagged = find_label_issues(labels, probs)
    return 1.0 - quality, np.asarray(flagged, dtype=bool)
