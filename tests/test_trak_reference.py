"""GGDA-TRAK against a hand-computed reference (no hf_ggda gradient code on the reference side).

The reference takes per-example gradients of the margin f = log p_y / (1 − p_y) from a plain
loop of batch-1 ``torch.autograd.grad`` calls on a tiny float64 BERT + LoRA, projects them with
the same seeded matrix as hf_ggda (``RandomProjector(...).matrix()``) and evaluates

    score(G, q) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ Σ_{i∈G} Q_i φ_i,    Q_i = 1 − p_i,

with Φ the (n, p) matrix of all per-example features. See ``notes/trak.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from datasets import Dataset

from hf_ggda import SIGN_CONVENTION
from hf_ggda.attributors import TRAK, TRAKConfig
from hf_ggda.gradients.projection import RandomProjector
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

GROUPS = [2, 0, 0, 1, 1, 2, 0, 3, 3, 1, 3, 2, 4, 4, 0, 1]
MAX_LENGTH = 16
SEED = 5
#: The classifier head is scaled up so that Q = 1 − p spreads as in a trained model (0.41–0.84
#: here instead of 0.66–0.67 at initialisation); the head is not among the selected parameters.
HEAD_SCALE = 100.0


@dataclass
class Reference:
    """Hand-computed pieces of the TRAK estimator.

    Attributes:
        train_f: (n, d) per-example gradients of the training margins.
        train_loss: (n, d) per-example gradients of the training losses.
        q_train: (n,) out-to-loss weights Q_i = 1 − p_i of the training rows.
        query_f: (m, d) gradients of the query margins.
        query_loss: (m, d) gradients of the query losses.
        q_query: (m,) Q of the query rows.
        groups: (n,) group id of each training row.
    """

    train_f: torch.Tensor
    train_loss: torch.Tensor
    q_train: torch.Tensor
    query_f: torch.Tensor
    query_loss: torch.Tensor
    q_query: torch.Tensor
    groups: torch.Tensor

    def projection(self, dim: int) -> torch.Tensor:
        """The (d, p) matrix hf_ggda projects with (default kind, seed ``SEED``)."""
        return RandomProjector(self.train_f.shape[1], dim, "rademacher", SEED).matrix()

    def damping(self, dim: int, relative: float) -> float:
        """λ = ``relative`` × the mean eigenvalue tr(ΦᵀΦ) / p of the exact kernel."""
        phi = self.train_f @ self.projection(dim)
        return relative * float((phi ** 2).sum()) / dim

    def group_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """(K, ·) sums of ``rows`` over the groups, ids in sorted order."""
        return torch.stack([rows[self.groups == k].sum(0) for k in sorted(set(GROUPS))])


def _rows(model: torch.nn.Module, params: list[torch.nn.Parameter], tok: Any,
          data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example margin gradients, loss gradients and Q, one batch-1 backward at a time."""
    grads_f, grads_loss, weights = [], [], []
    for text, label in zip(data["text"], data["label"]):
        enc = tok(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        logp = torch.log_softmax(model(**enc).logits[0], dim=-1)
        p_y = logp[label].exp()
        margin = logp[label] - torch.log1p(-p_y)  # log p / (1 − p)
        loss = -logp[label]
        flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params,
                                                                       retain_graph=True)])
                for out in (margin, loss)]
        grads_f.append(flat[0])
        grads_loss.append(flat[1])
        weights.append(1 - p_y.detach())
    return torch.stack(grads_f), torch.stack(grads_loss), torch.stack(weights)


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    """The tiny model, the data and the hand-computed reference pieces."""
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=1, seed=3).double().eval()
    head = model.base_model.model.classifier
    with torch.no_grad():
        head.weight *= HEAD_SCALE
        head.bias *= HEAD_SCALE
    train = toy_dataset(len(GROUPS), seed=1)
    train = train.add_column("group_id", GROUPS).add_column("row", list(range(len(GROUPS))))
    query = toy_dataset(4, seed=7)
    # the LoRA adapters in module order (what the default selection "auto" picks for PEFT)
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    params = [dict(model.named_parameters())[n] for n in names]
    train_f, train_loss, q_train = _rows(model, params, tok, train)
    query_f, query_loss, q_query = _rows(model, params, tok, query)
    ref = Reference(train_f, train_loss, q_train, query_f, query_loss, q_query,
                    torch.tensor(GROUPS))
    return {"model": model, "names": names, "params": params, "tok": tok,
            "task": SequenceClassificationTask(tok, max_length=MAX_LENGTH),
            "train": train, "query": query, "ref": ref}


