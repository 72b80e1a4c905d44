"""Grouping: partition training rows into K groups, written as a ``group_id`` column.

Every grouper runs as ``Dataset.map`` (features and the group column), with fingerprints that
cover the model weights, so repeated runs are datasets cache hits::

    from hf_ggda.grouping import get_grouper

    grouper = get_grouper("grad-kmeans", num_groups=64, per_class=True)
    grouped = grouper.assign(train, model=model, task=task)
    print(grouper.describe(engine))  # sizes and within-group gradient coherence
"""

from __future__ import annotations

from .base import (
    Assignment,
    Grouper,
    GrouperConfig,
    GroupingReport,
    model_weights_hash,
    write_group_column,
)
from .clustering import ClusterResult, canonical_labels, capped_assign, fit_kmeans
from .coherence import (
    CoherenceResult,
    coherence_from_gradients,
    compare_groupings,
    group_coherence,
    sample_rows,
)
from .features import FEATURE_COLUMN, OutputGradientProjector
from .kmeans import (
    GradKMeansConfig,
    GradKMeansGrouper,
    KMeansConfig,
    KMeansInputConfig,
    KMeansInputGrouper,
    KMeansReprGrouper,
    ModelKMeansConfig,
)
from .partition import allocate_groups, check_num_groups, factorize
from .registry import GROUPERS, get_grouper, register_grouper
from .simple import (
    ColumnConfig,
    ColumnGrouper,
    RandomConfig,
    RandomGrouper,
    StratifiedConfig,
    StratifiedGrouper,
)

__all__ = [
    "FEATURE_COLUMN",
    "GROUPERS",
    "Assignment",
    "ClusterResult",
    "CoherenceResult",
    "ColumnConfig",
    "ColumnGrouper",
    "GradKMeansConfig",
    "GradKMeansGrouper",
    "Grouper",
    "GrouperConfig",
    "GroupingReport",
    "KMeansConfig",
    "KMeansInputConfig",
    "KMeansInputGrouper",
    "KMeansReprGrouper",
    "ModelKMeansConfig",
    "OutputGradientProjector",
    "RandomConfig",
    "RandomGrouper",
    "StratifiedConfig",
    "StratifiedGrouper",
    "allocate_groups",
    "canonical_labels",
    "capped_assign",
    "check_num_groups",
    "coherence_from_gradients",
    "compare_groupings",
    "factorize",
    "fit_kmeans",
    "get_grouper",
    "group_coherence",
    "model_weights_hash",
    "register_grouper",
    "sample_rows",
    "write_group_column",
]
