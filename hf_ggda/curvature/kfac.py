"""K-FAC and EK-FAC: Kronecker-factored curvature per tracked linear module.

For a linear module y = W a (+ b) applied at every token, the gradient of the summed loss is
Σ_tokens g aᵀ with g = ∂(Σℓ)/∂y. K-FAC ("expand" flavour, for weights shared over tokens)
approximates the curvature of the summed loss, restricted to the module, by

    H ≈ N · (S ⊗ A),    A = E[a aᵀ],  S = E[g gᵀ]  (means over the N non-padding tokens),

acting on the row-major (out, in) weight matrix (a bias is an extra input column of ones).
Both factors come from one forward + backward pass with hooks: no per-example gradient is
formed. With eigenbases A = Q_A Λ_A Q_Aᵀ and S = Q_S Λ_S Q_Sᵀ,

    (H + λI)⁻¹ G = Q_S [(Q_Sᵀ G Q_A) / (N λ_S λ_Aᵀ + λ)] Q_Aᵀ.

EK-FAC (George et al. 2018) keeps the eigenbasis and replaces N λ_S λ_Aᵀ by the second moment
of the per-row gradients in that basis, Σ_i (Q_Sᵀ G_i Q_A)², where G_i = Σ_t g_{i,t} a_{i,t}ᵀ is
formed per row and per module from the same hooks, one batch at a time.

The g here are gradients of the training loss at the true labels, so S is an empirical
Fisher factor. Selected parameters outside linear modules (embeddings, norms, prompts) have no
factors; they are preconditioned by λ⁻¹ (zero curvature), with a warning.

Under several processes (``accelerate launch``) each process accumulates the statistics of its
share of the batches; the sums (A, S, token counts, EK-FAC second moments) are all-reduced
before the eigendecompositions, so every process holds the factors of all rows. With
``max_rows`` the statistics come from a seeded random sample of the rows, scaled to n: the
fitting passes then cost a fraction of a pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..distributed import all_reduce_sum
from ..gradients.hooks import GradientCollector, TrackedLayer
from ..gradients.taps import Calls, PassTap
from ..logging import get_logger
from ..tasks import Batch
from .base import CurvatureContext, CurvatureError, Preconditioner, RowVectors
from .registry import register_preconditioner

logger = get_logger(__name__)


@dataclass
class _Module:
    """One tracked linear module and its fitted eigen-factors."""

    tracked: TrackedLayer
    out: int
    inp: int  # input width seen by the factor A (plus 1 for a bias column)
    qa: Optional[torch.Tensor] = None
    qs: Optional[torch.Tensor] = None
    eig: Optional[torch.Tensor] = None  # (out, inp) eigenvalues of the Kronecker product

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qa, qs, eig) of a fitted module."""
        assert self.qa is not None and self.qs is not None and self.eig is not None, \
            "the module's factors are not fitted"
        return self.qa, self.qs, self.eig

    @property
    def width(self) -> int:
        """Input features of the module (without the bias column)."""
        return self.inp - (1 if self.tracked.bias is not None else 0)

    def augment(self, a: torch.Tensor) -> torch.Tensor:
        """Append a column of ones for the bias; drop the inputs when W is not selected."""
        ones = torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)
        if self.tracked.weight is None:
            return ones
        return torch.cat([a, ones], -1) if self.tracked.bias is not None else a

    def to_matrix(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, d) flat vectors -> (N, out, inp) matrices [W | b] of this module."""
        t, n = self.tracked, vectors.shape[0]
        parts = []
        if t.weight is not None:
            w = vectors[:, t.weight[0]:t.weight[1]]
            w = w.reshape(n, self.width, self.out).transpose(1, 2) if t.transposed \
                else w.reshape(n, self.out, self.width)
            parts.append(w)
        if t.bias is not None:
            parts.append(vectors[:, t.bias[0]:t.bias[1]].reshape(n, self.out, 1))
        return torch.cat(parts, -1)

    def from_matrix(self, mats: torch.Tensor, out: torch.Tensor) -> None:
        """Write (N, out, inp) matrices back into the flat (N, d) ``out``."""
        t, n = self.tracked, mats.shape[0]
        if t.weight is not None:
            w = mats[..., :self.width]
            w = w.transpose(1, 2) if t.transposed else w
            out[:, t.weight[0]:t.weight[1]] = w.reshape(n, -1)
        if t.bias is not None:
            out[:, t.bias[0]:t.bias[1]] = mats[..., -1]


def _token_mask(a: torch.Tensor, batch: Batch) -> Optional[torch.Tensor]:
    mask = batch.get("attention_mask")
    if mask is not None and a.dim() == 3 and tuple(mask.shape) == tuple(a.shape[:2]):
        return mask.reshape(-1).bool()
    return None


class KFAC(Preconditioner):
    """K-FAC per tracked linear module (LoRA ``lora_A`` / ``lora_B`` included).

    Args:
        damping: λ (must be > 0 when some selected parameters are outside linear modules).
        max_rows: Fit the statistics on a seeded random sample of this many training rows
            (scaled by n / sample size) instead of all n: the fitting passes then cost
            max_rows / n of a pass over the data. None: all rows (exact K-FAC / EK-FAC).
        seed: Seed of that sample.

    Raises:
        ValueError: ``max_rows`` < 1.
    """

    name = "kfac"
    cacheable = True

    def __init__(self, damping: float = 0.0, max_rows: Optional[int] = None,
                 seed: int = 0) -> None:
        super().__init__(damping)
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 (or None for all rows), got {max_rows}.")
        self.max_rows = max_rows
        self.seed = seed
        self.modules: list[_Module] = []
        self.fallback: list[tuple[int, int]] = []
        self._sample: Optional[list[int]] = None  # rows the statistics come from (None: all)
        self._scale = 1.0  # n / sample size

    def config_dict(self) -> dict[str, Any]:
        """Settings that change the result (the row sample included)."""
        return {**super().config_dict(), "max_rows": self.max_rows,
                "seed": self.seed if self.max_rows is not None else None}

    def _rows(self, ctx: CurvatureContext) -> tuple[Optional[list[int]], float]:
        """(rows the statistics are fitted on (None: all), scale n / sample size)."""
        n = ctx.num_rows
        if self.max_rows is None or self.max_rows >= n:
            return None, 1.0
        gen = np.random.default_rng(self.seed)
        rows = np.sort(gen.choice(n, size=self.max_rows, replace=False)).tolist()
        return rows, n / self.max_rows

    # -- structure ----------------------------------------------------------------------------
    def _setup(self, ctx: CurvatureContext) -> GradientCollector:
        """Modules in the engine's layout: with a factorised projection, each module is its
        k_out × k_in block and the factors are fitted from the projected a and g."""
        collector = ctx.engine.new_collector()
        self.modules = []
        self._sample, self._scale = self._rows(ctx)
        fz = collector.factorised
        for i, (t, view) in enumerate(zip(collector.tracked, collector.views)):
            d_in, d_out = t.widths
            out, width = (fz.layers[i].k_out, fz.layers[i].k_in) if fz else (d_out, d_in)
            inp = (width if t.weight is not None else 0) + (1 if t.bias is not None else 0)
            self.modules.append(_Module(view, int(out), int(inp)))
        self.fallback = list(collector.fallback_slices(ctx.engine.dim))
        if self.fallback:
            if self.damping <= 0:
                raise ValueError(f"Parameters {collector.fallback[:5]} are not in linear modules, "
                                 f"so {self.name} has no factors for them; set damping > 0 "
                                 "(they get λ⁻¹) or select only linear-module parameters.")
            logger.warning("%s: %d selected tensors are outside linear modules (%s...); they are "
                           "preconditioned by 1/damping.", self.name, len(self.fallback),
                           collector.fallback[0])
        return collector

    def _passes(self, ctx: CurvatureContext, collector: GradientCollector, tap: PassTap,
                desc: str) -> None:
        """Feed ``tap`` one forward+backward pass over this process's (sampled) training rows."""
        with ctx.differentiable(), collector:
            for rows, batch in ctx.indexed_batches(self._sample, desc=desc, this_process=True):
                collector.reset()
                losses = ctx.engine.task.per_row_loss(ctx.model, batch)
                if not torch.isfinite(losses.detach()).all():
                    raise CurvatureError(f"A training loss is NaN/Inf while fitting {self.name}.")
                layers = collector.tracked
                outputs = [y for t in layers for (_, y) in t.calls]
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
                pos, calls = 0, {}
                for i, t in enumerate(layers):
                    pairs = []
                    for a, _ in t.calls:
                        if grads[pos] is not None:
                            pairs.append(collector.project_pair(i, a, grads[pos]))
                        pos += 1
                    calls[id(t.module)] = pairs
                tap.observe(batch, rows, calls)
        tap.finish()

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, ctx: CurvatureContext) -> None:
        """Accumulate A and S over the training tokens and eigendecompose them (one pass).

        Raises:
            ValueError: Non-linear parameters are selected and damping is 0.
            CurvatureError: A loss is NaN/Inf.
        """
        collector = self._setup(ctx)
        tap = _FactorTap(self, ctx)
        self._passes(ctx, collector, tap, f"{self.name} factors")
        self._eigen_factors(tap)
        self.fitted = True

    def pass_tap(self, ctx: CurvatureContext) -> Optional[PassTap]:
        """The factor statistics A, S as a tap on the engine's gradient pass.

        Raises:
            ValueError: Non-linear parameters are selected and damping is 0.
        """
        self._setup(ctx)
        return _FactorTap(self, ctx)

    def fit_from_pass(self, ctx: CurvatureContext, tap: PassTap,
                      row_vectors: Optional[RowVectors] = None) -> None:
        """Eigendecompose the factors a gradient pass collected (no pass of its own)."""
        assert isinstance(tap, _FactorTap)
        self._eigen_factors(tap)
        self.fitted = True

    def _eigen_factors(self, tap: "_FactorTap") -> None:
        for i, m in enumerate(self.modules):
            n = max(int(tap.count[i].item()), 1)
            ea, m.qa = torch.linalg.eigh(tap.a_sum[i] / n)
            es, m.qs = torch.linalg.eigh(tap.s_sum[i] / n)
            m.eig = (n * self._scale) * torch.outer(es.clamp(min=0), ea.clamp(min=0))

    # -- applying ---------------------------------------------------------------------------
    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Return (H_kfac + λI)⁻¹ V, module by module.

        Raises:
            NotFittedError: Not fitted.
        """
        self._require_fitted()
        out = vectors.clone()
        for m in self.modules:
            assert m.qa is not None and m.qs is not None and m.eig is not None
            mats = m.to_matrix(vectors).to(m.qa.dtype)
            rot = m.qs.T @ mats @ m.qa
            denom = m.eig + self.damping
            inv = torch.where(denom > 0, 1.0 / denom.clamp(min=torch.finfo(denom.dtype).tiny),
                              torch.zeros_like(denom))
            m.from_matrix((m.qs @ (rot * inv) @ m.qa.T).to(vectors.dtype), out)
        for start, stop in self.fallback:
            out[:, start:stop] = vectors[:, start:stop] / self.damping
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Eigenbases and eigenvalues of every module."""
        self._require_fitted()
        state = {}
        for i, m in enumerate(self.modules):
            state.update({f"{i}.qa": m.qa, f"{i}.qs": m.qs, f"{i}.eig": m.eig})
        return state  # type: ignore[return-value]

    def load_state_dict(self, ctx: CurvatureContext, state: dict[str, torch.Tensor]) -> None:
        """Restore the factors for the modules of ``ctx``'s model.

        Raises:
            ValueError: The saved state has another number of modules or shapes.
        """
        self._setup(ctx)
        if len(state) != 3 * len(self.modules):
            raise ValueError(f"Saved {self.name} state has {len(state) // 3} modules, the model "
                             f"has {len(self.modules)}.")
        dev = ctx.engine.device
        for i, m in enumerate(self.modules):
            m.qa, m.qs, m.eig = (state[f"{i}.{k}"].to(dev) for k in ("qa", "qs", "eig"))
            if m.eig.shape != (m.out, m.inp):
                raise ValueError(f"Saved {self.name} factors of module {i} have shape "
                                 f"{tuple(m.eig.shape)}, expected {(m.out, m.inp)}.")
        self.fitted = True


