"""Overhead of in-run group TracIn: training time with ``GGDACallback(in_run=True)`` ÷ without.

Workload: MiniLM-L6 + LoRA (query, value; r = 8; classifier head saved) fine-tuned by a real
``transformers.Trainer`` on ``--rows`` BBC News articles (64 tokens), K = ``--groups`` random
groups, the evaluation gradient over ``--eval-rows`` held-out articles taken every ``--every``
optimizer steps. Three runs from the same initial weights, the same seed: no callback; in-run
capture scoring the step after each capture (``steps="capture"``); in-run capture scoring every
step against the latest capture (``steps="all"``). Figures are ratios of ``trainer.train()``
wall times measured in one run (the machine is shared and noisy); the final weights of the
captured runs must equal the plain run's bit for bit. With ``--eval-sample S`` another captured
run takes u from a rotating window of S evaluation rows per capture (scaled to the whole set),
its time ratio and the agreement of its group scores with the exact run's are reported. With
``--post-hoc`` a further run saves a
checkpoint at every capture's weights and post-hoc ``TracIn`` over those checkpoints (fit on all
training rows + score) is timed against the same training time.

Usage::

    python recipes/benchmarks/in_run.py [--rows 1024] [--every 10] [--json in_run.json]
    python recipes/benchmarks/in_run.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fidelity_core import correlations


def _train(args: argparse.Namespace, data: Any, steps: Optional[str], out: str,
           save_steps: Optional[int] = None, eval_sample: Optional[int] = None
           ) -> dict[str, Any]:
    """One training run (``steps`` None: without the callback); its time and final weights."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.gradients import EngineConfig
    from hf_ggda.integrations.trainer import GGDACallback
    from hf_ggda.tasks import SequenceClassificationTask

    model, tok = load_minilm_classifier(num_labels=5, lora_r=8, seed=0)
    task = SequenceClassificationTask(tok, max_length=64)
    train = data["train_tokenised"]
    collator: Any = DataCollatorWithPadding(tok)
    callbacks, cb = [], None
    if steps is not None:
        cb = GGDACallback(in_run=True, task=task, train_dataset=train,
                          eval_dataset=data["eval"], every=args.every, in_run_steps=steps,
                          in_run_config=EngineConfig(batch_size=args.batch_size),
                          eval_sample=eval_sample)
        collator, callbacks = cb.data_collator(collator), [cb]
    else:
        train = train.remove_columns("group_id")
    targs = TrainingArguments(
        out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, remove_unused_columns=False, report_to=[], seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_only_model=True, logging_steps=10, disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"seconds": seconds, "weights": weights, "callback": cb, "model": model,
            "task": task}


def _post_hoc(args: argparse.Namespace, data: Any, out: str) -> dict[str, Any]:
    """Train with a checkpoint every ``every`` steps, then time post-hoc TracIn over them."""
    from hf_ggda.attributors import TracIn
    from hf_ggda.integrations.trainer import tracin_config_from_manifest

    run = _train(args, data, "capture", out, save_steps=args.every)  # the manifest's rates
    config = tracin_config_from_manifest(out, batch_size=args.batch_size)
    start = time.perf_counter()
    TracIn(run["model"].eval(), run["task"], config).fit(data["train_raw"]).score(
        data["eval"], aggregate="sum")
    return {"checkpoints": len(config.checkpoints),
            "post_hoc_seconds": time.perf_counter() - start}


def run(rows: int = 1024, eval_rows: int = 128, groups: int = 64, every: int = 10,
        batch_size: int = 16, steps: Optional[int] = None, post_hoc: bool = False,
        eval_sample: Optional[int] = None) -> dict[str, Any]:
    """Train three (or four) times and return the time ratios and the weight check.

    Raises:
        ModuleNotFoundError: The MiniLM or BBC News packages are not installed.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.grouping import get_grouper
    from hf_ggda.tasks import SequenceClassificationTask

    args = argparse.Namespace(every=every, batch_size=batch_size,
                              steps=steps or rows // batch_size)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    split = load_bbc_news(limit=rows + eval_rows, seed=0).train_test_split(
        test_size=eval_rows, seed=0)
    raw = get_grouper("random", num_groups=groups, seed=0).assign(split["train"])
    _, tok = load_minilm_classifier(num_labels=5, lora_r=8, seed=0)
    task = SequenceClassificationTask(tok, max_length=64)
    tokenised = task.prepare(raw).select_columns([*task.feature_columns, "group_id"])
    data = {"train_raw": raw, "train_tokenised": tokenised, "eval": split["test"]}
    with tempfile.TemporaryDirectory() as tmp:
        plain = _train(args, data, None, os.path.join(tmp, "plain"))
        capture = _train(args, data, "capture", os.path.join(tmp, "capture"))
        every_step = _train(args, data, "all", os.path.join(tmp, "all"))
        sampled = _train(args, data, "capture", os.path.join(tmp, "sampled"),
                         eval_sample=eval_sample) if eval_sample else None
        post = _post_hoc(args, data, os.path.join(tmp, "post")) if post_hoc else {}
    same = all(torch.equal(plain["weights"][n], run["weights"][n])
               for run in (capture, every_step, sampled) if run is not None
               for n in plain["weights"])
    result = {
        "rows": rows, "eval_rows": eval_rows, "groups": groups, "every": every,
        "steps": args.steps, "batch_size": batch_size,
        "captures": len(capture["callback"].history),
        "train_seconds_plain": round(plain["seconds"], 2),
        "ratio_capture": round(capture["seconds"] / plain["seconds"], 3),
        "ratio_all_steps": round(every_step["seconds"] / plain["seconds"], 3),
        "weights_bit_identical": same,
        **({"eval_sample": eval_sample,
            "ratio_capture_sampled": round(sampled["seconds"] / plain["seconds"], 3),
            "sampled_vs_exact": {k: round(v, 4) for k, v in correlations(
                sampled["callback"].in_run_scores.matrix.double().numpy(),
                capture["callback"].in_run_scores.matrix.double().numpy()).items()}}
           if sampled is not None else {}),
        **({"post_hoc_checkpoints": post["checkpoints"],
            "ratio_post_hoc_tracin": round(post["post_hoc_seconds"] / plain["seconds"], 3)}
           if post else {})}
    return result


def main() -> None:
    """Parse the arguments, run the benchmark and print (or write) the ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="BBC training articles.")
    parser.add_argument("--eval-rows", type=int, default=128, help="Evaluation articles.")
    parser.add_argument("--groups", type=int, default=64, help="Random groups K.")
    parser.add_argument("--every", type=int, default=10, help="Optimizer steps per capture.")
    parser.add_argument("--batch-size", type=int, default=16, help="Rows per step.")
    parser.add_argument("--steps", type=int, default=None, help="Steps (default: one epoch).")
    parser.add_argument("--post-hoc", action="store_true", help="Also time post-hoc TracIn.")
    parser.add_argument("--eval-sample", type=int, default=None,
                        help="Also run capture with this many evaluation rows per capture "
                             "(a rotating window) and compare its scores with the exact run.")
    parser.add_argument("--json", type=str, default=None, help="Write the figures here.")
    parser.add_argument("--quick", action="store_true", help="64 + 16 rows, 4 steps (tests).")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.eval_rows, args.groups, args.every, args.steps = 64, 16, 8, 2, 4
    result = run(args.rows, args.eval_rows, args.groups, args.every, args.batch_size,
                 args.steps, args.post_hoc, args.eval_sample)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    if not result["weights_bit_identical"]:
        raise SystemExit("In-run capture changed the trained weights.")


if __name__ == "__main__":
    main()
