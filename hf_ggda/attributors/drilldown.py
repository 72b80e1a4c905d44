"""Self-influence and drill-down: the parts of an :class:`Attributor` that go below groups.

Group self-influence is the diagonal g_Gᵀ M⁻¹ g_G of the train-vs-train scores; row
self-influence is the same quantity for single rows, and equals group self-influence on
singleton groups (tested). Drill-down re-scores the rows of chosen groups against the queries
of a :class:`~hf_ggda.scores.GroupScores`, with per-example gradients for those rows only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import torch
from datasets import Dataset

from ..errors import CorruptShardError, MissingColumnError, NonFiniteScoresError
from ..logging import get_logger
from ..scores import GroupScores
from ..tasks import ROW_COLUMN
from .model_state import check_model_unchanged
from .normalise import normalise_rows

if TYPE_CHECKING:
    from ..gradients.engine import GradientEngine, RowFn
    from ..self_influence import SelfInfluence
    from .config import AttributorConfig
    from .state import Component, _Fit, _Part

logger = get_logger(__name__)


class _Host(Protocol):
    """What the mixin uses of its host class, :class:`~hf_ggda.attributors.base.Attributor`."""

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def config(self) -> AttributorConfig: ...

    @property
    def components(self) -> list[Component]: ...

    @property
    def _query_cache(self) -> OrderedDict[str, list[torch.Tensor]]: ...

    def _require_fit(self) -> _Fit: ...

    def train_fn(self) -> RowFn: ...

    def self_fn(self) -> RowFn: ...

    def _engine(self, index: int, component: Component) -> GradientEngine: ...

    def _transform(self, part: _Part, vectors: torch.Tensor, side: str) -> torch.Tensor: ...

    def _query_vectors(self, dataset: Dataset, mode: str, query_group_column: Optional[str]
                       ) -> tuple[list[torch.Tensor], list[Any], list[dict[str, Any]]]: ...

    def _combine(self, query: Sequence[torch.Tensor], train: Sequence[torch.Tensor],
                 first_row: int = 0, columns: Optional[Sequence[Any]] = None
                 ) -> torch.Tensor: ...


def stored_rows(part: "_Part", rows: Sequence[int]) -> Optional[torch.Tensor]:
    """The fit's per-example vectors of ``rows`` (in that order), read from its store.

    The drill-down's point scores are then taken from the same vectors the group sums were
    made of (so, for linear methods, a group's point scores sum to its score) and cost no
    backward pass.

    Args:
        part: A fitted component.
        rows: Positions in the fitted dataset.

    Returns:
        (len(rows), p) vectors, or None when the fit kept none or its store no longer holds
        them (the caller recomputes them).
    """
    if part.row_vectors is None:
        return None
    where = {r: j for j, r in enumerate(rows)}
    out: list[Optional[torch.Tensor]] = [None] * len(rows)
    try:
        for chunk_rows, vectors in part.row_vectors(only=where):  # only their shards
            for i, r in enumerate(chunk_rows):
                if r in where:
                    out[where[r]] = vectors[i]
    except CorruptShardError as err:
        logger.warning("The fit's store no longer holds its per-example vectors (%s); the "
                       "drill-down recomputes them.", err)
        return None
    if any(v is None for v in out):
        return None
    return torch.stack([v for v in out if v is not None]) if out else None


class SelfAndDrillMixin:
    """Self-influence (groups and rows) and drill-down for :class:`Attributor` (the host's
    members that the methods use are typed by :class:`_Host`)."""

    def self_scores(self: _Host) -> torch.Tensor:
        """Return each group's influence on its own summed loss, g_Gᵀ M⁻¹ g_G (K,).

        This is the diagonal of the train-vs-train scores
        ``score(train, query_group_column=group_column)`` (for TRAK the measured function is
        the output function of its own rows).

        Raises:
            NotFittedError: :meth:`fit` was not called.
        """
        state = self._require_fit()
        if state.self_scores is None:
            total = torch.zeros(len(state.group_ids), dtype=state.parts[0].raw.dtype)
            for c, (comp, part) in enumerate(zip(self.components, state.parts)):
                with comp.activate(self.model):
                    if self.self_fn() != self.train_fn():  # new gradients of the fitted rows
                        check_model_unchanged(self.model, part.fingerprint, "self-influence")
                    own = part.raw if self.self_fn() == self.train_fn() else \
                        self._engine(c, comp).group_gradients(
                            state.dataset, state.group_column, fn=self.self_fn()).gradients
                    own = self._transform(part, own, "query")
                total += comp.weight * (own * part.train).sum(1).detach().cpu()
            bad = torch.nonzero(~torch.isfinite(total)).flatten().tolist()
            if bad:
                raise NonFiniteScoresError([], [state.group_ids[k] for k in bad],
                                           str(total.dtype).replace("torch.", ""),
                                           what="Self-influence of")
            state.self_scores = total
        return state.self_scores.clone()

    def row_self_scores(self: _Host, rows: Dataset) -> torch.Tensor:
        """Return each row's influence on its own loss, g_iᵀ M⁻¹ g_i (R,), for ``rows``.

        Computed with per-example gradients of ``rows`` only, under the fit's preconditioner
        and ``normalize`` setting; on singleton groups it equals :meth:`self_scores`.

        Args:
            rows: Rows prepared like the fitted training data (e.g. a ``select`` of it).

        Raises:
            NotFittedError: :meth:`fit` was not called.
        """
        state = self._require_fit()
        total = torch.zeros(len(rows), dtype=state.parts[0].raw.dtype)
        if len(rows) == 0:
            return total
        for c, (comp, part) in enumerate(zip(self.components, state.parts)):
            engine = self._engine(c, comp)
            with comp.activate(self.model):
                check_model_unchanged(self.model, part.fingerprint, "row self-influence")
                grads = engine.per_example_gradients(rows, fn=self.train_fn()).gradients
                grads = normalise_rows(grads, self.config.normalize, part.preconditioner)
                own = grads if self.self_fn() == self.train_fn() else \
                    engine.per_example_gradients(rows, fn=self.self_fn()).gradients
                own = self._transform(part, own, "query")
                train = self._transform(part, grads, "train")
            total += comp.weight * (own * train).sum(1).detach().cpu()
        return total

    def self_influence(self, drill_top: int = 0, group_ids: Optional[Sequence[Any]] = None,
                       row_column: Optional[str] = None) -> "SelfInfluence":
        """Self-influence as a result of its own (no query axis).

        Args:
            drill_top: Also compute row self-influence for the rows of this many groups of
                highest group self-influence (0: none).
            group_ids: Drill into exactly these groups instead.
            row_column: Row-key column of the result (default: ``__ggda_row__`` when
                present, else positions in the fitted dataset).

        Returns:
            A :class:`~hf_ggda.self_influence.SelfInfluence`, with columns
            ``ggda_self_influence``, ``ggda_self_rank`` and ``ggda_point_self_influence``.

        Raises:
            NotFittedError: :meth:`fit` was not called.
            ValueError: ``drill_top`` < 0 or unknown group ids.
            MissingColumnError: ``row_column`` is absent.
        """
        from ..self_influence import compute_self_influence

        return compute_self_influence(self, drill_top=drill_top, group_ids=group_ids,
                                      row_column=row_column)

    def refine(self: _Host, scores: GroupScores, top_k: int = 5, query_index: Optional[int] = None,
               group_ids: Optional[Sequence[Any]] = None, row_column: Optional[str] = None,
               query_dataset: Optional[Dataset] = None) -> GroupScores:
        """Drill down: re-score the rows of chosen groups at point level.

        Only the chosen rows get per-example gradients, and none are recomputed when the
        fit computed them into a store (normalised scores, TRAK, Grad-K-Means grouping in
        the fit, with ``store=``): they are read back from it. The query side is reused from
        :meth:`score` (or recomputed from ``query_dataset``).

        Args:
            scores: Scores returned by :meth:`score` of this attributor.
            top_k: Drill into this many top groups (by ``query_index``'s scores, or summed).
            query_index: Rank groups by this query's scores (None: summed over queries).
            group_ids: Drill into exactly these groups instead.
            row_column: Column of row keys for the result (default: ``__ggda_row__`` when
                present, else row positions in the fitted dataset).
            query_dataset: The scored queries, needed when their gradients are not cached.

        Returns:
            A copy of ``scores`` with ``point_scores`` (m × R) for the R chosen rows.

        Raises:
            NotFittedError: :meth:`fit` was not called.
            ValueError: ``scores`` come from another fit, unknown group ids, or the query
                gradients are neither cached nor given.
            MissingColumnError: ``row_column`` is absent.
        """
        state = self._require_fit()
        if list(scores.group_ids) != list(state.group_ids):
            raise ValueError("These scores were not produced by this attributor's current fit.")
        chosen = list(group_ids) if group_ids is not None else \
            [g for g, _ in scores.top_k(query_index, top_k)]
        unknown = set(chosen) - set(state.group_ids)
        if unknown:
            raise ValueError(f"Unknown group ids {sorted(map(str, unknown))[:10]}.")
        vectors = self._query_cache.get(scores.fingerprints.get("query", ""))
        if vectors is None:
            if query_dataset is None:
                raise ValueError("The query gradients of these scores are no longer cached; "
                                 "pass query_dataset= (the rows that were scored).")
            vectors, _, _ = self._query_vectors(query_dataset, scores.query_mode,
                                                scores.query_group_column)
        values = list(state.dataset[state.group_column])
        wanted = set(chosen)
        rows = [i for i, g in enumerate(values) if g in wanted]
        subset = state.dataset.select(rows)
        train = []
        for c, (comp, part) in enumerate(zip(self.components, state.parts)):
            with comp.activate(self.model):
                check_model_unchanged(self.model, part.fingerprint, "the drill-down")
                stored = stored_rows(part, rows)
                if stored is None:
                    stored = self._engine(c, comp).per_example_gradients(
                        subset, fn=self.train_fn()).gradients
                rows_vec = normalise_rows(stored, self.config.normalize, part.preconditioner)
                train.append(self._transform(part, rows_vec, "train"))
        point = self._combine(vectors, train, columns=rows).detach().cpu()
        key = row_column or (ROW_COLUMN if ROW_COLUMN in state.dataset.column_names else None)
        if key is not None and key not in subset.column_names:
            raise MissingColumnError(key, subset.column_names, role="row id column")
        keys = list(subset[key]) if key is not None else rows
        logger.info("Drill-down: %d rows of %d groups.", len(rows), len(chosen))
        return replace(scores, point_scores=point, point_rows=keys,
                       point_groups=[values[i] for i in rows], point_key=key)


