"""The ``Attributor`` API shared by GGDA-TracIn, GGDA-Influence and GGDA-TRAK.

Every method scores a query q against a training group G as a weighted sum over components c
(checkpoints, ensemble members, or just the current model):

    τ(G, q) = Σ_c w_c · u_c(q)ᵀ M_c⁻¹ v_c(G),

where v_c(G) is the gradient of the *summed* per-row training function over G's rows (one
pass, no per-example gradients), u_c(q) the gradient of the query measurement, and M_c⁻¹ a
fixed linear preconditioner (identity, an inverse Hessian approximation, a TRAK kernel).
Because the score is linear in v_c(G), score(G) = Σ_{i∈G} score({i}) and point attribution is
the same code with singleton groups. The preconditioner is applied to the training side at fit
time when it is closed-form, otherwise to the query side at score time (it is symmetric, so
both give the same number).

Sign convention (:data:`hf_ggda.SIGN_CONVENTION`): positive = the group helps the query.
For loss-based methods: upweighting G by ε moves the optimum by dθ/dε = −(H + λI)⁻¹ g_G, so
removing G (ε = −1) changes the query loss by ∇ℓ(q)ᵀ (H + λI)⁻¹ g_G. That number is the
score: positive when removing G would raise the query's loss, i.e. when G helps the query.
"""

from __future__ import annotations

import os
from abc import ABC
from collections import OrderedDict
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Iterator,
    Optional,
    Sequence,
)

import numpy as np
import torch
from datasets import Dataset

from .. import SIGN_CONVENTION
from ..alignment import group_signature, rows_signature
from ..curvature import CurvatureContext, Preconditioner
from ..curvature.mix import CurvatureData, resolve_curvature_dataset
from ..errors import (
    GroupingError,
    NotFittedError,
)
from ..fingerprint import hash_json
from ..gradients.engine import EngineConfig, GradientEngine, GroupGradients, RowFn, plan_groups
from ..gradients.taps import PassTap
from ..learning_check import check_model_learned
from ..logging import get_logger
from ..params import ParameterSelection
from ..scores import GroupScores
from ..tasks import GROUP_COLUMN, AttributionTask
from .config import AttributorConfig
from .drilldown import SelfAndDrillMixin
from .model_state import check_model_unchanged
from .normalise import normalised_query_gradients, row_weights
from .pass_features import features_key, load_pass_features, save_pass_features
from .scoring import check_finite_scores
from .state import Component, _Fit, _Part, check_task_unchanged

if TYPE_CHECKING:
    from ..grouping.base import Grouper

logger = get_logger(__name__)

_ALL_QUERIES = "__ggda_all_queries__"
_QUERY_CACHE_SIZE = 4


