"""``GroupScores``: an (m queries × K groups) attribution matrix with its provenance.

Rows of the matrix are queries (single query rows, query groups, or one summed query set),
columns are training groups sorted by id. Every object carries the configuration that made it,
the fingerprints of the gradients behind it and the sign convention
(:data:`hf_ggda.SIGN_CONVENTION`: a positive score means the group helps the query).

Point scores from a drill-down (:meth:`hf_ggda.attributors.Attributor.refine`) ride along: an
(m × R) matrix for R training rows, keyed by a row-id column (or by row position in the
dataset the attributor was fitted on).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset, List, Value
from safetensors.torch import save as st_save

from . import SIGN_CONVENTION
from .alignment import check_grouping, check_positional_rows, check_query_rows
from .atomic import atomic_write_bytes
from .errors import MissingColumnError, ScoresFileError
from .logging import get_logger
from .result_files import ResultFormat, check_ids, read_result

logger = get_logger(__name__)

SCORES_FILE = "scores.safetensors"
META_FILE = "scores.json"
QUERY_MODES = ("rows", "groups", "sum")
#: Version of the files written by :meth:`GroupScores.save_pretrained`.
FORMAT_VERSION = 1

#: Names of the columns written by :meth:`GroupScores.to_dataset_columns`.
GROUP_SCORE_COLUMN = "ggda_group_score"
GROUP_RANK_COLUMN = "ggda_group_rank"
SELF_INFLUENCE_COLUMN = "ggda_self_influence"
POINT_SCORE_COLUMN = "ggda_point_score"
#: Columns written by :meth:`hf_ggda.self_influence.SelfInfluence.to_dataset_columns` besides
#: ``ggda_self_influence``; stale ones are removed when group scores are written.
SELF_RANK_COLUMN = "ggda_self_rank"
POINT_SELF_COLUMN = "ggda_point_self_influence"
#: Names of the columns written by :meth:`GroupScores.to_query_columns`.
TOP_GROUPS_COLUMN = "ggda_top_groups"
TOP_SCORES_COLUMN = "ggda_top_scores"


def _plain(value: Any) -> Any:
    """Turn numpy scalars into Python scalars (JSON, dict keys)."""
    return value.item() if hasattr(value, "item") else value


def _plain_list(values: Sequence[Any]) -> list[Any]:
    return [_plain(v) for v in values]


@dataclass
class GroupScores:
    """Attribution scores of K training groups for m queries.

    Attributes:
        matrix: (m, K) scores; entry (j, k) is the effect of group k on query j.
        group_ids: The K training group ids (column order of ``matrix``).
        query_ids: The m query ids: row positions (mode ``"rows"``), query group ids
            (``"groups"``) or ``["all"]`` (``"sum"``).
        config: Settings of the attributor that produced the scores.
        fingerprints: What the numbers depend on (model, data, grouping, gradients).
        sign_convention: Meaning of the sign (always :data:`hf_ggda.SIGN_CONVENTION`).
        query_mode: ``"rows"``, ``"groups"`` or ``"sum"``.
        group_column: Column of the training data holding group ids.
        query_group_column: Column of the query data holding query groups (mode ``"groups"``).
        self_influence: Optional (K,) self-influence of each group.
        point_scores: Optional (m, R) point-level scores of R drilled-down training rows.
        point_rows: The R row keys (values of ``point_key``, or row positions).
        point_groups: The group id of each drilled-down row.
        point_key: Column holding row keys; None means row positions in the fitted dataset.
    """

    matrix: torch.Tensor
    group_ids: list[Any]
    query_ids: list[Any]
    config: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    sign_convention: str = SIGN_CONVENTION
    query_mode: str = "rows"
    group_column: str = "group_id"
    query_group_column: Optional[str] = None
    self_influence: Optional[torch.Tensor] = None
    point_scores: Optional[torch.Tensor] = None
    point_rows: Optional[list[Any]] = None
    point_groups: Optional[list[Any]] = None
    point_key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.matrix.dim() != 2:
            raise ValueError(f"matrix must be 2-D (queries × groups), got {self.matrix.dim()}-D.")
        m, k = self.matrix.shape
        if len(self.group_ids) != k:
            raise ValueError(f"{len(self.group_ids)} group ids for {k} matrix columns.")
        if len(self.query_ids) != m:
            raise ValueError(f"{len(self.query_ids)} query ids for {m} matrix rows.")
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}.")
        if self.self_influence is not None and self.self_influence.shape != (k,):
            raise ValueError(f"self_influence must have shape ({k},), got "
                             f"{tuple(self.self_influence.shape)}.")
        if self.point_scores is not None:
            r = len(self.point_rows or [])
            if self.point_scores.shape != (m, r) or len(self.point_groups or []) != r:
                raise ValueError(f"point_scores must have shape ({m}, {r}) with {r} row keys "
                                 "and groups.")
        self.group_ids = _plain_list(self.group_ids)
        self.query_ids = _plain_list(self.query_ids)

    # -- views ---------------------------------------------------------------------------------
    @property
    def num_queries(self) -> int:
        """m, the number of query rows of the matrix."""
        return int(self.matrix.shape[0])

    @property
    def num_groups(self) -> int:
        """K, the number of training groups."""
        return int(self.matrix.shape[1])

    def aggregated(self) -> torch.Tensor:
        """Return the (K,) scores summed over queries (the effect on the total query loss)."""
        return self.matrix.sum(0)

    def ranks(self) -> torch.Tensor:
        """Return the (K,) rank of each group by aggregated score (1 = most helpful)."""
        order = torch.argsort(self.aggregated(), descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks

    def group_index(self) -> dict[Any, int]:
        """Return the map group id -> column index."""
        return {g: i for i, g in enumerate(self.group_ids)}

    def top_k(self, query_index: Optional[int] = None, k: int = 10,
              largest: bool = True) -> list[tuple[Any, float]]:
        """Return the ``k`` highest-scoring groups for one query (or for all queries summed).

        Args:
            query_index: Row of the matrix; None ranks by the scores summed over queries.
            k: How many groups.
            largest: True for the most helpful groups, False for the most harmful.

        Returns:
            (group id, score) pairs, best first.

        Raises:
            IndexError: ``query_index`` is out of range.
            ValueError: ``k`` < 1.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if query_index is None:
            row = self.aggregated()
        else:
            if not -self.num_queries <= query_index < self.num_queries:
                raise IndexError(f"query_index {query_index} is out of range for "
                                 f"{self.num_queries} queries.")
            row = self.matrix[query_index]
        vals, idx = torch.topk(row, min(k, self.num_groups), largest=largest)
        return [(self.group_ids[int(i)], float(v)) for v, i in zip(vals, idx)]

    def with_self_influence(self, values: torch.Tensor) -> "GroupScores":
        """Return a copy carrying (K,) self-influence values.

        Raises:
            ValueError: ``values`` does not have K entries.
        """
        return replace(self, self_influence=values.detach().to(self.matrix.dtype).cpu())

    # -- columns -------------------------------------------------------------------------------
    def to_dataset_columns(self, train: Dataset, group_column: Optional[str] = None,
                           row_column: Optional[str] = None) -> Dataset:
        """Add per-row attribution columns to a training dataset, aligned by group id.

        Columns: ``ggda_group_score`` (the row's group score summed over queries),
        ``ggda_group_rank`` (1 = most helpful group), ``ggda_self_influence`` (when computed)
        and ``ggda_point_score`` (the row's own score summed over queries where a drill-down
        ran, else None). Values follow group ids and row keys, not positions, so a shuffled
        or filtered dataset gets the same per-row values.

        Args:
            train: Training rows with the group column.
            group_column: Column holding group ids (default: the one used at fit time).
            row_column: Column holding row keys for point scores (default: the one used by
                the drill-down; when the drill-down keyed rows by position, the dataset
                must be the fitted one, in the same order).

        Returns:
            ``train`` with the new columns (existing ones of the same name are replaced, and
            self-influence columns of an earlier run removed when these scores carry none).

        Raises:
            MissingColumnError: The group (or row key) column is absent.
            RowAlignmentError: Point scores are keyed by position but ``train`` is not the
                fitted dataset (another length, order or fingerprint), or ``train`` has the
                fitted number of rows but its groups hold other rows than at fit time.
        """
        group_column = group_column or self.group_column
        if group_column not in train.column_names:
            raise MissingColumnError(group_column, train.column_names, role="group column")
        check_grouping(self.fingerprints.get("train_groups"), train, group_column,
                       self.group_ids)
        index = self.group_index()
        totals = self.aggregated().tolist()
        ranks = self.ranks().tolist()
        cols = [index.get(_plain(g)) for g in train[group_column]]
        missing = sum(c is None for c in cols)
        if missing:
            logger.warning("%d rows belong to groups without scores; their columns are None.",
                           missing)
        new: dict[str, tuple[list[Any], Value]] = {
            GROUP_SCORE_COLUMN: ([None if c is None else totals[c] for c in cols],
                                 Value("float64")),
            GROUP_RANK_COLUMN: ([None if c is None else int(ranks[c]) for c in cols],
                                Value("int64")),
        }
        if self.self_influence is not None:
            si = self.self_influence.tolist()
            new[SELF_INFLUENCE_COLUMN] = ([None if c is None else si[c] for c in cols],
                                          Value("float64"))
        new[POINT_SCORE_COLUMN] = (self._point_column(train, row_column), Value("float64"))
        # self-influence columns of an earlier run must not sit beside these scores
        stale = [c for c in (SELF_INFLUENCE_COLUMN, SELF_RANK_COLUMN, POINT_SELF_COLUMN)
                 if c in train.column_names and c not in new]
        if stale:
            logger.info("Removing %s of an earlier run (these scores carry no self-influence).",
                        stale)
        out = train.remove_columns(stale) if stale else train
        for name, (values, feature) in new.items():
            if name in out.column_names:
                out = out.remove_columns(name)
            out = out.add_column(name, values, feature=feature)
        return out

    def _point_column(self, train: Dataset, row_column: Optional[str]) -> list[Optional[float]]:
        if self.point_scores is None:
            return [None] * len(train)
        key = row_column or self.point_key
        totals = dict(zip(self.point_rows or [], self.point_scores.sum(0).tolist()))
        if key is None:
            check_positional_rows(self.fingerprints, train, list(self.point_rows or []),
                                  "Point scores")
            return [totals.get(i) for i in range(len(train))]
        if key not in train.column_names:
            raise MissingColumnError(key, train.column_names, role="row id column")
        return [totals.get(_plain(v)) for v in train[key]]

    def to_query_columns(self, query: Dataset, k: int = 5) -> Dataset:
        """Add each query's top-``k`` group ids and scores as columns.

        Columns: ``ggda_top_groups`` (list of group ids, best first) and ``ggda_top_scores``.
        In mode ``"groups"`` every row gets the values of its query group.

        Args:
            query: The query rows that were scored (same order in mode ``"rows"``).
            k: Groups per query.

        Returns:
            ``query`` with the two columns.

        Raises:
            ValueError: The scores were summed over all queries, or the lengths differ.
            RowAlignmentError: Mode ``"rows"`` and these are not the scored query rows in
                the scored order (shuffled, filtered or other rows).
            MissingColumnError: The query group column is absent (mode ``"groups"``).
        """
        if self.query_mode == "sum":
            raise ValueError("These scores were summed over the whole query set "
                             "(aggregate='sum'); score with aggregate=None to get per-query "
                             "columns.")
        if self.query_mode == "rows":
            if len(query) != self.num_queries:
                raise ValueError(f"The query dataset has {len(query)} rows but the scores "
                                 f"have {self.num_queries} queries.")
            check_query_rows(self.fingerprints.get("query_rows"), query)
            slots: list[Optional[int]] = list(range(len(query)))
        else:
            col = self.query_group_column or ""
            if col not in query.column_names:
                raise MissingColumnError(col, query.column_names, role="query group column")
            qindex = {q: i for i, q in enumerate(self.query_ids)}
            slots = [qindex.get(_plain(v)) for v in query[col]]
        per_query = [self.top_k(i, k) for i in range(self.num_queries)]
        ids = [None if s is None else [g for g, _ in per_query[s]] for s in slots]
        vals = [None if s is None else [v for _, v in per_query[s]] for s in slots]
        id_feature = Value("string") if any(isinstance(g, str) for g in self.group_ids) \
            else Value("int64")
        out = query
        for name, values, feature in ((TOP_GROUPS_COLUMN, ids, List(id_feature)),
                                      (TOP_SCORES_COLUMN, vals, List(Value("float64")))):
            if name in out.column_names:
                out = out.remove_columns(name)
            out = out.add_column(name, values, feature=feature)
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Save to a folder: tensors as safetensors, everything else as JSON (atomic writes).

        Args:
            save_directory: Target folder (created if needed).

        Raises:
            OSError: The files cannot be written.
            TypeError: ``config`` or ``fingerprints`` are not JSON-serialisable.
        """
        path = Path(save_directory)
        tensors = {"matrix": self.matrix.detach().cpu().contiguous()}
        for name in ("self_influence", "point_scores"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        meta = {
            "group_ids": self.group_ids, "query_ids": self.query_ids, "config": self.config,
            "fingerprints": self.fingerprints, "sign_convention": self.sign_convention,
            "query_mode": self.query_mode, "group_column": self.group_column,
            "query_group_column": self.query_group_column,
            "point_rows": None if self.point_rows is None else _plain_list(self.point_rows),
            "point_groups": None if self.point_groups is None
            else _plain_list(self.point_groups),
            "point_key": self.point_key, "format_version": FORMAT_VERSION,
        }
        atomic_write_bytes(path / SCORES_FILE, st_save(tensors))
        atomic_write_bytes(path / META_FILE, json.dumps(meta, indent=1).encode())

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike[str]) -> "GroupScores":
        """Load scores saved by :meth:`save_pretrained`.

        The folder is untrusted input: the JSON must carry a known ``format_version`` and
        pass the schema (every field present, of its type, no unknown field; finite, unique
        scalar group ids), and the tensors must be floating-point with shapes matching the
        ids.

        Args:
            save_directory: The folder.

        Returns:
            The scores.

        Raises:
            FileNotFoundError: The folder lacks the score files.
            ScoresFileError: Bad JSON or safetensors, an unknown format version, a field
                that fails the schema, or lengths that do not match the matrix.
        """
        path = Path(save_directory)
        meta, tensors = read_result(path, _FORMAT)
        _check_meta(path / META_FILE, meta)
        _check_tensors(path / SCORES_FILE, tensors)
        if ("point_scores" in tensors) != (meta["point_rows"] is not None):
            raise _bad(path, "point_scores and point_rows must both be saved or both absent")
        try:
            return cls(matrix=tensors["matrix"], self_influence=tensors.get("self_influence"),
                       point_scores=tensors.get("point_scores"), **meta)
        except ValueError as err:
            raise _bad(path, f"its JSON does not match its tensors ({err})") from None

    def __repr__(self) -> str:
        extra = []
        if self.self_influence is not None:
            extra.append("self_influence")
        if self.point_scores is not None:
            extra.append(f"point_scores[{self.point_scores.shape[1]} rows]")
        method = self.config.get("attributor_type", "?")
        return (f"GroupScores(method={method!r}, queries={self.num_queries} "
                f"({self.query_mode}), groups={self.num_groups}, dtype={self.matrix.dtype}"
                f"{', ' + ', '.join(extra) if extra else ''})")



_FORMAT = ResultFormat(
    what="scores file", version=FORMAT_VERSION, tensors_file=SCORES_FILE, meta_file=META_FILE,
    schema={"group_ids": ((list,), False), "query_ids": ((list,), False),
            "config": ((dict,), False), "fingerprints": ((dict,), False),
            "sign_convention": ((str,), False), "query_mode": ((str,), False),
            "group_column": ((str,), False), "query_group_column": ((str,), True),
            "point_rows": ((list,), True), "point_groups": ((list,), True),
            "point_key": ((str,), True)},
    required_tensors=("matrix",), optional_tensors=("self_influence", "point_scores"),
    fix="Restore the folder from the run that wrote it, or re-run the attribution to write "
        "it again (it is never repaired in place).")


def _bad(path: Path, problem: str) -> ScoresFileError:
    return _FORMAT.error(path, problem)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Checks of ``scores.json`` beyond the schema: query mode and ids."""
    if meta["query_mode"] not in QUERY_MODES:
        raise _bad(path, f"query_mode {meta['query_mode']!r} is not one of {QUERY_MODES}")
    if meta["query_mode"] == "groups" and meta["query_group_column"] is None:
        raise _bad(path, "query_mode 'groups' needs a query_group_column")
    check_ids(path, _FORMAT, meta, {"group_ids": (int, str, float),
                                    "query_ids": (int, str, float),
                                    "point_rows": (int, str),
                                    "point_groups": (int, str, float)},
              unique=("group_ids", "point_rows"))
    if (meta["point_rows"] is None) != (meta["point_groups"] is None):
        raise _bad(path, "point_rows and point_groups must both be present or both null")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if tensors["matrix"].dim() != 2:
        raise _bad(path, f"'matrix' must be 2-D, got shape {tuple(tensors['matrix'].shape)}")
