"""Source attribution: which named sources of the training data help or hurt each evaluation.

A *source* is any id a user gives every training row — a file, a domain, a Hub shard, an
annotator. :func:`attribute_sources` fits an attributor with the sources as its groups (the
``column`` grouping: one group gradient per source, summed over its rows), scores every
evaluation row against them, and reports per evaluation set and source

* ``score``: the source's effect on the evaluation set's summed loss, in the project's sign
  convention (> 0: keeping the source lowers the loss, it helps; < 0: it hurts). For linear
  methods (TracIn, IF, TRAK) it is exactly the sum of the source's rows' point scores;
* ``ci_low`` / ``ci_high``: a percentile bootstrap interval over evaluation rows (the
  evaluation set is a sample; the interval says how much the ranking depends on it);
* ``rank``: 1 = most helpful (as :class:`~hf_ggda.scores.GroupScores` ranks groups);
  ``harmful`` / ``helpful``: the whole interval lies below / above zero.

It then drills down into the most harmful sources (point scores of their rows only) and puts
the results back into the training set as columns, aligned by source id and row key, never by
position alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from datasets import Dataset

from .atomic import atomic_write_bytes, save_dataset_atomic
from .errors import EmptyDatasetError, GroupingError, MissingColumnError, RowAlignmentError
from .logging import get_logger
from .scores import GroupScores, _plain
from .tasks import ROW_COLUMN
from .validation import check_no_nulls, ensure_dataset

logger = get_logger(__name__)

SOURCE_SCORE_COLUMN = "ggda_source_score"
SOURCE_RANK_COLUMN = "ggda_source_rank"
SOURCE_POINT_COLUMN = "ggda_source_point_score"
TABLE_COLUMNS = ("evaluation", "source", "rows", "score", "ci_low", "ci_high", "rank",
                 "harmful", "helpful")


@dataclass
class SourceReport:
    """Per-source effects on one or more evaluation sets.

    Attributes:
        table: One row per (evaluation, source), columns :data:`TABLE_COLUMNS`.
        scores: Per evaluation name, the (m × S) scores of its rows against the sources,
            with the drill-down's point scores of the flagged sources' rows.
        source_column: The training column holding source ids.
        flagged: Per evaluation name, the drilled sources, most harmful first.
        train_fingerprint: ``Dataset._fingerprint`` of the attributed training rows (rows
            given by position are accepted only on this dataset).
        num_rows: Rows of the attributed training set.
    """

    table: Dataset
    scores: dict[str, GroupScores]
    source_column: str
    flagged: dict[str, list[Any]] = field(default_factory=dict)
    train_fingerprint: Optional[str] = None
    num_rows: int = 0

    @property
    def evaluations(self) -> list[str]:
        """The evaluation names, in the order given."""
        return list(self.scores)

    def ranking(self, evaluation: Optional[str] = None) -> list[Any]:
        """Source ids from most harmful to most helpful for one evaluation (None: the sum
        over all evaluations)."""
        totals = self._totals(evaluation)
        return [s for s, _ in sorted(totals.items(), key=lambda kv: (kv[1], str(kv[0])))]

    def _totals(self, evaluation: Optional[str]) -> dict[Any, float]:
        names = self.evaluations if evaluation is None else [evaluation]
        unknown = [n for n in names if n not in self.scores]
        if unknown:
            raise KeyError(f"No evaluation {unknown[0]!r}; the report has {self.evaluations}.")
        totals: dict[Any, float] = {}
        for name in names:
            s = self.scores[name]
            for g, v in zip(s.group_ids, s.aggregated().tolist()):
                totals[g] = totals.get(g, 0.0) + float(v)
        return totals

    def to_dataset_columns(self, train: Dataset) -> Dataset:
        """Add per-row columns: the row's source score (summed over evaluations, and per
        evaluation when there are several), its rank (1 = most helpful source) and, for rows
        of drilled sources, the row's own point score summed over evaluations.

        Args:
            train: The attributed training rows — the same dataset, or any reordering or
                subset of it that keeps the ``__ggda_row__`` key column the report added.

        Returns:
            ``train`` with the new columns (stale ones of the same names are replaced).

        Raises:
            MissingColumnError: No source column.
            RowAlignmentError: Rows that cannot be matched to the attributed ones.
        """
        if self.source_column not in train.column_names:
            raise MissingColumnError(self.source_column, train.column_names,
                                     role="source column")
        keys = self._row_keys(train)
        sources = [_plain(s) for s in train[self.source_column]]
        totals = self._totals(None)
        order = sorted(totals, key=lambda s: (-totals[s], str(s)))
        rank = {s: i + 1 for i, s in enumerate(order)}
        unknown = sorted({str(s) for s in sources if s not in totals})
        if unknown:
            raise RowAlignmentError(f"Sources {unknown[:5]} were not attributed; pass the "
                                    "training rows the report was computed on.")
        new: dict[str, list[Any]] = {SOURCE_SCORE_COLUMN: [totals[s] for s in sources],
                                     SOURCE_RANK_COLUMN: [rank[s] for s in sources]}
        if len(self.scores) > 1:
            for name in self.evaluations:
                per = self._totals(name)
                new[f"{SOURCE_SCORE_COLUMN}_{_slug(name)}"] = [per[s] for s in sources]
        point = self.point_scores()
        new[SOURCE_POINT_COLUMN] = [point.get(k) for k in keys]
        out = train
        stale = [c for c in out.column_names if c.startswith(SOURCE_SCORE_COLUMN)
                 or c in (SOURCE_RANK_COLUMN, SOURCE_POINT_COLUMN)]
        out = out.remove_columns(stale) if stale else out
        for name, values in new.items():
            out = out.add_column(name, values)
        return out

    def point_scores(self) -> dict[int, float]:
        """The drilled rows' own scores summed over evaluations, by row key (position in
        the attributed training set)."""
        out: dict[int, float] = {}
        for s in self.scores.values():
            if s.point_scores is not None:
                for r, v in zip(s.point_rows or [], s.point_scores.sum(0).tolist()):
                    out[int(r)] = out.get(int(r), 0.0) + float(v)
        return out

    def _row_keys(self, train: Dataset) -> list[Any]:
        if ROW_COLUMN in train.column_names:
            keys = [_plain(k) for k in train[ROW_COLUMN]]
            bad = [k for k in keys if not isinstance(k, int) or not 0 <= k < self.num_rows]
            if bad:
                raise RowAlignmentError(f"Row keys {bad[:5]} in {ROW_COLUMN!r} are not rows of "
                                        f"the attributed set ({self.num_rows} rows).")
            return keys
        if getattr(train, "_fingerprint", None) != self.train_fingerprint:
            raise RowAlignmentError(
                "These rows are not the attributed training set in its order (another "
                f"fingerprint) and carry no {ROW_COLUMN!r} key column: pass the dataset given "
                f"to attribute_sources, or add the key before attributing (train = "
                f"train.add_column({ROW_COLUMN!r}, list(range(len(train))))) and keep it when "
                "shuffling or filtering.")
        return list(range(len(train)))

    def plot_png(self, evaluation: Optional[str] = None) -> bytes:
        """A horizontal bar chart of the sources' scores with their intervals (PNG bytes)."""
        from .integrations.card_parts import _figure, _png

        name = evaluation or self.evaluations[0]
        rows = [r for r in self.table.to_list() if r["evaluation"] == name]
        rows.sort(key=lambda r: r["score"])
        fig = _figure(6.4, max(3.0, 0.35 * len(rows) + 1.2))
        ax = fig.subplots()
        pos = np.arange(len(rows))
        scores = np.array([r["score"] for r in rows])
        err = np.array([[r["score"] - r["ci_low"] for r in rows],
                        [r["ci_high"] - r["score"] for r in rows]])
        ax.barh(pos, scores, xerr=err, capsize=3,
                color=["#55A868" if v >= 0 else "#C44E52" for v in scores])
        ax.set_yticks(pos, [str(r["source"])[:40] for r in rows])
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set(xlabel="effect on the evaluation loss (> 0 helps), bootstrap interval",
               title=f"Sources vs {name}"[:80])
        return _png(fig)

    def to_markdown(self) -> str:
        """The table as Markdown (ids escaped), most harmful first within each evaluation."""
        from .integrations.card_parts import md_code

        lines = ["| evaluation | source | rows | score | interval | verdict |",
                 "|---|---|---:|---:|---|---|"]
        for r in sorted(self.table.to_list(), key=lambda r: (r["evaluation"], r["score"])):
            verdict = "harmful" if r["harmful"] else "helpful" if r["helpful"] else "unclear"
            lines.append(f"| {md_code(r['evaluation'], table=True)} | "
                         f"{md_code(r['source'], table=True)} | {r['rows']} | "
                         f"{r['score']:.4g} | [{r['ci_low']:.4g}, {r['ci_high']:.4g}] | "
                         f"{verdict} |")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> None:
        """Write ``sources/`` (the table, ``save_to_disk``), ``sources.json``, ``sources.png``
        and one ``scores-<evaluation>/`` folder per evaluation, each file atomically."""
        out = Path(folder)
        save_dataset_atomic(self.table, out / "sources")
        atomic_write_bytes(out / "sources.json", json.dumps(
            {"source_column": self.source_column, "evaluations": self.evaluations,
             "flagged": {k: [str(v) for v in vs] for k, vs in self.flagged.items()},
             "table": self.table.to_list()}, indent=1, default=str).encode())
        atomic_write_bytes(out / "sources.png", self.plot_png())
        for name, s in self.scores.items():
            s.save_pretrained(out / f"scores-{_slug(name)}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-")[:60] or "evaluation"


