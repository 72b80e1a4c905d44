"""Shared fixtures: tiny LoRA models in float64 and their tasks."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core box


def make_setup(arch: str, modules_to_save: tuple[str, ...] = ()):
    """Return (model, task) for a tiny float64 LoRA model of ``arch``."""
    from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
    from hf_ggda.testing import tiny_lora, tiny_tokenizer

    tok = tiny_tokenizer("bert" if arch == "bert" else "causal")
    model = tiny_lora(arch, len(tok), modules_to_save=modules_to_save).double()
    task = SequenceClassificationTask(tok, max_length=32) if arch == "bert" \
        else CausalLMTask(tok, max_length=32)
    return model, task


@pytest.fixture
def bert_setup():
    return make_setup("bert", ("classifier",))


def loop_gradients(model, task, dataset, params):
    """Reference: a Python loop of batch-1 backward passes, one gradient row per example."""
    prepared = task.prepare(dataset).select_columns(list(task.feature_columns))
    model.eval()
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(len(dataset)):
        batch = task.collate(prepared[i:i + 1])
        loss = task.per_row_loss(model, batch).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) if g is not None else torch.zeros(p.numel(),
                               dtype=p.dtype) for g, p in zip(grads, params)]))
    return torch.stack(rows)
