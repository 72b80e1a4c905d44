"""Self-influence as a result of its own: no query axis, its own columns, file and card.

A group's self-influence is g_Gᵀ M⁻¹ g_G — its influence on its own summed loss; a row's is
g_iᵀ M⁻¹ g_i. High values flag groups (and rows) the model finds surprising: mislabelled,
off-distribution or memorised data. Nothing here is measured against a query, so nothing is
written as a query score: :meth:`SelfInfluence.to_dataset_columns` writes
``ggda_self_influence``, ``ggda_self_rank`` (1 = highest) and ``ggda_point_self_influence``
(rows of drilled groups), and removes query-based columns an earlier run left behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset
from safetensors.torch import save as st_save

from .alignment import check_grouping, check_positional_rows
from .atomic import atomic_write_bytes
from .errors import MissingColumnError
from .logging import get_logger
from .result_files import ResultFormat, check_ids, read_result
from .scores import (
    GROUP_RANK_COLUMN,
    GROUP_SCORE_COLUMN,
    POINT_SCORE_COLUMN,
    POINT_SELF_COLUMN,
    SELF_INFLUENCE_COLUMN,
    SELF_RANK_COLUMN,
    _plain,
    _plain_list,
)

logger = get_logger(__name__)

FORMAT = "hf_ggda.self_influence"
FORMAT_VERSION = 1
TENSORS_FILE, META_FILE = "self_influence.safetensors", "self_influence.json"
#: Columns of query-based results; a self-influence run must not leave them standing.
QUERY_COLUMNS = (GROUP_SCORE_COLUMN, GROUP_RANK_COLUMN, POINT_SCORE_COLUMN)


@dataclass
class SelfInfluence:
    """Self-influence of K groups, and of the rows of drilled groups.

    Attributes:
        values: (K,) group self-influence g_Gᵀ M⁻¹ g_G.
        group_ids: The K group ids.
        group_column: Training column of group ids.
        config: Settings of the attributor.
        fingerprints: What the numbers depend on.
        point_values: Optional (R,) row self-influence of the drilled rows.
        point_rows: The R row keys (values of ``point_key``, or positions).
        point_groups: The group of each drilled row.
        point_key: Column of row keys (None: positions in the fitted dataset).
    """

    values: torch.Tensor
    group_ids: list[Any]
    group_column: str = "group_id"
    config: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, Any] = field(default_factory=dict)
    point_values: Optional[torch.Tensor] = None
    point_rows: Optional[list[Any]] = None
    point_groups: Optional[list[Any]] = None
    point_key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.values.dim() != 1 or len(self.values) != len(self.group_ids):
            raise ValueError(f"values must be ({len(self.group_ids)},), got "
                             f"{tuple(self.values.shape)}.")
        if self.point_values is not None:
            r = len(self.point_rows or [])
            if self.point_values.shape != (r,) or len(self.point_groups or []) != r:
                raise ValueError(f"point_values must be ({r},) with {r} row keys and groups.")
        self.group_ids = _plain_list(self.group_ids)

    @property
    def num_groups(self) -> int:
        """K."""
        return len(self.group_ids)

    #: No query axis: the card and ``prune`` read these instead of query fields.
    num_queries = 0
    query_mode = "self"
    sign_convention = ("self-influence g_Gᵀ M⁻¹ g_G: a group's influence on its own summed "
                       "loss; high values mark data the model finds surprising (mislabelled, "
                       "off-distribution or memorised)")

    def aggregated(self) -> torch.Tensor:
        """The (K,) self-influence values (the card's and ``prune``'s ranking key)."""
        return self.values

    def group_index(self) -> dict[Any, int]:
        """Return the map group id -> position."""
        return {g: i for i, g in enumerate(self.group_ids)}

    def top_k(self, query_index: Optional[int] = None, k: int = 10,
              largest: bool = True) -> list[tuple[Any, float]]:
        """The ``k`` groups of highest (or lowest) self-influence.

        Args:
            query_index: Must be None: self-influence has no query axis.
            k: How many groups.
            largest: True for the highest self-influence first.

        Returns:
            (group id, self-influence) pairs.

        Raises:
            ValueError: ``k`` < 1, or a ``query_index`` was given.
        """
        if query_index is not None:
            raise ValueError("Self-influence has no queries: call top_k without query_index.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        vals, idx = torch.topk(self.values, min(k, self.num_groups), largest=largest)
        return [(self.group_ids[int(i)], float(v)) for v, i in zip(vals, idx)]

    def ranks(self) -> torch.Tensor:
        """(K,) rank of each group, 1 = highest self-influence (inspect first)."""
        order = torch.argsort(-self.values.double(), stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks

    def to_dataset_columns(self, train: Dataset, group_column: Optional[str] = None,
                           row_column: Optional[str] = None) -> Dataset:
        """Add ``ggda_self_influence``, ``ggda_self_rank`` and ``ggda_point_self_influence``
        (None outside drilled groups) by group id and row key; query-based ``ggda_*`` columns
        of an earlier run are removed.

        Raises:
            MissingColumnError: The group or row-key column is absent.
            RowAlignmentError: Point values keyed by position on a dataset that is not the
                fitted one (another length, order or fingerprint), or rows grouped otherwise
                than at fit time.
        """
        column = group_column or self.group_column
        if column not in train.column_names:
            raise MissingColumnError(column, train.column_names, role="group column")
        check_grouping(self.fingerprints.get("train_groups"), train, column, self.group_ids)
        index = {g: k for k, g in enumerate(self.group_ids)}
        cols = [index.get(_plain(g)) for g in train[column]]
        vals, ranks = self.values.tolist(), self.ranks().tolist()
        new = {SELF_INFLUENCE_COLUMN: [None if c is None else vals[c] for c in cols],
               SELF_RANK_COLUMN: [None if c is None else int(ranks[c]) for c in cols],
               POINT_SELF_COLUMN: self._point_column(train, row_column)}
        stale = [c for c in (*QUERY_COLUMNS, *new) if c in train.column_names]
        out = train.remove_columns(stale) if stale else train
        for name, values in new.items():
            out = out.add_column(name, values)
        return out

    def _point_column(self, train: Dataset, row_column: Optional[str]) -> list[Any]:
        if self.point_values is None:
            return [None] * len(train)
        values = dict(zip(self.point_rows or [], self.point_values.tolist()))
        key = row_column or self.point_key
        if key is None:
            check_positional_rows(self.fingerprints, train, list(self.point_rows or []),
                                  "Point self-influence values")
            return [values.get(i) for i in range(len(train))]
        if key not in train.column_names:
            raise MissingColumnError(key, train.column_names, role="row id column")
        return [values.get(_plain(v)) for v in train[key]]

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``self_influence.safetensors`` and ``self_influence.json`` (atomically)."""
        path = Path(save_directory)
        tensors = {"values": self.values.detach().cpu().contiguous()}
        if self.point_values is not None:
            tensors["point_values"] = self.point_values.detach().cpu().contiguous()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "group_ids": self.group_ids, "group_column": self.group_column,
                "config": self.config, "fingerprints": self.fingerprints,
                "point_rows": None if self.point_rows is None else _plain_list(self.point_rows),
                "point_groups": None if self.point_groups is None
                else _plain_list(self.point_groups), "point_key": self.point_key}
        atomic_write_bytes(path / TENSORS_FILE, st_save(tensors))
        atomic_write_bytes(path / META_FILE, json.dumps(meta, indent=1, default=str).encode())

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike[str]) -> "SelfInfluence":
        """Load a folder written by :meth:`save_pretrained` (untrusted: schema-checked).

        Raises:
            FileNotFoundError: The files are missing.
            ScoresFileError: Bad JSON or tensors, an unknown format or version, a field that
                fails the schema, or lengths that do not match.
        """
        path = Path(save_directory)
        meta, tensors = read_result(path, _FORMAT)
        check_ids(path / META_FILE, _FORMAT, meta,
                  {"group_ids": (int, str, float), "point_rows": (int, str),
                   "point_groups": (int, str, float)}, unique=("group_ids", "point_rows"))
        if tensors["values"].dim() != 1:
            raise _FORMAT.error(path / TENSORS_FILE, "'values' must be 1-D")
        if ("point_values" in tensors) != (meta["point_rows"] is not None) or \
                (meta["point_rows"] is None) != (meta["point_groups"] is None):
            raise _FORMAT.error(path, "point_values, point_rows and point_groups must all be "
                                      "saved or all absent")
        try:
            return cls(values=tensors["values"], point_values=tensors.get("point_values"),
                       **meta)
        except ValueError as err:
            raise _FORMAT.error(path, f"its JSON does not match its tensors ({err})") from None


