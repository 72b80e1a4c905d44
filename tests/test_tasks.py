"""Task adapters: per-row losses, masking, Dataset.map caching, and the real MiniLM-L6."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, load_from_disk

from hf_ggda.errors import (
    ColumnTypeError,
    ConfigError,
    EmptyDatasetError,
    LabelError,
    MissingColumnError,
)
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

from .conftest import loop_gradients


def test_per_row_loss_is_a_vector_matching_single_rows(bert_setup):
    model, task = bert_setup
    ds = toy_dataset(7)
    prep = task.prepare(ds).select_columns(list(task.feature_columns))
    model.eval()
    batch = task.collate(prep[:7])
    losses = task.per_row_loss(model, batch)
    assert losses.shape == (7,)
    singles = torch.cat([task.per_row_loss(model, task.collate(prep[i:i + 1]))
                         for i in range(7)])
    torch.testing.assert_close(losses, singles, rtol=1e-9, atol=1e-12)


def test_causal_lm_masks_prompt_and_padding():
    tok = tiny_tokenizer("causal")
    ds = Dataset.from_dict({"prompt": ["the market", "a film star award"],
                            "response": [" shares up", " win"]})
    task = CausalLMTask(tok, prompt_column="prompt", response_column="response")
    prep = task.prepare(ds)
    labels = prep["labels"]
    assert labels[0][:2] == [-100, -100] and labels[0][2:] == prep["input_ids"][0][2:]
    assert labels[1][:4] == [-100] * 4 and len(labels[1]) == 6  # + eos
    batch = task.collate(prep.select_columns(list(task.feature_columns))[:2])
    assert batch["labels"][0, -1] == -100  # padding is not a target
    model = tiny_lora("llama", len(tok)).double().eval()
    mean = task.per_row_loss(model, batch)
    summed = CausalLMTask(tok, prompt_column="prompt", response_column="response",
                          reduction="sum").per_row_loss(model, batch)
    torch.testing.assert_close(summed, mean * torch.tensor([3.0, 2.0], dtype=mean.dtype))


def test_causal_lm_rows_without_targets_are_named():
    tok = tiny_tokenizer("causal")
    ds = Dataset.from_dict({"prompt": ["the market shares bank profit"], "response": [" win"]})
    with pytest.raises(LabelError, match=r"Rows \[0\] have no target tokens") as info:
        CausalLMTask(tok, prompt_column="prompt", response_column="response",
                     max_length=4).prepare(ds)
    assert "Increase max_length" in str(info.value)  # a row that would add nothing, typed
    for bad in ({"reduction": "avg"}, {"prompt_column": "prompt"}, {"max_length": 0}):
        with pytest.raises(ConfigError):
            CausalLMTask(tok, **bad)


def test_prepare_is_cached_by_fingerprint(tmp_path):
    tok = tiny_tokenizer("bert")
    toy_dataset(20).save_to_disk(str(tmp_path / "raw"))
    raw = load_from_disk(str(tmp_path / "raw"))
    a = SequenceClassificationTask(tok, max_length=16).prepare(raw)
    b = SequenceClassificationTask(tok, max_length=16).prepare(raw)
    assert a._fingerprint == b._fingerprint
    assert a.cache_files == b.cache_files and a.cache_files  # second call read the cache
    c = SequenceClassificationTask(tok, max_length=8).prepare(raw)
    assert c._fingerprint != a._fingerprint
    assert max(len(x) for x in c["input_ids"]) == 8


def test_bad_columns_are_named():
    tok = tiny_tokenizer("bert")
    task = SequenceClassificationTask(tok)
    with pytest.raises(MissingColumnError, match=r"'label'.*\['text'\]"):
        task.prepare(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(EmptyDatasetError):
        task.prepare(toy_dataset(3).select([]))
    with pytest.raises(ColumnTypeError, match="must hold text"):
        task.prepare(Dataset.from_dict({"text": [1, 2], "label": [0, 1]}))
    with pytest.raises(ColumnTypeError, match="class_encode_column"):
        task.prepare(Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}))


def test_output_gradient_is_the_logit_gradient(bert_setup):
    model, task = bert_setup
    prep = task.prepare(toy_dataset(5)).select_columns(list(task.feature_columns))
    batch = task.collate(prep[:5])
    model.eval()
    err, feats = task.output_gradient(model, batch)
    logits = model(**task.model_inputs(batch)).logits.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    torch.testing.assert_close(err, logits.grad.float())
    assert feats.shape == (5, 16)


def test_real_minilm_per_example_gradients_match_loop():
    """The packaged MiniLM-L6 with LoRA (q, v) and a saved head, on real BBC News rows."""
    from hf_ggda.data import load_bbc_news, load_minilm_classifier

    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=4)
    model = model.double()
    task = SequenceClassificationTask(tokenizer, max_length=24)
    ds = load_bbc_news(limit=6, seed=1)
    ds = ds.add_column("group_id", [0, 0, 1, 2, 2, 2])
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=4))
    ref = loop_gradients(model, task, ds, engine.selection.parameters(model))
    torch.testing.assert_close(engine.per_example_gradients(ds).gradients, ref,
                               rtol=1e-6, atol=1e-12)
    groups = engine.group_gradients(ds).gradients
    torch.testing.assert_close(groups, torch.stack([ref[:2].sum(0), ref[2], ref[3:].sum(0)]),
                               rtol=1e-6, atol=1e-12)