class EKFAC(KFAC):
    """EK-FAC: K-FAC eigenbases with eigenvalues refitted from per-row gradients.

    Args:
        damping: λ.
        max_rows: As :class:`KFAC` (the same sample serves the factors and the eigenvalues).
        seed: Seed of the sample.
    """

    name = "ekfac"

    def fit(self, ctx: CurvatureContext) -> None:
        """Fit K-FAC, then correct the eigenvalues in a second pass.

        Raises:
            ValueError: Non-linear parameters are selected and damping is 0.
            CurvatureError: A loss is NaN/Inf.
        """
        super().fit(ctx)
        self._correct_by_pass(ctx)

    def fit_from_pass(self, ctx: CurvatureContext, tap: PassTap,
                      row_vectors: Optional[RowVectors] = None) -> None:
        """Factors from the gradient pass; eigenvalues from the per-row gradients that pass
        kept (no further pass), else from one more pass.

        Raises:
            CurvatureError: A loss is NaN/Inf in the eigenvalue pass.
        """
        super().fit_from_pass(ctx, tap)
        if row_vectors is None:
            self._correct_by_pass(ctx)
            return
        keep = None if self._sample is None else set(self._sample)
        corrected = [torch.zeros_like(m.factors()[2]) for m in self.modules]
        for rows, vectors in row_vectors():
            if keep is not None:
                pick = [j for j, r in enumerate(rows) if int(r) in keep]
                if not pick:
                    continue
                vectors = vectors[pick]
            for i, m in enumerate(self.modules):
                qa, qs, _ = m.factors()
                mats = m.to_matrix(vectors).to(corrected[i].dtype)
                corrected[i] += ((qs.T @ mats @ qa) ** 2).sum(0)
        # the kept per-row vectors are every row's on every process (summed over processes,
        # or read back from the shared store), so the sum is already whole: no reduction
        for m, eig in zip(self.modules, corrected):
            m.eig = eig * self._scale
        self.fitted = True

    def _correct_by_pass(self, ctx: CurvatureContext) -> None:
        collector = ctx.engine.new_collector()
        self.modules = [_Module(view, m.out, m.inp, m.qa, m.qs, m.eig)
                        for view, m in zip(collector.views, self.modules)]
        tap = _EigenTap(self, ctx)
        self._passes(ctx, collector, tap, "EK-FAC eigenvalues")
        for m, eig in zip(self.modules, tap.corrected):
            m.eig = eig * self._scale
        self.fitted = True


