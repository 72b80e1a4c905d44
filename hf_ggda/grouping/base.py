"""The :class:`Grouper` interface and the helpers every grouper shares.

A grouper reads a :class:`datasets.Dataset` and returns the same rows with an integer
``group_id`` column (:data:`hf_ggda.tasks.GROUP_COLUMN`) holding ids ``0..K-1``, every id used.
The column is written with ``Dataset.map`` under an explicit fingerprint (dataset + grouper
config + model weights when a model is used), so the datasets cache applies to it and to the
features the grouper computes on the way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch
from datasets import Dataset, Features, Value

from ..config import ConfigMixin
from ..errors import NotFittedError
from ..fingerprint import hash_array, hash_json, hash_model
from ..logging import get_logger
from ..tasks import GROUP_COLUMN, AttributionTask, check_columns
from .coherence import CoherenceResult, group_coherence

if TYPE_CHECKING:  # pragma: no cover
    from ..gradients import GradientEngine

logger = get_logger(__name__)

#: Bump when the meaning of a written ``group_id`` column changes.
_ASSIGN_VERSION = "group-column-v1"


@dataclass
class GrouperConfig(ConfigMixin):
    """Settings shared by every grouper.

    Attributes:
        num_proc: Processes for the ``Dataset.map`` calls (None: in this process).
    """

    #: Fields that do not change the groups (left out of fingerprints).
    runtime_fields: ClassVar[tuple[str, ...]] = ("num_proc", "batch_size", "cache_dir")

    num_proc: Optional[int] = field(
        default=None, metadata={"help": "Processes for Dataset.map (None = this process only)."})

    def __post_init__(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 or None, got {self.num_proc}.")

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that change the groups (fingerprints)."""
        return {k: v for k, v in asdict(self).items() if k not in self.runtime_fields}


