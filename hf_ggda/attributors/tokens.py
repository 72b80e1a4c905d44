"""Token-level scores for causal LMs: which groups pushed which tokens of a response.

A causal-LM query's measurement is its target tokens' loss, ℓ(q) = Σ_t c · ℓ_t(q) with
c = 1 / T for ``reduction="mean"`` (T target tokens) and 1 for ``"sum"``. Scores are linear
in the query gradient, so the score of group G on token t,

    τ_t(G, q) = Σ_c w_c · ∇(c · ℓ_t(q))ᵀ M_c⁻¹ v_c(G),

sums over t exactly to the sequence-level score τ(G, q). Each token's gradient comes from a
forward+backward pass of the query row whose measured function is that one token's loss (T
one-row passes per query: exact, and cheap beside the training pass; documented equivalent of
one backward per token). Under ``normalize`` every token gradient is divided by the norm of
the whole query's gradient, so the token scores still sum to the normalised sequence score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from datasets import Dataset

from ..tasks import CausalLMTask
from .model_state import check_model_unchanged
from .normalise import inverse_norms, metric_norms

if TYPE_CHECKING:
    from .base import Attributor

_ONE = "__ggda_token_query__"


@dataclass
class TokenScores:
    """Scores of every fitted group on every target token of one query.

    Attributes:
        matrix: (T, K) scores; ``matrix.sum(0)`` is the query's sequence-level score row.
        tokens: The T target tokens (decoded), in order.
        positions: Their positions in the query's token ids.
        group_ids: The K group ids (columns).
    """

    matrix: torch.Tensor
    tokens: list[str]
    positions: list[int]
    group_ids: list[Any]

    def top_tokens(self, group_id: Any, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` tokens ``group_id`` helps most (largest scores), with their scores.

        Raises:
            KeyError: Unknown group id.
        """
        column = self.group_ids.index(group_id)
        values = self.matrix[:, column]
        order = torch.argsort(values, descending=True)[:k]
        return [(self.tokens[i], float(values[i])) for i in order.tolist()]


def _token_fn(task: CausalLMTask, index: int, scale: float) -> Callable[..., torch.Tensor]:
    def fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**task.model_inputs(batch)).logits
        losses = task._token_losses(logits, batch["labels"]).to(logits.dtype)
        targets = (batch["labels"][:, 1:] != -100).nonzero()
        row_pos = targets[targets[:, 0] == 0][:, 1]
        return losses[:, row_pos[index]] * scale
    fn.ggda_key = f"token-loss:{index}:{scale!r}"  # type: ignore[attr-defined]
    return fn


def token_scores(attributor: "Attributor", query_dataset: Dataset, row: int = 0) -> TokenScores:
    """Score every fitted group on every target token of query ``row``.

    Args:
        attributor: A fitted attributor over a :class:`~hf_ggda.tasks.CausalLMTask` whose
            query function is the task's measurement (its loss): TracIn or InfluenceFunction.
        query_dataset: Raw query rows.
        row: Which query row.

    Returns:
        The (T × K) :class:`TokenScores`.

    Raises:
        NotFittedError: The attributor is not fitted.
        ValueError: Not a causal-LM task, a query function other than the loss, or ``row``
            out of range.
    """
    state = attributor._require_fit()
    task = attributor.task
    if not isinstance(task, CausalLMTask):
        raise ValueError(f"Token-level scores need a CausalLMTask, got {type(task).__name__}.")
    if attributor.query_fn() != "measurement" or \
            type(task).measurement is not CausalLMTask.measurement:
        raise ValueError("Token-level scores split the query loss over its tokens; this "
                         "attributor measures another function (use TracIn or "
                         "InfluenceFunction).")
    if not 0 <= row < len(query_dataset):
        raise ValueError(f"row must be in [0, {len(query_dataset)}), got {row}.")
    one = query_dataset.select([row])
    one = one.add_column(_ONE, [0])
    labels = task.prepare(one.remove_columns(_ONE))["labels"][0]
    positions = [t for t in range(1, len(labels)) if labels[t] != -100]
    scale = 1.0 / len(positions) if task.reduction == "mean" else 1.0
    total: torch.Tensor | None = None
    for c, (comp, part) in enumerate(zip(attributor.components, state.parts)):
        engine = attributor._engine(c, comp)
        with comp.activate(attributor.model):
            check_model_unchanged(attributor.model, part.fingerprint, "token scores")
            grads = torch.cat([engine.group_gradients(one, _ONE, fn=_token_fn(task, i, scale))
                               .gradients for i in range(len(positions))])
            kind = attributor.config.normalize
            if kind is not None:  # the whole query's norm, so the tokens still sum exactly
                norm = metric_norms(grads.sum(0, keepdim=True), kind, part.preconditioner)
                grads = grads * inverse_norms(norm)
            vectors = attributor._transform(part, grads, "query")
        term = comp.weight * (vectors @ part.train.T)
        total = term if total is None else total + term
    assert total is not None
    ids = task.prepare(one.remove_columns(_ONE))["input_ids"][0]
    tokens = [task.tokenizer.decode([ids[t]]) for t in positions]
    return TokenScores(total.detach().cpu(), tokens, positions, list(state.group_ids))