class _FactorTap(PassTap):
    """Sums of a aᵀ and g gᵀ over non-padding tokens per module (K-FAC's A and S)."""

    def __init__(self, kfac: KFAC, ctx: CurvatureContext) -> None:
        dev, self.dtype = ctx.engine.device, ctx.engine.dtype
        self.kfac = kfac
        self.keep = None if kfac._sample is None else set(kfac._sample)
        self.a_sum = [torch.zeros(m.inp, m.inp, dtype=self.dtype, device=dev)
                      for m in kfac.modules]
        self.s_sum = [torch.zeros(m.out, m.out, dtype=self.dtype, device=dev)
                      for m in kfac.modules]
        self.count = torch.zeros(len(kfac.modules), dtype=torch.float64, device=dev)

    def observe(self, batch: Batch, rows: Sequence[int], calls: Calls) -> None:
        pick = _sampled(rows, self.keep)
        if pick is not None and not pick:
            return
        for i, m in enumerate(self.kfac.modules):
            for a, g in calls.get(id(m.tracked.module), []):
                a, g = a.to(self.dtype), g.detach().to(self.dtype)
                mask = _token_mask(a, batch)
                if pick is not None:
                    a, g = a[pick], g[pick]
                    mask = None if mask is None else \
                        mask.reshape(len(rows), -1)[pick].reshape(-1)
                a2 = m.augment(a).reshape(-1, m.inp)
                g2 = g.reshape(-1, m.out)
                if mask is not None:
                    a2, g2 = a2[mask], g2[mask]
                self.a_sum[i] += a2.T @ a2
                self.s_sum[i] += g2.T @ g2
                self.count[i] += a2.shape[0]

    def finish(self) -> None:
        for tensor in (*self.a_sum, *self.s_sum, self.count):  # every process's rows
            all_reduce_sum(tensor)


