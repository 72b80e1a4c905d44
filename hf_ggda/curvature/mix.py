"""Curvature from another dataset (or a weighted mix of datasets) than the one attributed to.

LLM users fit the Hessian approximation on data that represents the model's training
distribution (a pre-training sample, a mix of fine-tuning sets) while attributing to one
fine-tuning set. ``Attributor.fit(..., curvature_dataset=...)`` takes:

* a ``datasets.Dataset``: H is the Hessian (approximation) of the summed loss over its rows;
* a list of ``(Dataset, weight)`` pairs: a seeded, weighted sample of their rows made by
  :func:`datasets.interleave_datasets` (``probabilities`` = normalised weights, stopping when
  the first dataset is exhausted), then as above.

The curvature cache's fingerprint includes the curvature rows' fingerprint, so a cached
curvature is never reused for other curvature data.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

from datasets import Dataset, interleave_datasets

from ..tasks import check_columns

CurvatureData = Union[Dataset, Sequence[tuple[Dataset, float]]]


def resolve_curvature_dataset(data: CurvatureData, seed: int) -> Dataset:
    """Return the rows curvature is fitted on.

    Args:
        data: A dataset, or (dataset, weight) pairs to mix.
        seed: Seed of the weighted mix.

    Returns:
        One ``Dataset``.

    Raises:
        DatasetTypeError: A ``DatasetDict`` / ``IterableDataset`` where one split is needed.
        EmptyDatasetError: A dataset has no rows.
        ValueError: The mix is empty, or a weight is not a finite positive number.
        TypeError: ``data`` is neither a dataset nor (dataset, weight) pairs.
    """
    if not isinstance(data, (list, tuple)):
        check_columns(data, [], what="curvature_dataset")  # one split with rows
        return data
    if not data:
        raise ValueError("curvature_dataset must be a Dataset or a non-empty list of "
                         "(Dataset, weight) pairs.")
    parts, weights = [], []
    for item in data:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and isinstance(item[0], Dataset)):
            raise TypeError(f"curvature_dataset entries must be (Dataset, weight) pairs, got "
                            f"{type(item).__name__}.")
        ds, weight = item
        check_columns(ds, [], what="curvature_dataset")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"curvature_dataset weights must be finite and > 0, got "
                             f"{weight!r}.")
        parts.append(ds)
        weights.append(float(weight))
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="first_exhausted")
