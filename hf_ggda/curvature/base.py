"""Preconditioners: the (H + λI)⁻¹ of influence functions, and what they share.

H is the Hessian (or an approximation of it) of the *summed* training loss Σ_i ℓ_i over the
selected parameters, in the unprojected flat layout of
:meth:`hf_ggda.params.ParameterSelection.offsets`. A preconditioner is fitted once on the
training rows (:meth:`Preconditioner.fit`) and then maps (N, d) vectors to (N, d) vectors
(:meth:`Preconditioner.apply`), linearly, so scores stay additive over groups.

Closed-form preconditioners (identity, K-FAC, EK-FAC, exact, a TRAK kernel) are applied to the
K training group gradients at fit time (``side = "train"``); iterative or streaming ones (LiSSA,
DataInf) are applied to the (usually fewer) query gradients at score time (``side = "query"``).
Because (H + λI)⁻¹ is symmetric, both give the same score.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..atomic import atomic_write_bytes
from ..distributed import rank_and_world
from ..errors import GGDAError, NotFittedError
from ..fingerprint import hash_json
from ..gradients.engine import GradientEngine
from ..gradients.taps import PassTap
from ..logging import get_logger, progress
from ..tasks import Batch
from .registry import register_preconditioner

logger = get_logger(__name__)

#: Yields (dataset rows, (N, d) unprojected per-row gradients of the training loss) chunks.
RowVectors = Callable[[], Iterator[tuple[Sequence[int], torch.Tensor]]]


class CurvatureError(GGDAError, FloatingPointError):
    """A curvature computation produced NaN/Inf or diverged."""


class CurvatureContext:
    """The model, task, parameters and training rows a preconditioner is fitted on.

    Batches are collated in dataset order (independent of any grouping), so curvature fitted
    for two groupings of the same rows is the same.

    Args:
        engine: The gradient engine (model, task, selection, dtype, device, batch size).
        dataset: Raw training rows (the task prepares them).

    Raises:
        EmptyDatasetError: ``dataset`` has no rows.
    """

    def __init__(self, engine: GradientEngine, dataset: Dataset) -> None:
        self.engine = engine
        self.dataset = dataset
        prepared = engine.task.prepare(dataset)
        self.features = prepared.select_columns(
            [c for c in engine.task.feature_columns if c in prepared.column_names])

    @property
    def model(self) -> torch.nn.Module:
        """The model."""
        return self.engine.model

    @property
    def num_rows(self) -> int:
        """Number of training rows n."""
        return len(self.features)

    def batches(self, rows: Optional[Sequence[int]] = None,
                desc: Optional[str] = None, this_process: bool = False) -> Iterator[Batch]:
        """Yield collated batches on the model's device (see :meth:`indexed_batches`)."""
        for _, batch in self.indexed_batches(rows, desc, this_process):
            yield batch

    def indexed_batches(self, rows: Optional[Sequence[int]] = None,
                        desc: Optional[str] = None,
                        this_process: bool = False) -> Iterator[tuple[list[int], Batch]]:
        """Yield collated batches on the model's device.

        Args:
            rows: Row indices to use (default: all, in order).
            desc: Progress bar label (None: no bar).
            this_process: Only the batches of this process (batch b goes to rank b mod world
                size), for statistics that are then summed over processes.

        Yields:
            (dataset rows, batch) for batches of at most ``engine.config.batch_size`` rows.
        """
        index = list(range(self.num_rows)) if rows is None else [int(r) for r in rows]
        bs = self.engine.config.batch_size
        starts: Sequence[int] = range(0, len(index), bs)
        if this_process:
            rank, world = rank_and_world()
            starts = starts[rank::world]
        for start in (progress(starts, desc=desc, unit="batch") if desc else starts):
            chunk = index[start:start + bs]
            yield chunk, self.engine.collate_rows(self.features, chunk)

    def fingerprint(self) -> str:
        """Hash of what curvature depends on: model, selection, task and training rows."""
        return hash_json(self.engine.fingerprint(self.dataset, "curvature", "loss"))

    @contextlib.contextmanager
    def differentiable(self, double_backward: bool = False) -> Iterator[None]:
        """Attribution mode (eval, selected parameters differentiable); optionally with the
        math attention kernel, whose backward is itself differentiable."""
        with self.engine.attribution_mode():
            if double_backward:
                with sdpa_kernel([SDPBackend.MATH]):
                    yield
            else:
                yield