def check_sources(train: Any, source_column: str) -> Dataset:
    """Validate the training rows and their source column.

    Raises:
        DatasetTypeError: Not one ``Dataset`` split.
        EmptyDatasetError: No rows.
        MissingColumnError: No source column.
        NullValueError: Null sources (the rows are named).
        GroupingError: NaN sources, or fewer than two distinct sources.
    """
    train = ensure_dataset(train, "training dataset")
    if len(train) == 0:
        raise EmptyDatasetError("The training dataset has no rows; pass the rows to attribute.")
    if source_column not in train.column_names:
        raise MissingColumnError(source_column, train.column_names, role="source column")
    check_no_nulls(train, [source_column], "training dataset")
    values = train[source_column]
    nan = [i for i, v in enumerate(values) if isinstance(v, float) and v != v]
    if nan:
        raise GroupingError(f"Source ids are NaN in rows {nan[:10]}: give every row a source "
                            "(e.g. 'unknown') or drop those rows.")
    if len(set(values)) < 2:
        raise GroupingError(f"Source attribution needs at least two sources; the column "
                            f"{source_column!r} holds one ({values[0]!r}). Pass a column that "
                            "names where each row came from.")
    return train


def _evaluations(evaluations: Any) -> dict[str, Dataset]:
    """Name a single evaluation set ``"evaluation"``; check every set has rows.

    Raises:
        DatasetTypeError / EmptyDatasetError: A set that is not one split, or has no rows.
    """
    named = dict(evaluations) if isinstance(evaluations, Mapping) else \
        {"evaluation": evaluations}
    if not named:
        raise EmptyDatasetError("No evaluation sets given; pass a Dataset or {name: Dataset}.")
    out = {}
    for name, data in named.items():
        data = ensure_dataset(data, f"evaluation set {name!r}")
        if len(data) == 0:
            raise EmptyDatasetError(f"The evaluation set {name!r} has no rows; source effects "
                                    "are measured on evaluation rows, pass at least one.")
        out[str(name)] = data
    return out


