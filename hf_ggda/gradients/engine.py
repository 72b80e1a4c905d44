"""The gradient engine: K group gradients (or n per-example gradients) in one pass.

Rows are ordered by group (stable), cut into shards of whole groups, and each shard is one
sequence of forward+backward passes whose per-group sums come from
:class:`~hf_ggda.gradients.hooks.GradientCollector`. Shards go to a
:class:`~hf_ggda.store.GradientStore` when a path is given, so an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from datasets import Dataset

from ..config import ConfigMixin
from ..distributed import all_reduce_sum, barrier, rank_and_world
from ..errors import GroupingError, MissingColumnError, ModelStateError, NonFiniteError
from ..fingerprint import hash_array, hash_json, hash_model, request_fingerprint
from ..logging import get_logger, progress
from ..params import ParameterSelection, SelectionSpec
from ..store import GradientStore
from ..tasks import GROUP_COLUMN, AttributionTask, Batch, check_columns
from ..validation import check_group_values
from .factorised import FactorisedProjector
from .hooks import GradientCollector, find_tracked
from .projection import RandomProjector
from .taps import PassTap

logger = get_logger(__name__)

RowFn = Union[str, Callable[[torch.nn.Module, Batch], torch.Tensor]]


@dataclass
class EngineConfig(ConfigMixin):
    """Settings of the gradient engine.

    Attributes:
        batch_size: Rows per forward/backward pass (does not change results).
        projection_dim: Project gradients to this many dimensions (None: keep all d).
        projection_kind: ``"rademacher"`` or ``"gaussian"`` (dense and factorised).
        memory_budget: Bytes the pass's gradient blocks may use; a quarter of it bounds one
            shard's unprojected (groups × d) block (None: 64 MB).
        store_dtype: dtype of the vectors kept in a store (``"float16"`` / ``"bfloat16"``
            halve it; read back into the accumulation dtype); None: the accumulation dtype.
        factorised_dim: k per side of the factorised projection inside the hooks (see
            :mod:`hf_ggda.gradients.factorised`); None: off. Excludes ``projection_dim``.
        seed: Projection seed.
        shard_rows: Target rows per store shard (shards hold whole groups).
        strict: Turn warnings (train mode, partial name matches) into errors.
    """

    batch_size: int = field(default=16, metadata={"help": "Rows per forward/backward pass."})
    projection_dim: Optional[int] = field(
        default=None, metadata={"help": "Random projection dimension (None = no projection)."})
    projection_kind: str = field(default="rademacher",
                                 metadata={"help": "'rademacher' or 'gaussian'."})
    factorised_dim: Optional[int] = field(default=None, metadata={
        "help": "Factorised projection inside the hooks: k per side of every linear layer "
                "(its k_out x k_in block; None = off)."})
    memory_budget: Optional[int] = field(default=None, metadata={
        "help": "Bytes for one shard's gradient block (None: 64 MB of unprojected vectors)."})
    store_dtype: Optional[str] = field(default=None, metadata={
        "help": "Keep store shards as 'float16' or 'bfloat16' (accumulation stays fp32)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random projection."})
    shard_rows: int = field(default=512, metadata={"help": "Target rows per store shard."})
    strict: bool = field(default=False,
                         metadata={"help": "Raise instead of warning on risky input."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}.")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim}.")
        if self.factorised_dim is not None and self.factorised_dim < 1:
            raise ValueError(f"factorised_dim must be >= 1 or None, got {self.factorised_dim}.")
        if self.factorised_dim is not None and self.projection_dim is not None:
            raise ValueError("Use either projection_dim (dense) or factorised_dim, not both.")
        if self.store_dtype not in (None, "float16", "bfloat16", "float32", "float64"):
            raise ValueError("store_dtype must be None, 'float16', 'bfloat16', 'float32' or "
                             f"'float64', got {self.store_dtype!r}.")
        if self.projection_kind not in ("rademacher", "gaussian"):
            raise ValueError("projection_kind must be 'rademacher' or 'gaussian', got "
                             f"{self.projection_kind!r}.")


@dataclass
class GroupGradients:
    """K group gradients (rows) with their ids.

    Attributes:
        gradients: (K, p) matrix, row k = Σ_{i ∈ G_k} ∇ℓ_i (projected when configured).
        group_ids: The K group ids, sorted.
        sizes: (K,) members per group.
        fingerprint: What the numbers depend on.
        fresh: Every shard was computed by this call (none read back from a store), so the
            taps fed by the pass saw every row.
    """

    gradients: torch.Tensor
    group_ids: list[Any]
    sizes: np.ndarray
    fingerprint: dict[str, Any]
    fresh: bool = True
    #: What the pass left for later steps (e.g. ``"row_vectors"`` for EK-FAC).
    extras: dict[str, Any] = field(default_factory=dict)

    def point_chunks(self, rows: int = 256, only: Optional[Container[int]] = None
                     ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (dataset rows, vectors) chunks of a per-example result (group id = row).

        Reads the store shard by shard when the result was not kept in memory
        (``per_example_gradients(..., keep=False)``); with ``only``, the shards that hold
        none of those rows are not read (their chunks are skipped).
        """
        if "store" in self.extras:
            store = self.extras["store"]
            device = self.extras.get("device")
            for i, (g0, g1) in enumerate(store.manifest["shard_bounds"]):
                keys = [int(r) for r in self.group_ids[g0:g1]]
                if only is None or any(r in only for r in keys):
                    yield keys, store.read_shard(i).to(device=device,
                                                       dtype=self.gradients.dtype)
            return
        for start in range(0, len(self.group_ids), rows):
            yield ([int(r) for r in self.group_ids[start:start + rows]],
                   self.gradients[start:start + rows])


