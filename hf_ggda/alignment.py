"""Placing per-row results on a dataset only where its rows are the ones that were scored.

Results keyed by *position* (query rows of :meth:`~hf_ggda.scores.GroupScores.to_query_columns`,
drill-down rows keyed by their place in the fitted dataset) land on the wrong rows of a
shuffled, filtered or other dataset of the same length. These checks make that an error:

* **Query rows** carry a signature (:func:`rows_signature`: the hash of their columns, in
  order) in the scores' ``fingerprints["query_rows"]``; the dataset the columns are added to
  must show the same signature over those columns (columns added since are ignored).
* **Positional drill-down rows** are valid only on the fitted dataset itself: its
  ``_fingerprint`` is the ``dataset`` field of the scores' training fingerprints.
* **Groups** carry which rows they held at fit time (:func:`group_signature`: per group, the
  order-free sum of its rows' hashes, in ``fingerprints["train_groups"]``); group-score
  columns are refused on a dataset of the fitted size whose groups hold other rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from .errors import RowAlignmentError
from .fingerprint import hash_json
from .logging import get_logger

logger = get_logger(__name__)

__all__ = ["check_grouping", "check_positional_rows", "check_query_rows", "fitted_dataset",
           "group_signature", "rows_signature"]


def rows_signature(dataset: Dataset, columns: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """The order-sensitive signature of ``dataset``'s rows.

    Args:
        dataset: The rows (a ``datasets.Dataset``, any indices mapping).
        columns: Columns to hash (default: every column not written by hf_ggda, i.e. not
            starting with ``ggda_``).

    Returns:
        ``{"columns": [...], "rows": n, "hash": ...}``.
    """
    cols = sorted(columns if columns is not None else
                  [c for c in dataset.column_names if not c.startswith("ggda_")])
    table = dataset.select_columns(cols).with_format("arrow")[:] if cols and len(dataset) \
        else None
    values = table.to_pydict() if table is not None else {}
    return {"columns": cols, "rows": len(dataset), "hash": hash_json(values)}


def check_query_rows(signature: Mapping[str, Any] | None, query: Dataset) -> None:
    """Raise unless ``query`` holds the scored query rows in the scored order.

    Args:
        signature: ``fingerprints["query_rows"]`` of the scores (None: older scores, which
            carry none; only their length is checked by the caller).
        query: The dataset the per-query columns are about to be added to.

    Raises:
        RowAlignmentError: Other rows or another order (the message names the fix).
    """
    if not signature:
        return
    cols = list(signature.get("columns", []))
    missing = [c for c in cols if c not in query.column_names]
    if missing:
        logger.warning("The query rows cannot be checked against the scored ones: columns %s "
                       "were removed since scoring.", missing[:5])
        return
    if rows_signature(query, cols)["hash"] != signature.get("hash"):
        raise RowAlignmentError(
            f"These query rows are not the scored ones in the scored order (their columns "
            f"{cols[:5]} differ: shuffled, filtered or other rows), so per-query columns "
            "would land on the wrong rows. Pass the query dataset exactly as it was given to "
            "score(), add the columns, and reorder or filter afterwards.")


def fitted_dataset(fingerprints: Mapping[str, Any]) -> str | None:
    """The ``_fingerprint`` of the dataset the attributor was fitted on, if recorded.

    Args:
        fingerprints: A result's ``fingerprints``.

    Returns:
        The fingerprint, or None.
    """
    train = fingerprints.get("train")
    if isinstance(train, list) and train and isinstance(train[0], Mapping):
        value = train[0].get("dataset")
        return value if isinstance(value, str) else None
    return None


def check_positional_rows(fingerprints: Mapping[str, Any], train: Dataset,
                          rows: Sequence[int], what: str) -> None:
    """Raise unless ``train`` is the fitted dataset, for results keyed by row position.

    Args:
        fingerprints: The result's fingerprints.
        train: The dataset the per-row values are about to be added to.
        rows: The positions the result holds values for.
        what: The values, for the message (``"Point scores"``).

    Raises:
        RowAlignmentError: ``train`` is shorter than a position, or (where the fitted
            dataset's fingerprint is known) is another dataset or order.
    """
    fix = ("Pass the fitted dataset itself (attributor.train_dataset), or key the rows by an "
           "id column: add one before fitting (train.add_column('__ggda_row__', "
           "list(range(len(train))))) or drill down with row_column=.")
    if rows and max(rows) >= len(train):
        raise RowAlignmentError(f"{what} are keyed by row position in the fitted dataset, "
                                f"which is longer than this one ({len(train)} rows). {fix}")
    fitted = fitted_dataset(fingerprints)
    if rows and fitted is not None and getattr(train, "_fingerprint", None) != fitted:
        raise RowAlignmentError(
            f"{what} are keyed by row position in the fitted dataset, and this dataset is "
            "another one (another fingerprint: shuffled, filtered, mapped or reloaded), so "
            f"they would land on the wrong rows. {fix}")


def _json_text(value: Any) -> str:
    """Deterministic text of a cell (arrays in full: their ``str`` elides long ones)."""
    def plain(v: Any) -> Any:
        return v.tolist() if hasattr(v, "tolist") else v
    value = plain(value)
    if isinstance(value, list):
        value = [plain(v) for v in value]
    return json.dumps(value, sort_keys=True, default=str)


def _row_hashes(dataset: Dataset, columns: Sequence[str]) -> np.ndarray:
    """(n,) uint64 hash of each row's values in ``columns`` (order-free over rows)."""
    import pandas as pd

    frame = dataset.select_columns(list(columns)).to_pandas()
    for col in frame.columns:  # lists, dicts, arrays, bytes: hashed through their JSON text
        if frame[col].dtype == object:
            frame[col] = frame[col].map(_json_text)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def _group_sums(dataset: Dataset, group_column: str, group_ids: Sequence[Any],
                columns: Sequence[str]) -> tuple[np.ndarray, int]:
    """Per group (in ``group_ids`` order), the wrapped uint64 sum of its rows' hashes, and the
    number of rows whose group is not among ``group_ids``."""
    index = {g: k for k, g in enumerate(group_ids)}
    slots = np.array([index.get(v.item() if hasattr(v, "item") else v, -1)
                      for v in dataset[group_column]], dtype=np.int64)
    hashes = _row_hashes(dataset, columns) if columns else np.zeros(len(dataset), np.uint64)
    sums = np.zeros(len(group_ids), dtype=np.uint64)
    known = slots >= 0
    np.add.at(sums, slots[known], hashes[known])
    return sums, int((~known).sum())


def group_signature(dataset: Dataset, group_column: str, group_ids: Sequence[Any]
                    ) -> dict[str, Any]:
    """Which rows each group holds, order-free: per group, the sum of its rows' hashes.

    Args:
        dataset: The fitted training rows.
        group_column: Their group column.
        group_ids: The fitted group ids (the order of the result).

    Returns:
        ``{"columns": [...], "rows": n, "sums": [hex per group]}`` (columns: every column but
        the group column and ``ggda_*`` ones).
    """
    cols = sorted(c for c in dataset.column_names
                  if c != group_column and not c.startswith("ggda_"))
    sums, _ = _group_sums(dataset, group_column, group_ids, cols)
    return {"columns": cols, "rows": len(dataset), "sums": [f"{int(s):016x}" for s in sums]}


def check_grouping(signature: Mapping[str, Any] | None, train: Dataset, group_column: str,
                   group_ids: Sequence[Any]) -> None:
    """Raise when ``train`` holds the fitted rows grouped otherwise than at fit time.

    Only a dataset with the fitted number of rows is checked (any order: a shuffle is fine);
    a filtered subset gets its values by group id as before.

    Args:
        signature: The result's ``fingerprints["train_groups"]`` (None: not recorded).
        train: The dataset the per-row columns are about to be added to.
        group_column: Its group column.
        group_ids: The result's group ids.

    Raises:
        RowAlignmentError: The same number of rows, but some group holds other rows than
            at fit time (another grouping with the same ids, or other rows).
    """
    if not signature or len(train) != signature.get("rows"):
        return
    cols = list(signature.get("columns", []))
    if any(c not in train.column_names for c in cols) or \
            len(signature.get("sums", [])) != len(group_ids):
        logger.warning("The grouping of these rows cannot be checked against the fitted one: "
                       "columns %s are missing.",
                       [c for c in cols if c not in train.column_names][:5])
        return
    sums, _ = _group_sums(train, group_column, group_ids, cols)
    bad = [group_ids[k] for k, s in enumerate(sums) if f"{int(s):016x}" != signature["sums"][k]]
    if bad:
        raise RowAlignmentError(
            f"These rows are grouped differently from the rows the scores were computed on: "
            f"groups {bad[:10]}{' ...' if len(bad) > 10 else ''} of column {group_column!r} "
            "hold other rows than at fit time (same ids, another grouping, or other rows), so "
            "their scores would land on the wrong rows. Pass the rows grouped as at fit "
            "(attributor.train_dataset), or fit again with this grouping.")
