"""Loading models and datasets from local paths (no hub access at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from ..errors import DataFileError, EmptyDatasetError

_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_local_dataset(spec: str, split: Optional[str] = None) -> Dataset:
    """Load a ``save_to_disk`` folder or a local json/jsonl/csv/parquet file.

    Args:
        spec: Path of a folder written by ``save_to_disk`` or of a data file.
        split: Split to take from a ``DatasetDict`` folder (default: ``train`` or the only one).

    Returns:
        The dataset.

    Raises:
        FileNotFoundError: The path does not exist.
        DataFileError: (a ``ValueError``) Unknown file type or split.
        EmptyDatasetError: The dataset has no rows.
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"No dataset at {spec!r}. Pass a folder written by "
                                "`Dataset.save_to_disk` or a .json/.jsonl/.csv/.parquet file.")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            names = list(data)
            pick = split or ("train" if "train" in data else names[0] if len(names) == 1
                             else None)
            if pick not in data:
                raise DataFileError(f"{spec!r} holds splits {names}; choose one with --split.")
            data = data[pick]
    else:
        kind = _FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise DataFileError(f"Unknown data file type {path.suffix!r} for {spec!r}; use one "
                                f"of {sorted(_FILE_TYPES)} or a save_to_disk folder.")
        data = load_dataset(kind, data_files=str(path), split="train")
    if len(data) == 0:
        raise EmptyDatasetError(f"dataset {spec!r}")
    return data


def load_local_model(path: str, task_type: str = "classification",
                     adapter: Optional[str] = None, num_labels: Optional[int] = None,
                     gguf_file: Optional[str] = None) -> tuple[Any, Any]:
    """Load a transformers model (+ optional PEFT adapter) and its tokenizer from local files.

    Args:
        path: Model folder.
        task_type: ``"classification"`` or ``"causal-lm"``.
        adapter: Folder of a PEFT adapter to attach.
        num_labels: Classes for a new classification head.
        gguf_file: GGUF file name inside ``path`` (quantised checkpoints).

    Returns:
        (model, tokenizer) with the model in eval mode.

    Raises:
        FileNotFoundError: ``path`` or ``adapter`` does not exist.
        ValueError: Unknown ``task_type``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for p in (path, adapter):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"No model/adapter folder at {p!r}.")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if task_type == "classification":
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    elif task_type == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        raise ValueError(f"task_type must be 'classification' or 'causal-lm', got "
                         f"{task_type!r}.")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer
