"""Group gradients over a stream of rows (``datasets.IterableDataset``, e.g. a streamed Hub set).

The in-memory engine sorts rows by group and cuts shards, which needs random access. A stream
is read once, in chunks: each chunk is tokenised by the task (``Dataset.map`` on the chunk),
ordered by group within each batch, and its per-group sums are added to a K × p buffer, so peak
memory is K × p plus one chunk, whatever n. Under Accelerate every process reads its own part
of the stream (``datasets.distributed.split_dataset_by_node``) and the per-group sums are
gathered and added, so each row counts exactly once. Streams are not resumable (no store).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from datasets import Dataset, IterableDataset

from ..distributed import all_gather_object, rank_and_world
from ..errors import EmptyDatasetError, GroupingError, MissingColumnError, NonFiniteError
from ..logging import progress
from ..tasks import GROUP_COLUMN
from .engine import GradientEngine, GroupGradients, RowFn, fn_key
from .hooks import GradientCollector


def random_stream_groups(dataset: IterableDataset, num_groups: int, seed: int = 0,
                         column: str = GROUP_COLUMN) -> IterableDataset:
    """Add a seeded random group id to each streamed row (from the row's position).

    Args:
        dataset: The stream.
        num_groups: K.
        seed: Seed of the assignment.
        column: Name of the new column.

    Returns:
        The stream with ``column`` = blake2b(seed, position) mod K.

    Raises:
        GroupingError: K < 1.
    """
    if num_groups < 1:
        raise GroupingError(f"num_groups must be >= 1, got K = {num_groups}.")

    def assign(row: dict[str, Any], index: int) -> dict[str, Any]:
        digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
        return {column: int.from_bytes(digest, "little") % num_groups}

    return dataset.map(assign, with_indices=True)


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def stream_group_gradients(engine: GradientEngine, dataset: IterableDataset | Iterable[dict],
                           group_column: str = GROUP_COLUMN, fn: RowFn = "loss",
                           chunk_rows: int = 512) -> GroupGradients:
    """Return the group gradients of a stream, reading it once.

    Args:
        engine: The gradient engine (model, task, selection, projection).
        dataset: An ``IterableDataset`` (or any iterable of row dicts) with a group column.
        group_column: Column of group ids (hashable, sortable, not null).
        fn: Row function, as for :meth:`GradientEngine.group_gradients`.
        chunk_rows: Rows tokenised at a time.

    Returns:
        The group gradients, groups sorted by id (fingerprint: no dataset hash for streams).

    Raises:
        EmptyDatasetError: The stream has no rows.
        MissingColumnError: A row lacks the group column.
        GroupingError: A null group id.
        NonFiniteError: A NaN/Inf loss (names the stream positions).
    """
    rank, world = rank_and_world()
    if world > 1 and isinstance(dataset, IterableDataset):
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
    sums: dict[Any, torch.Tensor] = {}
    sizes: dict[Any, int] = {}
    collector = engine.new_collector()
    bar = progress(desc="Group gradients (stream)", unit="row")
    seen = 0
    with engine.attribution_mode(), collector:
        for chunk in _chunks(iter(dataset), chunk_rows):
            seen = _chunk(engine, collector, chunk, group_column, fn, sums, sizes, seen)
            bar.update(len(chunk))
    bar.close()
    sums, sizes = _gather(sums, sizes, world)
    if not sums:
        raise EmptyDatasetError("stream")
    ids = sorted(sums)
    grads = torch.stack([sums[g] for g in ids]).to(engine.device)
    grads = engine.finish_block(grads)
    fingerprint = {"stream": True, "selection": engine.selection.how, "fn": fn_key(fn),
                   "task": engine.task.config_dict()}
    return GroupGradients(grads, ids, np.array([sizes[g] for g in ids]), fingerprint)


def _chunk(engine: GradientEngine, collector: GradientCollector, rows: list[dict[str, Any]],
           group_column: str, fn: RowFn, sums: dict[Any, torch.Tensor],
           sizes: dict[Any, int], seen: int) -> int:
    """Add one chunk's per-group sums; return the number of rows seen so far."""
    if any(group_column not in r for r in rows):
        raise MissingColumnError(group_column, list(rows[0]), role="group column")
    groups = [r[group_column] for r in rows]
    nulls = [seen + i for i, g in enumerate(groups) if g is None]
    if nulls:
        raise GroupingError(f"Null group ids at stream positions {nulls[:20]}.")
    prepared = engine.task.prepare(Dataset.from_list(rows))
    features = prepared.select_columns(
        [c for c in engine.task.feature_columns if c in prepared.column_names])
    row_fn = engine._row_fn(fn)
    bs = engine.config.batch_size
    for start in range(0, len(rows), bs):
        idx = sorted(range(start, min(start + bs, len(rows))), key=lambda i: groups[i])
        local = sorted(set(groups[i] for i in idx))
        slot_of = {g: k for k, g in enumerate(local)}
        batch = engine.collate_rows(features, idx)
        collector.reset()
        losses = row_fn(engine.model, batch)
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            raise NonFiniteError("loss", [seen + idx[i] for i in torch.nonzero(bad).flatten()])
        out = torch.zeros(len(local), engine.collect_dim, dtype=engine.dtype,
                          device=engine.device)
        slots = torch.tensor([slot_of[groups[i]] for i in idx])
        collector.backward(losses, slots, out, per_example=False)
        for g, k in slot_of.items():
            sums[g] = sums[g] + out[k].cpu() if g in sums else out[k].cpu()
        for i in idx:
            sizes[groups[i]] = sizes.get(groups[i], 0) + 1
    return seen + len(rows)


def _gather(sums: dict[Any, torch.Tensor], sizes: dict[Any, int], world: int
            ) -> tuple[dict[Any, torch.Tensor], dict[Any, int]]:
    """Add every process's per-group sums (each row was read by exactly one process)."""
    if world == 1:
        return sums, sizes
    parts: list[Optional[tuple[dict, dict]]] = all_gather_object((sums, sizes), world)
    total: dict[Any, torch.Tensor] = {}
    count: dict[Any, int] = {}
    for part in parts:
        assert part is not None
        for g, v in part[0].items():
            total[g] = total[g] + v if g in total else v.clone()
        for g, n in part[1].items():
            count[g] = count.get(g, 0) + n
    return total, count
