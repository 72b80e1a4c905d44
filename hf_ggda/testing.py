"""Tiny models built from configs, with a tokenizer trained by ``tokenizers``, for fast tests."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from datasets import Dataset

_WORDS = ("the a market shares bank profit film music star award vote party minister election "
          "game team win match phone software network data growth price band show court "
          "law player coach goal chip web user record sales deal").split()


def toy_texts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12) -> list[str]:
    """Return ``n`` seeded random sentences of uneven lengths."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        idx = torch.randint(0, len(_WORDS), (k,), generator=gen).tolist()
        out.append(" ".join(_WORDS[i] for i in idx))
    return out


def toy_dataset(n: int = 37, num_labels: int = 3, seed: int = 0) -> Dataset:
    """A text dataset with ``text``, ``label`` and uneven lengths."""
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, num_labels, (n,), generator=gen).tolist()
    return Dataset.from_dict({"text": toy_texts(n, seed), "label": labels})


def tiny_tokenizer(kind: str = "bert") -> Any:
    """A word-level fast tokenizer trained on the toy vocabulary.

    Args:
        kind: ``"bert"`` ([CLS] x [SEP] template) or ``"causal"`` (eos-terminated, no template).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(_WORDS)] * 2,
                            trainers.WordLevelTrainer(special_tokens=specials))
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                            ("[SEP]", tok.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def tiny_model(arch: str, vocab_size: int, num_labels: int = 3, seed: int = 0) -> Any:
    """Build a 2-layer, 16-wide model from a config.

    Args:
        arch: ``"bert"`` (sequence classifier), ``"gpt2"`` or ``"llama"`` (causal LMs).
        vocab_size: Tokenizer vocabulary size.
        num_labels: Classes (BERT only).
        seed: Initialisation seed.
    """
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "bert":
        # num_labels is a PretrainedConfig keyword that BertConfig's typed signature omits
        bert = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2,  # type: ignore[call-arg]
                          num_attention_heads=2, intermediate_size=32, num_labels=num_labels,
                          max_position_embeddings=64)
        return BertForSequenceClassification(bert)
    if arch == "gpt2":
        gpt2 = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64)
        return GPT2LMHeadModel(gpt2)
    if arch == "llama":
        llama = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64)
        return LlamaForCausalLM(llama)
    raise ValueError(f"Unknown arch {arch!r}; use 'bert', 'gpt2' or 'llama'.")


LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def tiny_lora(arch: str, vocab_size: int, r: int = 2, seed: int = 0,
              modules_to_save: Sequence[str] = ()) -> Any:
    """A tiny model with LoRA (non-zero init, so every adapter gradient is non-trivial)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, vocab_size, seed=seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[arch],
                     init_lora_weights=False, lora_dropout=0.1,
                     modules_to_save=list(modules_to_save) or None,
                     fan_in_fan_out=arch == "gpt2")
    torch.manual_seed(seed + 1)
    return get_peft_model(model, cfg)