class Attributor(SelfAndDrillMixin, ABC):
    """Base class: fit on training groups, score queries, self-influence, drill-down.

    Args:
        model: A transformers / PEFT model (any module the task can call).
        task: The :class:`~hf_ggda.tasks.AttributionTask`.
        config: The method's config (default: the config class's defaults).

    Raises:
        TypeError: ``config`` is not an instance of the method's config class.
        NoParametersError: The parameter selection matched nothing.
    """

    config_class: ClassVar[type[AttributorConfig]] = AttributorConfig

    def __init__(self, model: torch.nn.Module, task: AttributionTask,
                 config: Optional[AttributorConfig] = None) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}.")
        self.model = model
        self.task = task
        self.config = config
        self.selection = ParameterSelection.resolve(model, config.selection)
        self._engines: dict[int, GradientEngine] = {}
        self._fit: Optional[_Fit] = None
        self._components: Optional[list[Component]] = None
        self._query_cache: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._curvature_rows: Optional[Dataset] = None

    # -- hooks for subclasses ----------------------------------------------------------------
    def build_components(self) -> list[Component]:
        """The components c of the score sum (default: the current model, weight 1)."""
        return [Component(1.0)]

    @property
    def components(self) -> list[Component]:
        """The components c of the score sum (built once)."""
        if self._components is None:
            self._components = self.build_components()
        return self._components

    def engine_config(self, component: Component) -> EngineConfig:
        """Engine settings for one component (default: no projection)."""
        return EngineConfig(batch_size=self.config.batch_size, shard_rows=self.config.shard_rows,
                            factorised_dim=self.config.factorised_dim,
                            memory_budget=self.config.memory_budget,
                            store_dtype=self.config.store_dtype, strict=self.config.strict)

    def train_fn(self) -> RowFn:
        """The per-row training function whose group gradients are v(G) (default: loss)."""
        return "loss"

    def query_fn(self) -> RowFn:
        """The query measurement whose gradients are u(q) (default: the task's measurement)."""
        return "measurement"

    def self_fn(self) -> RowFn:
        """The function a group's self-influence measures on its own rows (default: loss)."""
        return "loss"

    def fit_preconditioner(self, component: Component, engine: GradientEngine,
                           train: Dataset, groups: GroupGradients,
                           store: Optional[Path]) -> Optional[Preconditioner]:
        """Fit the component's preconditioner (default: none, i.e. the identity)."""
        return None

    def postprocess(self, vectors: torch.Tensor) -> torch.Tensor:
        """Last transform of both sides (default: none; cosine similarity normalises)."""
        return vectors

    # -- helpers ---------------------------------------------------------------------------
    def _engine(self, index: int, component: Component) -> GradientEngine:
        if index not in self._engines:
            self._engines[index] = GradientEngine(self.model, self.task, self.selection,
                                                  self.engine_config(component))
        return self._engines[index]

    def _transform(self, part: _Part, vectors: torch.Tensor, side: str) -> torch.Tensor:
        pre = part.preconditioner
        if pre is not None and pre.side == side:
            vectors = pre.apply(vectors)
        return self.postprocess(vectors)

    def _require_fit(self) -> _Fit:
        if self._fit is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call "
                                 "fit(train_dataset, group_column=...) before scoring.")
        return self._fit

    def curvature_context(self, engine: GradientEngine, train: Dataset) -> CurvatureContext:
        """A :class:`~hf_ggda.curvature.CurvatureContext` for ``engine`` over the curvature
        rows given to :meth:`fit` (default: ``train``)."""
        return CurvatureContext(engine, self._curvature_rows or train)

    def uses_curvature(self) -> bool:
        """Whether the method fits curvature (so ``fit(curvature_dataset=)`` applies)."""
        return False

    # -- public API ------------------------------------------------------------------------
    def prepare_pass(self, index: int, component: Component, engine: GradientEngine,
                     train: Dataset, store: Optional[Path]) -> list[PassTap]:
        """Taps whose statistics the component's training pass should collect (default: none;
        influence functions collect their K-FAC factors there)."""
        return []

    def fit(self, train_dataset: Dataset, group_column: str = GROUP_COLUMN,
            store: Optional[str | os.PathLike[str]] = None,
            overwrite: bool = False, grouper: Optional["Grouper"] = None,
            curvature_dataset: Optional[CurvatureData] = None) -> "Attributor":
        """Compute and keep the group vectors (and curvature / kernels) of the training data.

        With a ``grouper`` the rows are grouped inside the fit. For Grad-K-Means (the
        grouping features are the output layer's gradients) that takes no pass of its own:
        one pass at the last component computes the per-example vectors, the K-FAC factors
        and the grouping features; the groups are then clustered and their vectors are the
        sums of their members' (exact by linearity; EK-FAC takes its eigenvalues from the same
        per-example vectors). The grouped rows are :attr:`train_dataset`.

        Args:
            train_dataset: Raw training rows with a group column (or any rows, with
                ``grouper``).
            group_column: Column of group ids (use a row-index column for point mode); with
                ``grouper``, the grouper's column ``group_id``.
            store: Folder for resumable gradient stores and cached curvature (None: memory).
            overwrite: Replace stores made for another request instead of raising.
            grouper: Group the rows inside the fit (see above); other groupers run their
                own ``assign`` first.
            curvature_dataset: Fit the curvature (K-FAC, EK-FAC, LiSSA, DataInf, exact) on
                these rows, or a weighted mix of datasets, instead of the training rows
                (:mod:`hf_ggda.curvature.mix`); it then costs a pass of its own.

        Returns:
            ``self``.

        Raises:
            MissingColumnError: No group column.
            EmptyDatasetError: No rows.
            StoreMismatchError: ``store`` holds results of another request.
            NonFiniteError: A loss or gradient is NaN/Inf.
            ValueError: ``curvature_dataset`` for a method without curvature.
        """
        if curvature_dataset is not None and not self.uses_curvature():
            raise ValueError(f"{type(self).__name__} with these settings fits no curvature, so "
                             "curvature_dataset does not apply: use InfluenceFunction with "
                             "preconditioner='kfac', 'ekfac', 'lissa', 'datainf' or 'exact'.")
        self._curvature_rows = None if curvature_dataset is None else \
            resolve_curvature_dataset(curvature_dataset, getattr(self.config, "seed", 0))
        learned = check_model_learned(self.model, self.task, train_dataset,
                                      strict=self.config.strict)
        base = None if store is None else Path(store)
        subs = [None if base is None else base / f"component-{c}"
                for c in range(len(self.components))]
        first: dict[int, _Part] = {}
        if grouper is not None:
            group_column = GROUP_COLUMN
            train_dataset, first = self._fit_grouping(train_dataset, grouper, subs, overwrite)
        parts, ids, sizes = [], None, None
        for c, comp in enumerate(self.components):
            part = first.get(c) or self._fit_component(c, comp, train_dataset, group_column,
                                                       subs[c], overwrite)
            if ids is not None and part.group_ids != ids:
                raise GroupingError("Components disagree on the group ids.")
            ids, sizes = part.group_ids, part.sizes
            parts.append(part)
        self._fit = _Fit(train_dataset, group_column, list(ids or []), np.asarray(sizes), parts,
                         task_config=self.task.config_dict(),
                         group_signature=group_signature(train_dataset, group_column,
                                                         list(ids or [])),
                         model_check=None if learned is None else learned.to_dict())
        self._query_cache.clear()
        logger.info("%s fitted on %d rows in %d groups.", type(self).__name__,
                    len(train_dataset), len(self._fit.group_ids))
        return self

    @property
    def train_dataset(self) -> Dataset:
        """The fitted training rows (with their group column).

        Raises:
            NotFittedError: Not fitted.
        """
        return self._require_fit().dataset

    def _fit_component(self, c: int, comp: Component, train: Dataset, group_column: str,
                       sub: Optional[Path], overwrite: bool) -> _Part:
        engine = self._engine(c, comp)
        with comp.activate(self.model):
            taps = self.prepare_pass(c, comp, engine, train, sub)
            if self.point_pass() or self.config.normalize:  # per-example, summed into groups
                points = engine.per_example_gradients(
                    train, fn=self.train_fn(), taps=taps, overwrite=overwrite, keep=False,
                    store=None if sub is None else str(sub / "points"))
                groups = engine.sum_into_groups(points, train, group_column, self.train_fn())
                groups.extras.update(row_vectors=points.point_chunks, points=points)
            else:
                groups = engine.group_gradients(
                    train, group_column, overwrite=overwrite, fn=self.train_fn(),
                    store=None if sub is None else str(sub / "groups"), taps=taps)
                if bool((groups.sizes == 1).all()):  # point mode: the vectors are per-row
                    groups.extras["row_vectors"] = _row_vectors(
                        groups.gradients, plan_groups(train[group_column], 1).order)
            return self._finish_part(comp, engine, train, groups, sub, group_column)

    def point_pass(self) -> bool:
        """Whether the training pass computes per-example vectors and sums them into the
        groups (exact by linearity), instead of group sums directly (default: False). Worth
        it when the vectors are projected (small) and the method needs per-row statistics:
        TRAK's kernel then costs no pass of its own."""
        return False

    def _finish_part(self, comp: Component, engine: GradientEngine, train: Dataset,
                     groups: GroupGradients, sub: Optional[Path], group_column: str) -> _Part:
        pre = self.fit_preconditioner(comp, engine, train, groups, sub)
        if self._curvature_rows is not None:  # which rows the curvature came from
            groups.fingerprint = {**groups.fingerprint,
                                  "curvature_dataset": self._curvature_rows._fingerprint}
        stored = groups.extras.get("points")
        kind = self.config.normalize
        if kind is not None:  # re-sum the per-row vectors, each divided by its norm
            points = groups.extras["points"]
            weights = row_weights(points.point_chunks, len(train), kind, pre)
            groups = engine.sum_into_groups(points, train, group_column, self.train_fn(),
                                            weights)
            groups.fingerprint = {**groups.fingerprint, "normalize": kind}
        part = _Part(groups.gradients, groups.gradients, pre, groups.fingerprint,
                     groups.group_ids, groups.sizes)
        if stored is not None and "store" in stored.extras:  # on disk: the drill-down reads them
            part.row_vectors = stored.point_chunks
        part.train = self._transform(part, groups.gradients, "train")
        return part

    def _fit_grouping(self, train: Dataset, grouper: "Grouper", subs: list[Optional[Path]],
                      overwrite: bool) -> tuple[Dataset, dict[int, _Part]]:
        """Group ``train`` (one pass for Grad-K-Means) and fit the last component with it."""
        c = len(self.components) - 1
        comp = self.components[c]
        engine = self._engine(c, comp)
        if not getattr(grouper, "accepts_pass_features", False):
            with comp.activate(self.model):
                return grouper.assign(train, model=self.model, task=self.task), {}
        sub = subs[c]
        with comp.activate(self.model):
            feature_tap = grouper.pass_tap(self.model, self.task, len(train),  # type: ignore
                                           sign=self.train_sign())
            taps = [*self.prepare_pass(c, comp, engine, train, sub), feature_tap]
            points = engine.per_example_gradients(  # n vectors stay on disk with a store
                train, fn=self.train_fn(), taps=taps, overwrite=overwrite, keep=False,
                store=None if sub is None else str(sub / "points"))
            grouped = self._assign_pass_groups(grouper, train, points, feature_tap, sub)
            groups = engine.sum_into_groups(points, grouped, GROUP_COLUMN, self.train_fn())
            groups.extras = {"row_vectors": points.point_chunks, "points": points}
            part = self._finish_part(comp, engine, grouped, groups, sub, GROUP_COLUMN)
        return grouped, {c: part}

    def _assign_pass_groups(self, grouper: "Grouper", train: Dataset, points: GroupGradients,
                            feature_tap: Any, sub: Optional[Path]) -> Dataset:
        """Group with the pass's features; a resumed pass reads them from the store's cache
        (:mod:`.pass_features`) or, without one, recomputes them with the model."""
        key = features_key(points.fingerprint, grouper, self.train_sign())
        if points.fresh:
            features = feature_tap.matrix()
            if sub is not None:
                save_pass_features(sub, key, features)
            return grouper.assign(train, features=features)
        cached = None if sub is None else load_pass_features(sub, key, len(train))
        if cached is not None:
            return grouper.assign(train, features=cached)
        return grouper.assign(train, model=self.model, task=self.task)

    def train_sign(self) -> float:
        """Sign of the training function's logit-gradient relative to the loss's (+1: it is
        the loss; TRAK's Q·margin has −1). Grouping features are multiplied by it."""
        return 1.0

    @property
    def group_ids(self) -> list[Any]:
        """The fitted group ids (columns of every score matrix).

        Raises:
            NotFittedError: Not fitted.
        """
        return list(self._require_fit().group_ids)

    @property
    def group_sizes(self) -> np.ndarray:
        """Rows per fitted group, in the order of :attr:`group_ids`.

        Raises:
            NotFittedError: Not fitted.
        """
        return self._require_fit().sizes.copy()

    def _query_vectors(self, dataset: Dataset, mode: str, query_group_column: Optional[str]
                       ) -> tuple[list[torch.Tensor], list[Any], list[dict[str, Any]]]:
        state = self._require_fit()
        check_task_unchanged(self.task.config_dict(), state.task_config)
        fn = self.query_fn()
        column = query_group_column
        if mode == "sum":
            if _ALL_QUERIES in dataset.column_names:
                dataset = dataset.remove_columns(_ALL_QUERIES)
            dataset = dataset.add_column(_ALL_QUERIES, [0] * len(dataset))
            column = _ALL_QUERIES
        vectors: list[torch.Tensor] = []
        fps: list[dict[str, Any]] = []
        ids: list[Any] = []
        for c, (comp, part) in enumerate(zip(self.components, state.parts)):
            engine = self._engine(c, comp)
            with comp.activate(self.model):
                check_model_unchanged(self.model, part.fingerprint, "scoring")
                if self.config.normalize is not None:
                    grads = normalised_query_gradients(engine, dataset, fn, mode, column,
                                                       self.config.normalize,
                                                       part.preconditioner)
                else:
                    grads = engine.per_example_gradients(dataset, fn=fn) if mode == "rows" \
                        else engine.group_gradients(dataset, column or "", fn=fn)
                vectors.append(self._transform(part, grads.gradients, "query"))
            fps.append(grads.fingerprint)
            ids = list(range(len(dataset))) if mode == "rows" else \
                (["all"] if mode == "sum" else grads.group_ids)
        return vectors, ids, fps

    def result_config(self) -> dict[str, Any]:
        """The config written into results: the settings, the resolved parameter selection
        and the fitted model's learning check (``model_check``)."""
        state = self._require_fit()
        return {**self.config.to_dict(), "selection_resolved": self.selection.how,
                "model_check": state.model_check}

    def _combine(self, query: Sequence[torch.Tensor], train: Sequence[torch.Tensor],
                 first_row: int = 0, columns: Optional[Sequence[Any]] = None) -> torch.Tensor:
        """The (m × K) scores, summed over components: Σ_c w_c q_c t_cᵀ.

        Args:
            query: Per component, the (m, p) query vectors.
            train: Per component, the (K, p) training vectors (or the rows of a drill-down).
            first_row: Row of the first query (chunks), for the error message.
            columns: Ids of the columns (default: the fitted group ids), for the message.

        Raises:
            NonFiniteScoresError: Some score is NaN or infinite (an overflow of the dtype).
        """
        total: Optional[torch.Tensor] = None
        for comp, q, t in zip(self.components, query, train):
            term = comp.weight * (q @ t.T)
            total = term if total is None else total + term
        assert total is not None
        check_finite_scores(total, first_row,
                            list(columns) if columns is not None else self.group_ids)
        return total

    def score(self, query_dataset: Dataset, aggregate: Optional[str] = None,
              query_group_column: Optional[str] = None,
              self_influence: bool = False, top_k: Optional[int] = None,
              query_chunk: Optional[int] = None) -> Any:
        """Score every fitted group for the queries.

        Args:
            query_dataset: Raw query rows.
            aggregate: ``"sum"`` scores the whole query set at once (its summed measurement);
                None scores each row (or each query group).
            query_group_column: Score query groups (sums of their rows' measurements) instead
                of rows; one gradient pass, no per-row query gradients.
            self_influence: Attach :meth:`self_scores` to the result.
            top_k: Keep only each query's ``top_k`` best groups
                (:class:`~hf_ggda.top_groups.TopGroupScores`, no m × K matrix); per-row
                queries only.
            query_chunk: Query rows whose gradients are computed and scored at a time (None:
                sized by ``config.memory_budget``, else all at once). Chunked query gradients
                are not cached for :meth:`refine` (pass ``query_dataset=`` there).

        Returns:
            (m × K) :class:`~hf_ggda.scores.GroupScores`, or the top-k groups per query.

        Raises:
            NotFittedError: :meth:`fit` was not called.
            ValueError: Bad ``aggregate``, both ``aggregate`` and ``query_group_column``, or
                ``top_k`` / ``query_chunk`` < 1 or with aggregated queries.
            MissingColumnError: ``query_group_column`` is absent.
        """
        from .scoring import chunk_rows, score_in_chunks

        state = self._require_fit()
        if aggregate not in (None, "sum"):
            raise ValueError(f"aggregate must be None or 'sum', got {aggregate!r}.")
        if aggregate and query_group_column:
            raise ValueError("Pass either aggregate='sum' or query_group_column, not both.")
        mode = "sum" if aggregate else ("groups" if query_group_column else "rows")
        chunk = chunk_rows(self, len(query_dataset), query_chunk)
        if (top_k is not None or chunk < len(query_dataset)) and mode != "rows":
            raise ValueError("top_k and query chunks apply to per-row queries only.")
        if top_k is not None or chunk < len(query_dataset):
            return score_in_chunks(self, query_dataset, chunk, top_k)
        vectors, ids, fps = self._query_vectors(query_dataset, mode, query_group_column)
        matrix = self._combine(vectors, [p.train for p in state.parts])
        key = hash_json([fps, mode, query_group_column])
        self._query_cache[key] = vectors
        while len(self._query_cache) > _QUERY_CACHE_SIZE:
            self._query_cache.popitem(last=False)
        scores = GroupScores(
            matrix=matrix.detach().cpu(), group_ids=list(state.group_ids), query_ids=ids,
            config=self.result_config(),
            fingerprints={"train": [p.fingerprint for p in state.parts], "query": key,
                          "query_gradients": fps, "query_rows": rows_signature(query_dataset),
                          "train_groups": state.group_signature},
            sign_convention=SIGN_CONVENTION, query_mode=mode, group_column=state.group_column,
            query_group_column=query_group_column)
        return scores.with_self_influence(self.self_scores()) if self_influence else scores


def _row_vectors(vectors: torch.Tensor, rows: np.ndarray,
                 chunk: int = 256) -> Callable[[], Iterator[tuple[list[int], torch.Tensor]]]:
    """Chunks of (dataset rows, per-row vectors) for vectors ordered like ``rows``."""
    def chunks() -> Iterator[tuple[list[int], torch.Tensor]]:
        for start in range(0, len(rows), chunk):
            yield rows[start:start + chunk].tolist(), vectors[start:start + chunk]
    return chunks
