"""Fidelity of group attribution: the linear datamodeling score (LDS) on groups.

For each partition of the training rows into K groups (random, K-means on representations,
Grad-K-Means; K = n is the point level), draw M random subsets holding half of the groups,
retrain on each, and measure every query's loss. Each method's prediction for subset S is
Σ_{G∈S} τ(G, q); since a positive τ means G helps (lowers the query loss), the prediction is
correlated with the *negated* loss: group LDS = mean over queries of Spearman(Σ_{G∈S} τ,
−loss_S) over the M subsets, with a 95 % interval over queries (``group_lds`` metric module).
Leave-one-group-out: for L removed groups, τ(G, q) against loss(without G) − loss(full),
pooled over (group, query) pairs.

Settings:

* ``fast`` (default): a linear softmax head on cached MiniLM-L6 embeddings of BBC News,
  retrained exactly (convex, L-BFGS); methods TracIn (L-BFGS path checkpoints), IF-identity,
  IF-EK-FAC, IF-exact, TRAK.
* ``real``: MiniLM-L6 + LoRA fine-tuned on a small BBC News subset; every retraining is a
  short seeded AdamW run (slow: see notes/fidelity.md).

Usage::

    python recipes/benchmarks/fidelity.py --json fidelity.json --plot fidelity.png
    python recipes/benchmarks/fidelity.py --setting real --subsets 20 --json real.json
    python recipes/benchmarks/fidelity.py --quick [--setting real]   # under a minute (tests)

The JSON holds ``group_lds`` nested as {method: {grouping: {K: value}}}, with the same nesting
for ``group_lds_ci`` ([low, high]), ``cost_s`` (attribution: fit + score seconds),
``logo_spearman``, ``logo_pearson`` and ``num_queries``; plus ``grouping_cost_s``,
``retrain``, ``setup`` and the command. Quote cost ratios from one run (shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fidelity_core import GROUPINGS, METHODS, FidelitySetting, MethodOptions, run_grid  # noqa

QUICK = {
    "fast": {"train_rows": 96, "queries": 32, "subsets": 8, "ks": ["n", "16"],
             "logo_groups": 2, "trak_dim": 128},
    "real": {"train_rows": 24, "queries": 8, "subsets": 4, "ks": ["n", "4"], "logo_groups": 2,
             "trak_dim": 64, "max_length": 32, "epochs": 1, "batch_size": 8,
             "tracin_checkpoints": 2, "groupings": ["grad-kmeans"]},
}
DEFAULTS = {
    "fast": {"train_rows": 1024, "queries": 256, "subsets": 100, "ks": ["n", "256", "64", "16"],
             "logo_groups": 8, "trak_dim": 512, "tracin_checkpoints": 4},
    "real": {"train_rows": 256, "queries": 64, "subsets": 20, "ks": ["n", "64", "16"],
             "logo_groups": 4, "trak_dim": 512, "max_length": 64, "epochs": 3,
             "batch_size": 16, "tracin_checkpoints": 3},
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; unset options take the setting's defaults (or --quick's)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=("fast", "real"), default="fast")
    ap.add_argument("--quick", action="store_true", help="Tiny run for tests (< 1 minute).")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="Methods (default: all the setting supports).")
    ap.add_argument("--groupings", nargs="+", default=None,
                    help=f"Groupers (default: {' '.join(GROUPINGS)}).")
    ap.add_argument("--balanced", action="store_true",
                    help="K-means groupers make equal-size groups (grouper balanced=True).")
    ap.add_argument("--ks", nargs="+", default=None, help="Values of K; 'n' = point level.")
    ap.add_argument("--subsets", type=int, default=None, help="M retraining subsets.")
    ap.add_argument("--logo-groups", type=int, default=None,
                    help="Groups removed one at a time per partition.")
    ap.add_argument("--train-rows", type=int, default=None, help="Training articles n.")
    ap.add_argument("--queries", type=int, default=None, help="Query articles m.")
    ap.add_argument("--l2", type=float, default=1.0,
                    help="fast: λ of the objective (= influence damping).")
    ap.add_argument("--damping", type=float, default=1e-2, help="real: influence damping.")
    ap.add_argument("--trak-dim", type=int, default=None, help="TRAK projection dimension.")
    ap.add_argument("--trak-kernel", choices=("group", "sample", "exact"), default="exact",
                    help="TRAK kernel.")
    ap.add_argument("--tracin-checkpoints", type=int, default=None,
                    help="TracIn checkpoints (fast: 4 on the L-BFGS path; real: 3).")
    ap.add_argument("--max-length", type=int, default=None, help="real: tokens per article.")
    ap.add_argument("--epochs", type=int, default=None, help="real: epochs of every run.")
    ap.add_argument("--batch-size", type=int, default=None, help="real: rows per step.")
    ap.add_argument("--lr", type=float, default=2e-3, help="real: AdamW learning rate.")
    ap.add_argument("--cache-dir", type=str, default=None,
                    help="fast: embedding cache (default: $HF_GGDA_CACHE or ~/.cache/hf_ggda).")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 1: on a shared 2-core machine more threads "
                         "oversubscribe the cores and run many times slower).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="Write the results here.")
    ap.add_argument("--plot", type=str, default=None,
                    help="PNG of LDS against cost (default: next to --json).")
    args = ap.parse_args(argv)
    preset = {**DEFAULTS[args.setting], **(QUICK[args.setting] if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.groupings is None:
        args.groupings = list(GROUPINGS)
    return args


def build_setting(args: argparse.Namespace) -> FidelitySetting:
    """Train the model of the chosen setting."""
    if args.setting == "fast":
        from _fidelity_fast import FastSetting, default_cache_dir

        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        return FastSetting(args.train_rows, args.queries, l2=args.l2,
                           tracin_checkpoints=args.tracin_checkpoints, cache_dir=cache,
                           seed=args.seed,
                           options=MethodOptions(trak_dim=args.trak_dim,
                                                 trak_kernel=args.trak_kernel))
    from _fidelity_real import RealSetting

    return RealSetting(args.train_rows, args.queries, max_length=args.max_length,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       tracin_checkpoints=args.tracin_checkpoints, seed=args.seed,
                       options=MethodOptions(damping=args.damping, trak_dim=args.trak_dim,
                                             trak_kernel=args.trak_kernel,
                                             trak_damping=args.damping, batch_size=32))


def _fmt(value: float, width: int = 6) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "nan".rjust(width)


def print_tables(result: dict[str, Any]) -> None:
    """Print LDS ± CI half-width, attribution cost and leave-one-group-out tables."""
    ks = [str(k) for k in result["ks"]]
    n = str(result["num_train"])
    head = "".join(f"{('K=' + k + (' (n)' if k == n else '')):>17}" for k in ks)
    tables = [("group LDS  (mean Spearman over queries ± 95% CI half-width)", "group_lds"),
              ("attribution cost, seconds (fit + score)", "cost_s"),
              ("leave-one-group-out Spearman (pooled over removed groups x queries)",
               "logo_spearman")]
    for title, key in tables:
        print(f"\n{title}\n{'method':<13}{'grouping':<13}{head}")
        for method, per_grouping in result[key].items():
            for grouping, per_k in per_grouping.items():
                cells = []
                for k in ks:
                    v = per_k.get(k, float("nan"))
                    if key == "group_lds":
                        lo, hi = result["group_lds_ci"][method][grouping][k]
                        half = (hi - lo) / 2 if math.isfinite(hi - lo) else float("nan")
                        cells.append(f"{_fmt(v)} ± {half:.3f}".rjust(17))
                    elif key == "cost_s":
                        cells.append(f"{v:17.2f}")
                    else:
                        cells.append(_fmt(v).rjust(17))
                print(f"{method:<13}{grouping:<13}{''.join(cells)}")
    print("\ngrouping cost, seconds: " + "; ".join(
        f"{g}: " + ", ".join(f"K={k} {s:.1f}" for k, s in per.items())
        for g, per in result["grouping_cost_s"].items()))
    r = result["retrain"]
    print(f"retraining: {int(r['retrains'])} runs in {r['retrain_s']:.0f} s; "
          f"total {result['total_s']:.0f} s")


def plot(result: dict[str, Any], path: str) -> None:
    """Save a PNG of LDS (with its 95 % CI) against attribution cost (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"random": "o", "kmeans-repr": "s", "grad-kmeans": "^"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, per_grouping) in enumerate(result["group_lds"].items()):
        for grouping, per_k in per_grouping.items():
            for k, v in per_k.items():
                cost = result["cost_s"][method][grouping][k]
                lo, hi = result["group_lds_ci"][method][grouping][k]
                if not (math.isfinite(v) and cost > 0):
                    continue
                err = [[v - lo], [hi - v]] if math.isfinite(hi - lo) else None
                ax.errorbar(cost, v, yerr=err, fmt=markers.get(grouping, "D"),
                            color=colours[i % len(colours)], alpha=0.85, capsize=2,
                            label=method if grouping == next(iter(per_grouping)) and
                            k == next(iter(per_k)) else None)
                label = "n" if k == str(result["num_train"]) else k
                ax.annotate(label, (cost, v), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("attribution cost (s, fit + score; log scale)")
    ax.set_ylabel("group LDS (mean Spearman, 95% CI)")
    shapes = ", ".join(f"{m} {g}" for g, m in markers.items())
    ax.set_title(f"{result['setting']} setting: fidelity vs cost (markers: {shapes}; "
                 "labels: K)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write the JSON and the plot.

    Args:
        argv: Command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The results (as written to ``--json``).
    """
    args = parse_args(argv)
    start = time.perf_counter()
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads or 1)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    setting = build_setting(args)
    n = len(setting.train)
    ks = sorted({n if str(k) == "n" else int(k) for k in args.ks}, reverse=True)
    if any(k < 2 or k > n for k in ks):
        raise SystemExit(f"Every K must be in [2, n={n}], got {ks}.")
    methods = args.methods or setting.available_methods()
    print(f"{setting.name} setting: n={n}, m={len(setting.queries)}, M={args.subsets}, "
          f"K={ks}, setup {time.perf_counter() - start:.0f} s", flush=True)
    grid = run_grid(setting, methods, args.groupings, ks, args.subsets, args.logo_groups,
                    args.seed, report=lambda line: print(line, flush=True),
                    balanced=args.balanced)
    command = " ".join(shlex.quote(a) for a in
                       ["python", "recipes/benchmarks/fidelity.py",
                        *(sys.argv[1:] if argv is None else argv)])
    result = {"setting": setting.name, "quick": args.quick, "command": command,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "num_train": n, "num_queries": len(setting.queries), "num_subsets": args.subsets,
              "logo_groups": args.logo_groups, "ks": ks, "methods": list(methods),
              "groupings": list(args.groupings), "balanced": args.balanced,
              "point_level_k": n,
              "sign": "prediction = sum of kept group scores, correlated with -loss",
              **grid, "setup": setting.describe(), "total_s": time.perf_counter() - start}
    print_tables(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if path:
        plot(result, path)
        result["plot"] = path
    return result


if __name__ == "__main__":
    main()
