"""Group gradients, per-example gradients and projections."""

from .engine import EngineConfig, GradientEngine, GroupGradients, plan_groups
from .hooks import GradientCollector
from .projection import RandomProjector

__all__ = [
    "EngineConfig",
    "GradientCollector",
    "GradientEngine",
    "GroupGradients",
    "RandomProjector",
    "plan_groups",
]

from .streaming import random_stream_groups, stream_group_gradients

__all__ += ["random_stream_groups", "stream_group_gradients"]
