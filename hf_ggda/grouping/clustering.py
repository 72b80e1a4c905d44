"""K-means with exactly K non-empty clusters, optional balanced sizes or a size cap.

The clustering is scikit-learn's :class:`~sklearn.cluster.KMeans` (fixed ``n_init``,
``random_state=seed``). Size constraints are applied afterwards by capacity-constrained
reassignment: points, most "regretful" first (largest gap between their nearest and second
nearest centroid), go to their nearest centroid that still has room; centroids are then
recomputed as the means of their members and the step repeats until nothing moves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.preprocessing import normalize as l2_normalize

from ..errors import GroupingError
from ..logging import get_logger
from .partition import check_num_groups

logger = get_logger(__name__)

Matrix = Union[np.ndarray, sp.csr_matrix]

#: Rounds of capacity-constrained reassignment at most.
_MAX_ROUNDS = 30


@dataclass
class ClusterResult:
    """Labels 0..K-1 (all used, numbered by first occurrence) and the final inertia."""

    labels: np.ndarray
    inertia: float
    moved_to_fill: int = 0


def _centers(x: Matrix, labels: np.ndarray, k: int, old: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = onehot @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    counts = np.bincount(labels, minlength=k)
    out = old.copy()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def capped_assign(dist: np.ndarray, cap: Optional[int] = None,
                  balanced: bool = False) -> np.ndarray:
    """Assign points to their nearest centroid with room (greedy, most regretful point first).

    Args:
        dist: (n, K) squared distances.
        cap: Largest allowed cluster size (ignored when ``balanced``).
        balanced: Sizes must be floor(n/K) or ceil(n/K).

    Returns:
        (n,) labels.

    Raises:
        GroupingError: The capacity cannot hold n points.
    """
    n, k = dist.shape
    order = np.argsort(dist, axis=1, kind="stable")
    rows = np.arange(n)
    best = dist[rows, order[:, 0]]
    regret = (dist[rows, order[:, 1]] - best) if k > 1 else np.zeros(n)
    floor, extra = divmod(n, k)
    if not balanced:
        if cap is None or cap * k < n:
            raise GroupingError(f"A size cap of {cap} cannot hold n={n} rows in K={k} groups.")
    sizes = np.zeros(k, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    big = 0
    for i in np.argsort(-regret, kind="stable"):
        for c in order[i]:
            if balanced:
                room = sizes[c] < floor or (sizes[c] == floor and big < extra)
                if room and sizes[c] == floor:
                    big += 1
            else:
                room = sizes[c] < cap
            if room:
                labels[i] = c
                sizes[c] += 1
                break
    return labels


def _fill_empty(x: Matrix, labels: np.ndarray, centers: np.ndarray, k: int) -> int:
    """Give every empty cluster the point farthest from its centroid (in a cluster of >= 2)."""
    moved = 0
    while True:
        sizes = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(sizes == 0)
        if not len(empty):
            return moved
        dist = euclidean_distances(x, centers, squared=True)
        own = dist[np.arange(len(labels)), labels]
        own[sizes[labels] < 2] = -np.inf
        i = int(np.argmax(own))
        labels[i] = empty[0]
        row = x[i]
        centers[empty[0]] = row.toarray().ravel() if sp.issparse(row) else row
        moved += 1


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..K-1 by first occurrence (so ids do not depend on k-means' order)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def fit_kmeans(x: Matrix, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 300,
           balanced: bool = False, max_size: Optional[int] = None,
           normalize: bool = False) -> ClusterResult:
    """K-means into exactly K non-empty clusters.

    Args:
        x: (n, d) dense or CSR features.
        k: K.
        seed: ``random_state`` of :class:`sklearn.cluster.KMeans`.
        n_init: Its ``n_init``.
        max_iter: Its ``max_iter``.
        balanced: Make sizes floor(n/K) or ceil(n/K).
        max_size: Cap on cluster sizes (ignored when ``balanced``).
        normalize: L2-normalise rows first (clusters by direction).

    Returns:
        Labels and inertia.

    Raises:
        GroupingError: K < 1, K > n, or K * max_size < n.
    """
    n = x.shape[0]
    check_num_groups(k, n)
    if max_size is not None and not balanced and max_size * k < n:
        raise GroupingError(f"max_size={max_size} x K={k} groups cannot hold n={n} rows; raise "
                            f"max_size to at least {-(-n // k)} or use more groups.")
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
    else:
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise GroupingError(f"Features of {int((~np.isfinite(x).all(1)).sum())} rows are "
                                "NaN or infinite; check the model/inputs of those rows.")
    if normalize:
        x = l2_normalize(x)
    if k == 1:
        centers = _centers(x, np.zeros(n, dtype=np.int64), 1, np.zeros((1, x.shape[1])))
        return ClusterResult(np.zeros(n, dtype=np.int64),
                             float(euclidean_distances(x, centers, squared=True).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates: handled below
        km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)
    labels = km.labels_.astype(np.int64)
    centers = np.asarray(km.cluster_centers_, dtype=np.float64)
    if balanced or max_size is not None:
        for _ in range(_MAX_ROUNDS):
            dist = euclidean_distances(x, centers, squared=True)
            new = capped_assign(dist, max_size, balanced)
            centers = _centers(x, new, k, centers)
            if np.array_equal(new, labels):
                break
            labels = new
        else:
            logger.info("Size-constrained k-means stopped after %d rounds.", _MAX_ROUNDS)
    moved = _fill_empty(x, labels, centers, k)
    if moved:
        logger.warning("K-means left %d of K=%d clusters empty (duplicate rows?); each got the "
                       "point farthest from its centroid.", moved, k)
        centers = _centers(x, labels, k, centers)
    inertia = float(euclidean_distances(x, centers, squared=True)[np.arange(n), labels].sum())
    return ClusterResult(canonical_labels(labels), inertia, moved)
