"""Helpers shared by the recipes: arguments, timing, label noise, evaluation and JSON figures.

The recipes are scripts (``python recipes/<name>.py --help``); each one imports this module
from its own folder, so ``recipes/`` needs no ``__init__.py`` and nothing here is part of the
installed package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset

#: Regular expression of the classifier head's parameters in a PEFT-wrapped MiniLM
#: (``modules_to_save`` copy of ``classifier``).
HEAD_SELECTION = [r".*classifier\.modules_to_save\..*"]


def base_parser(description: str, default_output: str) -> argparse.ArgumentParser:
    """Return an argument parser with the options every recipe has.

    Args:
        description: First line of the recipe's docstring.
        default_output: Default ``--output`` folder.

    Returns:
        A parser with ``--quick``, ``--json``, ``--output``, ``--seed`` and ``--threads``.
    """
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="A small run (tests; well under a minute on 2 CPU cores).")
    ap.add_argument("--json", type=str, default=None,
                    help="Write the headline figures to this JSON file.")
    ap.add_argument("--output", type=str, default=default_output,
                    help="Folder for the scored dataset, the card and other outputs.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of data, noise and training.")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: leave torch's setting). One thread is the default: "
                         "on a shared machine more threads spin-wait and run several times "
                         "slower.")
    return ap


def parse_sized(ap: argparse.ArgumentParser, argv: Optional[list[str]],
                full: Mapping[str, Any], quick: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; every option left at None takes its full-mode or ``--quick`` value.

    Args:
        ap: The recipe's parser (from :func:`base_parser`).
        argv: Command line (None: ``sys.argv``).
        full: Sizes of the full run, by option name.
        quick: Sizes of the ``--quick`` run.

    Returns:
        The parsed arguments.
    """
    args = ap.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def setup_run(args: argparse.Namespace) -> Path:
    """Apply the common options: threads, seeds, quiet progress bars; create the output folder.

    Args:
        args: Parsed arguments of :func:`base_parser`.

    Returns:
        The output folder.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets.utils.logging import disable_progress_bar as ds_quiet
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    ds_quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch.

    Args:
        seed: The seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Timings:
    """Wall-clock and CPU seconds of named stages (CPU time is less sensitive to other jobs
    on a shared machine; it counts every thread of this process).

    Attributes:
        wall: Wall-clock seconds by stage.
        cpu: Process CPU seconds by stage.
    """

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block; repeated names add up.

        Args:
            name: Stage name.
        """
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

    def total(self, names: Sequence[str], kind: str = "cpu") -> float:
        """Sum of some stages.

        Args:
            names: Stage names (missing ones count 0).
            kind: ``"cpu"`` or ``"wall"``.

        Returns:
            Seconds.
        """
        table = self.cpu if kind == "cpu" else self.wall
        return float(sum(table.get(n, 0.0) for n in names))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Plain-data form, rounded to 0.01 s."""
        return {"wall_s": {k: round(v, 2) for k, v in self.wall.items()},
                "cpu_s": {k: round(v, 2) for k, v in self.cpu.items()}}


def make_attributor(method: str, model: Any, task: Any, snapshots: Sequence[Any], lr: float,
                    batch_size: int, selection: Any) -> Any:
    """GGDA-TracIn over training snapshots, or GGDA-Influence (identity) at the final weights.

    Args:
        method: ``"tracin"`` or ``"influence"``.
        model: The fine-tuned model.
        task: The attribution task.
        snapshots: Parameter snapshots from :func:`hf_ggda.training.finetune_with_snapshots`.
        lr: The fine-tuning learning rate (TracIn's step size at every snapshot).
        batch_size: Rows per gradient pass.
        selection: Attributed parameters.

    Returns:
        The unfitted attributor.
    """
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, TracIn, TracInConfig

    if method == "tracin":
        return TracIn(model, task, TracInConfig(
            learning_rates=[lr] * len(snapshots), batch_size=batch_size, selection=selection),
            checkpoints=list(snapshots))
    return InfluenceFunction(model, task, InfluenceConfig(
        preconditioner="identity", batch_size=batch_size, selection=selection))


def bbc_splits(sizes: Sequence[int], seed: int = 0) -> list[Dataset]:
    """Disjoint seeded splits of the packaged BBC News articles.

    Args:
        sizes: Rows of each split (their sum must not exceed 2,225).
        seed: Seed of the shuffle.

    Returns:
        One dataset per size, in order.

    Raises:
        ValueError: The sizes ask for more rows than there are.
    """
    from hf_ggda.data import load_bbc_news

    data = load_bbc_news(seed=seed)
    if sum(sizes) > len(data):
        raise ValueError(f"Splits of {list(sizes)} rows need {sum(sizes)} articles; BBC News has "
                         f"{len(data)}.")
    data = data.shuffle(seed=seed).flatten_indices()
    out, start = [], 0
    for size in sizes:
        out.append(data.select(range(start, start + size)).flatten_indices())
        start += size
    return out


def flip_labels(labels: Sequence[int], fraction: float, num_labels: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip a seeded fraction of labels to a different class, chosen uniformly.

    Args:
        labels: Clean integer labels.
        fraction: Share of rows to flip (rounded to the nearest row count).
        num_labels: Number of classes.
        seed: Seed of the choice of rows and of the new labels.

    Returns:
        (noisy labels, 0/1 flag of flipped rows).

    Raises:
        ValueError: ``fraction`` is not in [0, 1] or fewer than 2 classes.
    """
    if not 0.0 <= fraction <= 1.0 or num_labels < 2:
        raise ValueError(f"Need 0 <= fraction <= 1 and >= 2 classes, got {fraction}, "
                         f"{num_labels}.")
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, num_labels, len(rows))) % num_labels
    flags = np.zeros(len(y), dtype=np.int64)
    flags[rows] = 1
    return noisy, flags


