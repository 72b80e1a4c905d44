"""In-run vs post-hoc group TracIn on the fast fidelity setting's data: cost and group LDS.

The fast fidelity setting (:mod:`_fidelity_fast`) trains its linear head by full-batch L-BFGS
to the optimum, a path with no Trainer steps for in-run capture to score. Here the same data
(cached MiniLM-L6 embeddings of BBC News, ``--rows`` training and ``--queries`` held-out
articles, 5 topics) trains the same ``nn.Linear(384, 5)`` with a real ``transformers.Trainer``
(AdamW, mini-batches, a linear schedule), and the attributions are judged against retraining
with that same Trainer:

* **in-run (capture)**: ``GGDACallback(in_run=True, every=E)``, the step after each capture;
* **in-run (all)**: ``in_run_steps="all"``, every step against the latest capture;
* **post-hoc TracIn** over the checkpoints saved at the captures' weights (fit on all rows at
  each checkpoint, score), from the Trainer's checkpoint list.

Group LDS: K random groups; ``--subsets`` random halves of the groups are retrained from the
same initial weights with the same arguments (same epochs, so the kept rows are seen as often
as in the full run); the measurement is each query's loss; the prediction Σ_{G∈S} τ(G, q)
(:mod:`hf_ggda.metrics.group_lds`). Costs: training seconds of the captured run ÷ the plain
run, and the post-hoc fit + score seconds ÷ the plain run.

Usage::

    python recipes/benchmarks/in_run_lds.py --json in_run_lds.json
    python recipes/benchmarks/in_run_lds.py --quick
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

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fidelity_core import draw_subsets, lds_of, predict_subsets


class Head(torch.nn.Module):
    """A linear softmax head that a ``Trainer`` can train: with ``labels`` it returns the
    batch-mean cross-entropy (a dict, as transformers models do), without them the logits
    (what :class:`~hf_ggda.attributors.TensorTask` reads)."""

    def __init__(self, dim: int, classes: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(dim, classes)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Any:
        """Logits, or ``{"loss", "logits"}`` when ``labels`` are given."""
        logits = self.linear(inputs.to(self.linear.weight.dtype))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels.long()), "logits": logits}


def _data(rows: int, queries: int, groups: int, seed: int) -> dict[str, Any]:
    """Embeddings (cached), random groups, the prepared Trainer rows."""
    from _fidelity_fast import FastSetting, default_cache_dir
    from datasets import Dataset

    from hf_ggda.attributors import TensorTask

    setting = FastSetting(train_rows=rows, num_queries=queries, cache_dir=default_cache_dir(),
                          seed=seed)
    group_of = np.random.default_rng(seed).permutation(np.arange(rows) % groups)
    raw = Dataset.from_dict({"x": setting.x.float().tolist(), "y": setting.y.tolist(),
                             "group_id": group_of.tolist()})
    evaluation = Dataset.from_dict({"x": setting.xq.float().tolist(),
                                    "y": setting.yq.tolist()})
    task = TensorTask(loss="cross_entropy")
    return {"raw": raw, "train": task.prepare(raw), "eval": evaluation, "task": task,
            "group_of": group_of, "embed_s": setting.embed_s}


def _train(args: argparse.Namespace, data: Any, out: str, rows: Optional[np.ndarray] = None,
           mode: Optional[str] = None) -> dict[str, Any]:
    """One Trainer run from the seeded initial head: plain on ``rows`` (None: all), or with
    in-run capture (``mode`` = ``in_run_steps``; one evaluation group per query row, so the
    scores are m × K; ``"capture"`` also saves a checkpoint at every capture)."""
    from transformers import Trainer, default_data_collator

    from hf_ggda.integrations.trainer import GGDACallback

    model = Head(384, 5, args.seed)
    train = data["train"] if rows is None else data["train"].select(rows.tolist())
    collator: Any = default_data_collator
    callbacks, cb = [], None
    if mode is None:
        train = train.remove_columns("group_id")
    else:
        cb = GGDACallback(in_run=True, task=data["task"], train_dataset=train,
                          eval_dataset=data["eval"], eval_group_column="query",
                          every=args.every, in_run_steps=mode, selection="trainable")
        collator, callbacks = cb.data_collator(collator), [cb]
    trainer = Trainer(model=model, args=_arguments(args, out, save=mode == "capture"),
                      train_dataset=train, data_collator=collator, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - start, "model": model.eval(), "callback": cb}


def _arguments(args: argparse.Namespace, out: str, save: bool) -> Any:
    """The ``TrainingArguments`` every run shares (checkpoints every capture when ``save``)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, remove_unused_columns=False, report_to=[], seed=args.seed,
        save_strategy="steps" if save else "no", save_steps=args.every, save_only_model=True,
        logging_steps=1, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)


