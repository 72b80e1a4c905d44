"""Setting-independent machinery of the fidelity benchmark (group LDS and leave-one-group-out).

A :class:`FidelitySetting` owns a trained model, its training rows and the query rows, and
knows how to retrain on a subset of the training rows and measure the queries' losses. This
module draws the subsets, assigns the groups, runs the attribution methods and correlates
their predictions with the measured losses.

Sign. hf_ggda scores are positive when a group *helps* a query (removing it would raise the
query's loss). Keeping the subset S of groups therefore changes the query loss, relative to
some constant, by about −Σ_{G∈S} τ(G, q): the prediction Σ_{G∈S} τ(G, q) is correlated with
the *negated* measured loss (``group_lds`` with ``references_are_losses=True``). For leave-one-
group-out, τ(G, q) predicts loss(without G) − loss(full) directly (positive: G helped).

For a cross-entropy classifier, loss = softplus(−margin) is a strictly decreasing function of
the margin, so per-query Spearman correlations against the loss and against the margin are
the same number; only the loss is measured.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset

from hf_ggda.attributors import (TRAK, InfluenceConfig, InfluenceFunction, TracIn, TracInConfig,
                                 TRAKConfig)
from hf_ggda.attributors.base import Attributor
from hf_ggda.grouping import get_grouper
from hf_ggda.metrics import load_metric
from hf_ggda.tasks import GROUP_COLUMN, AttributionTask

#: Attribution methods of the grid (``if-exact`` needs a model small enough for the Hessian).
METHODS: tuple[str, ...] = ("tracin", "if-identity", "if-ekfac", "if-exact", "trak",
                            "if-ekfac-128", "if-identity-f16", "if-identity-f64",
                            "if-ekfac-f16", "if-ekfac-f64")
#: Run only when asked for (``--methods``): the exact Hessian, EK-FAC fitted on a seeded
#: sample of 128 training rows (``InfluenceConfig.curvature_rows``), and the factorised
#: projection at k = 16 / 64 per side (``-f16`` / ``-f64``, ``factorised_dim``).
OPT_IN_METHODS: tuple[str, ...] = ("if-exact", "if-ekfac-128", "if-identity-f16",
                                   "if-identity-f64", "if-ekfac-f16", "if-ekfac-f64")
#: Groupers of the grid.
GROUPINGS: tuple[str, ...] = ("random", "kmeans-repr", "grad-kmeans")

StateDict = dict[str, torch.Tensor]


@dataclass
class MethodOptions:
    """Settings of the attribution methods.

    Attributes:
        damping: λ of the influence preconditioners (the L2 coefficient of a regularised
            training objective makes (H + λI) its exact Hessian).
        trak_dim: TRAK projection dimension.
        trak_kernel: TRAK kernel: ``"group"``, ``"sample"`` or ``"exact"``.
        trak_damping: λ of the TRAK kernel.
        batch_size: Rows per gradient pass.
    """

    damping: float = 0.0
    trak_dim: int = 512
    trak_kernel: str = "exact"
    trak_damping: float = 0.0
    batch_size: int = 64


class FidelitySetting(ABC):
    """A trained model plus the means to retrain it on subsets.

    Attributes:
        name: ``"fast"`` or ``"real"``.
        model: The model trained on all training rows (what is attributed).
        task: Its attribution task.
        train: Training rows in model order (row i is training row i).
        queries: Query rows.
        checkpoints: Weights along the full training run, for TracIn (last = final model).
        learning_rates: TracIn weight of each checkpoint.
        options: Attribution settings.
        full_losses: (m,) query losses of ``model``.
    """

    name: str
    model: torch.nn.Module
    task: AttributionTask
    train: Dataset
    queries: Dataset
    checkpoints: list[StateDict]
    learning_rates: list[float]
    options: MethodOptions
    full_losses: np.ndarray

    @abstractmethod
    def retrain_losses(self, rows: np.ndarray) -> np.ndarray:
        """Retrain on the training rows ``rows`` and return the (m,) query losses."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings and training figures of this setting (JSON-friendly)."""

    def available_methods(self) -> list[str]:
        """Methods that run on this setting (default: all but :data:`OPT_IN_METHODS`)."""
        return [m for m in METHODS if m not in OPT_IN_METHODS]

    def grouper_options(self, grouping: str) -> dict[str, Any]:
        """Extra grouper settings (default: none)."""
        return {}