class _EigenTap(PassTap):
    """EK-FAC's Σ_i (Q_Sᵀ G_i Q_A)² from per-row gradients formed per module and batch."""

    def __init__(self, kfac: KFAC, ctx: CurvatureContext) -> None:
        self.kfac = kfac
        self.corrected = [torch.zeros_like(m.factors()[2]) for m in kfac.modules]

    def observe(self, batch: Batch, rows: Sequence[int], calls: Calls) -> None:
        for i, m in enumerate(self.kfac.modules):
            pairs = calls.get(id(m.tracked.module), [])
            if not pairs:
                continue
            grad = torch.zeros(len(rows), m.out, m.inp, dtype=self.corrected[i].dtype,
                               device=self.corrected[i].device)
            for a, g in pairs:
                a3 = m.augment(a.to(grad.dtype)).reshape(len(rows), -1, m.inp)
                g3 = g.detach().to(grad.dtype).reshape(len(rows), -1, m.out)
                grad += g3.transpose(1, 2) @ a3
            qa, qs, _ = m.factors()
            self.corrected[i] += ((qs.T @ grad @ qa) ** 2).sum(0)

    def finish(self) -> None:
        for eig in self.corrected:
            all_reduce_sum(eig)


def _sampled(rows: Sequence[int], keep: Optional[set[int]]) -> Optional[list[int]]:
    """Batch positions of the rows in ``keep`` (None: keep all)."""
    if keep is None:
        return None
    return [j for j, r in enumerate(rows) if int(r) in keep]


register_preconditioner(KFAC)
register_preconditioner(EKFAC)