@dataclass
class _Plan:
    order: np.ndarray  # dataset rows, sorted by group
    slot: np.ndarray  # group index of each entry of ``order``
    ptr: np.ndarray  # (K+1,) start of each group in ``order``
    group_ids: list[Any]
    shards: list[tuple[int, int]]


def plan_groups(values: Sequence[Any], shard_rows: int,
                max_groups: Optional[int] = None) -> _Plan:
    """Order rows by group and cut whole groups into shards of about ``shard_rows`` rows
    (and at most ``max_groups`` groups, which bounds a shard's (groups × d) block).

    Raises:
        GroupingError: A group value is null, NaN / Inf or a fractional float, or the values
            cannot be ordered.
    """
    check_group_values(values)
    try:
        uniq, inverse = np.unique(np.asarray(values), return_inverse=True)
    except TypeError as err:
        raise GroupingError(f"Group ids cannot be sorted ({err}); use one type.") from err
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(uniq))
    ptr = np.concatenate([[0], np.cumsum(counts)])
    shards, start = [], 0
    for k in range(len(uniq)):
        if ptr[k + 1] - ptr[start] >= shard_rows or k == len(uniq) - 1 or \
                (max_groups is not None and k + 1 - start >= max_groups):
            shards.append((start, k + 1))
            start = k + 1
    ids = [v.item() if hasattr(v, "item") else v for v in uniq]
    return _Plan(order, inverse[order], ptr, ids, shards)


def fn_key(fn: RowFn) -> str:
    """Name of a row function in fingerprints: its ``ggda_key`` attribute, else module.qualname.

    Give a callable a ``ggda_key`` (e.g. including its settings) when two different functions
    could share a qualified name.
    """
    if isinstance(fn, str):
        return fn
    key = getattr(fn, "ggda_key", None)
    if key is not None:
        return str(key)
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