def _query_losses(model: Head, data: Any) -> np.ndarray:
    """(m,) cross-entropy of each query under ``model``."""
    with torch.no_grad():
        x = torch.tensor(data["eval"]["x"])
        y = torch.tensor(data["eval"]["y"])
        return F.cross_entropy(model(x), y, reduction="none").numpy()


def _by_group(matrix: torch.Tensor, group_ids: list[Any], groups: int) -> np.ndarray:
    """(m, K) scores with column j = group j."""
    out = np.zeros((matrix.shape[0], groups))
    out[:, [int(g) for g in group_ids]] = matrix.double().numpy()
    return out


def run(rows: int = 1024, queries: int = 128, groups: int = 64, every: int = 8,
        epochs: int = 2, batch_size: int = 16, lr: float = 5e-3, subsets: int = 32,
        seed: int = 0) -> dict[str, Any]:
    """Train, attribute three ways, retrain the subsets; return costs and LDS.

    Raises:
        ModuleNotFoundError: The MiniLM or BBC News packages are not installed.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    from hf_ggda.attributors import TracIn
    from hf_ggda.integrations.trainer import tracin_config_from_manifest
    from hf_ggda.metrics import load_metric

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    args = argparse.Namespace(every=every, epochs=epochs, batch_size=batch_size, lr=lr,
                              seed=seed)
    data = _data(rows, queries, groups, seed)
    # one evaluation group per query row: m × K in-run scores, comparable per query
    data["eval"] = data["eval"].add_column("query", list(range(queries)))
    metric = load_metric("group_lds")
    with tempfile.TemporaryDirectory() as tmp:
        plain = _train(args, data, os.path.join(tmp, "plain"))
        found: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for mode in ("capture", "all"):
            captured = _train(args, data, os.path.join(tmp, mode), mode=mode)
            got = captured["callback"].in_run_scores
            found[f"in_run_{mode}"] = _by_group(got.matrix, got.group_ids, groups)
            seconds[f"in_run_{mode}"] = captured["seconds"]
            if mode == "capture":
                config = tracin_config_from_manifest(os.path.join(tmp, mode), batch_size=64)
                start = time.perf_counter()
                post = TracIn(captured["model"], data["task"], config).fit(data["raw"])
                scores = post.score(data["eval"].remove_columns("query"))
                seconds["post_hoc"] = time.perf_counter() - start
                found["post_hoc"] = _by_group(scores.matrix, scores.group_ids, groups)
                checkpoints = len(config.checkpoints)
        masks = draw_subsets(groups, subsets, seed)
        start = time.perf_counter()
        losses = np.stack([_query_losses(_train(args, data, os.path.join(tmp, f"s{k}"),
                                                np.flatnonzero(m[data["group_of"]]))["model"],
                                         data) for k, m in enumerate(masks)])
        retrain_s = time.perf_counter() - start
    lds = {name: lds_of(metric, predict_subsets(scores, masks), losses)
           for name, scores in found.items()}
    return {
        "rows": rows, "queries": queries, "groups": groups, "every": every, "epochs": epochs,
        "steps": int(np.ceil(rows / batch_size)) * epochs, "subsets": subsets,
        "post_hoc_checkpoints": checkpoints, "train_seconds_plain": round(plain["seconds"], 2),
        "ratio_train_in_run_capture": round(seconds["in_run_capture"] / plain["seconds"], 3),
        "ratio_train_in_run_all": round(seconds["in_run_all"] / plain["seconds"], 3),
        "ratio_post_hoc_tracin": round(seconds["post_hoc"] / plain["seconds"], 3),
        "retrain_seconds": round(retrain_s, 1),
        "lds": {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in d.items()}
                for k, d in lds.items()},
        "full_query_loss": float(_query_losses(plain["model"], data).mean())}


def main() -> None:
    """Parse the arguments, run, print (and write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="Training articles.")
    parser.add_argument("--queries", type=int, default=128, help="Held-out query articles.")
    parser.add_argument("--groups", type=int, default=64, help="Random groups K.")
    parser.add_argument("--every", type=int, default=8, help="Optimizer steps per capture.")
    parser.add_argument("--epochs", type=int, default=2, help="Training epochs.")
    parser.add_argument("--subsets", type=int, default=32, help="Retrained subsets.")
    parser.add_argument("--json", type=str, default=None, help="Write the figures here.")
    parser.add_argument("--quick", action="store_true", help="128 rows, 8 groups (tests).")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.queries, args.groups, args.subsets = 128, 16, 8, 4
    result = run(args.rows, args.queries, args.groups, args.every, args.epochs,
                 subsets=args.subsets)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
