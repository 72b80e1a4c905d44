"""GGDA-TracIn: τ(G, q) = Σ_c η_c ∇f(q; θ_c) · g_G(θ_c) over saved checkpoints.

A gradient step of size η_c on the summed loss of G changes the query loss by about
−η_c ∇ℓ(q)·g_G, so a positive τ means G's training steps lowered the query loss: G helps the
query, as :data:`hf_ggda.SIGN_CONVENTION` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..gradients.engine import EngineConfig
from ..logging import get_logger
from ..tasks import AttributionTask
from .base import Attributor, AttributorConfig, Component
from .checkpoints import (
    Checkpoint,
    CheckpointSource,
    learning_rate_of_checkpoint,
    trainer_checkpoints,
)
from .registry import register_attributor

logger = get_logger(__name__)


@dataclass
class TracInConfig(AttributorConfig):
    """Settings of GGDA-TracIn.

    Attributes:
        checkpoints: PEFT adapter folders / model folders / weight files, in training order.
            Empty: use ``trainer_output_dir``, or else the model's current weights.
        learning_rates: η_c per checkpoint. None: read them from the Trainer state.
        trainer_output_dir: A ``Trainer`` output folder whose ``checkpoint-N`` folders and
            logged learning rates are used.
        projection_dim: Project gradients to this many dimensions (None: exact dot products).
        projection_kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection seed.
    """

    attributor_type: str = field(default="tracin", metadata={"help": "Method name."})
    checkpoints: list[str] = field(
        default_factory=list, metadata={"help": "Checkpoint folders/files, in training order."})
    learning_rates: Optional[list[float]] = field(
        default=None, metadata={"help": "Learning rate at each checkpoint (None: from the "
                                        "Trainer state)."})
    trainer_output_dir: Optional[str] = field(
        default=None, metadata={"help": "Trainer output_dir with checkpoint-N folders."})
    projection_dim: Optional[int] = field(
        default=None, metadata={"help": "Random projection dimension (None: none)."})
    projection_kind: str = field(default="rademacher",
                                 metadata={"help": "'rademacher' or 'gaussian'."})
    seed: int = field(default=0, metadata={"help": "Projection seed."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoints and self.trainer_output_dir:
            raise ValueError("Pass either checkpoints or trainer_output_dir, not both.")
        if self.learning_rates is not None:
            bad = [r for r in self.learning_rates if not (math.isfinite(r) and r > 0)]
            if bad or not self.learning_rates:
                raise ValueError(f"learning_rates must be positive and finite, got "
                                 f"{self.learning_rates}.")
            if self.checkpoints and len(self.learning_rates) != len(self.checkpoints):
                raise ValueError(f"{len(self.learning_rates)} learning rates for "
                                 f"{len(self.checkpoints)} checkpoints.")
        EngineConfig(projection_dim=self.projection_dim, projection_kind=self.projection_kind,
                     factorised_dim=self.factorised_dim)


class TracIn(Attributor):
    """GGDA-TracIn over checkpoints (or the current weights).

    Args:
        model: The model (PEFT or plain); its weights are restored after every use.
        task: The attribution task.
        config: A :class:`TracInConfig`.
        checkpoints: In-memory state dicts (or paths) instead of ``config.checkpoints``; then
            ``config.learning_rates`` must be given.

    Raises:
        ValueError: Learning rates are missing or do not match the checkpoints.
        FileNotFoundError: ``trainer_output_dir`` has no checkpoints.
    """

    config_class = TracInConfig
    config: TracInConfig

    def __init__(self, model: torch.nn.Module, task: AttributionTask,
                 config: Optional[TracInConfig] = None,
                 checkpoints: Optional[Sequence[CheckpointSource]] = None) -> None:
        self._sources = list(checkpoints) if checkpoints is not None else None
        super().__init__(model, task, config)
        _ = self.components  # validate checkpoints and learning rates now

    def build_components(self) -> list[Component]:
        """One component per checkpoint, weighted by its learning rate.

        Raises:
            ValueError: Learning rates are missing or do not match the checkpoints.
            FileNotFoundError: ``trainer_output_dir`` has no checkpoints.
        """
        cfg = self.config
        rates: Optional[list[float]] = cfg.learning_rates
        if self._sources is not None:
            sources: list[CheckpointSource] = self._sources
            names = [s if isinstance(s, str) else f"state_dict_{i}"
                     for i, s in enumerate(sources)]
        elif cfg.trainer_output_dir:
            dirs, logged = trainer_checkpoints(cfg.trainer_output_dir)
            sources, names = [str(d) for d in dirs], [d.name for d in dirs]
            rates = rates or logged
        elif cfg.checkpoints:
            sources, names = list(cfg.checkpoints), list(cfg.checkpoints)
            if rates is None:
                found = [learning_rate_of_checkpoint(p) for p in cfg.checkpoints]
                if any(r is None for r in found):
                    raise ValueError("No learning rate for some checkpoints (no trainer_state.json"
                                     " in them); pass learning_rates.")
                rates = [float(r) for r in found]  # type: ignore[arg-type]
        else:
            logger.info("TracIn without checkpoints: using the current weights.")
            return [Component(float(rates[0]) if rates else 1.0, None, cfg.seed)]
        if rates is None or len(rates) != len(sources):
            raise ValueError(f"Need one learning rate per checkpoint: {len(sources)} "
                             f"checkpoints, learning_rates={rates}.")
        return [Component(float(r), Checkpoint(s if not isinstance(s, Path) else str(s), n),
                          cfg.seed) for s, n, r in zip(sources, names, rates)]

    def engine_config(self, component: Component) -> EngineConfig:
        """Engine settings (same projection at every checkpoint)."""
        cfg = self.config
        return EngineConfig(batch_size=cfg.batch_size, shard_rows=cfg.shard_rows,
                            projection_dim=cfg.projection_dim,
                            factorised_dim=cfg.factorised_dim,
                            memory_budget=cfg.memory_budget, store_dtype=cfg.store_dtype,
                            projection_kind=cfg.projection_kind, seed=component.seed)


register_attributor("tracin", TracInConfig, TracIn)
