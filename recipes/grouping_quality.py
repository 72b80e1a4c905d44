"""Grouping quality on BBC News: within-group gradient coherence of each grouper.

Fine-tunes MiniLM-L6 + LoRA (q, v; classifier head saved with the adapter) for a few steps on
BBC News articles, groups the articles with every grouper, and prints the mean cosine between
a member's per-example gradient (LoRA + head) and its group's gradient (sum over the sampled
members), on one shared sample of rows (``hf_ggda.grouping.coherence_from_gradients``).

Run::

    python recipes/grouping_quality.py --rows 1000 --groups 16 64

A higher coherence means the group gradient stands better for its members (GGDA's error of
treating a group as one unit is smaller). Quote ratios from one run; absolute seconds vary.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch

from hf_ggda.data import load_bbc_news, load_minilm_classifier
from hf_ggda.gradients import GradientEngine
from hf_ggda.grouping import coherence_from_gradients, get_grouper, sample_rows
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.training import finetune


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print a table (returns the figures)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000, help="BBC articles (seeded subset).")
    ap.add_argument("--groups", type=int, nargs="+", default=[16, 64], help="Values of K.")
    ap.add_argument("--max-length", type=int, default=64, help="Tokens per article.")
    ap.add_argument("--steps", type=int, default=60, help="Fine-tuning steps.")
    ap.add_argument("--batch-size", type=int, default=16, help="Fine-tuning batch size.")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    ap.add_argument("--sample", type=int, default=None,
                    help="Rows sampled for coherence (default: all rows).")
    ap.add_argument("--per-class", action="store_true",
                    help="Also run the K-means groupers within each label.")
    ap.add_argument("--balanced", action="store_true",
                    help="Also run the K-means groupers with balanced group sizes.")
    ap.add_argument("--cache-dir", type=str, default=None,
                    help="Feature cache folder (default: a temporary folder), so features are "
                         "computed once for all values of K.")
    ap.add_argument("--exclude-self", action="store_true",
                    help="Also report leave-one-out coherence cos(g_i, g_G - g_i).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="Write the figures to this file.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    data = load_bbc_news(limit=args.rows, seed=args.seed)
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=args.seed)
    task = SequenceClassificationTask(tokenizer, max_length=args.max_length)
    losses = finetune(model, task, data, args.steps, args.batch_size, args.lr, args.seed,
                      desc=None)
    print(f"fine-tune: {args.steps} steps of {args.batch_size}, loss {np.mean(losses[:5]):.3f} -> "
          f"{np.mean(losses[-5:]):.3f} ({time.perf_counter() - t0:.0f} s incl. loading)")
    engine = GradientEngine(model, task)
    rows = sample_rows(len(data), args.sample, args.seed)
    t = time.perf_counter()
    grads = engine.per_example_gradients(data.select(rows)).gradients
    print(f"per-example gradients of {engine.selection.numel} parameters "
          f"({engine.selection.how}) for {len(rows)} rows: {time.perf_counter() - t:.0f} s")

    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("random", "random", {}), ("stratified", "stratified", {}),
        ("kmeans-input", "kmeans-input", {}), ("kmeans-repr", "kmeans-repr", {}),
        ("grad-kmeans", "grad-kmeans", {})]
    kmeans_names = ("kmeans-input", "kmeans-repr", "grad-kmeans")
    if args.per_class:
        specs += [(f"{n} per-class", n, {"per_class": True}) for n in kmeans_names]
    if args.balanced:
        specs += [(f"{n} balanced", n, {"balanced": True}) for n in kmeans_names]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ggda-grouping-")
    figures: dict[str, Any] = {"args": vars(args), "results": {}}
    for k in args.groups:
        grouped, seconds, sizes = {}, {}, {}
        for label, name, kwargs in specs:
            t = time.perf_counter()
            if name.startswith("kmeans") or name.startswith("grad"):
                kwargs = {**kwargs, "cache_dir": cache_dir}
            grouper = get_grouper(name, num_groups=k, seed=args.seed, **kwargs)
            grouped[label] = grouper.assign(data, model=model, task=task) \
                if grouper.uses_model else grouper.assign(data)
            seconds[label] = time.perf_counter() - t
            rep = grouper.describe()
            sizes[label] = (rep.size_min, rep.size_median, rep.size_max)
        ids = {label: np.asarray(ds["group_id"])[rows].tolist() for label, ds in grouped.items()}
        coh = {label: coherence_from_gradients(grads, g) for label, g in ids.items()}
        loo = {label: coherence_from_gradients(grads, g, exclude_self=True)
               for label, g in ids.items()} if args.exclude_self else {}
        print(f"\nK = {k}, n = {len(data)} (coherence on {len(rows)} sampled rows)")
        print(f"{'grouper':<26}{'coherence':>10}{'leave-1-out':>12}{'sizes min/med/max':>20}"
              f"{'assign s':>10}")
        figures["results"][k] = {}
        for label in grouped:
            lo = f"{loo[label].mean:.4f}" if loo else "-"
            s = "/".join(f"{v:g}" for v in sizes[label])
            print(f"{label:<26}{coh[label].mean:>10.4f}{lo:>12}{s:>20}{seconds[label]:>10.1f}")
            figures["results"][k][label] = {
                "coherence": coh[label].mean,
                "leave_one_out": loo[label].mean if loo else None,
                "sizes": sizes[label], "assign_seconds": seconds[label]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2, default=str)
    return figures


if __name__ == "__main__":
    main()