def build_attributor(setting: FidelitySetting, method: str) -> Attributor:
    """Build an unfitted attributor of ``method`` for the setting's trained model.

    Args:
        setting: The setting.
        method: One of :data:`METHODS`.

    Returns:
        The attributor.

    Raises:
        ValueError: Unknown method.
    """
    opts = setting.options
    model, task = setting.model, setting.task
    if method == "tracin":
        return TracIn(model, task, TracInConfig(learning_rates=list(setting.learning_rates),
                                                batch_size=opts.batch_size),
                      checkpoints=list(setting.checkpoints))
    if method == "if-ekfac-128":
        return InfluenceFunction(model, task, InfluenceConfig(
            preconditioner="ekfac", damping=opts.damping, batch_size=opts.batch_size,
            curvature_rows=128))
    if method.startswith("if-"):
        pre, _, k = method[3:].partition("-f")
        return InfluenceFunction(model, task, InfluenceConfig(
            preconditioner=pre, damping=opts.damping if pre != "identity" else 0.0,
            batch_size=opts.batch_size, factorised_dim=int(k) if k else None))
    if method == "trak":
        return TRAK(model, task, TRAKConfig(projection_dim=opts.trak_dim,
                                            kernel=opts.trak_kernel, damping=opts.trak_damping,
                                            batch_size=opts.batch_size))
    raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")


def attribute(setting: FidelitySetting, method: str, grouped: Dataset,
              num_groups: int) -> tuple[np.ndarray, float]:
    """Fit ``method`` on ``grouped`` and score the queries.

    Args:
        setting: The setting.
        method: The method.
        grouped: Training rows with a ``group_id`` column holding 0..K−1.
        num_groups: K.

    Returns:
        ((m, K) scores with column k = group k, seconds of fit + score).

    Raises:
        ValueError: The fitted group ids are not 0..K−1.
    """
    start = time.perf_counter()
    attributor = build_attributor(setting, method)
    attributor.fit(grouped, group_column=GROUP_COLUMN)
    scores = attributor.score(setting.queries)
    seconds = time.perf_counter() - start
    return ordered_matrix(scores.matrix, scores.group_ids, num_groups), seconds


def ordered_matrix(matrix: torch.Tensor, group_ids: Sequence[Any],
                   num_groups: int) -> np.ndarray:
    """Return the (m, K) matrix with its columns in group-id order 0..K−1.

    Raises:
        ValueError: The ids are not exactly 0..K−1.
    """
    ids = [int(g) for g in group_ids]
    if sorted(ids) != list(range(num_groups)):
        raise ValueError(f"Expected group ids 0..{num_groups - 1}, got {len(ids)} ids.")
    order = np.argsort(ids)
    return matrix.detach().cpu().double().numpy()[:, order]


def assign_groups(setting: FidelitySetting, grouping: str, num_groups: int,
                  seed: int, balanced: bool = False) -> tuple[np.ndarray, float]:
    """Group the training rows with a registered grouper.

    Args:
        setting: The setting (its trained model and task feed the model-based groupers).
        grouping: ``"random"``, ``"kmeans-repr"`` or ``"grad-kmeans"`` (or any registered name).
        num_groups: K.
        seed: Grouper seed.
        balanced: K-means groupers make equal-size groups (⌊n/K⌋ or ⌈n/K⌉ rows).

    Returns:
        ((n,) group id of each training row, seconds).
    """
    start = time.perf_counter()
    options = setting.grouper_options(grouping)
    if balanced and "kmeans" in grouping:
        options["balanced"] = True
    grouper = get_grouper(grouping, num_groups=num_groups, seed=seed, **options)
    data = setting.train.remove_columns([c for c in (GROUP_COLUMN,)
                                         if c in setting.train.column_names])
    grouped = grouper.assign(data, model=setting.model, task=setting.task) \
        if grouper.uses_model else grouper.assign(data)
    return np.asarray(grouped[GROUP_COLUMN], dtype=np.int64), time.perf_counter() - start


def with_groups(train: Dataset, ids: np.ndarray) -> Dataset:
    """Return ``train`` with ``group_id`` = ``ids``."""
    if GROUP_COLUMN in train.column_names:
        train = train.remove_columns(GROUP_COLUMN)
    return train.add_column(GROUP_COLUMN, [int(i) for i in ids])


