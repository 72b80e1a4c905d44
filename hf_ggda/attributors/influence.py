"""GGDA-Influence: τ(G, q) = ∇f(q)ᵀ (H + λI)⁻¹ g_G.

H is the Hessian of the summed training loss over the selected parameters, or an
approximation: ``identity`` (grad-dot; ``normalize="unit"`` for per-row grad-cosine),
``kfac`` / ``ekfac`` (Kronecker factors per linear module, LoRA ``lora_A`` / ``lora_B``
included), ``lissa`` (stochastic recursion with Hessian-vector products), ``datainf``
(closed-form per-module inverse) or ``exact`` (the full Hessian; small models). Group gradients
are stored unprojected, since curvature lives in the parameter space (projection is allowed
with the identity only).

Sign: removing G moves the optimum by ≈ +(H + λI)⁻¹ g_G (upweighting by ε moves it by
−ε (H + λI)⁻¹ g_G), so the query loss changes by ≈ ∇ℓ(q)ᵀ (H + λI)⁻¹ g_G = τ: positive when
removing G would raise the query's loss, i.e. when G helps the query.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import Dataset

from ..curvature import PRECONDITIONERS, Preconditioner, make_preconditioner
from ..curvature.base import CurvatureContext
from ..gradients.engine import EngineConfig, GradientEngine, GroupGradients
from ..gradients.taps import PassTap
from ..logging import get_logger
from .base import Attributor, AttributorConfig, Component
from .registry import register_attributor

logger = get_logger(__name__)


@dataclass
class InfluenceConfig(AttributorConfig):
    """Settings of GGDA-Influence.

    Attributes:
        preconditioner: ``identity``, ``kfac``, ``ekfac``, ``lissa``, ``datainf`` or ``exact``.
        damping: λ added to the Hessian of the summed training loss.
        cosine: Deprecated alias of ``normalize="unit"`` (per-row grad-cosine, additive over
            groups); it used to normalise the group vectors, which was not additive.
        projection_dim: Random projection dimension (identity only; None: exact).
        projection_kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection and LiSSA sampling seed.
        lissa_scale: LiSSA scale (None: 1.5 × (estimated λ_max + λ)).
        lissa_depth: LiSSA recursion depth.
        lissa_repeat: LiSSA runs averaged.
        lissa_batch_size: Rows per sampled Hessian (None: all rows every step).
        exact_max_dim: Largest parameter count for which the exact Hessian is formed.
        curvature_rows: K-FAC / EK-FAC: fit the factors and eigenvalues on a seeded random
            sample of this many training rows (None: all rows, exact).
    """

    attributor_type: str = field(default="influence", metadata={"help": "Method name."})
    preconditioner: str = field(
        default="identity",
        metadata={"help": "identity, kfac, ekfac, lissa, datainf or exact."})
    damping: float = field(default=0.0, metadata={"help": "Damping λ of (H + λI)⁻¹."})
    cosine: bool = field(default=False,
                         metadata={"help": "Deprecated: normalize='unit'."})
    projection_dim: Optional[int] = field(
        default=None, metadata={"help": "Projection dimension (identity only)."})
    projection_kind: str = field(default="rademacher",
                                 metadata={"help": "'rademacher' or 'gaussian'."})
    seed: int = field(default=0, metadata={"help": "Projection / LiSSA sampling seed."})
    lissa_scale: Optional[float] = field(
        default=None, metadata={"help": "LiSSA scale (None: from a power iteration)."})
    lissa_depth: int = field(default=100, metadata={"help": "LiSSA recursion depth."})
    lissa_repeat: int = field(default=1, metadata={"help": "LiSSA runs averaged."})
    lissa_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Rows per LiSSA Hessian sample (None: all)."})
    exact_max_dim: int = field(default=4096,
                               metadata={"help": "Max parameters for the exact Hessian."})
    curvature_rows: Optional[int] = field(
        default=None, metadata={"help": "K-FAC/EK-FAC: rows sampled to fit the factors "
                                        "(None: all rows)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {sorted(PRECONDITIONERS)}, got "
                             f"{self.preconditioner!r}.")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}.")
        if self.preconditioner == "datainf" and self.damping <= 0:
            raise ValueError("The datainf preconditioner needs damping > 0.")
        if self.factorised_dim is not None and (
                self.preconditioner not in ("identity", "kfac", "ekfac") or self.projection_dim):
            raise ValueError("factorised_dim works with the identity, kfac and ekfac "
                             "preconditioners (K-FAC factors are fitted in the projected space) "
                             "and without projection_dim.")
        if self.preconditioner != "identity" and self.projection_dim:
            raise ValueError("projection_dim works with preconditioner='identity' only: "
                             "curvature is computed in the unprojected parameter space (use "
                             "factorised_dim for projected K-FAC / EK-FAC).")
        if self.cosine:
            warnings.warn("InfluenceConfig(cosine=True) is now normalize='unit': every row is "
                          "normalised before its group sum (additive over groups). Pass "
                          "normalize='unit' instead.", FutureWarning, stacklevel=3)
            self.normalize = self.normalize or "unit"
        self.preconditioner_options()  # validates the LiSSA / exact settings
        EngineConfig(projection_dim=self.projection_dim, projection_kind=self.projection_kind)

    def preconditioner_options(self) -> dict[str, Any]:
        """Constructor arguments of the chosen preconditioner.

        Raises:
            ValueError: A method-specific setting is out of range.
        """
        name = self.preconditioner
        if self.curvature_rows is not None and name not in ("kfac", "ekfac"):
            raise ValueError("curvature_rows applies to the kfac and ekfac preconditioners only.")
        if name == "identity":
            return {}
        if name == "lissa":
            opts: dict[str, Any] = dict(damping=self.damping, scale=self.lissa_scale,
                                        depth=self.lissa_depth, repeat=self.lissa_repeat,
                                        batch_size=self.lissa_batch_size, seed=self.seed)
            make_preconditioner(name, **opts)
            return opts
        if name == "exact":
            if self.exact_max_dim < 1:
                raise ValueError(f"exact_max_dim must be >= 1, got {self.exact_max_dim}.")
            return {"damping": self.damping, "max_dim": self.exact_max_dim}
        if name in ("kfac", "ekfac"):
            opts = {"damping": self.damping, "max_rows": self.curvature_rows, "seed": self.seed}
            make_preconditioner(name, **opts)
            return opts
        return {"damping": self.damping}


class InfluenceFunction(Attributor):
    """GGDA-Influence with a choice of Hessian approximation.

    Args:
        model: The model (at the trained weights).
        task: The attribution task.
        config: An :class:`InfluenceConfig`.
    """

    config_class = InfluenceConfig
    config: InfluenceConfig

    def __init__(self, model: torch.nn.Module, task: Any,
                 config: Optional[InfluenceConfig] = None) -> None:
        super().__init__(model, task, config)
        #: Per component (by id): preconditioner, its context and pass tap, between the
        #: start of the training pass and :meth:`fit_preconditioner`.
        self._prepared: dict[int, tuple[Preconditioner, CurvatureContext,
                                        Optional[PassTap]]] = {}

    def engine_config(self, component: Component) -> EngineConfig:
        """Engine settings (projection only with the identity)."""
        cfg = self.config
        return EngineConfig(batch_size=cfg.batch_size, shard_rows=cfg.shard_rows,
                            projection_dim=cfg.projection_dim,
                            factorised_dim=cfg.factorised_dim,
                            memory_budget=cfg.memory_budget, store_dtype=cfg.store_dtype,
                            projection_kind=cfg.projection_kind, seed=cfg.seed)

    def _cache(self, store: Optional[Path]) -> Optional[Path]:
        name = self.config.preconditioner
        return None if store is None else store / f"curvature-{name}.safetensors"

    def prepare_pass(self, index: int, component: Component, engine: GradientEngine,
                     train: Dataset, store: Optional[Path]) -> list[PassTap]:
        """Reload the curvature cached in ``store``, or hand the training pass a tap for the
        K-FAC / EK-FAC factors (so they cost no pass of their own).

        Raises:
            ValueError: Non-linear parameters with K-FAC and no damping.
        """
        name = self.config.preconditioner
        if name == "identity":
            return []
        pre = make_preconditioner(name, **self.config.preconditioner_options())
        ctx = self.curvature_context(engine, train)
        own_rows = self._curvature_rows is None  # the training pass sees the curvature rows
        tap = None if pre.try_load(ctx, self._cache(store)) or not own_rows \
            else pre.pass_tap(ctx)
        self._prepared[id(component)] = (pre, ctx, tap)
        return [tap] if tap is not None else []

    def fit_preconditioner(self, component: Component, engine: GradientEngine,
                           train: Dataset, groups: GroupGradients,
                           store: Optional[Path]) -> Optional[Preconditioner]:
        """Finish (or fit, or reload from ``store``) the configured preconditioner on ``train``.

        Statistics collected by the training pass (:meth:`prepare_pass`) are used when that
        pass computed every row; EK-FAC's eigenvalues come from the per-row gradients when the
        pass kept them (point mode, one-pass grouping), else from one more pass.

        Raises:
            ValueError: The exact Hessian is too large, or non-linear parameters with K-FAC
                and no damping.
        """
        name = self.config.preconditioner
        if name == "identity":
            return None
        cache = self._cache(store)
        prepared = self._prepared.pop(id(component), None)
        if prepared is None:
            pre = make_preconditioner(name, **self.config.preconditioner_options())
            pre.fit_or_load(self.curvature_context(engine, train), cache)
            return pre
        pre, ctx, tap = prepared
        if pre.fitted:  # reloaded from the cache
            return pre
        if tap is not None and groups.fresh:
            pre.fit_from_pass(ctx, tap, groups.extras.get("row_vectors"))
        else:
            pre.fit(ctx)
        pre.save(ctx, cache)
        return pre

    def uses_curvature(self) -> bool:
        """Every preconditioner but the identity fits curvature."""
        return self.config.preconditioner != "identity"

    @property
    def preconditioner(self) -> Optional[Preconditioner]:
        """The fitted preconditioner (None for the identity).

        Raises:
            NotFittedError: Not fitted.
        """
        return self._require_fit().parts[0].preconditioner

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return (H + λI)⁻¹ V for (N, d) vectors in the flat parameter layout.

        Raises:
            NotFittedError: Not fitted.
        """
        pre = self.preconditioner
        if pre is None:
            return vectors
        with self.components[0].activate(self.model):
            return pre.apply(vectors)


register_attributor("influence", InfluenceConfig, InfluenceFunction)