def _trak(setup: dict[str, Any], dim: int, damping: float, **kwargs: Any) -> TRAK:
    cfg = TRAKConfig(projection_dim=dim, damping=damping, seed=SEED, batch_size=5, **kwargs)
    return TRAK(setup["model"], setup["task"], cfg)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _solve(kernel: torch.Tensor, damping: float, rhs: torch.Tensor) -> torch.Tensor:
    """(kernel + λI)⁻¹ rhs for (p, p) kernel and (p, N) rhs."""
    return torch.linalg.solve(kernel + damping * torch.eye(len(kernel), dtype=kernel.dtype), rhs)


# (p, λ relative to the mean eigenvalue of ΦᵀΦ). p = 8 < n = 16: ΦᵀΦ is invertible and
# λ = 0 is the undamped published estimator; p = 24 > n: ΦᵀΦ is singular, λ > 0 is needed.
CASES = [(8, 0.0), (24, 0.01)]


@pytest.mark.parametrize(("dim", "relative"), CASES)
def test_trak_exact_kernel_matches_hand_reference(setup: dict[str, Any], dim: int,
                                                  relative: float) -> None:
    """kernel="exact" with groups: scores, kernel and training vectors equal the hand formula."""
    ref: Reference = setup["ref"]
    damping = ref.damping(dim, relative)
    proj = ref.projection(dim)
    phi, phi_q = ref.train_f @ proj, ref.query_f @ proj  # (n, p), (m, p)
    phi_groups = ref.group_sum(ref.q_train[:, None] * phi)  # (K, p): Σ_{i∈G} Q_i φ_i
    expected = phi_q @ _solve(phi.T @ phi, damping, phi_groups.T)  # (m, K)

    trak = _trak(setup, dim, damping, kernel="exact").fit(setup["train"], "group_id")
    assert list(trak.selection.names) == setup["names"]  # same flat layout as the reference
    scores = trak.score(setup["query"])
    assert trak.group_ids == [0, 1, 2, 3, 4]
    assert scores.matrix.shape == (4, 5)
    assert _rel_err(scores.matrix, expected) < 1e-6
    # the pieces, too: the fitted kernel is ΦᵀΦ, the training vectors Σ Q_i φ_i
    part = trak._fit.parts[0]  # type: ignore[union-attr]
    assert _rel_err(part.preconditioner.matrix(), phi.T @ phi) < 1e-9  # type: ignore[union-attr]
    assert _rel_err(part.raw, phi_groups) < 1e-9
    # not a degenerate check: the scores are neither tiny nor all of one sign
    assert float(expected.abs().max()) > 1e-2
    assert bool((expected > 0).any()) and bool((expected < 0).any())


@pytest.mark.parametrize(("dim", "relative"), CASES)
def test_trak_point_mode_default_kernel_is_the_exact_kernel(setup: dict[str, Any], dim: int,
                                                            relative: float) -> None:
    """Singleton groups with the default (group) kernel give exactly the exact-kernel TRAK."""
    ref: Reference = setup["ref"]
    damping = ref.damping(dim, relative)
    proj = ref.projection(dim)
    phi, phi_q = ref.train_f @ proj, ref.query_f @ proj
    expected = phi_q @ _solve(phi.T @ phi, damping, (ref.q_train[:, None] * phi).T)  # (m, n)

    assert TRAKConfig().kernel == "group"
    default = _trak(setup, dim, damping).fit(setup["train"], "row")
    exact = _trak(setup, dim, damping, kernel="exact").fit(setup["train"], "row")
    point, point_exact = default.score(setup["query"]), exact.score(setup["query"])
    assert point.matrix.shape == (4, len(GROUPS))
    kernel = default._fit.parts[0].preconditioner.matrix()  # type: ignore[union-attr]
    assert _rel_err(kernel, phi.T @ phi) < 1e-9
    assert _rel_err(point.matrix, point_exact.matrix) < 1e-9
    assert _rel_err(point.matrix, expected) < 1e-6
    # the defect this guards against: a batched kernel from the Q-weighted training vectors,
    # Σ Q_i² φ_i φ_iᵀ, gives visibly different point scores
    weighted = ref.q_train[:, None] * phi
    old = phi_q @ _solve(weighted.T @ weighted, damping, weighted.T)
    assert _rel_err(old, expected) > 0.3
    r = float(torch.corrcoef(torch.stack([old.flatten(), expected.flatten()]))[0, 1])
    assert r < 0.97


