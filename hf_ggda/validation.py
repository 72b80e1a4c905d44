"""Checks of datasets and models at the boundary, before any computation starts.

One place for what a user can pass wrong: something other than one ``Dataset`` split, null
texts or labels, labels that do not fit the task or the model's head, token ids or row
lengths the model cannot embed, and a model whose weights are not loaded (``meta`` device).
Each check raises a typed error of :mod:`hf_ggda.errors` naming the rows and the fix; the
tasks (:mod:`hf_ggda.tasks`) call them from ``prepare`` (data only) and ``validate`` (data
against the model).

Columns are checked with vectorised Arrow kernels over the (memory-mapped) column; rows are
located batch by batch only when a check fails (never the whole table in Python).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from .errors import (
    DatasetTypeError,
    GroupingError,
    LabelError,
    ModelInputError,
    ModelStateError,
    NullValueError,
)

_BATCH = 16384
_SHOWN = 10


def ensure_dataset(dataset: Any, what: str = "dataset") -> Dataset:
    """Return ``dataset`` if it is one ``datasets.Dataset``; else raise naming the fix.

    Args:
        dataset: What the user passed.
        what: How to call it in messages.

    Returns:
        The dataset.

    Raises:
        DatasetTypeError: A ``DatasetDict`` (name its splits), an ``IterableDataset``
            (streaming), a pandas frame, a dict or list, or anything else.
    """
    if isinstance(dataset, Dataset):
        return dataset
    kind = type(dataset).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        splits = list(dataset)
        first = splits[0] if splits else "train"
        fix = (f"it holds the splits {splits}; pass one of them, e.g. dataset[{first!r}]")
        if kind == "IterableDatasetDict":
            fix += ", loaded without streaming=True"
    elif kind == "IterableDataset":
        fix = ("attribution reads rows by index and more than once, which a streamed dataset "
               "cannot do; load it without streaming=True, or materialise it with "
               "`Dataset.from_generator(lambda: (yield from iterable))`")
    elif kind == "DataFrame":
        fix = "convert it with `datasets.Dataset.from_pandas(frame, preserve_index=False)`"
    elif isinstance(dataset, (dict, list, tuple)):
        fix = ("convert it with `datasets.Dataset.from_dict({...})` or "
               "`Dataset.from_list([...])`")
    else:
        fix = "pass a datasets.Dataset (e.g. `load_from_disk(path)` or `Dataset.from_dict`)"
    article = "an" if kind[:1] in "AEIOU" else "a"
    raise DatasetTypeError(f"The {what} must be one datasets.Dataset split, got {article} "
                           f"{kind}: {fix}.")


def _whole(dataset: Dataset, column: str) -> Optional[pa.ChunkedArray]:
    """The column as stored (None when an indices mapping selects or reorders its rows)."""
    if getattr(dataset, "_indices", None) is not None:
        return None
    return dataset.data.column(column)


def _batches(dataset: Dataset, column: str) -> Iterator[tuple[int, pa.Array]]:
    """Yield (offset of the first row, Arrow array) over one column, in row order."""
    view = dataset.select_columns([column]).with_format("arrow")
    offset = 0
    for table in view.iter(batch_size=_BATCH):
        array = table.column(0).combine_chunks()
        yield offset, array
        offset += len(array)


def _rows_where(dataset: Dataset, column: str,
                mask_of: Callable[[pa.Array], np.ndarray]) -> list[int]:
    """Row positions (at most ``_SHOWN`` + 1) where ``mask_of(batch)`` is true."""
    found: list[int] = []
    for offset, array in _batches(dataset, column):
        hits = np.flatnonzero(mask_of(array))
        found.extend(int(offset + h) for h in hits[:_SHOWN + 1 - len(found)])
        if len(found) > _SHOWN:
            break
    return found


def _shown(rows: Sequence[int]) -> str:
    return f"{list(rows[:_SHOWN])}{' ...' if len(rows) > _SHOWN else ''}"


def check_no_nulls(dataset: Dataset, columns: Sequence[str], what: str = "dataset") -> None:
    """Refuse None / null values in ``columns``.

    Raises:
        NullValueError: A column holds nulls (the message names the rows and the fix).
    """
    for column in columns:
        whole = _whole(dataset, column)
        if whole is not None and whole.null_count == 0:
            continue
        rows = _rows_where(dataset, column,
                           lambda a: a.is_null().to_numpy(zero_copy_only=False))
        if rows:
            raise NullValueError(
                f"Column {column!r} of the {what} holds None (null) at rows {_shown(rows)}. "
                f"Drop them with `dataset.filter(lambda r: r[{column!r}] is not None)` or "
                "fill them in.")


def check_class_ids(dataset: Dataset, column: str, what: str = "dataset") -> None:
    """Refuse labels no classification or regression loss can use: negative class ids (the
    Hugging Face ignore index -100 included: it would silently add nothing) and NaN / Inf
    regression targets.

    Raises:
        LabelError: Such labels (the message names the rows and the fix).
    """
    dtype = dataset.features[column]
    kind = str(getattr(dtype, "dtype", ""))
    whole = _whole(dataset, column)
    if kind.startswith("int"):
        low = pc.min(whole).as_py() if whole is not None else -1
        if low is None or low >= 0:
            return
        rows = _rows_where(dataset, column, lambda a: np.asarray(
            pc.fill_null(pc.less(a, 0), False).to_numpy(zero_copy_only=False)))
        if rows:
            values = sorted({int(v) for v in dataset.select(rows[:_SHOWN])[column]})
            ignore = -100 in values
            raise LabelError(
                f"Label column {column!r} of the {what} holds negative class ids {values} at "
                f"rows {_shown(rows)}."
                + (" -100 is the ignore index of token-level losses: on a sequence "
                   "classifier it would make these rows silently contribute nothing."
                   if ignore else "")
                + f" Drop these rows (`dataset.filter(lambda r: r[{column!r}] >= 0)`) or "
                "re-encode the labels as 0..K-1 (`dataset.class_encode_column(...)`).")
    elif kind.startswith("float"):
        if whole is not None and pc.all(pc.is_finite(whole)).as_py() is not False:
            return
        rows = _rows_where(dataset, column, lambda a: ~np.isfinite(
            np.asarray(a.to_numpy(zero_copy_only=False), dtype=np.float64)))
        if rows:
            raise LabelError(
                f"Label column {column!r} of the {what} holds NaN or Inf targets at rows "
                f"{_shown(rows)}. Drop or fix these rows before attributing.")


def check_model_ready(model: torch.nn.Module) -> None:
    """Refuse a model whose weights are not materialised (``meta`` device).

    Raises:
        ModelStateError: Some parameters or buffers live on the ``meta`` device.
    """
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta"]
    if meta:
        raise ModelStateError(
            f"{len(meta)} weights of the model are on the 'meta' device (never loaded), e.g. "
            f"{meta[:5]}. Load real weights: call from_pretrained without "
            "init_empty_weights / device_map offloading, or `model.to_empty(device='cpu')` "
            "followed by `model.load_state_dict(...)`, before attributing.")


def head_outputs(model: torch.nn.Module) -> tuple[Optional[int], Optional[str]]:
    """Return (number of outputs of the classification head, ``problem_type``) of a model.

    ``config.num_labels`` is used when the model has a config; else the output layer's
    ``out_features``. Either may be None when unknown.
    """
    cfg = getattr(model, "config", None)
    num = getattr(cfg, "num_labels", None) if cfg is not None else None
    if not isinstance(num, int):
        from .params import find_head

        try:
            head = find_head(model)
        except ValueError:
            head = None
        num = getattr(head, "out_features", None)
    problem = getattr(cfg, "problem_type", None) if cfg is not None else None
    return (int(num) if isinstance(num, int) else None), problem


def check_labels_fit_head(prepared: Dataset, model: torch.nn.Module,
                          column: str = "labels") -> None:
    """Refuse labels of the wrong kind or range for a sequence-classification head.

    Rules: a head with one output (or ``problem_type="regression"``) takes float targets; a
    head with K >= 2 outputs takes integer class ids 0..K-1; multi-label heads are not what
    the task's single-label cross-entropy computes.

    Raises:
        LabelError: Float labels on a classifier, class ids on a 1-output (regression) head,
            ids >= K, or a multi-label head (the message names the rows and the fix).
    """
    num, problem = head_outputs(model)
    kind = str(getattr(prepared.features[column], "dtype", ""))
    floats = kind.startswith("float")
    if problem == "multi_label_classification":
        raise LabelError(
            "The model's head is multi-label (config.problem_type='multi_label_classification'), "
            "but SequenceClassificationTask computes a single-label cross-entropy. Set "
            "model.config.problem_type = 'single_label_classification' with one class id per "
            "row, or subclass the task and override per_row_loss for a BCE loss.")
    regression = problem == "regression" or num == 1
    if floats and not regression:
        raise LabelError(
            f"The labels are floats ({prepared.features[column]}) but the model's head is a "
            f"classifier with {num} outputs. Cast class ids to integers "
            "(`dataset.cast_column('label', Value('int64'))` or `class_encode_column`), or for "
            "regression load the model with num_labels=1.")
    if not floats and regression:
        top = _max_of(prepared, column)
        raise LabelError(
            f"The labels are integer class ids but the model's head has {num} output(s) "
            f"(problem_type={problem!r}): it is a regression head. Load the model with "
            f"num_labels={max(2, (top or 0) + 1)} "
            "(AutoModelForSequenceClassification.from_pretrained(..., num_labels=K)) for "
            "classification, or cast the labels to float for regression.")
    if not floats and num is not None and kind != "bool" and \
            (_max_of(prepared, column) or 0) >= num:
        rows = _rows_where(prepared, column, lambda a: np.asarray(
            pc.fill_null(pc.greater_equal(a, num), False).to_numpy(zero_copy_only=False)))
        if rows:
            top = _max_of(prepared, column)
            raise LabelError(
                f"Labels reach {top} at rows {_shown(rows)}, but the model's head has "
                f"{num} outputs (classes 0..{num - 1}). Load the model with "
                f"num_labels={(top or 0) + 1} (AutoModelForSequenceClassification."
                "from_pretrained(..., num_labels=K)), or remap / drop those labels.")


def _max_of(dataset: Dataset, column: str) -> Optional[int]:
    whole = _whole(dataset, column)
    if whole is not None:
        top = pc.max(whole).as_py()
        return None if top is None else int(top)
    tops = [pc.max(a).as_py() for _, a in _batches(dataset, column)]
    tops = [t for t in tops if t is not None]
    return int(max(tops)) if tops else None


def check_inputs_fit_model(prepared: Dataset, model: torch.nn.Module,
                           column: str = "input_ids") -> None:
    """Refuse token ids the model's embedding table lacks, and rows longer than absolute
    position embeddings (both would fail deep inside torch with an index error).

    Raises:
        ModelInputError: Token ids >= the embedding table size (tokenizer and model
            do not match), or rows longer than the position table.
    """
    if column not in prepared.column_names:
        return
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if callable(getter) else None
    size = getattr(embed, "num_embeddings", None)
    limit = _position_limit(model)
    if size is None and limit is None:
        return
    whole = _whole(prepared, column)
    if whole is not None:
        flat = pc.list_flatten(whole)
        top = pc.max(flat).as_py() if len(flat) else None
        longest = pc.max(pc.list_value_length(whole)).as_py() if len(whole) else None
        if (size is None or top is None or top < size) and \
                (limit is None or longest is None or longest <= limit):
            return
    for offset, array in _batches(prepared, column):
        values = pc.list_flatten(array)
        top = pc.max(values).as_py() if len(values) else None
        if size is not None and top is not None and top >= size:
            rows = [offset + i for i, ids in enumerate(array.to_pylist())
                    if ids and max(ids) >= size]
            raise ModelInputError(
                f"Token ids reach {top} at rows {_shown(rows)}, but the model's embedding table "
                f"has {size} rows: the tokenizer does not match the model. Use the tokenizer "
                "saved with the model, or call `model.resize_token_embeddings(len(tokenizer))` "
                "(then fine-tune) before attributing.")
        longest = pc.max(pc.list_value_length(array)).as_py() if len(array) else None
        if limit is not None and longest is not None and longest > limit:
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            rows = [int(offset + i) for i in np.flatnonzero(lengths > limit)]
            raise ModelInputError(
                f"Rows {_shown(rows)} are {longest} tokens long, but the model's position "
                f"embeddings cover {limit} positions. Lower the task's max_length to at most "
                f"{limit}.")


def _position_limit(model: torch.nn.Module) -> Optional[int]:
    """Positions an absolute position-embedding table covers (None: no such table)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and (
                name.endswith("position_embeddings") or name.endswith(".wpe")
                or name == "wpe"):
            pad = module.padding_idx
            return int(module.num_embeddings - (pad + 1 if pad is not None else 0))
    return None


