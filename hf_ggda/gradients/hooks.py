"""Group and per-example gradients from one backward pass, via hooks on linear layers.

For a linear map y = a Wᵀ + b applied at every token, the gradient of a sum of row losses is
Σ_rows Σ_tokens (∂ℓ/∂y) ⊗ a. Forward hooks keep each tracked layer's input ``a`` and output
``y``; one ``torch.autograd.grad`` call returns ∂(Σℓ)/∂y for every tracked output (autograd
computes no weight gradients at all), and the weight gradient of each *group* is then a single
matmul over that group's rows — so the cost is the one forward+backward pass. When a batch
holds many small groups (4 or more), a single ``bmm`` of the batch's row gradients summed into
the groups is faster; those row gradients are transient (one batch, one layer, capped at 64 MB)
and never stored. Point mode is that ``bmm`` with one group per row.

Selected parameters that do not belong to a tracked layer (embeddings, norms, prompt vectors)
go through autograd directly: summed when the batch holds one group, or as a vmapped backward
with one-hot group weights (``is_grads_batched``) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from transformers.pytorch_utils import Conv1D

from ..params import ParameterSelection

if TYPE_CHECKING:
    from .factorised import FactorisedProjector
    from .taps import PassTap


#: From this many groups in a batch on, row gradients are formed by one bmm (when small).
_MANY_SEGMENTS = 4
#: Largest transient (rows × out × in) of that bmm, in elements (64 MB of float32).
_MAX_TRANSIENT = 16 * 1024 * 1024


@dataclass
class TrackedLayer:
    """A hooked Linear / Conv1D layer, its slices in the flat gradient, and captured calls."""

    module: torch.nn.Module
    transposed: bool  # Conv1D stores W as (in, out)
    weight: Optional[tuple[int, int]]  # slice in the flat vector
    bias: Optional[tuple[int, int]]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    name: str = ""

    @property
    def widths(self) -> tuple[int, int]:
        """(d_in, d_out) of the layer."""
        w = self.module.weight
        assert isinstance(w, torch.Tensor)  # a Linear / Conv1D weight
        return (int(w.shape[0]), int(w.shape[1])) if self.transposed \
            else (int(w.shape[1]), int(w.shape[0]))


def find_tracked(model: torch.nn.Module,
                 selection: ParameterSelection) -> tuple[list[TrackedLayer], list[str]]:
    """The Linear / Conv1D layers holding selected weights or biases (their slices in the flat
    gradient), and the names of the selected parameters outside them (fallback)."""
    offsets = selection.offsets()
    named = dict(model.named_parameters())
    covered: set[str] = set()
    tracked: list[TrackedLayer] = []
    for mname, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        w = f"{mname}.weight" if mname else "weight"
        b = f"{mname}.bias" if mname else "bias"
        w_sl = offsets.get(w) if named.get(w) is module.weight else None
        b_sl = offsets.get(b) if module.bias is not None and named.get(b) is module.bias \
            else None
        if w_sl is None and b_sl is None:
            continue
        covered |= {n for n, sl in ((w, w_sl), (b, b_sl)) if sl is not None}
        tracked.append(TrackedLayer(module, isinstance(module, Conv1D), w_sl, b_sl, name=mname))
    return tracked, [n for n in selection.names if n not in covered]


def segment_bounds(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """Return (slot, start, stop) for runs of equal values in a 1-D tensor of group slots."""
    vals = slots.tolist()
    out, start = [], 0
    for i in range(1, len(vals) + 1):
        if i == len(vals) or vals[i] != vals[start]:
            out.append((vals[start], start, i))
            start = i
    return out


class GradientCollector:
    """Computes summed-per-group gradients of selected parameters for one batch at a time.

    Args:
        model: The model.
        selection: Selected parameters; their flat layout defines the output columns.
        dtype: Accumulation dtype (float32, or float64 for float64 models).
        taps: Statistics that ride along every backward (see :mod:`hf_ggda.gradients.taps`);
            the modules they watch beyond the tracked layers get forward hooks too.
    """

    def __init__(self, model: torch.nn.Module, selection: ParameterSelection,
                 dtype: torch.dtype = torch.float32, taps: Sequence["PassTap"] = (),
                 factorised: Optional["FactorisedProjector"] = None) -> None:
        self.selection = selection
        self.dtype = dtype
        self.tracked, self.fallback = find_tracked(model, selection)
        named = dict(model.named_parameters())
        self._fallback_params = [named[n] for n in self.fallback]
        self.factorised = factorised
        self.dim = selection.numel
        self._fb_offsets = {n: selection.offsets()[n] for n in self.fallback}
        #: The tracked layers as accumulated: their slices and layout in the output vector.
        self.views = self.tracked
        if factorised is not None:  # accumulate in the projected layout
            if len(factorised.layers) != len(self.tracked):
                raise ValueError("The factorised projection was built for other layers.")
            self.views = [TrackedLayer(t.module, False, lp.weight, lp.bias, name=t.name)
                           for t, lp in zip(self.tracked, factorised.layers)]
            pos, self._fb_offsets = factorised.linear_dim, {}
            for n, p in zip(self.fallback, self._fallback_params):
                self._fb_offsets[n] = (pos, pos + p.numel())
                pos += p.numel()
            self.dim = factorised.collect_dim
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.taps = list(taps)
        tracked_ids = {id(t.module) for t in self.tracked}
        self.watched: list[TrackedLayer] = []  # extra modules the taps need, not tracked
        seen: set[int] = set()
        for tap in self.taps:
            for module in tap.watch_modules():
                if id(module) not in tracked_ids and id(module) not in seen:
                    seen.add(id(module))
                    self.watched.append(TrackedLayer(module, isinstance(module, Conv1D),
                                                     None, None))

    def project_pair(self, index: int, a: torch.Tensor,
                     g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tracked layer ``index``'s (input, output gradient) in the accumulated layout."""
        if self.factorised is None:
            return a, g
        return self.factorised.layers[index].project(a.to(self.dtype), g.to(self.dtype))

    def fallback_slices(self, dim: int) -> list[tuple[int, int]]:
        """Slices of the parameters outside linear layers in the final (N, dim) vectors (one
        slice for all of them when a factorised projection projects them densely)."""
        if self.factorised is not None and self.factorised.fallback is not None:
            return [(self.factorised.linear_dim, dim)]
        return [self._fb_offsets[n] for n in self.fallback]

    # -- hook management -------------------------------------------------------------------
    def __enter__(self) -> "GradientCollector":
        for t in self.tracked + self.watched:
            t.calls.clear()
            self._handles.append(t.module.register_forward_hook(self._make_hook(t)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _make_hook(t: TrackedLayer) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:
                t.calls.append((inputs[0].detach(), output))
        return hook

    def reset(self) -> None:
        """Forget captured activations (call before each forward)."""
        for t in self.tracked + self.watched:
            t.calls.clear()

    # -- gradients ---------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, slots: torch.Tensor, out: torch.Tensor,
                 per_example: bool = False, batch: Optional[dict[str, torch.Tensor]] = None,
                 rows: Optional[Sequence[int]] = None) -> None:
        """Add the summed gradients of ``losses`` per slot into ``out``.

        The same backward feeds every tap of the collector (with ``batch`` and ``rows``).

        Args:
            losses: (B,) per-row losses of the batch just run under this collector.
            slots: (B,) row index into ``out`` of each batch row; rows of one slot must be
                contiguous.
            out: (num_slots, d) accumulator in the accumulation dtype, updated in place.
            per_example: Every row is its own slot (vectorised point mode).
            batch: The collated batch (passed to the taps).
            rows: Dataset row index of each batch row (passed to the taps).
        """
        layers = self.tracked + self.watched if self.taps else self.tracked
        outputs = [y for t in layers for (_, y) in t.calls]
        segments = segment_bounds(slots)
        many = len(segments) > 1
        fb = self._fallback_params if not many else []
        grads = torch.autograd.grad(losses.sum(), [*outputs, *fb], allow_unused=True,
                                    retain_graph=bool(self._fallback_params) and many)
        pos, seen, projected = 0, {}, {}
        for li, t in enumerate(layers):
            calls, pcalls = [], []
            for a, _ in t.calls:
                go = grads[pos]
                pos += 1
                if go is None:
                    continue
                calls.append((a, go))
                if li >= len(self.tracked):
                    continue
                if self.factorised is not None:
                    a, go = self.factorised.layers[li].project(a.to(self.dtype),
                                                               go.to(self.dtype))
                pcalls.append((a, go))
                self._linear_grads(self.views[li], a, go, segments, out, per_example)
            seen[id(t.module)] = calls
            projected[id(t.module)] = pcalls if li < len(self.tracked) else calls
        if self._fallback_params:
            self._fallback_grads(losses, grads[len(outputs):], segments, out)
        for tap in self.taps:
            tap.observe(batch or {}, list(rows) if rows is not None else [],
                        projected if tap.projected else seen)

    def _linear_grads(self, t: TrackedLayer, a: torch.Tensor, go: torch.Tensor,
                      segments: list[tuple[int, int, int]], out: torch.Tensor,
                      per_example: bool) -> None:
        bsz = a.shape[0]
        a = a.reshape(bsz, -1, a.shape[-1]).to(self.dtype)
        go = go.reshape(bsz, -1, go.shape[-1]).to(self.dtype)
        many = len(segments) >= _MANY_SEGMENTS
        if (per_example and len(segments) == bsz) or \
                (many and bsz * a.shape[-1] * go.shape[-1] <= _MAX_TRANSIENT):
            # one bmm of within-batch row gradients, summed into the slots; transient only
            slot_of_row = torch.empty(bsz, dtype=torch.long, device=out.device)
            for slot, s, e in segments:
                slot_of_row[s:e] = slot
            if t.weight is not None:
                gw = torch.bmm(a.transpose(1, 2), go) if t.transposed \
                    else torch.bmm(go.transpose(1, 2), a)
                out[:, t.weight[0]:t.weight[1]].index_add_(0, slot_of_row, gw.reshape(bsz, -1))
            if t.bias is not None:
                out[:, t.bias[0]:t.bias[1]].index_add_(0, slot_of_row, go.sum(1))
            return
        for slot, s, e in segments:
            a_s = a[s:e].reshape(-1, a.shape[-1])
            g_s = go[s:e].reshape(-1, go.shape[-1])
            if t.weight is not None:
                gw = a_s.T @ g_s if t.transposed else g_s.T @ a_s
                out[slot, t.weight[0]:t.weight[1]] += gw.reshape(-1)
            if t.bias is not None:
                out[slot, t.bias[0]:t.bias[1]] += g_s.sum(0)

    def _fallback_grads(self, losses: torch.Tensor, summed: tuple,
                        segments: list[tuple[int, int, int]], out: torch.Tensor) -> None:
        offsets = self._fb_offsets
        if len(segments) == 1:
            grads = [g.unsqueeze(0) if g is not None else None for g in summed]
            slot_idx = [segments[0][0]]
        else:
            weights = torch.zeros(len(segments), losses.shape[0], dtype=losses.dtype,
                                  device=losses.device)
            for k, (_, s, e) in enumerate(segments):
                weights[k, s:e] = 1.0
            grads = list(torch.autograd.grad(losses, self._fallback_params,
                                             grad_outputs=weights, is_grads_batched=True,
                                             allow_unused=True))
            slot_idx = [slot for slot, _, _ in segments]
        idx = torch.tensor(slot_idx, device=out.device)
        for name, g in zip(self.fallback, grads):
            if g is None:
                continue
            s, e = offsets[name]
            out[idx, s:e] += g.reshape(len(slot_idx), -1).to(self.dtype)
