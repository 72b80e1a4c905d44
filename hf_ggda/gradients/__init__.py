"""Group gradients, per-example gradients and projections."""

from .engine import EngineConfig, GradientEngine, GroupGradients, plan_groups
from .hooks import GradientCollector
from .projection import RandomProjector

__all__ = ["EngineConfig", "GradientEngine", "GroupGradients", "GradientCollector",
           "RandomProjector", "plan_groups"]
