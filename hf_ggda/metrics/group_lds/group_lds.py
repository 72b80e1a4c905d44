"""Group linear datamodeling score (LDS): does attribution predict retraining on subsets?

For each query q and each random subset S of training groups, the attribution predicts
τ(S, q) = Σ_{G∈S} τ(G, q) (the scores are linear in the groups), and a model retrained on S
gives a measured output f_S(q). The LDS of q is the Spearman rank correlation between the
predictions and the measurements over the subsets; the metric reports its mean over queries
with a confidence interval.

Sign: hf_ggda scores are positive when a group *helps* the query, so predictions should rise
with an output where higher is better (a margin, a negative loss). When the references are
losses, pass ``references_are_losses=True`` and they are negated first.

The module is self-contained (numpy and the standard library only) so that ``evaluate`` can
load it from its folder without the Hub.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Linear datamodeling score on groups (Park et al., 2023, TRAK; Ley et al., 2024, GGDA): the
Spearman correlation, per query, between predicted subset scores (sums of group scores over
the groups kept in each retraining subset) and the outputs measured after retraining on each
subset, averaged over queries, with a confidence interval (normal approximation or
percentile bootstrap over queries).
"""

_CITATION = """\
@article{ley2024ggda,
  title={Generalized Group Data Attribution},
  author={Ley, Dan and Srinivas, Suraj and Zhang, Shichang and Rusak, Gili and
          Lakkaraju, Himabindu},
  journal={arXiv preprint arXiv:2410.09940},
  year={2024}
}
@inproceedings{park2023trak,
  title={TRAK: Attributing Model Behavior at Scale},
  author={Park, Sung Min and Georgiev, Kristian and Ilyas, Andrew and
          Leclerc, Guillaume and Madry, Aleksander},
  booktitle={ICML},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): one list per query: the predicted score of each
        retraining subset (sum of the group scores of the groups in the subset).
    references (list of list of float): one list per query, same lengths: the output measured
        on that query by the model retrained on each subset.
    references_are_losses (bool, default False): negate the references (losses fall when
        helpful groups are kept).
    interval (str, default "normal"): "normal" (mean +- z * standard error) or "bootstrap"
        (percentile bootstrap over queries).
    confidence (float, default 0.95): level of the interval.
    n_resamples (int, default 2000): bootstrap resamples.
    seed (int, default 0): bootstrap seed.
Returns:
    lds: mean Spearman correlation over the queries where it is defined.
    lds_ci_low, lds_ci_high: the confidence interval (NaN with fewer than 2 queries).
    lds_std: standard deviation of the per-query correlations (ddof=1).
    num_queries: queries with a defined correlation.
    num_undefined: queries skipped because predictions or references are constant.
    spearman_per_query: the correlation of every query (NaN where undefined).
Examples:
    >>> lds = hf_ggda.metrics.load_metric("group_lds")
    >>> lds.compute(predictions=[[0.1, 0.5, 0.3]], references=[[1.0, 3.0, 2.0]])["lds"]
    1.0
"""


def rankdata(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks, ties sharing their average rank.

    Args:
        values: 1-D array.

    Returns:
        float64 ranks.
    """
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two 1-D arrays (NaN if either is constant).

    Args:
        a: First sample.
        b: Second sample, same length.

    Returns:
        The correlation of the ranks.
    """
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def confidence_interval(values: np.ndarray, interval: str, confidence: float,
                        n_resamples: int, seed: int) -> tuple[float, float]:
    """Interval for the mean of ``values``.

    Args:
        values: Per-query correlations (no NaN).
        interval: ``"normal"`` or ``"bootstrap"``.
        confidence: Level in (0, 1).
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        (low, high); NaNs with fewer than two values.

    Raises:
        ValueError: Unknown ``interval`` or a level outside (0, 1).
    """
    if interval not in ("normal", "bootstrap"):
        raise ValueError(f"interval must be 'normal' or 'bootstrap', got {interval!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if len(values) < 2:
        return float("nan"), float("nan")
    mean = float(values.mean())
    if interval == "normal":
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
        half = z * float(values.std(ddof=1)) / float(np.sqrt(len(values)))
        return mean - half, mean + half
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroupLDS(evaluate.Metric):
    """Linear datamodeling score over group subsets (mean Spearman over queries)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
            reference_urls=["https://arxiv.org/abs/2410.09940",
                            "https://arxiv.org/abs/2303.14186"],
        )

    def _compute(self, predictions: Sequence[Sequence[float]],
                 references: Sequence[Sequence[float]], references_are_losses: bool = False,
                 interval: str = "normal", confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
        if len(predictions) == 0:
            raise ValueError("No queries: pass one list of subset predictions per query.")
        per_query: list[float] = []
        for j, (pred, ref) in enumerate(zip(predictions, references)):
            p, r = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
            if p.shape != r.shape:
                raise ValueError(f"Query {j}: {p.size} predictions for {r.size} references.")
            if p.size < 2:
                raise ValueError(f"Query {j}: need at least 2 subsets, got {p.size}.")
            if not (np.isfinite(p).all() and np.isfinite(r).all()):
                raise ValueError(f"Query {j}: predictions and references must be finite.")
            per_query.append(spearman(p, -r if references_are_losses else r))
        values = np.asarray(per_query)
        defined = values[~np.isnan(values)]
        low, high = confidence_interval(defined, interval, confidence, n_resamples, seed)
        lds: Optional[float] = float(defined.mean()) if len(defined) else float("nan")
        return {
            "lds": lds, "lds_ci_low": low, "lds_ci_high": high,
            "lds_std": float(defined.std(ddof=1)) if len(defined) > 1 else float("nan"),
            "num_queries": len(defined), "num_undefined": int(len(values) - len(defined)),
            "spearman_per_query": values.tolist(),
        }