def test_trak_group_kernel_uses_unweighted_group_features(setup: dict[str, Any]) -> None:
    """The batched kernel is Φ_Gᵀ Φ_G with φ_G = Pᵀ Σ_{i∈G} ∇f_i (no Q)."""
    ref: Reference = setup["ref"]
    dim = 8
    damping = ref.damping(dim, 0.01)
    proj = ref.projection(dim)
    phi, phi_q = ref.train_f @ proj, ref.query_f @ proj
    phi_f_groups = ref.group_sum(phi)  # (K, p): Pᵀ Σ_{i∈G} ∇f_i
    phi_groups = ref.group_sum(ref.q_train[:, None] * phi)
    kernel = phi_f_groups.T @ phi_f_groups
    expected = phi_q @ _solve(kernel, damping, phi_groups.T)
    trak = _trak(setup, dim, damping).fit(setup["train"], "group_id")
    fitted = trak._fit.parts[0].preconditioner.matrix()  # type: ignore[union-attr]
    assert _rel_err(fitted, kernel) < 1e-9
    assert _rel_err(trak.score(setup["query"]).matrix, expected) < 1e-6


def test_trak_sign_positive_means_the_group_helps(setup: dict[str, Any]) -> None:
    """A positive score means training on G lowers the query's loss (and vice versa)."""
    ref: Reference = setup["ref"]
    dim = 8
    damping = ref.damping(dim, 0.01)
    proj = ref.projection(dim)
    phi = ref.train_f @ proj
    result = _trak(setup, dim, damping, kernel="exact").fit(setup["train"], "group_id") \
        .score(setup["query"])
    assert result.sign_convention == SIGN_CONVENTION
    assert SIGN_CONVENTION.startswith("positive score = the group helps the query")
    scores = result.matrix
    # ∂ℓ/∂f = −(1 − p) = −Q: the training vectors are minus the projected loss gradients, and
    # the query margin gradient is −∇ℓ(q) / Q_q, so the TRAK score is the influence-function
    # score ∇ℓ(q)ᵀ M g_G (M = P (ΦᵀΦ + λI)⁻¹ Pᵀ, PSD) divided by Q_q > 0: same sign
    torch.testing.assert_close(ref.train_loss, -ref.q_train[:, None] * ref.train_f,
                               rtol=1e-9, atol=1e-12)
    inverse = _solve(phi.T @ phi, damping, torch.eye(dim, dtype=phi.dtype))
    influence = (ref.query_loss @ proj) @ inverse @ ref.group_sum(ref.train_loss @ proj).T
    assert _rel_err(scores, influence / ref.q_query[:, None]) < 1e-6
    # behaviour: one preconditioned descent step on G's summed loss,
    # θ ← θ − ε M g_G = θ + ε P (ΦᵀΦ + λI)⁻¹ φ_G, raises the query margin by ε · score (first
    # order), i.e. training more on a positive-scored group lowers the query's loss
    model, params = setup["model"], setup["params"]
    tok, query = setup["tok"], setup["query"]
    phi_groups = ref.group_sum(ref.q_train[:, None] * phi)
    directions = (proj @ _solve(phi.T @ phi, damping, phi_groups.T)).T  # (K, d)

    def margins_and_losses() -> tuple[torch.Tensor, torch.Tensor]:
        out_f, out_l = [], []
        with torch.no_grad():
            for text, label in zip(query["text"], query["label"]):
                enc = tok(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
                logp = torch.log_softmax(model(**enc).logits[0], dim=-1)
                out_f.append(logp[label] - torch.log1p(-logp[label].exp()))
                out_l.append(-logp[label])
        return torch.stack(out_f), torch.stack(out_l)

    def shift(vector: torch.Tensor) -> None:
        with torch.no_grad():
            start = 0
            for p in params:
                p += vector[start:start + p.numel()].view_as(p)
                start += p.numel()

    eps = 1e-5 / float(directions.norm(dim=1).max())
    base_f, base_l = margins_and_losses()
    for k, direction in enumerate(directions):
        shift(eps * direction)
        up_f, up_l = margins_and_losses()
        shift(-2 * eps * direction)
        down_f, _ = margins_and_losses()
        shift(eps * direction)
        slope = (up_f - down_f) / (2 * eps)
        assert _rel_err(slope, scores[:, k]) < 1e-6
        helps = scores[:, k] > 1e-3 * float(scores.abs().max())
        hurts = scores[:, k] < -1e-3 * float(scores.abs().max())
        assert bool(((up_l - base_l)[helps] < 0).all())
        assert bool(((up_l - base_l)[hurts] > 0).all())
    after_f, _ = margins_and_losses()
    torch.testing.assert_close(after_f, base_f, rtol=0, atol=1e-12)
