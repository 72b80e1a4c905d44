"""Noisy-label detection: how many flipped labels are found by inspecting the top-ranked rows?

Rows are ranked by a suspicion score (higher = inspect first; e.g. self-influence, or minus
the group score on a clean validation set). Recall at a fraction f is the share of all flipped
rows found among the first ⌈f·n⌉ rows. Ties are common with group scores (every member of a
group shares its score), so a block of tied rows that straddles the cutoff counts by its
expected share, as if the tie were broken at random. AUC is the ROC AUC (the chance that a
flipped row outranks a clean one, ties counting one half).

The module is self-contained (numpy and the standard library only) so that ``evaluate`` can
load it from its folder without the Hub.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Noisy-label detection: recall of flipped labels when inspecting the top fraction of rows
ranked by a suspicion score (ties broken in expectation), and the ROC AUC of the ranking.
"""

_CITATION = """\
@article{ley2024ggda,
  title={Generalized Group Data Attribution},
  author={Ley, Dan and Srinivas, Suraj and Zhang, Shichang and Rusak, Gili and
          Lakkaraju, Himabindu},
  journal={arXiv preprint arXiv:2410.09940},
  year={2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (list of float): suspicion score of every training row (higher = more suspicious).
    references (list of int): 1 where the row's label was flipped, else 0.
    fractions (list of float, default [0.1, 0.2]): fractions of rows inspected.
    return_curve (bool, default False): also return the recall after every row inspected.
Returns:
    recall_at_<p>: recall after inspecting the top p% of rows (p = 100 * fraction; "2p5" for
        2.5%), NaN when no label is flipped.
    auc: ROC AUC of the ranking (NaN when all or no labels are flipped).
    num_rows, num_flipped: counts.
    curve_fractions, curve_recall (with return_curve): k / n and recall for k = 0..n.
Examples:
    >>> det = hf_ggda.metrics.load_metric("noisy_label_detection")
    >>> det.compute(scores=[0.9, 0.1, 0.8, 0.2], references=[1, 0, 1, 0], fractions=[0.5])
    {'recall_at_50': 1.0, 'auc': 1.0, 'num_rows': 4, 'num_flipped': 2}
"""


def fraction_key(fraction: float) -> str:
    """Return the result key of a fraction: 0.1 -> ``recall_at_10``, 0.025 -> ``recall_at_2p5``.

    Raises:
        ValueError: ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fractions must be in (0, 1], got {fraction}.")
    pct = round(100.0 * fraction, 6)
    text = f"{pct:g}" if pct != int(pct) else str(int(pct))
    return "recall_at_" + text.replace(".", "p")


def found_curve(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Expected number of flipped rows among the top k, for k = 0..n (ties in expectation).

    Args:
        scores: (n,) suspicion scores.
        flipped: (n,) 0/1 flags.

    Returns:
        (n + 1,) float64 counts.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], flipped[order].astype(np.float64)
    n = len(s)
    new_block = np.ones(n, dtype=bool)
    new_block[1:] = s[1:] != s[:-1]
    block = np.cumsum(new_block) - 1
    starts = np.flatnonzero(new_block)
    sizes = np.diff(np.append(starts, n))
    block_flipped = np.add.reduceat(y, starts)
    before = np.concatenate([[0.0], np.cumsum(block_flipped)[:-1]])
    k = np.arange(1, n + 1)
    taken = k - starts[block]
    found = before[block] + taken * block_flipped[block] / sizes[block]
    return np.concatenate([[0.0], found])


def roc_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic with average ranks (NaN for one class only).

    Args:
        scores: (n,) suspicion scores.
        flipped: (n,) 0/1 flags.

    Returns:
        The AUC.
    """
    pos = int(flipped.sum())
    neg = len(flipped) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]
    return float((ranks[flipped == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NoisyLabelDetection(evaluate.Metric):
    """Recall of flipped labels at inspected fractions, and ROC AUC of the ranking."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "scores": datasets.Value("float64"),
                "references": datasets.Value("int64"),
            }),
            reference_urls=["https://arxiv.org/abs/2410.09940"],
        )

    def _compute(self, scores: Sequence[float], references: Sequence[int],
                 fractions: Sequence[float] = (0.1, 0.2),
                 return_curve: bool = False) -> dict[str, Any]:
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(references, dtype=np.int64)
        if s.size == 0:
            raise ValueError("No rows: pass one score and one 0/1 reference per row.")
        if not np.isfinite(s).all():
            raise ValueError("scores must be finite (no NaN/Inf).")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("references must be 0 (clean) or 1 (flipped).")
        keys = [fraction_key(float(f)) for f in fractions]
        n, total = int(s.size), int(y.sum())
        found = found_curve(s, y)
        recall = found / total if total else np.full(n + 1, np.nan)
        out: dict[str, Any] = {}
        for key, f in zip(keys, fractions):
            k = min(n, math.ceil(float(f) * n - 1e-9))
            out[key] = float(recall[k])
        out.update(auc=roc_auc(s, y), num_rows=n, num_flipped=total)
        if return_curve:
            out["curve_fractions"] = (np.arange(n + 1) / n).tolist()
            out["curve_recall"] = recall.tolist()
        return out