def write_group_column(dataset: Dataset, ids: np.ndarray, fingerprint: str,
                       num_proc: Optional[int] = None) -> Dataset:
    """Return ``dataset`` with ``group_id`` = ``ids`` (replacing an existing column), via map.

    Args:
        dataset: The rows.
        ids: (n,) integer group id of each row, by position.
        fingerprint: The ``new_fingerprint`` of the result.
        num_proc: Processes for the map.

    Returns:
        The same rows with an int64 ``group_id`` column as the last column.

    Raises:
        ValueError: ``ids`` does not have one entry per row.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(dataset),):
        raise ValueError(f"Expected {len(dataset)} group ids, got shape {ids.shape}.")
    keep = {k: v for k, v in dataset.features.items() if k != GROUP_COLUMN}
    features = Features({**keep, GROUP_COLUMN: Value("int64")})
    remove = [GROUP_COLUMN] if GROUP_COLUMN in dataset.column_names else None

    def fn(batch: Any, indices: list[int]) -> dict[str, Any]:
        return {GROUP_COLUMN: ids[np.asarray(indices, dtype=np.int64)]}

    return dataset.map(fn, batched=True, with_indices=True, remove_columns=remove,
                       features=features, new_fingerprint=fingerprint, num_proc=num_proc,
                       desc=f"Writing {GROUP_COLUMN}")


def model_weights_hash(model: torch.nn.Module, params: str = "all") -> str:
    """Hash a model's weights for feature fingerprints.

    Args:
        model: The model.
        params: ``"all"`` (every parameter and buffer hashed in full, the default) or
            ``"trainable"`` (an opt-in shortcut: trainable ones in full, frozen ones by a
            strided sample, so an edit of a frozen weight can go unseen).

    Returns:
        A digest that changes when any hashed-in-full weight changes.

    Raises:
        ValueError: Unknown ``params``.
    """
    if params == "all":
        return hash_model(model)
    if params == "trainable":
        return hash_model(model, [n for n, p in model.named_parameters() if not p.requires_grad])
    raise ValueError(f"params must be 'all' or 'trainable', got {params!r}.")


@dataclass
class Assignment:
    """What a grouper computed: ids plus grouper-specific details.

    Attributes:
        ids: (n,) group id of each row, values 0..K-1, all used.
        num_groups: K.
        extra: JSON-friendly details for :meth:`Grouper.describe`.
    """

    ids: np.ndarray
    num_groups: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupingReport:
    """Sizes and quality figures of an assignment.

    Attributes:
        grouper: Registry name of the grouper.
        config: Its configuration.
        num_rows: n.
        num_groups: K.
        sizes: Size of group k at index k.
        size_min: Smallest group.
        size_median: Median group size.
        size_max: Largest group.
        size_mean: n / K.
        size_counts: Histogram: group size -> how many groups have it.
        fingerprint: Fingerprint of the dataset with the ``group_id`` column.
        extra: Grouper-specific details (id -> value mapping, class of each group, inertia...).
        coherence: Within-group gradient coherence, when an engine was given.
    """

    grouper: str
    config: dict[str, Any]
    num_rows: int
    num_groups: int
    sizes: list[int]
    size_min: int
    size_median: float
    size_max: int
    size_mean: float
    size_counts: dict[int, int]
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    coherence: Optional[CoherenceResult] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        out = asdict(self)
        out["coherence"] = self.coherence.to_dict() if self.coherence else None
        return out

    def __str__(self) -> str:
        text = (f"{self.grouper}: n={self.num_rows}, K={self.num_groups}, sizes "
                f"min/median/max = {self.size_min}/{self.size_median:g}/{self.size_max}")
        if self.coherence is not None:
            text += f", coherence = {self.coherence.mean:.4f}"
        return text


def size_report(ids: np.ndarray, k: int) -> dict[str, Any]:
    """Return the size fields of a :class:`GroupingReport` for ids in 0..K-1."""
    sizes = np.bincount(ids, minlength=k)
    uniq, counts = np.unique(sizes, return_counts=True)
    return {"sizes": sizes.tolist(), "size_min": int(sizes.min()),
            "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
            "size_mean": float(sizes.mean()),
            "size_counts": {int(s): int(c) for s, c in zip(uniq, counts)}}


def skew_warning(sizes: np.ndarray, can_balance: bool = True) -> Optional[str]:
    """A warning with the fix when group sizes are too uneven to compare groups, else None.

    Groups are "too uneven" when, with K >= 4, the largest group holds more than four times
    the mean size or the median group less than a quarter of it (e.g. one group of 182 rows
    beside singletons): group scores then mostly measure size.

    Args:
        sizes: (K,) group sizes.
        can_balance: Whether the grouper has ``balanced`` / ``max_size`` settings.
    """
    k = len(sizes)
    if k < 4 or not sizes.sum():
        return None
    mean = float(sizes.mean())
    if sizes.max() <= 4 * mean and np.median(sizes) >= mean / 4:
        return None
    share = float(sizes.max()) / float(sizes.sum())
    fix = ("set balanced=True (CLI: --balanced) for sizes floor(n/K)..ceil(n/K), or "
           f"max_size={int(np.ceil(2 * mean))} (CLI: --max-size {int(np.ceil(2 * mean))}) to "
           "cap them" if can_balance else "use a grouping with more even sizes")
    return (f"group sizes are very uneven (min/median/max = {int(sizes.min())}/"
            f"{np.median(sizes):g}/{int(sizes.max())}, mean {mean:.3g}; the largest group holds "
            f"{100 * share:.0f}% of the rows, {int((sizes <= 2).sum())} groups hold <= 2): "
            f"group scores will mostly measure size. To fix: {fix}.")


class Grouper(ABC):
    """Partitions a dataset's rows into K groups, written as an integer ``group_id`` column.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`_group`.

    Args:
        config: The grouper's config (an instance of ``config_class``).
        **kwargs: Fields of ``config_class``, when ``config`` is not given.

    Raises:
        TypeError: ``config`` has the wrong type.
        ValueError: Both ``config`` and keyword settings were given.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[GrouperConfig]] = GrouperConfig
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Optional[GrouperConfig] = None, **kwargs: Any) -> None:
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise ValueError("Pass either a config or keyword settings, not both.")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}.")
        self.config = config
        self._result: Optional[Assignment] = None
        self._dataset: Optional[Dataset] = None
        self._pass_features: Optional[np.ndarray] = None

    # -- to implement --------------------------------------------------------------------------
    def required_columns(self) -> list[str]:
        """Columns the raw dataset must have."""
        return []

    @abstractmethod
    def _group(self, dataset: Dataset, model: Optional[torch.nn.Module],
               task: Optional[AttributionTask], context: dict[str, Any]) -> Assignment:
        """Compute the assignment; ``context`` holds the model/task hashes (model groupers)."""

    # -- public API ----------------------------------------------------------------------------
    #: Whether :meth:`assign` takes ``features=`` computed in the attribution pass (see
    #: :meth:`hf_ggda.attributors.Attributor.fit` with ``grouper=``).
    accepts_pass_features: ClassVar[bool] = False

    def assign(self, dataset: Dataset, model: Optional[torch.nn.Module] = None,
               task: Optional[AttributionTask] = None,
               features: Optional[np.ndarray] = None) -> Dataset:
        """Return ``dataset`` with an integer ``group_id`` column (replacing an existing one).

        Args:
            dataset: The rows to group.
            model: The model (groupers on representations / output gradients only).
            task: The :class:`~hf_ggda.tasks.AttributionTask` (model groupers only).
            features: (n, p) grouping features already computed (by the attribution pass),
                instead of a model and task (groupers with ``accepts_pass_features`` only).

        Returns:
            The same rows, in the same order, plus ``group_id`` with values 0..K-1, all used.

        Raises:
            EmptyDatasetError: The dataset has no rows.
            MissingColumnError: A column the config names is absent.
            GroupingError: K < 1, K > n, nulls in a group/label column, a class too small.
            ModelStateError: A model grouper got a model with weights on the ``meta`` device.
            LabelError: Labels that do not fit the model's head (model groupers).
            ValueError: A model grouper got no model or task; ``features`` given to a grouper
                that does not take them, or with the wrong number of rows.
        """
        if features is not None:
            if not self.accepts_pass_features:
                raise ValueError(f"Grouper {self.name!r} does not take precomputed features.")
            if len(features) != len(dataset):
                raise ValueError(f"features has {len(features)} rows, the dataset "
                                 f"{len(dataset)}.")
        elif self.uses_model and (model is None or task is None):
            raise ValueError(f"Grouper {self.name!r} computes features with the model: pass "
                             "assign(dataset, model=..., task=...).")
        check_columns(dataset, self.required_columns())
        context: dict[str, Any] = {}
        if features is not None:
            context = {"features": hash_array(np.ascontiguousarray(features))}
            self._pass_features = features
        elif self.uses_model:
            assert model is not None and task is not None
            task.check_model(model)  # weights on the meta device: refused before hashing them
            params = getattr(self.config, "hash_params", "all")
            context = {"model": model_weights_hash(model, params), "task": task.fingerprint()}
        try:
            result = self._group(dataset, model, task, context)
        finally:
            self._pass_features = None
        self._validate(result, len(dataset))
        fp = hash_json([dataset._fingerprint, self.name, self.config.fingerprint_dict(), context,
                        _ASSIGN_VERSION])
        out = write_group_column(dataset, result.ids, fp, self.config.num_proc)
        self._result, self._dataset = result, out
        sizes = np.bincount(result.ids, minlength=result.num_groups)
        logger.info("%s grouping: n=%d rows into K=%d groups (sizes %d..%d).", self.name,
                    len(dataset), result.num_groups, sizes.min(), sizes.max())
        warning = skew_warning(sizes, hasattr(self.config, "balanced"))
        if warning:
            logger.warning("%s grouping: %s", self.name, warning)
        return out

    def describe(self, engine: Optional["GradientEngine"] = None,
                 dataset: Optional[Dataset] = None, sample: Optional[int] = 256,
                 seed: int = 0, exclude_self: bool = False) -> GroupingReport:
        """Sizes and quality figures of the last :meth:`assign`.

        Args:
            engine: When given, the within-group gradient coherence is computed with it (see
                :func:`~hf_ggda.grouping.coherence.group_coherence`).
            dataset: The grouped dataset to measure coherence on (default: the output of the
                last :meth:`assign`).
            sample: Rows sampled for the coherence (None: all).
            seed: Seed of that sample.
            exclude_self: Compare each row with its group's sum *without* it.

        Returns:
            The report.

        Raises:
            NotFittedError: :meth:`assign` was never called.
        """
        if self._result is None or self._dataset is None:
            raise NotFittedError(f"Call {type(self).__name__}.assign(dataset) before describe().")
        res = self._result
        coherence = None
        if engine is not None:
            coherence = group_coherence(engine, dataset if dataset is not None else self._dataset,
                                        GROUP_COLUMN, sample=sample, seed=seed,
                                        exclude_self=exclude_self)
        return GroupingReport(grouper=self.name, config=self.config.to_dict(),
                              num_rows=len(res.ids), num_groups=res.num_groups,
                              fingerprint=self._dataset._fingerprint, extra=dict(res.extra),
                              coherence=coherence, **size_report(res.ids, res.num_groups))

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _validate(result: Assignment, n: int) -> None:
        ids, k = result.ids, result.num_groups
        if ids.shape != (n,) or (n and (ids.min() < 0 or ids.max() >= k)):
            raise RuntimeError(f"Internal error: group ids out of range 0..{k - 1}.")
        empty = np.flatnonzero(np.bincount(ids, minlength=k) == 0)
        if len(empty):
            raise RuntimeError(f"Internal error: groups {empty[:10].tolist()} are empty.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
