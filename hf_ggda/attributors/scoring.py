"""Bounded-memory scoring: query gradients computed and scored a chunk of rows at a time.

A chunk's gradients (rows × p per component) and its scores (rows × K) are the only
query-side tensors alive at once, so scoring m queries needs memory for one chunk, not m × p;
with ``top_k`` only each query's k best groups are kept (m × k instead of m × K). The
numbers are those of the unchunked computation (tested: chunked = full matrix, top-k = the
top-k of the full matrix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from datasets import Dataset

from .. import SIGN_CONVENTION
from ..alignment import rows_signature
from ..errors import NonFiniteScoresError
from ..fingerprint import hash_json
from ..scores import GroupScores
from ..top_groups import TopGroupScores

if TYPE_CHECKING:
    from .base import Attributor


def chunk_rows(attributor: "Attributor", num_queries: int, query_chunk: Optional[int]) -> int:
    """Query rows per chunk: ``query_chunk``, else what ``config.memory_budget`` allows (a
    chunk's vectors before and after the preconditioner, per component, plus its scores),
    else all rows.

    Raises:
        ValueError: ``query_chunk`` < 1.
    """
    if query_chunk is not None:
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}.")
        return query_chunk
    budget = getattr(attributor.config, "memory_budget", None)
    if budget is None or num_queries == 0:
        return max(num_queries, 1)
    state = attributor._require_fit()
    part = state.parts[0]
    per_row = (2 * len(state.parts) * part.train.shape[1] + len(state.group_ids)) * \
        part.train.element_size()
    return max(1, min(num_queries, (budget // 2) // max(per_row, 1)))


def score_in_chunks(attributor: "Attributor", queries: Dataset, chunk: int,
                    top_k: Optional[int]) -> Any:
    """Score per-row queries ``chunk`` rows at a time.

    Returns:
        :class:`~hf_ggda.scores.GroupScores` (m × K), or :class:`TopGroupScores` with
        ``top_k``.

    Raises:
        ValueError: ``top_k`` < 1.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    state = attributor._require_fit()
    trains = [p.train for p in state.parts]
    blocks: list[torch.Tensor] = []
    rows_best: list[tuple[torch.Tensor, torch.Tensor]] = []
    fps: list[Any] = []
    for start in range(0, len(queries), chunk):
        sub = queries.select(range(start, min(start + chunk, len(queries))))
        vectors, _, chunk_fps = attributor._query_vectors(sub, "rows", None)
        block = attributor._combine(vectors, trains, first_row=start).detach().cpu()
        fps.append(chunk_fps)
        if top_k is None:
            blocks.append(block)
        else:
            values, index = torch.topk(block, min(top_k, block.shape[1]), dim=1)
            rows_best.append((values, index))
        del vectors
    config = attributor.result_config()
    ids = list(range(len(queries)))
    if top_k is not None:
        values = torch.cat([v for v, _ in rows_best]) if rows_best else torch.zeros(0, top_k)
        index = torch.cat([i for _, i in rows_best]) if rows_best else \
            torch.zeros(0, top_k, dtype=torch.long)
        return TopGroupScores(values, index, list(state.group_ids), ids, SIGN_CONVENTION,
                              config)
    key = hash_json([fps, "rows", None])
    return GroupScores(
        matrix=torch.cat(blocks), group_ids=list(state.group_ids), query_ids=ids,
        config=config,
        fingerprints={"train": [p.fingerprint for p in state.parts], "query": key,
                      "query_gradients": fps, "query_rows": rows_signature(queries),
                      "train_groups": state.group_signature},
        sign_convention=SIGN_CONVENTION, query_mode="rows", group_column=state.group_column,
        query_group_column=None)


def check_finite_scores(scores: torch.Tensor, first_row: int, columns: list[Any]) -> None:
    """Raise when a score matrix holds NaN or Inf (an overflow of its dtype).

    Args:
        scores: (m, K) scores.
        first_row: Row of the first query (chunks), for the message.
        columns: Ids of the K columns (groups, or drill-down rows).

    Raises:
        NonFiniteScoresError: Naming the query rows, the columns and the fix.
    """
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        rows = (torch.nonzero(bad.any(1)).flatten() + first_row).tolist()
        groups = [columns[int(k)] for k in torch.nonzero(bad.any(0)).flatten()]
        raise NonFiniteScoresError(rows, groups, str(scores.dtype).replace("torch.", ""))