class GradientEngine:
    """Computes group and per-example gradients of a task's per-row losses.

    Args:
        model: A transformers / PEFT model (any torch module the task can call).
        task: The :class:`~hf_ggda.tasks.AttributionTask`.
        selection: Parameter selection spec (see :meth:`ParameterSelection.resolve`).
        config: Engine settings.

    Raises:
        NoParametersError: The selection matched nothing.
    """

    def __init__(self, model: torch.nn.Module, task: AttributionTask,
                 selection: SelectionSpec | ParameterSelection = "auto",
                 config: Optional[EngineConfig] = None) -> None:
        self.model = model
        self.task = task
        self.config = config or EngineConfig()
        self.selection = selection if isinstance(selection, ParameterSelection) else \
            ParameterSelection.resolve(model, selection, strict=self.config.strict)
        params = self.selection.parameters(model)
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) \
            else torch.float32
        self.device = params[0].device
        self.projector = None
        if self.config.projection_dim is not None:
            self.projector = RandomProjector(self.selection.numel, self.config.projection_dim,
                                             self.config.projection_kind, self.config.seed)
        self.factorised: Optional[FactorisedProjector] = None
        if self.config.factorised_dim is not None:
            tracked, fallback = find_tracked(model, self.selection)
            named = dict(model.named_parameters())
            layers = [(t.name, t.widths[0], t.widths[1], t.weight is not None,
                       t.bias is not None) for t in tracked]
            fb_dim = sum(named[n].numel() for n in fallback)
            if fallback:
                logger.warning("Factorised projection: %d selected tensors outside linear "
                               "layers (%s...) are projected densely.", len(fallback),
                               fallback[0])
            self.factorised = FactorisedProjector(layers, fb_dim, self.config.factorised_dim,
                                                  self.config.projection_kind,
                                                  self.config.seed)

    @property
    def dim(self) -> int:
        """Columns of the gradient matrices (p if projected, else d)."""
        if self.factorised is not None:
            return self.factorised.dim_out
        return self.projector.dim_out if self.projector else self.selection.numel

    @property
    def store_dtype(self) -> torch.dtype:
        """dtype of stored vectors (``config.store_dtype``, else the accumulation dtype)."""
        return getattr(torch, self.config.store_dtype) if self.config.store_dtype else self.dtype

    @property
    def collect_dim(self) -> int:
        """Columns a pass accumulates before the last projection step (d; or the factorised
        blocks plus the unprojected parameters outside linear layers)."""
        return self.factorised.collect_dim if self.factorised is not None \
            else self.selection.numel

    def new_collector(self, taps: Sequence[PassTap] = ()) -> GradientCollector:
        """A :class:`GradientCollector` in this engine's layout (factorised or not)."""
        return GradientCollector(self.model, self.selection, self.dtype, taps, self.factorised)

    def finish_block(self, out: torch.Tensor) -> torch.Tensor:
        """The last projection step of a collected (N, collect_dim) block."""
        if self.factorised is not None:
            return self.factorised.finish(out)
        return self.projector.project(out) if self.projector else out

    # -- public API ----------------------------------------------------------------------------
    def group_gradients(self, dataset: Dataset, group_column: str = GROUP_COLUMN,
                        store: Optional[str] = None, overwrite: bool = False,
                        fn: RowFn = "loss", taps: Sequence[PassTap] = ()) -> GroupGradients:
        """Return g_G = Σ_{i∈G} ∇ fn(row i) for every group of ``dataset[group_column]``.

        Args:
            dataset: Raw rows (the task prepares them) with a group column.
            group_column: Column holding group ids.
            store: Folder of a resumable :class:`GradientStore` (None: keep in memory).
            overwrite: Replace a store made for another request.
            fn: ``"loss"`` (training loss), ``"measurement"`` or a callable (model, batch) ->
                (B,) tensor.
            taps: Statistics fed by the same pass (:mod:`hf_ggda.gradients.taps`); each gets
                :meth:`~hf_ggda.gradients.taps.PassTap.finish` called at the end. They saw
                every row only when the result is ``fresh``.

        Returns:
            The group gradients, groups sorted by id.

        Raises:
            MissingColumnError: No group column.
            EmptyDatasetError: No rows.
            NonFiniteError: A loss or gradient is NaN/Inf (names the rows).
            StoreMismatchError: ``store`` was made for another request.
        """
        check_columns(dataset, [])  # one split with rows, before naming its columns
        if group_column not in dataset.column_names:
            raise MissingColumnError(group_column, dataset.column_names, role="group column")
        plan = plan_groups(dataset[group_column], self.config.shard_rows,
                           self.point_shard_rows())
        return self._run(dataset, plan, store, overwrite, fn, per_example=False,
                         grouping=hash_array(dataset[group_column]), taps=taps)

    def per_example_gradients(self, dataset: Dataset, store: Optional[str] = None,
                              overwrite: bool = False, fn: RowFn = "loss",
                              taps: Sequence[PassTap] = (), keep: bool = True
                              ) -> GroupGradients:
        """Return the n per-example gradients (point mode; vectorised, one pass).

        Args and Raises: as :meth:`group_gradients`, without a group column; with a store,
        ``keep=False`` leaves the n vectors on disk (``gradients`` is then empty; read them
        with :meth:`GroupGradients.point_chunks`, one shard at a time).
        """
        check_columns(dataset, [])
        plan = plan_groups(list(range(len(dataset))), self.point_shard_rows())
        return self._run(dataset, plan, store, overwrite, fn, per_example=True,
                         grouping="point", taps=taps, keep=keep or store is None)

    def point_shard_rows(self) -> int:
        """Rows per shard in point mode (groups per shard in group mode): ``shard_rows``,
        capped so a shard's unprojected (groups × d) block stays within 64 MB (a pass never
        holds more than one shard of full-size gradients beside the projected result)."""
        budget = self.config.memory_budget // 4 if self.config.memory_budget else 64 << 20
        cap = max(1, budget // (self.collect_dim * self.dtype.itemsize))
        rows = max(1, min(self.config.shard_rows, cap))
        bs = self.config.batch_size
        return rows if rows < bs else rows // bs * bs  # whole batches: no short batches

    def sum_into_groups(self, points: GroupGradients, dataset: Dataset,
                        group_column: str = GROUP_COLUMN, fn: RowFn = "loss",
                        weights: Optional[np.ndarray] = None) -> GroupGradients:
        """Sum per-example vectors (rows in dataset order) into the groups of ``group_column``.

        By linearity this equals :meth:`group_gradients` on the same rows (exactly, up to
        floating-point summation order), in the projected space too.

        Args:
            points: The result of :meth:`per_example_gradients` on ``dataset``'s rows.
            dataset: The same rows, now with a group column.
            group_column: Column of group ids.
            fn: The row function ``points`` were computed with (for the fingerprint).
            weights: (n,) per-row factors applied before the sum (e.g. 1 / ‖g_i‖ for
                normalised scores); None: plain sums.

        Returns:
            The group vectors, groups sorted by id, fingerprinted like :meth:`group_gradients`.

        Raises:
            MissingColumnError: No group column.
            ValueError: ``points`` does not have one vector per row.
        """
        if group_column not in dataset.column_names:
            raise MissingColumnError(group_column, dataset.column_names, role="group column")
        if len(points.group_ids) != len(dataset):
            raise ValueError(f"Expected {len(dataset)} per-example vectors, got "
                             f"{len(points.group_ids)}.")
        plan = plan_groups(dataset[group_column], self.config.shard_rows)
        slot_of_row = np.empty(len(dataset), dtype=np.int64)
        slot_of_row[plan.order] = plan.slot
        grads = torch.zeros(len(plan.group_ids), points.gradients.shape[1],
                            dtype=points.gradients.dtype, device=points.gradients.device)
        for rows, vectors in points.point_chunks():
            index = torch.as_tensor(slot_of_row[rows], device=grads.device)
            vectors = vectors.to(grads.dtype)
            if weights is not None:
                vectors = vectors * torch.as_tensor(weights[rows], dtype=grads.dtype,
                                                    device=grads.device)[:, None]
            grads.index_add_(0, index, vectors)
        fp = self.fingerprint(dataset, hash_array(dataset[group_column]), fn)
        return GroupGradients(grads, plan.group_ids, np.diff(plan.ptr), fp, points.fresh,
                              dict(points.extras))

    def fingerprint(self, dataset: Dataset, grouping: str, fn: RowFn) -> dict[str, Any]:
        """Everything the stored gradients depend on (batch size excluded)."""
        return request_fingerprint({
            "model": hash_model(self.model),
            "selection": hash_json(self.selection.to_dict()),
            "task": self.task.config_dict(),
            "projection": self.factorised.config_dict() if self.factorised is not None else
            (self.projector.config_dict() if self.projector else None),
            "dataset": dataset._fingerprint,
            "grouping": grouping,
            "fn": fn_key(fn),
        })

    # -- internals -----------------------------------------------------------------------------
    def _row_fn(self, fn: RowFn) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        if fn == "loss":
            return self.task.per_row_loss
        if fn == "measurement":
            return self.task.measurement
        if callable(fn):
            return fn
        raise ValueError(f"fn must be 'loss', 'measurement' or a callable, got {fn!r}.")

    @contextlib.contextmanager
    def attribution_mode(self) -> Iterator[None]:
        """Eval mode (dropout off), only selected parameters differentiable, grad enabled."""
        was_training = self.model.training
        if was_training:
            msg = ("The model is in train mode; dropout would make gradients random. "
                   "Switching to eval() for attribution.")
            if self.config.strict:
                raise ModelStateError(msg + " (strict mode: call model.eval() first)")
            logger.info(msg)
        self.model.eval()
        try:
            with self.selection.only_selected_require_grad(self.model), \
                    torch.enable_grad():
                yield
        finally:
            self.model.train(was_training)

    def _run(self, dataset: Dataset, plan: _Plan, store_path: Optional[str], overwrite: bool,
             fn: RowFn, per_example: bool, grouping: str,
             taps: Sequence[PassTap] = (), keep: bool = True) -> GroupGradients:
        rank, world = rank_and_world()
        prepared = self.task.prepare(dataset)
        self.task.validate(prepared, self.model)  # labels vs the head, device: before any pass
        fp = self.fingerprint(dataset, grouping, fn)
        store = self._open_store(store_path, fp, plan, overwrite, rank)
        missing = store.missing_shards() if store else list(range(len(plan.shards)))
        todo = [s for s in missing if s % world == rank]  # whole groups per process
        features = prepared.select_columns(
            [c for c in self.task.feature_columns if c in prepared.column_names])
        collector = self.new_collector(taps)
        bar = progress(total=int(sum(plan.ptr[plan.shards[i][1]] - plan.ptr[plan.shards[i][0]]
                                     for i in todo)),
                       desc="Per-example gradients" if per_example else "Group gradients",
                       unit="row")
        grads = None if store else torch.zeros(len(plan.group_ids), self.dim, dtype=self.dtype,
                                               device=self.device)
        with self.attribution_mode(), collector:
            for s in todo:
                block = self._shard(features, plan, plan.shards[s], self._row_fn(fn),
                                    collector, per_example, bar)
                if store is not None:
                    store.write_shard(s, block)
                else:
                    assert grads is not None  # no store: the in-memory matrix
                    grads[plan.shards[s][0]:plan.shards[s][1]] = block
        bar.close()
        fresh = len(missing) == len(plan.shards)  # the same on every process
        for tap in taps:
            tap.finish()
        barrier()
        if store is not None:
            if rank == 0:
                store.mark_complete()
            barrier()
            request, writer = store.request, store
            store = GradientStore.open(store.path, expect_request=request)
            store.adopt_verified(writer)
            if not keep:
                return GroupGradients(
                    torch.zeros(0, self.dim, dtype=self.dtype, device=self.device),
                    plan.group_ids, np.diff(plan.ptr), fp, fresh,
                    {"store": store, "device": self.device})
            grads = store.load(self.device).to(self.dtype)
        else:
            assert grads is not None
            grads = all_reduce_sum(grads)  # each group was computed by exactly one process
        return GroupGradients(grads, plan.group_ids, np.diff(plan.ptr), fp, fresh)

    def _open_store(self, store_path: Optional[str], fp: dict[str, Any], plan: _Plan,
                    overwrite: bool, rank: int) -> Optional[GradientStore]:
        """Create/resume the store; the main process writes the manifest, others wait."""
        if store_path is None:
            return None
        # every process runs the same read-only check first, so a mismatch raises everywhere
        store = GradientStore.create(store_path, fp, plan.group_ids, plan.shards, self.dim,
                                     self.store_dtype, overwrite=overwrite, write=False)
        if rank == 0:
            store = GradientStore.create(store_path, fp, plan.group_ids, plan.shards, self.dim,
                                         self.store_dtype, overwrite=overwrite)
        barrier()
        if rank != 0:
            store = GradientStore.create(store_path, fp, plan.group_ids, plan.shards, self.dim,
                                         self.store_dtype, overwrite=False, write=False)
        return store

    def collate_rows(self, features: Dataset, rows: Sequence[int]) -> Batch:
        """Collate the given rows of prepared ``features`` into a batch on the model's device."""
        cols = features[list(rows)] if len(rows) > 1 else \
            {k: [v] for k, v in features[int(rows[0])].items()}
        return {k: v.to(self.device) for k, v in self.task.collate(cols).items()}

    def _shard(self, features: Dataset, plan: _Plan, bounds: tuple[int, int], row_fn: Callable,
               collector: GradientCollector, per_example: bool, bar: Any) -> torch.Tensor:
        g0, g1 = bounds
        r0, r1 = int(plan.ptr[g0]), int(plan.ptr[g1])
        out = torch.zeros(g1 - g0, self.collect_dim, dtype=self.dtype, device=self.device)
        bs = self.config.batch_size
        for start in range(r0, r1, bs):
            rows = plan.order[start:min(start + bs, r1)]
            batch = self.collate_rows(features, rows.tolist())
            collector.reset()
            losses = row_fn(self.model, batch)
            if losses.dim() != 1 or losses.shape[0] != len(rows):
                raise ValueError(
                    f"The task must return one loss per row, shape ({len(rows)},), got "
                    f"{tuple(losses.shape)}. Never return the batch-mean `.loss` of a "
                    "Hugging Face model: compute per-row losses (reduction='none').")
            bad = ~torch.isfinite(losses.detach())
            if bad.any():
                raise NonFiniteError("loss", rows[bad.cpu().numpy()].tolist())
            slots = torch.as_tensor(plan.slot[start:start + len(rows)] - g0)
            collector.backward(losses, slots, out, per_example=per_example, batch=batch,
                               rows=rows.tolist())
            bar.update(len(rows))
        bad_rows = ~torch.isfinite(out).all(1)
        if bad_rows.any():
            groups = [plan.group_ids[g0 + int(k)] for k in torch.nonzero(bad_rows).flatten()]
            raise NonFiniteError(f"gradient (groups {groups[:10]})",
                                 [int(r) for g in torch.nonzero(bad_rows).flatten()
                                  for r in plan.order[plan.ptr[g0 + int(g)]:
                                                      plan.ptr[g0 + int(g) + 1]]])
        return self.finish_block(out)