def bootstrap_interval(matrix: np.ndarray, samples: int, confidence: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the column sums of ``matrix`` (m × S), rows resampled.

    Returns:
        (low, high), each (S,). With ``samples`` = 0 both are the sums themselves.
    """
    total = matrix.sum(0)
    if samples == 0 or len(matrix) < 2:
        return total.copy(), total.copy()
    rng = np.random.default_rng(seed)
    m = len(matrix)
    sums = np.empty((samples, matrix.shape[1]))
    for start in range(0, samples, 256):  # (256 × m) counts at a time
        n = min(256, samples - start)
        counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n).astype(matrix.dtype)
        sums[start:start + n] = counts @ matrix
    tail = 100.0 * (1.0 - confidence) / 2.0
    return np.percentile(sums, tail, axis=0), np.percentile(sums, 100.0 - tail, axis=0)


def attribute_sources(attributor: Any, train: Dataset, evaluations: Any, source_column: str,
                      *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                      drill_sources: int = 2, store: Optional[str] = None) -> SourceReport:
    """Rank the training sources by their effect on each evaluation set.

    Args:
        attributor: An unfitted (or refitted here) attributor, e.g.
            ``InfluenceFunction(model, task, InfluenceConfig(preconditioner="ekfac"))``.
        train: Training rows with a source column.
        evaluations: One evaluation ``Dataset`` or ``{name: Dataset}`` (e.g. one per task).
        source_column: Column of source ids (any hashable id).
        bootstrap: Bootstrap resamples of the evaluation rows for the intervals (0: none).
        confidence: Interval coverage.
        seed: Seed of the bootstrap.
        drill_sources: Drill into this many of the most harmful sources per evaluation
            (only sources with a negative score; 0: no drill-down).
        store: Gradient store folder of the fit (resumable).

    Returns:
        The :class:`SourceReport`.

    Raises:
        DatasetTypeError, EmptyDatasetError, MissingColumnError, NullValueError,
        GroupingError: Bad training or evaluation rows (see :func:`check_sources`).
        ValueError: ``bootstrap`` < 0, ``confidence`` not in (0, 1), ``drill_sources`` < 0.
    """
    if bootstrap < 0 or drill_sources < 0:
        raise ValueError(f"bootstrap and drill_sources must be >= 0, got {bootstrap} and "
                         f"{drill_sources}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    train = check_sources(train, source_column)
    evals = _evaluations(evaluations)
    rows = train if ROW_COLUMN in train.column_names else \
        train.add_column(ROW_COLUMN, list(range(len(train))))
    attributor.fit(rows, group_column=source_column, store=store)
    sizes = dict(zip(attributor.group_ids, attributor.group_sizes.tolist()))
    table: list[dict[str, Any]] = []
    scores: dict[str, GroupScores] = {}
    flagged: dict[str, list[Any]] = {}
    for e, (name, data) in enumerate(evals.items()):
        s = attributor.score(data)
        matrix = s.matrix.double().numpy()
        low, high = bootstrap_interval(matrix, bootstrap, confidence, seed + e)
        total = matrix.sum(0)
        ranks = s.ranks().tolist()
        for k, g in enumerate(s.group_ids):
            table.append({"evaluation": name, "source": str(g), "rows": int(sizes[g]),
                          "score": float(total[k]), "ci_low": float(low[k]),
                          "ci_high": float(high[k]), "rank": int(ranks[k]),
                          "harmful": bool(high[k] < 0), "helpful": bool(low[k] > 0)})
        order = np.argsort(total, kind="stable")
        flagged[name] = [s.group_ids[k] for k in order[:drill_sources] if total[k] < 0]
        if flagged[name]:
            s = attributor.refine(s, group_ids=flagged[name], row_column=ROW_COLUMN,
                                  query_dataset=data)
        scores[name] = s
        logger.info("Sources vs %s: most harmful first %s.", name,
                    [str(s.group_ids[k]) for k in order[:3]])
    report = SourceReport(Dataset.from_list(table), scores, source_column, flagged,
                          getattr(train, "_fingerprint", None), len(train))
    return report


__all__: Sequence[str] = (
    "SOURCE_POINT_COLUMN",
    "SOURCE_RANK_COLUMN",
    "SOURCE_SCORE_COLUMN",
    "RowAlignmentError",
    "SourceReport",
    "attribute_sources",
    "bootstrap_interval",
    "check_sources",
)