def replace_column(dataset: Dataset, name: str, values: Sequence[Any]) -> Dataset:
    """Return ``dataset`` with column ``name`` set to ``values`` (same feature type if it
    exists, so a ``ClassLabel`` stays one).

    Args:
        dataset: The rows.
        name: Column name.
        values: One value per row.

    Returns:
        The new dataset.
    """
    feature = dataset.features.get(name)
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, list(values), feature=feature)


@torch.no_grad()
def predict(model: torch.nn.Module, task: Any, dataset: Dataset,
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-row training losses and predicted classes of a sequence classifier (eval mode).

    Args:
        model: The classifier.
        task: Its :class:`~hf_ggda.tasks.SequenceClassificationTask`.
        dataset: Raw rows with labels.
        batch_size: Rows per forward pass.

    Returns:
        (losses, predictions), both (n,).
    """
    model.eval()
    prepared = task.prepare(dataset)
    prepared = prepared.select_columns([c for c in task.feature_columns
                                        if c in prepared.column_names])
    losses, preds = [], []
    for start in range(0, len(prepared), batch_size):
        batch = task.collate(prepared[start:start + batch_size])
        logits = model(**task.model_inputs(batch)).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, batch["labels"],
                                                        reduction="none"))
        preds.append(logits.argmax(-1))
    return torch.cat(losses).numpy(), torch.cat(preds).numpy()


def accuracy(model: torch.nn.Module, task: Any, dataset: Dataset,
             label_column: str = "label") -> float:
    """Accuracy of a sequence classifier on labelled rows.

    Args:
        model: The classifier.
        task: Its task.
        dataset: Raw rows.
        label_column: Column of true labels.

    Returns:
        The share of correct predictions.
    """
    _, preds = predict(model, task, dataset)
    return float((preds == np.asarray(dataset[label_column])).mean())


def detection(scores: Sequence[float], flags: Sequence[int],
              fractions: Sequence[float] = (0.1, 0.2)) -> dict[str, Any]:
    """Recall of flagged rows at inspected fractions (the bundled ``noisy_label_detection``
    metric, ties broken in expectation), with the full curve.

    Args:
        scores: Suspicion per row (higher = inspect first).
        flags: 1 for rows to be found.
        fractions: Inspected fractions.

    Returns:
        The metric's output (``recall_at_<p>``, ``auc``, ``curve_fractions``,
        ``curve_recall``).
    """
    from hf_ggda.metrics import load_metric

    metric = load_metric("noisy_label_detection")
    return metric.compute(scores=[float(s) for s in scores], references=[int(f) for f in flags],
                          fractions=list(fractions), return_curve=True)


def recall_figures(results: Mapping[str, Mapping[str, Any]],
                   spec: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, Any]:
    """Flatten :func:`detection` results into headline figures.

    Args:
        results: {ranking name: output of :func:`detection`}.
        spec: {ranking name: (key prefix, metrics to keep)}, in output order.

    Returns:
        {prefix + metric: value}, e.g. ``loss_baseline_recall_at_20``.
    """
    return {prefix + metric: results[name][metric]
            for name, (prefix, metrics) in spec.items() for metric in metrics}


def sample_curve(result: Mapping[str, Any], points: int = 41) -> tuple[list[float], list[float]]:
    """Thin a recall curve from :func:`detection` to about ``points`` points (for plots).

    Args:
        result: Output of :func:`detection`.
        points: Number of points kept.

    Returns:
        (fractions, recalls).
    """
    x = np.asarray(result["curve_fractions"])
    y = np.asarray(result["curve_recall"])
    idx = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[idx].tolist(), y[idx].tolist()


def found_curve(result: Mapping[str, Any], found: str, inspected: str = "training rows"
                ) -> Any:
    """The card's curve of a :func:`detection` result: share of ``found`` against share of
    ``inspected``, with random inspection (the diagonal) as its baseline.

    Args:
        result: Output of :func:`detection`.
        found: What is found, for the y label (e.g. ``"flipped labels"``).
        inspected: What is inspected, for the x label.

    Returns:
        A :class:`hf_ggda.integrations.cards.Curve`.
    """
    from hf_ggda.integrations.cards import Curve

    x, y = sample_curve(result)
    return Curve(x, y, xlabel=f"fraction of {inspected} inspected",
                 ylabel=f"fraction of {found} found", baseline=(x, x))


def select_until(order: Sequence[int], sizes: Sequence[int], budget: float) -> list[int]:
    """Take items in ``order`` until their sizes sum to at least ``budget``.

    Args:
        order: Item indices, most wanted first.
        sizes: Size of every item (by index).
        budget: Rows to cover.

    Returns:
        The chosen indices (at least one when ``order`` is not empty and budget > 0).
    """
    chosen, total = [], 0
    for k in order:
        if total >= budget:
            break
        chosen.append(int(k))
        total += int(sizes[k])
    return chosen


def finite(value: Any) -> Any:
    """Turn numpy scalars into Python floats/ints, NaN/Inf into None (strict JSON).

    Args:
        value: Any JSON-like value (nested dicts and lists are converted).

    Returns:
        The converted value.
    """
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_figures(figures: Mapping[str, Any], json_path: Optional[str], run: Any) -> None:
    """Write the figures into the run as ``figures.json`` and, when given, to ``json_path``.

    Args:
        figures: The recipe's results.
        json_path: The ``--json`` path (None: only the run folder).
        run: The recipe's :class:`hf_ggda.pipeline.RunWriter` (see :func:`recipe_run`).

    Raises:
        ValueError: A figure is not JSON (non-finite numbers become null first).
    """
    text = json.dumps(finite(figures), indent=1, sort_keys=False)
    run.file("figures.json", text)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def recipe_run(out: Path, name: str, args: argparse.Namespace) -> Any:
    """The run folder a recipe writes its outputs into, atomically (``hf_ggda.pipeline``).

    Use as ``with recipe_run(out, "noisy_labels", args) as run:``; the folder appears whole
    when the block ends (``run.json`` last), or not at all.

    Raises:
        RunFolderError: ``out`` holds files that hf_ggda did not write as a run.
    """
    from hf_ggda.pipeline import RunWriter

    return RunWriter(out, kind=f"recipe:{name}", config=finite(vars(args)))


def say(message: str) -> None:
    """Print a progress line to stderr (stdout carries the summary).

    Args:
        message: The line.
    """
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