def check_group_values(values: Sequence[Any]) -> None:
    """Refuse group ids that are no ids: nulls, NaN / Inf, and fractional floats.

    Args:
        values: One group id per row.

    Raises:
        GroupingError: With the rows and the fix.
    """
    nulls, non_finite, fractional = [], [], []
    for i, v in enumerate(values):
        if v is None:
            nulls.append(i)
        elif isinstance(v, (float, np.floating)):
            if not math.isfinite(v):
                non_finite.append(i)
            elif not float(v).is_integer():
                fractional.append(i)

    def rows(found: list[int]) -> str:
        return f"{found[:20]}{' ...' if len(found) > 20 else ''} ({len(found)} of {len(values)})"

    if nulls:
        raise GroupingError(f"Group column has nulls at rows {rows(nulls)}; every row needs a "
                            "group. Fill them (e.g. with a 'unknown' group) or drop the rows.")
    if non_finite:
        raise GroupingError(
            f"Group column has NaN or Inf at rows {rows(non_finite)}: NaN is a missing value, "
            "not a group id (NaN != NaN), and Inf cannot be stored. Fill them with a real "
            "group id (e.g. `dataset.map(lambda r: {'group_id': -1 if r['group_id'] != "
            "r['group_id'] else r['group_id']})`) or drop the rows.")
    if fractional:
        example = values[fractional[0]]
        raise GroupingError(
            f"Group column has fractional float ids at rows {rows(fractional)} (e.g. "
            f"{float(example)!r}): group ids must be integers or strings, and a store keeps "
            "ids as integers, so 0.5 and 0.7 would collide. Cast the column, e.g. "
            "`dataset.map(lambda r: {'group_id': str(r['group_id'])})`.")
