"""Features for k-means grouping, each computed as a ``Dataset.map`` column.

Every map gets an explicit ``new_fingerprint`` = hash(dataset fingerprint, feature settings,
model weights and task when a model is used), so a second run with the same model and settings
is a datasets cache hit (on datasets backed by cache files, or with ``cache_dir``) and a changed
weight is not.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp
import torch
from datasets import Dataset, Value

from ..errors import ColumnTypeError
from ..fingerprint import hash_json
from ..gradients.projection import RandomProjector
from ..logging import get_logger
from ..tasks import AttributionTask

logger = get_logger(__name__)

#: Dense feature column written by the feature maps.
FEATURE_COLUMN = "__ggda_feature__"
#: Sparse feature columns (hashed term counts): indices and values.
INDEX_COLUMN = "__ggda_feature_idx__"
VALUE_COLUMN = "__ggda_feature_val__"
_VERSION = "features-v1"

#: Largest un-projected output-gradient feature allowed (floats per row).
MAX_DENSE_DIM = 1 << 22


def feature_fingerprint(dataset: Dataset, settings: dict[str, Any],
                        context: Optional[dict[str, Any]] = None) -> str:
    """Fingerprint of a feature map: dataset + feature settings + model/task hashes."""
    return hash_json([dataset._fingerprint, settings, context or {}, _VERSION])


def run_feature_map(dataset: Dataset, fn: Callable[..., dict[str, Any]], fingerprint: str,
                    input_columns: Optional[Sequence[str]] = None, batch_size: int = 1000,
                    num_proc: Optional[int] = None, cache_dir: Optional[str] = None,
                    desc: str = "Grouping features") -> Dataset:
    """Run ``fn`` with ``Dataset.map(batched=True)`` keeping only the columns it returns.

    Args:
        dataset: Input rows.
        fn: Batched function of the ``input_columns`` (or of the batch).
        fingerprint: ``new_fingerprint`` of the result (names its cache file).
        input_columns: Columns passed to ``fn`` positionally (None: the whole batch).
        batch_size: Rows per call.
        num_proc: Processes.
        cache_dir: Folder for the cache file ``ggda-features-<fingerprint>.arrow`` (default:
            the datasets cache next to the dataset's files, none for in-memory datasets).
        desc: Progress bar text.

    Returns:
        A dataset holding only the feature columns.
    """
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"ggda-features-{fingerprint}.arrow")
    return dataset.map(fn, batched=True, batch_size=batch_size,
                       input_columns=list(input_columns) if input_columns else None,
                       remove_columns=dataset.column_names, new_fingerprint=fingerprint,
                       cache_file_name=cache_file, num_proc=num_proc, desc=desc)


def dense_matrix(features: Dataset, column: str = FEATURE_COLUMN) -> np.ndarray:
    """Read a fixed-length list column as an (n, d) float array.

    Raises:
        ColumnTypeError: Rows have different lengths.
    """
    arr = features.with_format("arrow")[:][column].combine_chunks()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = np.flatnonzero(lengths != lengths[0])[:10].tolist()
        raise ColumnTypeError(f"Feature vectors differ in length (row 0 has {lengths[0]}, rows "
                              f"{bad} do not); flattened tensor columns must have one shape.")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(lengths), -1 if len(lengths) and lengths[0] else 0)


def sparse_matrix(features: Dataset, dim: int) -> sp.csr_matrix:
    """Read the sparse (index, value) feature columns as an (n, dim) CSR matrix."""
    tbl = features.with_format("arrow")[:]
    idx = tbl[INDEX_COLUMN].combine_chunks()
    val = tbl[VALUE_COLUMN].combine_chunks()
    lengths = pc.list_value_length(idx).to_numpy(zero_copy_only=False)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    return sp.csr_matrix((val.flatten().to_numpy(zero_copy_only=False).astype(np.float64),
                          idx.flatten().to_numpy(zero_copy_only=False), indptr),
                         shape=(len(lengths), dim))


def is_text_feature(feature: Any) -> bool:
    """True for a string column."""
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def hashed_counts_fn(n_features: int, ngram_max: int,
                     lowercase: bool) -> Callable[..., dict[str, Any]]:
    """Batched map function: hashed term counts of the text columns (joined by spaces)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=n_features, alternate_sign=False, norm=None,
                                   lowercase=lowercase, ngram_range=(1, ngram_max))

    def fn(*columns: list[Any]) -> dict[str, Any]:
        texts = [" ".join(parts) for parts in zip(*columns)]
        counts = vectorizer.transform(texts).tocsr()
        counts.sort_indices()
        return {INDEX_COLUMN: [counts.indices[a:b].astype(np.int32)
                               for a, b in zip(counts.indptr[:-1], counts.indptr[1:])],
                VALUE_COLUMN: [counts.data[a:b].astype(np.float32)
                               for a, b in zip(counts.indptr[:-1], counts.indptr[1:])]}

    return fn


