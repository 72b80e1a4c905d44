"""GGDA-TRAK: projected output-function features with out-to-loss weights folded into groups.

With f the output function (the margin log p/(1−p) of the correct class for classifiers; the
mean token log-odds for causal LMs), P a seeded random projection and Q_i = 1 − p_i:

    φ(q) = Pᵀ∇f(q),    φ_G = Pᵀ Σ_{i∈G} Q_i ∇f_i,    τ(G, q) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ_G,

averaged over an ensemble of checkpoints. φ_G is one group-gradient pass of the row function
Q_i.detach() · f_i, so no per-example gradient is formed. Since ∂ℓ_i/∂f_i = −(1 − p_i) for the
cross-entropy, φ_G = −Pᵀ g_G: τ has the sign of the influence function with the Gauss-Newton
kernel ΦᵀΦ as curvature, positive when G helps the query.

The kernel ΦᵀΦ is always built from features of the *unweighted* output function f, as in
TRAK: from the K group features Pᵀ Σ_{i∈G} ∇f_i (``kernel="group"``, the batched kernel; one
extra group-gradient pass), from per-example features Pᵀ∇f_i of a seeded sample of s rows
scaled by n/s (``"sample"``) or from all n rows (``"exact"``). With singleton groups the group
kernel is therefore exactly the exact kernel. (The Q-weighted training vectors φ_G are not
used for the kernel: for singletons they would give Σ_i Q_i² φ_i φ_iᵀ instead of ΦᵀΦ.)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, cast

import numpy as np
import torch
from datasets import Dataset

from ..curvature import MatrixPreconditioner, Preconditioner
from ..curvature.mix import CurvatureData
from ..distributed import all_reduce_sum
from ..errors import GroupingError
from ..gradients.engine import EngineConfig, GradientEngine, GroupGradients, fn_key, plan_groups
from ..gradients.taps import Calls, PassTap
from ..logging import get_logger
from ..tasks import GROUP_COLUMN, AttributionTask, Batch, CausalLMTask
from .base import Attributor, AttributorConfig, Component
from .checkpoints import Checkpoint, CheckpointSource
from .registry import register_attributor

if TYPE_CHECKING:
    from ..grouping.base import Grouper

logger = get_logger(__name__)

OutputFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
KERNELS = ("group", "sample", "exact")


class _MarginTask(Protocol):
    """A task with a margin output function (e.g. ``SequenceClassificationTask``)."""

    def margin(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor: ...


def causal_lm_token_margins(task: CausalLMTask, model: torch.nn.Module,
                            batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-token log-odds of the next token and the target mask.

    The log-odds of target y_t is z_y − logsumexp_{v≠y} z_v = log p_t − log(1 − p_t).

    Args:
        task: The causal LM task (labels −100 are not targets).
        model: The model.
        batch: A collated batch.

    Returns:
        (margins (B, T−1), mask (B, T−1) of target tokens).
    """
    logits = model(**task.model_inputs(batch)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    safe = labels.clamp(min=0)[..., None]
    correct = logits.gather(-1, safe).squeeze(-1)
    others = logits.scatter(-1, safe, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1), mask


def _token_reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    total = (values * mask.to(values.dtype)).sum(1)
    if reduction == "sum":
        return total
    return total / mask.sum(1).clamp(min=1).to(values.dtype)


def causal_lm_margin(task: CausalLMTask, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Return (B,) mean (or summed, per ``task.reduction``) target-token log-odds.

    Args:
        task: The causal LM task.
        model: The model.
        batch: A collated batch.

    Returns:
        The output function f of each row.
    """
    margins, mask = causal_lm_token_margins(task, model, batch)
    return _token_reduce(margins, mask, task.reduction)


class TRAKKernel(MatrixPreconditioner):
    """(ΦᵀΦ + λI)⁻¹ in the projected feature space."""

    name = "trak_kernel"


@dataclass
class TRAKConfig(AttributorConfig):
    """Settings of GGDA-TRAK.

    Attributes:
        projection_dim: Feature dimension p.
        projection_kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection seed (member c of the ensemble uses seed + c).
        kernel: ``"group"``, ``"sample"`` or ``"exact"``.
        kernel_sample_size: Rows of the ``"sample"`` kernel.
        damping: λ of (ΦᵀΦ + λI)⁻¹ (0: pseudo-inverse).
        checkpoints: Ensemble members (adapter folders / weight files); empty: the current
            weights.
    """

    attributor_type: str = field(default="trak", metadata={"help": "Method name."})
    projection_dim: int = field(default=512, metadata={"help": "Projected dimension p."})
    projection_kind: str = field(default="rademacher",
                                 metadata={"help": "'rademacher' or 'gaussian'."})
    seed: int = field(default=0, metadata={"help": "Projection seed (+c for member c)."})
    kernel: str = field(default="group", metadata={"help": "'group', 'sample' or 'exact'."})
    kernel_sample_size: int = field(default=256,
                                    metadata={"help": "Rows sampled for kernel='sample'."})
    damping: float = field(default=0.0, metadata={"help": "Damping λ of the kernel."})
    checkpoints: list[str] = field(default_factory=list,
                                   metadata={"help": "Ensemble checkpoints (empty: current)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}.")
        if self.kernel_sample_size < 1:
            raise ValueError(f"kernel_sample_size must be >= 1, got {self.kernel_sample_size}.")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}.")
        EngineConfig(projection_dim=self.projection_dim, projection_kind=self.projection_kind)
        if self.normalize is not None:
            raise ValueError("normalize does not apply to TRAK (its kernel already whitens the "
                             "features); use TracIn or InfluenceFunction with normalize=, or "
                             "leave it None.")


class TRAK(Attributor):
    """GGDA-TRAK (ensemble over checkpoints, averaged).

    Args:
        model: The model.
        task: The task; classification tasks need ``margin``; causal LMs use the mean token
            log-odds.
        config: A :class:`TRAKConfig`.
        checkpoints: In-memory state dicts (or paths) for the ensemble instead of
            ``config.checkpoints``.
        output_fn: A custom output function (model, batch) -> (B,) logit of the correct
            outcome (Q = 1 − sigmoid(f) is then used).

    Raises:
        TypeError: No output function is known for the task.
    """

    config_class = TRAKConfig
    config: TRAKConfig

    def __init__(self, model: torch.nn.Module, task: AttributionTask,
                 config: Optional[TRAKConfig] = None,
                 checkpoints: Optional[Sequence[CheckpointSource]] = None,
                 output_fn: Optional[OutputFn] = None) -> None:
        self._sources = list(checkpoints) if checkpoints is not None else None
        self._custom_fn = output_fn
        self._group_column = GROUP_COLUMN
        self._overwrite = False
        self._last_q: Optional[torch.Tensor] = None
        self._q_taps: dict[int, _QTap] = {}
        super().__init__(model, task, config)
        if output_fn is None and not isinstance(task, CausalLMTask) \
                and not callable(getattr(task, "margin", None)):
            raise TypeError(f"{type(task).__name__} has no `margin` method; pass output_fn= "
                            "(model, batch) -> (B,) log-odds of the correct outcome.")

    def build_components(self) -> list[Component]:
        """One equally weighted component per ensemble member, each with its own seed."""
        sources: list[Any] = self._sources if self._sources is not None \
            else list(self.config.checkpoints)
        if not sources:
            return [Component(1.0, None, self.config.seed)]
        return [Component(1.0 / len(sources),
                          Checkpoint(s, s if isinstance(s, str) else f"state_dict_{i}"),
                          self.config.seed + i) for i, s in enumerate(sources)]

    def engine_config(self, component: Component) -> EngineConfig:
        """Projected engine with the component's seed."""
        cfg = self.config
        return EngineConfig(batch_size=cfg.batch_size, shard_rows=cfg.shard_rows,
                            projection_dim=None if cfg.factorised_dim else cfg.projection_dim,
                            factorised_dim=cfg.factorised_dim,
                            memory_budget=cfg.memory_budget, store_dtype=cfg.store_dtype,
                            projection_kind=cfg.projection_kind, seed=component.seed)

    # -- output functions ----------------------------------------------------------------------
    def output(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The output function f (B,) of the rows."""
        if self._custom_fn is not None:
            return self._custom_fn(model, batch)
        if isinstance(self.task, CausalLMTask):
            return causal_lm_margin(self.task, model, batch)
        return cast(_MarginTask, self.task).margin(model, batch)  # checked in __init__

    def weighted_output(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Σ of Q.detach() · f per row, whose gradient is Σ Q ∇f (per token for causal LMs)."""
        if self._custom_fn is None and isinstance(self.task, CausalLMTask):
            margins, mask = causal_lm_token_margins(self.task, model, batch)
            weighted = torch.sigmoid(-margins).detach() * margins
            return _token_reduce(weighted, mask, self.task.reduction)
        f = self.output(model, batch)
        q = torch.sigmoid(-f).detach()
        self._last_q = q  # read by the pass's Q tap (per-row out-to-loss weights)
        return q * f

    def _keyed(self, fn: Callable[[torch.nn.Module, Batch], torch.Tensor], name: str
               ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """``fn`` with a store-fingerprint key that names a custom output function too."""
        keyed = functools.partial(fn)
        custom = "margin" if self._custom_fn is None else fn_key(self._custom_fn)
        keyed.ggda_key = f"trak.{name}[{custom}]"  # type: ignore[attr-defined]
        return keyed

    def train_fn(self) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """φ_G: gradients of Q-weighted outputs."""
        return self._keyed(self.weighted_output, "weighted_output")

    def query_fn(self) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """φ(q): gradients of the output function."""
        return self._keyed(self.output, "output")

    def self_fn(self) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """Self-influence measures the output function of the group's own rows."""
        return self._keyed(self.output, "output")

    def train_sign(self) -> float:
        """−1: the logit-gradient of Q.detach() · f is Q ∂f/∂z = −(softmax − onehot)."""
        return -1.0

    # -- kernel --------------------------------------------------------------------------------
    def _per_row_q(self) -> bool:
        """Q is one number per row (not per token), so φ_i = (Q_i φ_i) / Q_i."""
        return self._custom_fn is not None or not isinstance(self.task, CausalLMTask)

    def point_pass(self) -> bool:
        """Per-example projected vectors (n × p, small): the kernel then needs no pass."""
        return self._per_row_q()

    def prepare_pass(self, index: int, component: Component, engine: GradientEngine,
                     train: Dataset, store: Optional[Path]) -> list[PassTap]:
        """A tap recording each row's Q, so the kernel comes from the pass's vectors."""
        if not self._per_row_q():
            return []
        tap = _QTap(self, len(train))
        self._q_taps[id(component)] = tap
        return [tap]

    def fit(self, train_dataset: Dataset, group_column: str = GROUP_COLUMN,
            store: Optional[str | os.PathLike[str]] = None,
            overwrite: bool = False, grouper: Optional["Grouper"] = None,
            curvature_dataset: Optional[CurvatureData] = None) -> "TRAK":
        """As :meth:`Attributor.fit`; the group kernel is built over the same groups, and
        ``overwrite`` applies to the kernel's stores as well.

        Args:
            train_dataset: Raw training rows with a group column.
            group_column: Column of group ids (use a row-index column for point mode).
            store: Folder for resumable gradient stores (None: memory).
            overwrite: Replace stores made for another request instead of raising.
            grouper: As :meth:`Attributor.fit` (it writes the column ``group_id``).
            curvature_dataset: As :meth:`Attributor.fit`.

        Returns:
            ``self``.
        """
        self._group_column = GROUP_COLUMN if grouper is not None else group_column
        self._overwrite = overwrite
        super().fit(train_dataset, group_column, store=store, overwrite=overwrite,
                    grouper=grouper, curvature_dataset=curvature_dataset)
        return self

    def fit_preconditioner(self, component: Component, engine: GradientEngine,
                           train: Dataset, groups: GroupGradients,
                           store: Optional[Path]) -> Optional[Preconditioner]:
        """Build (ΦᵀΦ + λI)⁻¹ from features of the output function f (not Q-weighted): the K
        group features, a scaled sample of per-example features, or all of them.

        Raises:
            NonFiniteError: A feature is NaN/Inf.
            GroupingError: The group kernel's groups differ from the fitted groups.
        """
        kind, n = self.config.kernel, len(train)
        sub = None if store is None else str(store / f"kernel-{kind}")
        tap = self._q_taps.pop(id(component), None)
        rows = groups.extras.get("row_vectors")
        if tap is not None and rows is not None and groups.fresh and tap.usable():
            kernel = TRAKKernel(self.config.damping)
            kernel.set_matrix(self._kernel_from_rows(component, train, groups, rows, tap.q))
            return kernel
        if kind == "group":
            # Pᵀ Σ_{i∈G} ∇f_i: for singleton groups these are the per-example features, so the
            # batched kernel is the exact one (``groups`` holds Pᵀ Σ Q_i ∇f_i, whose kernel for
            # singletons would be Σ Q_i² φ_i φ_iᵀ)
            unweighted = engine.group_gradients(train, self._group_column, store=sub,
                                                overwrite=self._overwrite,
                                                fn=self._keyed(self.output, "output"))
            if unweighted.group_ids != groups.group_ids \
                    or not np.array_equal(unweighted.sizes, groups.sizes):
                raise GroupingError(f"The kernel's groups (column {self._group_column!r}) are "
                                    "not the fitted groups; call fit() with the group column.")
            feats, scale = unweighted.gradients, 1.0
        elif kind == "exact" or self.config.kernel_sample_size >= n:
            feats = engine.per_example_gradients(
                train, store=sub, overwrite=self._overwrite,
                fn=self._keyed(self.output, "output")).gradients
            scale = 1.0
        else:
            size = self.config.kernel_sample_size
            gen = torch.Generator().manual_seed(component.seed)
            rows = sorted(torch.randperm(n, generator=gen)[:size].tolist())
            feats = engine.per_example_gradients(train.select(rows), store=sub,
                                                 overwrite=self._overwrite,
                                                 fn=self._keyed(self.output, "output")).gradients
            scale = n / size
        kernel = TRAKKernel(self.config.damping)
        kernel.set_matrix(scale * feats.T @ feats)
        return kernel


    def _kernel_from_rows(self, component: Component, train: Dataset, groups: GroupGradients,
                          rows: Callable[[], Any], q: torch.Tensor) -> torch.Tensor:
        """ΦᵀΦ from the pass's per-row vectors Q_i φ_i divided by Q_i (no pass of its own)."""
        kind, n = self.config.kernel, len(train)
        keep, scale = None, 1.0
        if kind == "sample" and self.config.kernel_sample_size < n:
            gen = torch.Generator().manual_seed(component.seed)
            keep = set(torch.randperm(n, generator=gen)[:self.config.kernel_sample_size]
                       .tolist())
            scale = n / self.config.kernel_sample_size
        slot = None
        if kind == "group":
            plan = plan_groups(train[self._group_column], 1)
            if plan.group_ids != groups.group_ids:
                raise GroupingError(f"The kernel's groups (column {self._group_column!r}) are "
                                    "not the fitted groups; call fit() with the group column.")
            slot = np.empty(n, dtype=np.int64)
            slot[plan.order] = plan.slot
            feats = torch.zeros(len(groups.group_ids), groups.gradients.shape[1],
                                dtype=groups.gradients.dtype, device=groups.gradients.device)
        total = torch.zeros(groups.gradients.shape[1], groups.gradients.shape[1],
                            dtype=groups.gradients.dtype, device=groups.gradients.device)
        for index, vectors in rows():
            phi = vectors / q[index].to(vectors)[:, None]
            if slot is not None:
                feats.index_add_(0, torch.as_tensor(slot[index], device=feats.device), phi)
                continue
            if keep is not None:
                phi = phi[[j for j, r in enumerate(index) if int(r) in keep]]
            total += phi.T @ phi
        if slot is not None:
            total = feats.T @ feats
        return scale * total


class _QTap(PassTap):
    """Records each training row's out-to-loss weight Q_i = 1 − p_i during TRAK's pass."""

    def __init__(self, trak: TRAK, num_rows: int) -> None:
        self.trak = trak
        self.q = torch.zeros(num_rows, dtype=torch.float64)
        self.seen = torch.zeros(num_rows, dtype=torch.int32)

    def observe(self, batch: Batch, rows: Sequence[int], calls: Calls) -> None:
        q = self.trak._last_q
        if q is None or len(q) != len(rows):
            return
        index = torch.as_tensor(list(rows), dtype=torch.long)
        self.q[index] = q.detach().double().cpu()
        self.seen[index] = 1

    def finish(self) -> None:
        all_reduce_sum(self.q)
        all_reduce_sum(self.seen)

    def usable(self) -> bool:
        """Every row seen, and no Q so small that dividing by it loses the features."""
        return bool(self.seen.all()) and float(self.q.min()) > 1e-20

register_attributor("trak", TRAKConfig, TRAK)
