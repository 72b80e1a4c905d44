"""Group gradients, per-example gradients and projections."""

from .engine import EngineConfig, GradientEngine, GroupGradients, plan_groups
from .hooks import GradientCollector
from .projection import RandomProjector

__all__ = ["EngineConfig", "GradientEngine", "GroupGradients", "GradientCollector",
           "RandomProjector", "plan_groups"]

from .streaming import random_stream_groups, stream_group_gradients  # noqa: E402

__all__ += ["random_stream_groups", "stream_group_gradients"]