def psd_solve(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, damping: float,
              vectors: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Return (M + λI)⁻¹ V for M = Q diag(e) Qᵀ, rows of V as vectors (pseudo-inverse when
    an eigenvalue of M + λI is numerically zero).

    Args:
        eigenvalues: (d,) eigenvalues e of M.
        eigenvectors: (d, d) orthonormal eigenvectors Q (columns).
        damping: λ.
        vectors: (N, d) vectors.
        rtol: Eigenvalues of M + λI below rtol × the largest in magnitude are treated as zero.

    Returns:
        (N, d) solutions.
    """
    shifted = eigenvalues + damping
    cutoff = rtol * shifted.abs().max().clamp(min=torch.finfo(shifted.dtype).tiny)
    inv = torch.where(shifted.abs() > cutoff, 1.0 / shifted, torch.zeros_like(shifted))
    coords = vectors.to(eigenvectors.dtype) @ eigenvectors
    return ((coords * inv) @ eigenvectors.T).to(vectors.dtype)


class Preconditioner(ABC):
    """Maps vectors v to ≈ (H + λI)⁻¹ v, H the Hessian of the summed training loss.

    Args:
        damping: λ ≥ 0.

    Raises:
        ValueError: ``damping`` is negative.
    """

    name: ClassVar[str] = ""
    #: ``"train"``: apply to the group gradients at fit time; ``"query"``: at score time.
    side: ClassVar[str] = "train"
    #: Whether the fitted state can be saved and reloaded (state_dict / load_state_dict).
    cacheable: ClassVar[bool] = False

    def __init__(self, damping: float = 0.0) -> None:
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}.")
        self.damping = float(damping)
        self.fitted = False

    def config_dict(self) -> dict[str, Any]:
        """Settings that change the result (fingerprints)."""
        return {"name": self.name, "damping": self.damping}

    def cache_key(self) -> dict[str, Any]:
        """Settings the fitted state depends on (damping is applied later, so not included)."""
        return {k: v for k, v in self.config_dict().items() if k != "damping"}

    @abstractmethod
    def fit(self, ctx: CurvatureContext) -> None:
        """Fit on the training rows of ``ctx``.

        Raises:
            ValueError: The preconditioner cannot be fitted here (e.g. too many parameters).
        """

    @abstractmethod
    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return (N, d) ≈ (H + λI)⁻¹ V for (N, d) vectors V."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors (cacheable preconditioners)."""
        return {}

    def load_state_dict(self, ctx: CurvatureContext, state: dict[str, torch.Tensor]) -> None:
        """Restore fitted tensors for the model and rows of ``ctx``.

        Raises:
            NotImplementedError: The preconditioner is not cacheable.
        """
        raise NotImplementedError(f"{type(self).__name__} has no saved state.")

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit() first.")

    # -- fused passes ---------------------------------------------------------------------------
    def pass_tap(self, ctx: CurvatureContext) -> Optional[PassTap]:
        """A tap that collects this preconditioner's statistics during the engine's gradient
        pass over ``ctx``'s rows (the training loss), or None when it needs passes of its own.

        Raises:
            ValueError: As :meth:`fit`.
        """
        return None

    def fit_from_pass(self, ctx: CurvatureContext, tap: PassTap,
                      row_vectors: Optional[RowVectors] = None) -> None:
        """Finish fitting from the statistics ``tap`` collected over every row of ``ctx``.

        Args:
            ctx: The training context.
            tap: The tap returned by :meth:`pass_tap`, fed by a complete pass.
            row_vectors: The per-row training gradients, when the pass kept them (EK-FAC
                takes its eigenvalues from them instead of a second pass).

        Raises:
            NotImplementedError: The preconditioner has no tap.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fused statistics.")

    # -- caching ------------------------------------------------------------------------------
    def _cache_fingerprint(self, ctx: CurvatureContext) -> str:
        return hash_json([ctx.fingerprint(), self.cache_key()])

    def try_load(self, ctx: CurvatureContext, cache: Optional[Path]) -> bool:
        """Reload a state cached at ``cache`` for the same model, rows and settings.

        Returns:
            Whether it was loaded (False: no cache, another request, or unreadable).
        """
        if cache is None or not self.cacheable or not cache.exists():
            return False
        fingerprint = self._cache_fingerprint(ctx)
        try:
            with safe_open(str(cache), framework="pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") != fingerprint:
                    return False
                state = {k: fh.get_tensor(k) for k in fh.keys()}
            self.load_state_dict(ctx, state)
        except Exception as err:  # unreadable cache: recompute
            logger.warning("Ignoring unreadable curvature cache %s (%s).", cache, err)
            return False
        logger.info("Loaded %s curvature from %s.", self.name, cache)
        return True

    def save(self, ctx: CurvatureContext, cache: Optional[Path]) -> None:
        """Write the fitted state to ``cache`` (temp file, then rename); no-op when None."""
        if cache is None or not self.cacheable:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"fingerprint": self._cache_fingerprint(ctx),
                "config": json.dumps(self.config_dict())}
        atomic_write_bytes(cache, st_save(state, metadata=meta))

    def fit_or_load(self, ctx: CurvatureContext, cache: Optional[Path] = None) -> None:
        """Fit, or reload a state cached at ``cache`` for the same model, rows and settings.

        Args:
            ctx: The training context.
            cache: A ``.safetensors`` file to read/write the fitted state (None: no cache).

        Raises:
            ValueError: As :meth:`fit`.
        """
        if self.try_load(ctx, cache):
            return
        self.fit(ctx)
        self.save(ctx, cache)


class IdentityPreconditioner(Preconditioner):
    """H = I: plain gradient dot products (TracIn at one checkpoint, "grad-dot")."""

    name = "identity"
    cacheable = False

    def fit(self, ctx: CurvatureContext) -> None:
        """Nothing to fit."""
        self.fitted = True

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return the vectors unchanged."""
        return vectors


class MatrixPreconditioner(Preconditioner):
    """(M + λI)⁻¹ for an explicit symmetric d × d matrix M (via its eigendecomposition).

    Subclasses implement :meth:`compute_matrix`; :meth:`set_matrix` fixes M directly.
    """

    cacheable = True

    def __init__(self, damping: float = 0.0) -> None:
        super().__init__(damping)
        self.eigenvalues: Optional[torch.Tensor] = None
        self.eigenvectors: Optional[torch.Tensor] = None

    def compute_matrix(self, ctx: CurvatureContext) -> torch.Tensor:
        """Return the symmetric (d, d) matrix M for ``ctx``.

        Raises:
            NotImplementedError: The subclass sets M with :meth:`set_matrix` instead.
        """
        raise NotImplementedError(f"{type(self).__name__} sets its matrix with set_matrix().")

    def fit(self, ctx: CurvatureContext) -> None:
        """Compute M and its eigendecomposition.

        Raises:
            ValueError: As :meth:`compute_matrix`.
        """
        self.set_matrix(self.compute_matrix(ctx))

    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Use ``matrix`` (symmetrised) as M.

        Raises:
            ValueError: ``matrix`` is not square.
        """
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}.")
        sym = (matrix + matrix.T) / 2
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(sym)
        self.fitted = True

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues, eigenvectors) of M.

        Raises:
            NotFittedError: Not fitted.
        """
        self._require_fitted()
        assert self.eigenvalues is not None and self.eigenvectors is not None  # set when fitted
        return self.eigenvalues, self.eigenvectors

    def matrix(self) -> torch.Tensor:
        """Return M (reassembled from its eigendecomposition)."""
        e, q = self._eigh()
        return (q * e) @ q.T

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return (M + λI)⁻¹ V."""
        e, q = self._eigh()
        return psd_solve(e, q, self.damping, vectors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Eigenvalues and eigenvectors of M."""
        e, q = self._eigh()
        return {"eigenvalues": e, "eigenvectors": q}

    def load_state_dict(self, ctx: CurvatureContext, state: dict[str, torch.Tensor]) -> None:
        """Restore the eigendecomposition."""
        device = ctx.engine.device
        self.eigenvalues = state["eigenvalues"].to(device)
        self.eigenvectors = state["eigenvectors"].to(device)
        self.fitted = True


register_preconditioner(IdentityPreconditioner)
