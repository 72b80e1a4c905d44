"""Helpers shared by the ``hf-ggda`` commands: task options, argument types, reading data and
models, and the checks made before any computation (option files, output paths)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence

from .config import CLASS_KEY, ConfigMixin, check_known_keys, read_json_options
from .errors import DataFileError, GGDAError, ModelLoadError, OutputPathError


@dataclass
class TaskArgs(ConfigMixin):
    """How rows become model inputs and losses (see :mod:`hf_ggda.tasks`)."""

    task_type: str = field(default="classification",
                           metadata={"help": "'classification' or 'causal-lm'."})
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    label_column: str = field(default="label",
                              metadata={"help": "Column with class ids (classification)."})
    prompt_column: Optional[str] = field(
        default=None, metadata={"help": "Prompt column (causal-lm; not a target)."})
    response_column: Optional[str] = field(
        default=None, metadata={"help": "Response column (causal-lm; the targets)."})
    max_length: int = field(default=128, metadata={"help": "Truncation length in tokens."})
    reduction: str = field(default="mean",
                           metadata={"help": "Per-row token-loss reduction: mean or sum."})

    def build(self, tokenizer: Any) -> Any:
        """Instantiate the task.

        Raises:
            ValueError: Unknown task type.
        """
        from .tasks import CausalLMTask, SequenceClassificationTask

        if self.task_type == "classification":
            return SequenceClassificationTask(tokenizer, self.text_column, self.label_column,
                                              max_length=self.max_length)
        if self.task_type == "causal-lm":
            return CausalLMTask(tokenizer, self.text_column, self.prompt_column,
                                self.response_column, self.max_length, self.reduction)
        raise ValueError(f"--task-type must be 'classification' or 'causal-lm', got "
                         f"{self.task_type!r}.")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``hf-ggda: error: ...`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print one error line naming the --help of this (sub)command and exit 2."""
        sys.stderr.write(f"hf-ggda: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``low`` (checked before any computation)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _add_io(p: argparse.ArgumentParser, queries: bool) -> None:
    p.add_argument("--model", required=True,
                   help="Local model folder (transformers format), or 'minilm' for the "
                        "packaged MiniLM-L6.")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to attach.")
    p.add_argument("--num-labels", type=_int_at_least(1), default=None,
                   help="Classes of a new classification head (when the model has none).")
    p.add_argument("--train", required=True,
                   help="Training data: save_to_disk folder or .json/.jsonl/.csv/.parquet.")
    if queries:
        p.add_argument("--queries", required=True, help="Query data (same formats).")
    p.add_argument("--group-column", default="group_id",
                   help="Column of group ids in the training data (see `hf-ggda group`).")
    p.add_argument("--store", default=None, help="Resumable gradient store folder.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a store made for another request instead of failing.")
    p.add_argument("--output", required=True, help="Output folder (dataset + scores).")
    p.add_argument("--config", default=None, help="JSON file with any of these options.")
    TaskArgs.add_arguments(p)


def _file_options(path: Optional[str], classes: Iterable[type]) -> dict[str, Any]:
    """Read a --config file and refuse keys none of ``classes`` has.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Bad JSON, not an object, or an unknown key (the closest valid one named).
    """
    if path is None:
        return {}
    data = read_json_options(path)
    check_known_keys(data, classes, where=f"options in --config {path!r}", extra=(CLASS_KEY,))
    data.pop(CLASS_KEY, None)
    return data


def _check_outputs(outputs: Sequence[Path], inputs: Sequence[Optional[str]],
                   files: Sequence[Path] = (), datasets: Sequence[Path] = ()) -> None:
    """Refuse output paths that are (or lie under) files, or whose writing would replace an
    input (e.g. re-scoring a run in place: ``--train run/train --output run``), before any
    computation.

    Args:
        outputs: Output folders (that may exist).
        inputs: Input paths given on the command line (None: not given).
        files: Output files (an existing file is replaced; a folder there is refused).
        datasets: Dataset folders written by ``save_dataset_atomic``: only an empty one, or
            one an earlier hf_ggda run wrote, may already exist.

    Raises:
        OutputPathError: With the fix (another output folder).
    """
    from .atomic import _check_replaceable as check_replaceable

    for out in [*outputs, *files, *datasets]:
        for parent in [out, *out.parents]:
            if parent == out and out in files:
                if out.is_dir():
                    raise OutputPathError(f"The output file {str(out)!r} is a folder; move it "
                                          "away or pass another --output folder.")
                continue
            if parent.exists() and not parent.is_dir():
                where = "is" if parent == out else f"lies under {str(parent)!r}, which is"
                raise OutputPathError(f"The output path {str(out)!r} {where} a file, not a "
                                      "folder; pass a new path or an existing folder.")
        target = Path(os.path.abspath(out))
        for given in inputs:
            if given is None or given == "minilm":
                continue
            source = Path(os.path.abspath(given))
            if source == target or target in source.parents:
                raise OutputPathError(
                    f"Writing {str(out)!r} would replace the input {given!r} while it is "
                    "read (re-scoring a run in place?); pass another --output folder.")
            if source in target.parents and (source / "state.json").is_file():
                raise OutputPathError(
                    f"Writing {str(out)!r} would put outputs inside the input dataset folder "
                    f"{given!r} (a save_to_disk folder); pass an --output folder outside it.")
    for folder in datasets:
        check_replaceable(folder)


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by hf_ggda's own code (its message is already ours)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = str(Path(__file__).resolve().parent)
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(here)


def _cause(err: BaseException) -> str:
    inner = err.__cause__ or err.__context__ or err
    return f"{type(inner).__name__}: {' '.join(str(inner).split())}"


def _read_data(spec: str, option: str) -> Any:
    """Load a dataset for an option; a library's failure becomes one typed error.

    Raises:
        FileNotFoundError: No such path.
        DataFileError: The file or folder cannot be read as a dataset.
    """
    from .integrations.io import load_local_dataset

    try:
        return load_local_dataset(spec)
    except Exception as err:
        if isinstance(err, (GGDAError, FileNotFoundError)) or _raised_here(err):
            raise
        raise DataFileError(f"Cannot read {option} {spec!r} as a dataset ({_cause(err)}). "
                            "Pass a folder written by Dataset.save_to_disk or a well-formed "
                            ".json/.jsonl/.csv/.parquet file with a header / one object per "
                            "line.") from err


def _validate(task: Any, model: Any, *datasets: Any) -> None:
    """Check the data against the model (labels vs head, ids vs embeddings) before any pass."""
    for data in datasets:
        task.validate(task.prepare(data), model)


def _load(args: argparse.Namespace, base: dict[str, Any]) -> tuple[Any, Any]:
    """Load the model, its tokenizer and the task.

    Raises:
        FileNotFoundError: No model / adapter folder.
        ModelLoadError: transformers / peft cannot load the folder.
        ConfigError: Bad task options.
    """
    from .integrations.io import load_local_model

    targs = TaskArgs.from_args(args, base)
    path = args.model
    if path == "minilm":
        from .data import minilm_path

        path = minilm_path()
    try:
        model, tokenizer = load_local_model(path, targs.task_type, args.adapter,
                                            args.num_labels)
    except Exception as err:
        if isinstance(err, (GGDAError, FileNotFoundError)) or _raised_here(err):
            raise
        raise ModelLoadError(
            f"Cannot load the model {args.model!r}"
            f"{f' with the adapter {args.adapter!r}' if args.adapter else ''} ({_cause(err)}). "
            "Pass a folder written by save_pretrained (config.json, weights and tokenizer "
            "files), check --task-type, and --num-labels against the saved head."
        ) from err
    return model, targs.build(tokenizer)