_FORMAT = ResultFormat(
    what="self-influence file", version=FORMAT_VERSION, tensors_file=TENSORS_FILE,
    meta_file=META_FILE, tag=FORMAT,
    schema={"group_ids": ((list,), False), "group_column": ((str,), False),
            "config": ((dict,), False), "fingerprints": ((dict,), False),
            "point_rows": ((list,), True), "point_groups": ((list,), True),
            "point_key": ((str,), True)},
    required_tensors=("values",), optional_tensors=("point_values",),
    fix="Re-run `hf-ggda self-influence` (or compute_self_influence) to write it again.")


def compute_self_influence(attributor: Any, drill_top: int = 0,
                           group_ids: Optional[Sequence[Any]] = None,
                           row_column: Optional[str] = None) -> SelfInfluence:
    """Group self-influence of a fitted attributor, and row self-influence of chosen groups.

    Args:
        attributor: A fitted :class:`~hf_ggda.attributors.base.Attributor`.
        drill_top: Drill into this many groups of highest self-influence (0: none).
        group_ids: Drill into exactly these groups instead.
        row_column: Row-key column of the result (default: ``__ggda_row__`` when present,
            else positions in the fitted dataset).

    Returns:
        The :class:`SelfInfluence`.

    Raises:
        NotFittedError: The attributor was not fitted.
        ValueError: ``drill_top`` < 0 or unknown group ids.
        MissingColumnError: ``row_column`` is absent.
    """
    from .tasks import ROW_COLUMN

    if drill_top < 0:
        raise ValueError(f"drill_top must be >= 0, got {drill_top}.")
    values = attributor.self_scores()
    ids = list(attributor.group_ids)
    state = attributor._require_fit()
    result = SelfInfluence(values=values, group_ids=ids, group_column=state.group_column,
                           config=attributor.result_config(),
                           fingerprints={"train": [p.fingerprint for p in state.parts],
                                         "train_groups": state.group_signature})
    chosen = list(group_ids) if group_ids is not None else \
        [ids[int(k)] for k in torch.argsort(-values.double(), stable=True)[:drill_top]]
    if not chosen:
        return result
    unknown = set(map(_plain, chosen)) - set(result.group_ids)
    if unknown:
        raise ValueError(f"Unknown group ids {sorted(map(str, unknown))[:10]}.")
    wanted = set(map(_plain, chosen))
    members = [i for i, g in enumerate(state.dataset[state.group_column]) if _plain(g) in wanted]
    subset = state.dataset.select(members)
    point = attributor.row_self_scores(subset)
    key = row_column or (ROW_COLUMN if ROW_COLUMN in subset.column_names else None)
    if key is not None and key not in subset.column_names:
        raise MissingColumnError(key, subset.column_names, role="row id column")
    result.point_values = point
    result.point_rows = _plain_list(subset[key]) if key is not None else members
    result.point_groups = _plain_list(subset[state.group_column])
    result.point_key = key
    logger.info("Self-influence: %d groups, %d rows drilled.", len(ids), len(members))
    return result


__all__ = ["POINT_SELF_COLUMN", "SELF_RANK_COLUMN", "SelfInfluence", "compute_self_influence"]
