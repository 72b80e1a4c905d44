"""A new user's first run on a new small dataset: does the default fine-tuning learn?

Issue 18 found a 3-class, 600-row dataset on which the recipes' fine-tuning settings gave a
classifier at exactly the majority-class rate, and attribution then ranked noise. This recipe
checks :func:`hf_ggda.training.finetune` with the demo's settings (MiniLM-L6 + LoRA r = 8 on
query / value, the classifier head trained, AdamW lr 1e-3, batch 16) on a dataset that is not
the BBC News topic task the defaults were tuned on: **BBC headlines** — the title line only
(about 8 words, not the article), 3 classes (business / sport / tech), 600 training rows in an
imbalanced 50 / 30 / 20 split, 150 balanced held-out rows. It reports held-out accuracy beside
the majority rate, the learning check that attribution runs (:mod:`hf_ggda.learning_check`)
and the fine-tuning time, for ``finetune``'s default schedule and, with ``--steps``, a fixed
step count (the old recipes' 60 steps by default) for comparison.

Run::

    python recipes/first_run.py --json first_run.json
    python recipes/first_run.py --quick
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import accuracy, base_parser, parse_sized, recipe_run, say, setup_run, write_figures

FULL = {"train_rows": 600, "eval_rows": 150, "fixed_steps": 60}
QUICK = {"train_rows": 60, "eval_rows": 30, "fixed_steps": 4}
CLASSES = ("business", "sports", "tech")
SHARES = (0.5, 0.3, 0.2)


def headlines(train_rows: int, eval_rows: int, seed: int) -> tuple[Dataset, Dataset]:
    """BBC titles of three topics: an imbalanced training split and a balanced eval split."""
    from hf_ggda.data import load_bbc_news

    data = load_bbc_news(seed=seed)
    names = data.features["label"].names
    rng = np.random.default_rng(seed)
    train: dict[str, list[Any]] = {"text": [], "label": []}
    evaluation: dict[str, list[Any]] = {"text": [], "label": []}
    labels = np.asarray(data["label"])
    for new, (name, share) in enumerate(zip(CLASSES, SHARES)):
        rows = rng.permutation(np.flatnonzero(labels == names.index(name)))
        n_train, n_eval = round(share * train_rows), eval_rows // len(CLASSES)
        for target, chosen in ((train, rows[:n_train]), (evaluation, rows[-n_eval:])):
            target["text"] += [data[int(i)]["text"].split("\n")[0] for i in chosen]
            target["label"] += [new] * len(chosen)
    return Dataset.from_dict(train).shuffle(seed=seed), Dataset.from_dict(evaluation)


def one_run(train: Dataset, evaluation: Dataset, steps: Optional[int], seed: int
            ) -> dict[str, Any]:
    """Fine-tune a fresh MiniLM + LoRA with ``finetune`` (``steps`` None: its default)."""
    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.learning_check import check_model_learned
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.training import default_steps, finetune

    model, tok = load_minilm_classifier(num_labels=len(CLASSES), lora_r=8, seed=seed)
    task = SequenceClassificationTask(tok, max_length=64)
    used = steps if steps is not None else default_steps(len(train), 16)
    start = time.perf_counter()
    losses = finetune(model, task, train, steps, batch_size=16, lr=1e-3, seed=seed, desc=None)
    seconds = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = check_model_learned(model, task, train)
    assert check is not None
    return {"steps": used, "epochs": round(used * 16 / len(train), 2),
            "eval_accuracy": round(accuracy(model, task, evaluation), 4),
            "train_accuracy": round(check.accuracy, 4), "learned": check.learned,
            "predicted_classes": check.predicted_classes, "warned": bool(caught),
            "loss_first": round(float(np.mean(losses[:5])), 4),
            "loss_last": round(float(np.mean(losses[-5:])), 4),
            "finetune_seconds": round(seconds, 1)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run both schedules; return (and write) the figures."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/first_run")
    ap.add_argument("--train-rows", type=int, default=None, help="Training headlines.")
    ap.add_argument("--eval-rows", type=int, default=None, help="Held-out headlines.")
    ap.add_argument("--fixed-steps", type=int, default=None,
                    help="The fixed step count compared with finetune's default.")
    args = parse_sized(ap, argv, FULL, QUICK)
    out = setup_run(args)
    train, evaluation = headlines(args.train_rows, args.eval_rows, args.seed)
    counts = np.bincount(np.asarray(train["label"]), minlength=len(CLASSES))
    say(f"BBC headlines: {len(train)} training rows {counts.tolist()}, {len(evaluation)} eval")
    runs = {"default": one_run(train, evaluation, None, args.seed),
            "fixed": one_run(train, evaluation, args.fixed_steps, args.seed)}
    figures = {"dataset": "BBC headlines (title only), 3 classes, imbalanced 50/30/20",
               "train_rows": len(train), "eval_rows": len(evaluation),
               "train_majority_rate": round(float(counts.max() / counts.sum()), 4),
               "eval_majority_rate": round(1 / len(CLASSES), 4), "runs": runs,
               "args": vars(args)}
    for name, run in runs.items():
        print(f"{name:<8} {run['steps']:>4} steps ({run['epochs']} epochs): eval accuracy "
              f"{run['eval_accuracy']:.3f} (majority {figures['eval_majority_rate']:.3f}), "
              f"learned={run['learned']}, {run['finetune_seconds']:.0f} s")
    with recipe_run(out, "first_run", args) as run:
        write_figures(figures, args.json, run)
    return figures


if __name__ == "__main__":
    main()