def draw_subsets(num_groups: int, num_subsets: int, seed: int) -> np.ndarray:
    """Draw random subsets, each holding half of the groups (⌊K/2⌋, at least 1).

    Args:
        num_groups: K.
        num_subsets: M.
        seed: Seed.

    Returns:
        (M, K) boolean masks.
    """
    rng = np.random.default_rng(seed)
    keep = max(1, num_groups // 2)
    masks = np.zeros((num_subsets, num_groups), dtype=bool)
    for s in range(num_subsets):
        masks[s, rng.choice(num_groups, size=keep, replace=False)] = True
    return masks


def subset_rows(group_of_row: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Training rows whose group is kept by ``mask`` (sorted positions)."""
    return np.flatnonzero(mask[group_of_row])


def predict_subsets(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted subset scores Σ_{G∈S} τ(G, q).

    Args:
        scores: (m, K) group scores.
        masks: (M, K) kept groups.

    Returns:
        (m, M): higher = the subset is predicted to give the query a lower loss.
    """
    return scores @ masks.T.astype(scores.dtype)


def lds_of(metric: Any, predictions: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """Group LDS of (m, M) predictions against (M, m) measured losses.

    Returns:
        ``lds``, ``ci_low``, ``ci_high`` (95 %, normal, over queries), ``num_queries``.
    """
    out = metric.compute(predictions=predictions.tolist(), references=losses.T.tolist(),
                         references_are_losses=True)
    return {"lds": out["lds"], "ci_low": out["lds_ci_low"], "ci_high": out["lds_ci_high"],
            "num_queries": out["num_queries"]}


def logo_of(predicted: np.ndarray, deltas: np.ndarray) -> dict[str, float]:
    """Leave-one-group-out correlations over all (removed group, query) pairs.

    Args:
        predicted: (L, m) scores τ(G, q) of the removed groups.
        deltas: (L, m) measured loss(without G) − loss(full).

    Returns:
        ``spearman`` and ``pearson`` over the L·m pairs (NaN if either side is constant).
    """
    return correlations(predicted, deltas)


def correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of two arrays, flattened (NaN if either is constant
    or holds fewer than 3 values)."""
    from scipy.stats import pearsonr, spearmanr

    p, d = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if p.size < 3 or np.ptp(p) == 0 or np.ptp(d) == 0:
        return {"spearman": float("nan"), "pearson": float("nan")}
    return {"spearman": float(spearmanr(p, d).statistic), "pearson": float(pearsonr(p, d)[0])}


@dataclass
class Cell:
    """One grid cell: a method on one grouping at one K."""

    method: str
    grouping: str
    k: int
    lds: dict[str, float]
    logo: dict[str, float]
    cost_s: float


def evaluate_partition(setting: FidelitySetting, metric: Any, methods: Sequence[str],
                       ids: np.ndarray, num_groups: int, num_subsets: int, logo_groups: int,
                       seed: int, grouping: str,
                       report: Optional[Callable[[str], None]] = None
                       ) -> tuple[list[Cell], dict[str, float]]:
    """Retrain on M half-subsets (and L leave-one-group-out sets) of one partition and score
    every method against the measurements.

    Args:
        setting: The setting.
        metric: The loaded ``group_lds`` metric.
        methods: Methods to run.
        ids: (n,) group of each training row (0..K−1).
        num_groups: K.
        num_subsets: M.
        logo_groups: L groups removed one at a time.
        seed: Seed of the subsets and of the removed groups.
        grouping: Label of the partition.
        report: Progress printer.

    Returns:
        (cells, timing figures of the retraining).
    """
    masks = draw_subsets(num_groups, num_subsets, seed)
    start = time.perf_counter()
    losses = np.stack([setting.retrain_losses(subset_rows(ids, m)) for m in masks])
    rng = np.random.default_rng(seed + 1)
    removed = np.sort(rng.choice(num_groups, size=min(logo_groups, num_groups), replace=False))
    keep_all = np.ones(num_groups, dtype=bool)
    deltas = []
    for g in removed:
        mask = keep_all.copy()
        mask[g] = False
        deltas.append(setting.retrain_losses(subset_rows(ids, mask)) - setting.full_losses)
    retrain_s = time.perf_counter() - start
    grouped = with_groups(setting.train, ids)
    cells = []
    for method in methods:
        scores, cost = attribute(setting, method, grouped, num_groups)
        lds = lds_of(metric, predict_subsets(scores, masks), losses)
        logo = logo_of(scores[:, removed].T, np.stack(deltas)) if len(removed) else {}
        cells.append(Cell(method, grouping, num_groups, lds, logo, cost))
        if report is not None:
            report(f"  {method:<12} {grouping:<12} K={num_groups:<5} LDS {lds['lds']:+.3f} "
                   f"[{lds['ci_low']:+.3f}, {lds['ci_high']:+.3f}]  LOGO rho "
                   f"{logo.get('spearman', float('nan')):+.3f}  cost {cost:.2f} s")
    return cells, {"retrains": float(len(masks) + len(removed)), "retrain_s": retrain_s}


def run_grid(setting: FidelitySetting, methods: Sequence[str], groupings: Sequence[str],
             ks: Sequence[int], num_subsets: int, logo_groups: int, seed: int,
             report: Optional[Callable[[str], None]] = None,
             balanced: bool = False) -> dict[str, Any]:
    """Run the method × grouping × K grid.

    K equal to the number of training rows is the point level (singleton groups): it does
    not depend on the grouper, so it is computed once and listed under every grouping.

    Args:
        setting: The setting.
        methods: Methods.
        groupings: Groupers.
        ks: Values of K (n = point level).
        num_subsets: M subsets per partition.
        logo_groups: Groups removed one at a time per partition.
        seed: Seed.
        report: Progress printer.
        balanced: Equal-size groups from the K-means groupers.

    Returns:
        The nested results (see :func:`results_dict`).
    """
    metric = load_metric("group_lds")
    n = len(setting.train)
    cells: list[Cell] = []
    grouping_s: dict[str, dict[str, float]] = {g: {} for g in groupings}
    retrain: dict[str, float] = {"retrains": 0.0, "retrain_s": 0.0}

    def add(stats: dict[str, float]) -> None:
        for key, value in stats.items():
            retrain[key] += value

    for k in sorted(set(ks), reverse=True):
        if k == n:
            found, stats = evaluate_partition(setting, metric, methods, np.arange(n), n,
                                              num_subsets, logo_groups, seed + k, "point", report)
            add(stats)
            cells += [Cell(c.method, g, k, c.lds, c.logo, c.cost_s) for c in found
                      for g in groupings]
            for g in groupings:
                grouping_s[g][str(k)] = 0.0
            continue
        for grouping in groupings:
            ids, seconds = assign_groups(setting, grouping, k, seed, balanced)
            grouping_s[grouping][str(k)] = seconds
            found, stats = evaluate_partition(setting, metric, methods, ids, k, num_subsets,
                                              logo_groups, seed + k, grouping, report)
            add(stats)
            cells += found
    return results_dict(cells, grouping_s, retrain)


def results_dict(cells: Sequence[Cell], grouping_s: dict[str, dict[str, float]],
                 retrain: dict[str, float]) -> dict[str, Any]:
    """Nest the cells as {entry: {method: {grouping: {K: value}}}}.

    Returns:
        ``group_lds``, ``group_lds_ci`` ([low, high]), ``cost_s``, ``logo_spearman``,
        ``logo_pearson``, ``num_queries``, plus ``grouping_cost_s`` {grouping: {K: s}} and
        ``retrain`` (count and seconds).
    """
    keys = ("group_lds", "group_lds_ci", "cost_s", "logo_spearman", "logo_pearson",
            "num_queries")
    out: dict[str, Any] = {key: {} for key in keys}
    for c in cells:
        values = {"group_lds": c.lds["lds"], "group_lds_ci": [c.lds["ci_low"], c.lds["ci_high"]],
                  "cost_s": c.cost_s, "logo_spearman": c.logo.get("spearman", float("nan")),
                  "logo_pearson": c.logo.get("pearson", float("nan")),
                  "num_queries": c.lds["num_queries"]}
        for key, value in values.items():
            out[key].setdefault(c.method, {}).setdefault(c.grouping, {})[str(c.k)] = value
    out["grouping_cost_s"] = grouping_s
    out["retrain"] = retrain
    return out
