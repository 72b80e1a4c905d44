"""Grouping: partition training rows into K groups, written as a ``group_id`` column.

Every grouper runs as ``Dataset.map`` (features and the group column), with fingerprints that
cover the model weights, so repeated runs are datasets cache hits::

    from hf_ggda.grouping import get_grouper

    grouper = get_grouper("grad-kmeans", num_groups=64, per_class=True)
    grouped = grouper.assign(train, model=model, task=task)
    print(grouper.describe(engine))  # sizes and within-group gradient coherence
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

from ..errors import ConfigError
from .base import (Assignment, Grouper, GrouperConfig, GroupingReport, model_weights_hash,
                   write_group_column)
from .clustering import ClusterResult, capped_assign, canonical_labels, fit_kmeans
from .coherence import (CoherenceResult, coherence_from_gradients, compare_groupings,
                        group_coherence, sample_rows)
from .features import FEATURE_COLUMN, OutputGradientProjector
from .kmeans import (GradKMeansConfig, GradKMeansGrouper, KMeansConfig, KMeansInputConfig,
                     KMeansInputGrouper, KMeansReprGrouper, ModelKMeansConfig)
from .partition import allocate_groups, check_num_groups, factorize
from .simple import (ColumnConfig, ColumnGrouper, RandomConfig, RandomGrouper,
                     StratifiedConfig, StratifiedGrouper)

#: Registry: name -> grouper class.
GROUPERS: dict[str, type[Grouper]] = {
    cls.name: cls for cls in (RandomGrouper, StratifiedGrouper, ColumnGrouper,
                              KMeansInputGrouper, KMeansReprGrouper, GradKMeansGrouper)
}


def get_grouper(name: str, config: Optional[GrouperConfig] = None, **kwargs: Any) -> Grouper:
    """Build a registered grouper from its name and settings.

    Args:
        name: One of :data:`GROUPERS` (``"random"``, ``"stratified"``, ``"column"``,
            ``"kmeans-input"``, ``"kmeans-repr"``, ``"grad-kmeans"``; ``_`` works for ``-``).
        config: A ready config (instead of keyword settings).
        **kwargs: Fields of the grouper's config class.

    Returns:
        The grouper.

    Raises:
        ConfigError: (a ``ValueError``) Unknown name or unknown setting (the message lists
            the valid ones).
        GroupingError: An invalid K.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in GROUPERS:
        raise ConfigError(f"Unknown grouper {name!r}; choose one of {sorted(GROUPERS)}.")
    cls = GROUPERS[key]
    valid = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(f"Unknown settings {unknown} for grouper {key!r}; valid settings: "
                          f"{sorted(valid)}. Fix the spelling or remove the setting.")
    return cls(config, **kwargs)


__all__ = [
    "Assignment", "ClusterResult", "CoherenceResult", "ColumnConfig", "ColumnGrouper",
    "FEATURE_COLUMN", "GROUPERS", "GradKMeansConfig", "GradKMeansGrouper", "Grouper",
    "GrouperConfig", "GroupingReport", "KMeansConfig", "KMeansInputConfig",
    "KMeansInputGrouper", "KMeansReprGrouper", "ModelKMeansConfig", "OutputGradientProjector",
    "RandomConfig", "RandomGrouper", "StratifiedConfig", "StratifiedGrouper",
    "allocate_groups", "canonical_labels", "capped_assign", "check_num_groups",
    "coherence_from_gradients", "compare_groupings", "factorize", "fit_kmeans", "get_grouper",
    "group_coherence", "model_weights_hash", "sample_rows", "write_group_column",
]
