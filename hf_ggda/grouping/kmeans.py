"""K-means groupers: on input features, on model representations, on output gradients.

All three compute their features as a ``Dataset.map`` column (cached by an explicit
fingerprint, see :mod:`hf_ggda.grouping.features`), then run scikit-learn K-means, optionally
within each label (``per_class``) and with balanced sizes or a size cap.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from datasets import Dataset

from ..errors import ColumnTypeError, GroupingError
from ..gradients.taps import OutputFeatureTap
from ..logging import get_logger
from ..params import find_head
from ..tasks import AttributionTask
from .base import Assignment, Grouper, GrouperConfig
from .clustering import fit_kmeans
from .features import (
    OutputGradientProjector,
    dense_matrix,
    feature_fingerprint,
    flatten_fn,
    hashed_counts_fn,
    is_text_feature,
    model_feature_fn,
    run_feature_map,
    sparse_matrix,
)
from .partition import allocate_groups, check_k_setting, check_num_groups, column_values, factorize
from .registry import register_grouper

logger = get_logger(__name__)

Matrix = Union[np.ndarray, sp.csr_matrix]
FeatureFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class KMeansConfig(GrouperConfig):
    """Settings shared by the K-means groupers.

    Attributes:
        num_groups: K.
        seed: ``random_state`` of K-means (and the projection seed of ``grad-kmeans``).
        n_init: K-means restarts (fixed, so results do not depend on sklearn defaults).
        max_iter: K-means iterations per restart.
        per_class: Cluster within each label; K split across labels (each >= 1).
        label_column: Label column for ``per_class``.
        allocation: How K is split across labels: ``"proportional"`` or ``"equal"``.
        balanced: Group sizes floor(n/K) or ceil(n/K) (within each label when per_class).
        max_size: Cap on group sizes (ignored when ``balanced``).
        normalize: L2-normalise features before K-means (cluster by direction).
        batch_size: Rows per feature-map call.
        cache_dir: Folder for feature cache files (lets in-memory datasets use the cache).
    """

    num_groups: int = field(default=8, metadata={"help": "Number of groups K."})
    seed: int = field(default=0, metadata={"help": "K-means random_state (and projection seed)."})
    n_init: int = field(default=4, metadata={"help": "K-means restarts (fixed)."})
    max_iter: int = field(default=300, metadata={"help": "K-means iterations per restart."})
    per_class: bool = field(default=False, metadata={
        "help": "Cluster within each label, K split across labels in proportion to size."})
    label_column: str = field(default="label", metadata={"help": "Label column (per_class)."})
    allocation: str = field(default="proportional", metadata={
        "help": "Split K across labels 'proportional'ly or 'equal'ly (per_class)."})
    balanced: bool = field(default=False, metadata={
        "help": "Equal group sizes (floor/ceil of n/K) by capacity-constrained reassignment."})
    max_size: Optional[int] = field(default=None, metadata={
        "help": "Largest allowed group (reassignment to the nearest non-full centroid)."})
    normalize: bool = field(default=False, metadata={
        "help": "L2-normalise the features before K-means."})
    batch_size: int = field(default=1000, metadata={"help": "Rows per feature-map batch."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Folder for the feature cache files (default: the datasets cache)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k_setting(self.num_groups)
        if self.n_init < 1 or self.max_iter < 1 or self.batch_size < 1:
            raise ValueError(f"n_init, max_iter and batch_size must be >= 1, got {self.n_init}, "
                             f"{self.max_iter}, {self.batch_size}.")
        if self.allocation not in ("proportional", "equal"):
            raise ValueError("allocation must be 'proportional' or 'equal', got "
                             f"{self.allocation!r}.")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be >= 1 or None, got {self.max_size}.")


class _KMeansGrouper(Grouper):
    """K-means on features from :meth:`_features` (per class, balanced or capped on request)."""

    config: KMeansConfig

    def required_columns(self) -> list[str]:
        return [self.config.label_column] if self.config.per_class else []

    @abstractmethod
    def _features(self, dataset: Dataset, model: Optional[torch.nn.Module],
                  task: Optional[AttributionTask], context: dict[str, Any]) -> Matrix:
        """Return (n, d) features, computed with Dataset.map."""

    def _cluster(self, x: Matrix, k: int) -> tuple[np.ndarray, float]:
        cfg = self.config
        res = fit_kmeans(x, k, seed=cfg.seed, n_init=cfg.n_init, max_iter=cfg.max_iter,
                         balanced=cfg.balanced, max_size=cfg.max_size,
                         normalize=cfg.normalize)
        return res.labels, res.inertia

    def _group(self, dataset: Dataset, model: Optional[torch.nn.Module],
               task: Optional[AttributionTask], context: dict[str, Any]) -> Assignment:
        cfg = self.config
        n = len(dataset)
        check_num_groups(cfg.num_groups, n)
        cap = cfg.max_size if not cfg.balanced else None
        if cap is not None and cfg.num_groups * cap < n:
            raise GroupingError(f"max_size={cfg.max_size} x K={cfg.num_groups} groups cannot "
                                f"hold n={n} rows; raise max_size or num_groups.")
        if cfg.per_class:
            classes, inverse = factorize(column_values(dataset, cfg.label_column),
                                        cfg.label_column)
            counts = np.bincount(inverse, minlength=len(classes))
            shares = allocate_groups({i: int(c) for i, c in enumerate(counts)}, cfg.num_groups,
                                     cfg.allocation, what="label")
            if cap is not None:
                for i, c in enumerate(classes):
                    if shares[i] * cap < counts[i]:
                        raise GroupingError(
                            f"Label {c!r} has {counts[i]} rows but gets {shares[i]} of the "
                            f"K={cfg.num_groups} groups (n={n}); max_size={cfg.max_size} "
                            "cannot hold them. Raise max_size or num_groups.")
        x = self._features(dataset, model, task, context)
        if x.shape[0] != n:
            raise RuntimeError(f"Internal error: {x.shape[0]} feature rows for {n} rows.")
        extra: dict[str, Any] = {"feature_dim": int(x.shape[1])}
        if not cfg.per_class:
            ids, inertia = self._cluster(x, cfg.num_groups)
            extra["inertia"] = inertia
            return Assignment(ids, cfg.num_groups, extra)
        ids = np.empty(n, dtype=np.int64)
        class_of_group: dict[int, Any] = {}
        inertia, offset = 0.0, 0
        for ci, value in enumerate(classes):
            rows = np.flatnonzero(inverse == ci)
            labels, part = self._cluster(x[rows], shares[ci])
            ids[rows] = offset + labels
            class_of_group.update({offset + j: value for j in range(shares[ci])})
            inertia += part
            offset += shares[ci]
        extra.update(inertia=inertia, class_of_group=class_of_group,
                     groups_per_class={classes[i]: s for i, s in shares.items()})
        return Assignment(ids, cfg.num_groups, extra)


@dataclass
class KMeansInputConfig(KMeansConfig):
    """Settings of :class:`KMeansInputGrouper`.

    Attributes:
        columns: Input columns: text columns (joined) or number/list/tensor columns (flattened
            and concatenated); not a mix.
        vectorizer: Text weighting: ``"tfidf"`` or ``"hashing"`` (L2-normalised term counts).
        n_features: Hashing dimension of the text vectoriser.
        ngram_max: Largest word n-gram.
        lowercase: Lowercase texts.
    """

    columns: tuple[str, ...] = field(default=("text",), metadata={
        "help": "Input columns (text, or tensors/lists/numbers flattened)."})
    vectorizer: str = field(default="tfidf", metadata={"help": "'tfidf' or 'hashing' (text)."})
    n_features: int = field(default=1 << 16, metadata={"help": "Hashed text dimensions."})
    ngram_max: int = field(default=1, metadata={"help": "Largest word n-gram (text)."})
    lowercase: bool = field(default=True, metadata={"help": "Lowercase texts."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.columns, str):
            self.columns = (self.columns,)
        self.columns = tuple(self.columns)
        if not self.columns:
            raise ValueError("columns must name at least one input column.")
        if self.vectorizer not in ("tfidf", "hashing"):
            raise ValueError(f"vectorizer must be 'tfidf' or 'hashing', got {self.vectorizer!r}.")
        if self.n_features < 1 or self.ngram_max < 1:
            raise ValueError("n_features and ngram_max must be >= 1.")


class KMeansInputGrouper(_KMeansGrouper):
    """K-means on input features: TF-IDF / hashed text, or flattened tensor columns."""

    name = "kmeans-input"
    config_class = KMeansInputConfig
    config: KMeansInputConfig

    def required_columns(self) -> list[str]:
        return list(self.config.columns) + super().required_columns()

    def _features(self, dataset: Dataset, model: Optional[torch.nn.Module],
                  task: Optional[AttributionTask], context: dict[str, Any]) -> Matrix:
        cfg = self.config
        text = [is_text_feature(dataset.features[c]) for c in cfg.columns]
        if any(text) and not all(text):
            raise ColumnTypeError(
                f"kmeans-input columns {list(cfg.columns)} mix text and non-text columns; "
                "group on text columns or on numeric/tensor columns, not both.")
        if all(text):
            settings = {"kind": "hashed-counts", "columns": list(cfg.columns),
                        "n_features": cfg.n_features, "ngram_max": cfg.ngram_max,
                        "lowercase": cfg.lowercase}
            fn = hashed_counts_fn(cfg.n_features, cfg.ngram_max, cfg.lowercase)
        else:
            settings = {"kind": "flatten", "columns": list(cfg.columns)}
            fn = flatten_fn(cfg.columns)
        feats = run_feature_map(dataset, fn, feature_fingerprint(dataset, settings),
                                input_columns=cfg.columns, batch_size=cfg.batch_size,
                                num_proc=cfg.num_proc, cache_dir=cfg.cache_dir,
                                desc="Input features for k-means")
        if not all(text):
            return dense_matrix(feats)
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.preprocessing import normalize

        counts = sparse_matrix(feats, cfg.n_features)
        if cfg.vectorizer == "tfidf":
            return TfidfTransformer().fit_transform(counts).tocsr()
        return normalize(counts).tocsr()


@dataclass
class ModelKMeansConfig(KMeansConfig):
    """Settings shared by the model-based K-means groupers.

    Attributes:
        hash_params: Weights hashed in full for the feature fingerprint: ``"all"`` or
            ``"trainable"`` (the rest by strided sample).
    """

    batch_size: int = field(default=32, metadata={"help": "Rows per forward pass."})
    hash_params: str = field(default="all", metadata={
        "help": "Fingerprint hashes 'all' weights in full, or only the 'trainable' ones."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hash_params not in ("all", "trainable"):
            raise ValueError(f"hash_params must be 'all' or 'trainable', got "
                             f"{self.hash_params!r}.")


class _ModelKMeansGrouper(_KMeansGrouper):
    """Features from forward passes of the model over ``task.prepare``d rows."""

    uses_model = True
    config: ModelKMeansConfig

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """Settings that change the features (fingerprint)."""

    @abstractmethod
    def _compute(self, task: AttributionTask) -> FeatureFn:
        """Return a (model, batch) -> (B, d) function (run under torch.no_grad)."""

    def _features(self, dataset: Dataset, model: Optional[torch.nn.Module],
                  task: Optional[AttributionTask], context: dict[str, Any]) -> Matrix:
        assert model is not None and task is not None
        cfg = self.config
        prepared = task.prepare(dataset)
        task.validate(prepared, model)  # labels vs head, ids vs embeddings: before any pass
        columns = [c for c in task.feature_columns if c in prepared.column_names]
        parallel = (cfg.num_proc or 1) > 1
        fn = model_feature_fn(model, task, columns, self._compute(task), parallel)
        fp = feature_fingerprint(dataset, self._settings(), context)
        was_training, threads = model.training, torch.get_num_threads()
        model.eval()
        try:
            feats = run_feature_map(prepared, fn, fp, input_columns=columns,
                                    batch_size=cfg.batch_size, num_proc=cfg.num_proc,
                                    cache_dir=cfg.cache_dir, desc=f"{self.name} features")
        finally:
            model.train(was_training)
            torch.set_num_threads(threads)
        return dense_matrix(feats)


class KMeansReprGrouper(_ModelKMeansGrouper):
    """K-means on the model's pooled hidden states (``task.embed``)."""

    name = "kmeans-repr"
    config_class = ModelKMeansConfig

    def _settings(self) -> dict[str, Any]:
        return {"kind": "embed"}

    def _compute(self, task: AttributionTask) -> FeatureFn:
        def compute(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return task.embed(model, batch)
        return compute


@dataclass
class GradKMeansConfig(ModelKMeansConfig):
    """Settings of :class:`GradKMeansGrouper` (see :class:`OutputGradientProjector`).

    Attributes:
        projection: ``"auto"``, ``"none"``, ``"dense"`` or ``"factorised"``.
        projection_dim: Dense projection dimension p.
        err_dim: Factorised projection of the output errors, p1.
        feat_dim: Factorised projection of the head inputs, p2.
        projection_kind: ``"rademacher"`` or ``"gaussian"``.
        bias: Append a 1 to the head inputs (include the bias gradient).
    """

    projection: str = field(default="auto", metadata={
        "help": "'auto', 'none', 'dense' (p = projection_dim) or 'factorised' (p1*p2)."})
    projection_dim: int = field(default=512, metadata={"help": "Dense projection dimension."})
    err_dim: int = field(default=32, metadata={"help": "Factorised: output-error dimension."})
    feat_dim: int = field(default=32, metadata={"help": "Factorised: head-input dimension."})
    projection_kind: str = field(default="rademacher", metadata={
        "help": "'rademacher' or 'gaussian'."})
    bias: bool = field(default=True, metadata={"help": "Append 1 to the head inputs (bias)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection not in ("auto", "none", "dense", "factorised"):
            raise ValueError("projection must be 'auto', 'none', 'dense' or 'factorised', got "
                             f"{self.projection!r}.")
        if min(self.projection_dim, self.err_dim, self.feat_dim) < 1:
            raise ValueError("projection_dim, err_dim and feat_dim must be >= 1.")
        if self.projection_kind not in ("rademacher", "gaussian"):
            raise ValueError("projection_kind must be 'rademacher' or 'gaussian', got "
                             f"{self.projection_kind!r}.")


class GradKMeansGrouper(_ModelKMeansGrouper):
    """Grad-K-Means (the GGDA paper's best): K-means on projected output gradients.

    Each row's feature is its gradient with respect to the model's output layer weights,
    err ⊗ feats from ``task.output_gradient`` (classifier: (softmax - onehot) ⊗ penultimate
    features; causal LM: summed over target tokens), randomly projected and seeded. Forward
    passes only.
    """

    name = "grad-kmeans"
    config_class = GradKMeansConfig
    config: GradKMeansConfig
    accepts_pass_features = True

    def _projector(self) -> OutputGradientProjector:
        cfg = self.config
        return OutputGradientProjector(cfg.projection, cfg.projection_dim, cfg.err_dim,
                                       cfg.feat_dim, cfg.projection_kind, cfg.seed, cfg.bias)

    def pass_tap(self, model: torch.nn.Module, task: AttributionTask, num_rows: int,
                 sign: float = 1.0) -> OutputFeatureTap:
        """A tap that takes this grouper's features from an attribution pass's output-layer
        (input, output-gradient) pairs, equal to those of :meth:`assign` with a model.

        Args:
            model: The model.
            task: The task (its loss must be the one the pass differentiates, up to ``sign``).
            num_rows: Rows of the dataset the pass runs over.
            sign: See :class:`~hf_ggda.gradients.taps.OutputFeatureTap`.

        Returns:
            The tap; pass ``tap.matrix()`` to ``assign(dataset, features=...)``.

        Raises:
            ValueError: The model's output layer cannot be found.
        """
        return OutputFeatureTap(find_head(model), self._projector(), num_rows, sign)

    def _features(self, dataset: Dataset, model: Optional[torch.nn.Module],
                  task: Optional[AttributionTask], context: dict[str, Any]) -> Matrix:
        if self._pass_features is not None:
            return np.asarray(self._pass_features, dtype=np.float32)
        return super()._features(dataset, model, task, context)

    def _settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"kind": "output-gradient", "projection": cfg.projection,
                "projection_dim": cfg.projection_dim, "err_dim": cfg.err_dim,
                "feat_dim": cfg.feat_dim, "projection_kind": cfg.projection_kind,
                "bias": cfg.bias, "seed": cfg.seed}

    def _compute(self, task: AttributionTask) -> FeatureFn:
        project = self._projector()

        def compute(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            err, feats = task.output_gradient(model, batch)
            return project(err, feats)
        return compute


register_grouper(KMeansInputGrouper)
register_grouper(KMeansReprGrouper)
register_grouper(GradKMeansGrouper)