def flatten_fn(columns: Sequence[str]) -> Callable[..., dict[str, Any]]:
    """Batched map function: each row's tensor/list/number columns flattened and concatenated."""
    names = list(columns)

    def fn(*values: list[Any]) -> dict[str, Any]:
        out = []
        for row in zip(*values):
            parts = []
            for name, v in zip(names, row):
                try:
                    parts.append(np.asarray(v, dtype=np.float32).reshape(-1))
                except (TypeError, ValueError) as err:
                    raise ColumnTypeError(f"Column {name!r} holds values that are not numbers "
                                          f"or (ragged-free) tensors: {err}") from err
            out.append(np.concatenate(parts))
        return {FEATURE_COLUMN: out}

    return fn


class OutputGradientProjector:
    """Projects output gradients err ⊗ feats (the head-weight gradient) to fixed-size features.

    For a row with errors e_t (C values per token t) and head inputs a_t (h values, with a 1
    appended when ``bias``), the head-weight gradient is G = Σ_t e_t a_tᵀ (C × h). The feature
    is ``"none"``: vec(G); ``"dense"``: a seeded random projection Pᵀ vec(G) (p values);
    ``"factorised"``: vec(P1ᵀ G P2) = Σ_t (P1ᵀ e_t) ⊗ (P2ᵀ a_t) (p1·p2 values, never forming G),
    with P1 (C × p1) and P2 (h × p2) seeded; a factor whose p >= its input size is the identity.
    ``"auto"`` is ``"factorised"`` for per-token errors (causal LM), else ``"dense"`` when
    C·h > ``projection_dim`` and ``"none"`` otherwise.

    Args:
        mode: ``"auto"``, ``"none"``, ``"dense"`` or ``"factorised"``.
        projection_dim: p of the dense projection.
        err_dim: p1 of the factorised projection.
        feat_dim: p2 of the factorised projection.
        kind: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection seed.
        bias: Append a 1 to the head inputs (bias gradient).

    Raises:
        ValueError: Unknown mode, or an un-projected feature would be too large.
    """

    def __init__(self, mode: str = "auto", projection_dim: int = 512, err_dim: int = 32,
                 feat_dim: int = 32, kind: str = "rademacher", seed: int = 0,
                 bias: bool = True) -> None:
        if mode not in ("auto", "none", "dense", "factorised"):
            raise ValueError(f"projection must be 'auto', 'none', 'dense' or 'factorised', got "
                             f"{mode!r}.")
        self.mode, self.projection_dim, self.err_dim, self.feat_dim = (mode, projection_dim,
                                                                        err_dim, feat_dim)
        self.kind, self.seed, self.bias = kind, seed, bias
        self._projectors: dict[str, RandomProjector] = {}

    def _projector(self, key: str, dim_in: int, dim_out: int, seed: int) -> RandomProjector:
        proj = self._projectors.get(key)
        if proj is None or proj.dim_in != dim_in:
            proj = RandomProjector(dim_in, dim_out, self.kind, seed)
            self._projectors[key] = proj
        return proj

    def resolve(self, err: torch.Tensor, feats: torch.Tensor) -> str:
        """Return the concrete mode for these shapes."""
        if self.mode != "auto":
            return self.mode
        if err.dim() == 3:
            return "factorised"
        full = err.shape[-1] * (feats.shape[-1] + int(self.bias))
        return "dense" if full > self.projection_dim else "none"

    def __call__(self, err: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Return (B, p) features from err (B, C) or (B, T, C) and feats (B, h) or (B, T, h)."""
        mode = self.resolve(err, feats)
        err = err.float()
        feats = feats.float()
        if self.bias:
            feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
        if err.dim() == 2:
            err, feats = err[:, None], feats[:, None]
        c, h = err.shape[-1], feats.shape[-1]
        if mode == "factorised":
            e = err if self.err_dim >= c else \
                self._projector("err", c, self.err_dim, self.seed).project(err)
            a = feats if self.feat_dim >= h else \
                self._projector("feat", h, self.feat_dim, self.seed + 1).project(feats)
            return torch.einsum("btp,btq->bpq", e, a).reshape(len(e), -1)
        if c * h > MAX_DENSE_DIM:
            raise ValueError(f"The output gradient has C*h = {c}*{h} = {c * h} entries per row; "
                             "use projection='factorised' (or 'auto').")
        full = torch.einsum("btc,bth->bch", err, feats).reshape(len(err), -1)
        if mode == "none":
            return full
        return self._projector("dense", c * h, self.projection_dim, self.seed).project(full)


def model_feature_fn(model: torch.nn.Module, task: AttributionTask, columns: Sequence[str],
                     compute: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                     parallel: bool) -> Callable[..., dict[str, Any]]:
    """Batched map function: collate prepared rows, run ``compute`` without gradients.

    Args:
        model: The model (already in eval mode).
        task: Collates the rows.
        columns: Prepared columns passed in, in order.
        compute: (model, batch) -> (B, d) features.
        parallel: The map runs in worker processes: limit torch to one thread in each (a
            forked worker otherwise deadlocks after the parent ran a forward pass).

    Returns:
        The map function.
    """
    names = list(columns)

    def fn(*values: list[Any]) -> dict[str, Any]:
        if parallel:
            torch.set_num_threads(1)
        device = next(model.parameters()).device
        batch = task.collate(dict(zip(names, values)))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = compute(model, batch)
        return {FEATURE_COLUMN: list(out.detach().float().cpu().numpy())}

    return fn
