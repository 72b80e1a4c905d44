"""Statistics that ride along the engine's gradient pass ("taps"): one pass where one suffices.

Every backward of :class:`~hf_ggda.gradients.hooks.GradientCollector` has, for each tracked
linear layer, its inputs ``a`` and the gradients ``g`` of the summed row losses with respect to
its outputs. Whatever else a method needs that is a function of those same (a, g) pairs — the
K-FAC factors Σ aaᵀ and Σ ggᵀ, the output-gradient features of Grad-K-Means — is accumulated
by a tap in the same pass instead of in a pass of its own. A tap may also *watch* modules that
are not tracked (e.g. a frozen output layer), whose (a, g) pairs then join the same
``torch.autograd.grad`` call.

A tap's result is only whole when the pass visited every row: the engine reports that as
``GroupGradients.fresh`` (False when a store resumed and some shards were read, not computed).
Under several processes each process feeds its own rows, and :meth:`PassTap.finish` sums over
processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..distributed import all_reduce_max, all_reduce_sum

#: Per observed module (by ``id``): its calls in the batch as (input, output gradient) pairs.
Calls = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
#: (errors (B, [T,] C), inputs (B, [T,] h)) -> (B, p) features.
ProjectFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PassTap(ABC):
    """A statistic accumulated from the (input, output-gradient) pairs of a gradient pass.

    Attributes:
        projected: Receive the tracked layers' pairs as the engine accumulates them (after a
            factorised projection, when the engine has one); False: as the model computed
            them. Watched modules always come as computed.
    """

    projected: bool = True

    def watch_modules(self) -> Sequence[torch.nn.Module]:
        """Modules beyond the tracked layers whose (a, g) pairs the tap needs (default: none)."""
        return ()

    @abstractmethod
    def observe(self, batch: dict[str, torch.Tensor], rows: Sequence[int], calls: Calls) -> None:
        """Take one batch's pairs.

        Args:
            batch: The collated batch (attention mask, labels, ...).
            rows: Dataset row index of each batch row.
            calls: Per module id, the (input, output gradient) pairs of the batch.
        """

    def finish(self) -> None:  # noqa: B027 - optional hook: taps without statistics keep it
        """Sum the statistics over processes (call once, on every process, after the pass)."""


class OutputFeatureTap(PassTap):
    """Grad-K-Means features from the output layer's (input, output-gradient) pairs.

    The output layer's gradient for row i is G_i = Σ_t g_{i,t} [a_{i,t}, 1]ᵀ, with g the
    gradient of ℓ_i with respect to the logits — for a classifier (softmax − onehot), for a
    causal LM the per-token errors of the target tokens (scaled by 1/tokens under the mean
    reduction). That is exactly what :meth:`~hf_ggda.tasks.AttributionTask.output_gradient`
    returns, so ``project(g, a)`` gives the features the two-pass Grad-K-Means would compute
    with a forward pass of its own.

    Args:
        head: The output layer (``hf_ggda.params.find_head``).
        project: Maps (errors (B, [T,] C), inputs (B, [T,] h)) to (B, p) features
            (:class:`~hf_ggda.grouping.features.OutputGradientProjector`).
        num_rows: Rows n of the dataset (features are kept per dataset row).
        sign: Multiplies the errors: −1 when the pass differentiates a function whose
            logit-gradient is minus the loss's (TRAK's Q·margin); K-means is unchanged by it.
    """

    projected = False

    def __init__(self, head: torch.nn.Module, project: ProjectFn, num_rows: int,
                 sign: float = 1.0) -> None:
        self.head = head
        self.project = project
        self.sign = sign
        self.features: Optional[torch.Tensor] = None
        self.seen = torch.zeros(num_rows, dtype=torch.bool)

    def watch_modules(self) -> Sequence[torch.nn.Module]:
        return (self.head,)

    def observe(self, batch: dict[str, torch.Tensor], rows: Sequence[int], calls: Calls) -> None:
        pairs = calls.get(id(self.head), [])
        if not pairs:
            return
        a, g = pairs[-1]
        feats = self.project(self.sign * g.detach().float(), a.detach().float())
        if self.features is None:  # on the model's device, so nccl can sum it
            self.features = torch.zeros(len(self.seen), feats.shape[1], dtype=torch.float32,
                                        device=feats.device)
            self.seen = self.seen.to(feats.device)
        index = torch.as_tensor(list(rows), dtype=torch.long, device=feats.device)
        self.features[index] = feats
        self.seen[index] = True

    def finish(self) -> None:
        # a process that got no shard saw no row: it learns the width from the others, so
        # every process reduces a tensor of the same shape
        width = all_reduce_max(0 if self.features is None else self.features.shape[1])
        if self.features is None:
            self.features = torch.zeros(len(self.seen), width, dtype=torch.float32,
                                        device=self.seen.device)
        self.features = all_reduce_sum(self.features)
        self.seen = all_reduce_sum(self.seen.to(torch.int32)).bool()

    def matrix(self) -> np.ndarray:
        """The (n, p) feature matrix.

        Raises:
            RuntimeError: Some rows were never observed (the pass did not cover them, or the
                output layer's gradient was not reached).
        """
        if self.features is None or not bool(self.seen.all()):
            missing = np.flatnonzero(~self.seen.cpu().numpy())[:10].tolist()
            raise RuntimeError(f"One-pass grouping saw no output-layer gradient for rows "
                               f"{missing}: the output layer's logits must depend on the "
                               "selected parameters.")
        return self.features.cpu().numpy()

