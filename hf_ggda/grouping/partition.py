"""Partition helpers: checking K, mapping values to ids, splitting K across classes."""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from datasets import Dataset

from ..errors import GroupingError


def check_k_setting(k: int) -> None:
    """Config-time check of K (n is not known yet).

    Raises:
        GroupingError: K < 1.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise GroupingError(f"num_groups (K) must be an integer >= 1, got K={k!r}.")


def check_num_groups(k: int, n: int, what: str = "the dataset") -> None:
    """Raise unless 1 <= K <= n.

    Args:
        k: Requested number of groups K.
        n: Rows available.
        what: What the n rows are (for the message).

    Raises:
        GroupingError: K < 1 or K > n.
    """
    if k < 1:
        raise GroupingError(f"Number of groups K={k} must be >= 1 (n={n} rows in {what}).")
    if k > n:
        raise GroupingError(
            f"Cannot make K={k} non-empty groups from n={n} rows of {what}: K must be <= n. "
            "Lower num_groups or use more rows.")


def column_values(dataset: Dataset, column: str) -> list[Any]:
    """Return a column as a plain Python list, whatever the dataset's format (torch, numpy...)."""
    return list(dataset.select_columns([column]).with_format(None)[:][column])


def _hashable(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        return _hashable(value.tolist())
    return value


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def factorize(values: Sequence[Any], column: str) -> tuple[list[Any], np.ndarray]:
    """Map values of any hashable type to ints 0..K-1 in sorted order of the values.

    Lists and dicts are compared as tuples.

    Args:
        values: One value per row.
        column: The column's name (for messages).

    Returns:
        (sorted distinct values, (n,) int64 index of each row's value).

    Raises:
        GroupingError: A value is null/NaN, or the values cannot be sorted.
    """
    nulls = [i for i, v in enumerate(values) if _is_null(v)]
    if nulls:
        raise GroupingError(
            f"Column {column!r} has nulls at rows {nulls[:20]}{' ...' if len(nulls) > 20 else ''}"
            f" ({len(nulls)} of {len(values)}); every row needs a group. Fill them, e.g. "
            f"`dataset.map(lambda r: {{{column!r}: r[{column!r}] or 'unknown'}})`, or drop them.")
    keys = [_hashable(v) for v in values]
    try:
        uniq: list[Any] = sorted(set(keys))
    except TypeError as err:
        raise GroupingError(f"Values of column {column!r} cannot be sorted ({err}).") from err
    index = {u: i for i, u in enumerate(uniq)}
    inverse = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    return uniq, inverse


def allocate_groups(counts: Mapping[Any, int], k: int, allocation: str = "proportional",
                    what: str = "class") -> dict[Any, int]:
    """Split K groups across classes: in proportion to class size (largest remainder) or equally.

    Every class gets at least one group.

    Args:
        counts: Rows per class.
        k: Total number of groups K.
        allocation: ``"proportional"`` or ``"equal"``.
        what: What the classes are (for messages).

    Returns:
        Groups per class, summing to K.

    Raises:
        GroupingError: K is smaller than the number of classes, or a class has fewer rows than
            its share of the groups.
        ValueError: Unknown ``allocation``.
    """
    classes = sorted(counts)
    n = int(sum(counts.values()))
    check_num_groups(k, n)
    if k < len(classes):
        raise GroupingError(
            f"K={k} groups cannot cover the {len(classes)} {what}s of the n={n} rows: grouping "
            f"within each {what} needs K >= {len(classes)}.")
    if allocation == "equal":
        base, extra = divmod(k, len(classes))
        by_size = sorted(classes, key=lambda c: (-counts[c], classes.index(c)))
        shares = {c: base + (1 if i < extra else 0) for i, c in enumerate(by_size)}
    elif allocation == "proportional":
        quota = {c: k * counts[c] / n for c in classes}
        shares = {c: max(1, math.floor(quota[c])) for c in classes}
        while sum(shares.values()) < k:
            c = max(classes, key=lambda c: (quota[c] - shares[c], -classes.index(c)))
            shares[c] += 1
        while sum(shares.values()) > k:
            c = min((c for c in classes if shares[c] > 1),
                    key=lambda c: (quota[c] - shares[c], classes.index(c)))
            shares[c] -= 1
    else:
        raise ValueError(f"allocation must be 'proportional' or 'equal', got {allocation!r}.")
    for c in classes:
        if shares[c] > counts[c]:
            hint = "allocation='proportional', " if allocation == "equal" else ""
            raise GroupingError(
                f"{what[:1].upper() + what[1:]} {c!r} has {counts[c]} rows but its share of the "
                f"K={k} groups is {shares[c]} (n={n} rows in all). Use fewer groups, {hint}or "
                "drop the tiny class.")
    return {c: int(shares[c]) for c in classes}
