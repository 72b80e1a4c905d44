"""Placing per-row results on a dataset only where its rows are the ones that were scored.

Results keyed by *position* (query rows of :meth:`~hf_ggda.scores.GroupScores.to_query_columns`,
drill-down rows keyed by their place in the fitted dataset) land on the wrong rows of a
shuffled, filtered or other dataset of the same length. These checks make that an error:

* **Query rows** carry a signature (:func:`rows_signature`: the hash of their columns, in
  order) in the scores' ``fingerprints["query_rows"]``; the dataset the columns are added to
  must show the same signature over those columns (columns added since are ignored).
* **Positional drill-down rows** are valid only on the fitted dataset itself: its
  ``_fingerprint`` is the ``dataset`` field of the scores' training fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from .errors import RowAlignmentError
from .fingerprint import hash_json
from .logging import get_logger

logger = get_logger(__name__)

__all__ = ["check_positional_rows", "check_query_rows", "fitted_dataset", "rows_signature"]


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
