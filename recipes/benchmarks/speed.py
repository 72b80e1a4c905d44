"""Speed of the group-gradient pass against the floor (one plain forward+backward pass).

Workload: MiniLM-L6 + LoRA (query, value; r = 8; classifier head saved) over BBC News
articles truncated to 64 tokens. Every figure is a ratio to the floor measured in the same run
(this machine is shared and noisy; absolute seconds are printed for reference only):

* floor: tokenise + one forward+backward pass over all rows (``loss.backward()`` into .grad);
* group pass: all K group gradients through the engine (K = 16, 64, 256, random groups);
* point pass: all n per-example gradients through the engine (vectorised, one pass).

Each pass is timed ``--repeats`` times, interleaved, and the minimum is kept.

End to end (``end_to_end`` in the JSON; see ``_speed_e2e.py``): TracIn, IF-identity, IF-EK-FAC
and TRAK, fit (with a gradient store) + score of ``--queries`` query rows, at K = 64 and in
point mode, as ratios to the end-to-end floor (one forward+backward pass over the training and
query rows), with peak memory and store size. ``--scaling`` adds a small config-built model on
n = 1k / 4k / 16k rows and the query-heavy case n = 100,000, m = 10,000.

Usage::

    python recipes/benchmarks/speed.py [--rows 1024] [--json speed.json] [--quick]
    python recipes/benchmarks/speed.py --repeats 3 --processes --scaling --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _speed_e2e import (end_to_end, exact_memory_accounting, floor_pass,  # noqa: E402
                        query_heavy, scaling)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rows: int, batch_size: int, ks: list[int], repeats: int) -> dict[str, Any]:
    """Measure the floor and the ratios of the group and point passes to it."""
    from transformers.utils import logging as hf_logging

    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.tasks import SequenceClassificationTask

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8)
    task = SequenceClassificationTask(tokenizer, max_length=64)
    data = load_bbc_news(limit=rows, seed=0)
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=batch_size))
    rng = np.random.default_rng(0)
    grouped = {k: data.add_column("group_id", rng.permutation(np.arange(rows) % k).tolist())
               for k in ks}
    passes: dict[str, Callable[[], Any]] = {"floor": lambda: floor_pass(model, task, data,
                                                                         batch_size)}
    for k in ks:
        passes[f"group_{k}"] = lambda k=k: engine.group_gradients(grouped[k])
    passes["point"] = lambda: engine.per_example_gradients(data)
    floor_pass(model, task, data.select(range(min(rows, 2 * batch_size))), batch_size)
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, fn in passes.items():
            times[name].append(_timed(fn))
    best = {name: min(v) for name, v in times.items()}
    floor = best["floor"]
    return {
        "rows": rows, "max_length": 64, "batch_size": batch_size, "repeats": repeats,
        "selected_params": engine.selection.numel, "threads": torch.get_num_threads(),
        "floor_s": floor,
        "group_pass_ratio": {str(k): best[f"group_{k}"] / floor for k in ks},
        "point_pass_ratio": best["point"] / floor,
        "seconds": best,
    }


def run_end_to_end(rows: int, queries: int, batch_size: int, k: int,
                   methods: list[str]) -> dict[str, Any]:
    """Fit + score at K = ``k`` vs point mode for each method (MiniLM-L6 + LoRA, BBC News)."""
    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.tasks import SequenceClassificationTask

    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8)
    task = SequenceClassificationTask(tokenizer, max_length=64)
    data = load_bbc_news(limit=rows + queries, seed=0)
    train, query = data.select(range(rows)), data.select(range(rows, rows + queries))
    return end_to_end(model, task, train, query, k, batch_size, methods)


def _print_end_to_end(e2e: dict[str, Any]) -> None:
    print(f"end to end (grouping + fit + score {e2e['queries']} queries, K = {e2e['k']}; floor "
          f"= forward+backward over train + query rows = {e2e['floor_s']:.2f} s, peak "
          f"{e2e['floor_peak_mb']:.0f} MB); ratio to the floor per checkpoint, peak MB, "
          "store MB")
    for name, r in e2e["methods"].items():
        for grouping, v in r.items():
            if isinstance(v, dict):
                print(f"  {name:<13}{grouping:<19}{v['ratio_per_checkpoint']:>7.3f}x"
                      f"{v['peak_mb']:>8.0f} MB{v['store_mb']:>9.1f} MB")
    for pair, v in e2e["agreement"].items():
        print(f"  agreement {pair}: pearson {v['pearson']:.4f}, per-query spearman "
              f"{v['spearman_per_query']:.4f}")


def _print_scaling(rows: list[dict[str, float]]) -> None:
    print(f"{'n':>8}{'m':>7}{'floor s':>9}{'group s':>9}{'point s':>9}{'speedup':>9}"
          f"{'floor MB':>9}{'group MB':>9}{'point MB':>9}")
    for r in rows:
        print(f"{r['rows']:>8}{r['queries']:>7}{r['floor_s']:>9.2f}{r['group_s']:>9.2f}"
              f"{r['point_s']:>9.2f}{r['speedup']:>8.2f}x{r['floor_peak_mb']:>9.0f}"
              f"{r['group_peak_mb']:>9.0f}{r['point_peak_mb']:>9.0f}")


def _group_pass_seconds(rows: int, batch_size: int, k: int) -> float:
    """Time one K-group pass (after a warm-up) in this process; under accelerate, per rank."""
    from transformers.utils import logging as hf_logging

    from hf_ggda.data import load_bbc_news, load_minilm_classifier
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.distributed import barrier, rank_and_world
    from hf_ggda.tasks import SequenceClassificationTask

    hf_logging.disable_progress_bar()
    rank_and_world()
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8)
    task = SequenceClassificationTask(tokenizer, max_length=64)
    data = load_bbc_news(limit=rows, seed=0)
    data = data.add_column("group_id", (np.arange(rows) % k).tolist())
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=batch_size,
                                                             shard_rows=rows // 8))
    engine.group_gradients(data.select(range(2 * batch_size)))
    barrier()
    start = time.perf_counter()
    engine.group_gradients(data)
    barrier()
    return time.perf_counter() - start


def run_processes(rows: int, batch_size: int, k: int = 64) -> dict[str, float]:
    """Wall time of the K-group pass on 2 CPU processes (accelerate launch) vs 1 process."""
    import subprocess
    from pathlib import Path

    one = _group_pass_seconds(rows, batch_size, k)
    config = Path(__file__).resolve().parents[1] / "accelerate" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           __file__, "--inner-group-pass", str(k), "--rows", str(rows),
           "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    two = max(float(v) for v in re.findall(r"GGDA_TIMING ([0-9.eE+-]+?)(?=GGDA|\s|$)", out))
    return {"one_process_s": one, "two_processes_s": two, "ratio_2_to_1": two / one}


def _passes(args: argparse.Namespace) -> dict[str, Any]:
    ks = [k for k in (16, 64, 256) if k <= args.rows]
    result = run(args.rows, args.batch_size, ks, args.repeats)
    print(f"floor (tokenise + forward+backward, {result['rows']} rows): "
          f"{result['floor_s']:.2f} s")
    for k, ratio in result["group_pass_ratio"].items():
        print(f"group pass K={k:>4}: {ratio:.3f} x floor")
    print(f"point pass (K=n):  {result['point_pass_ratio']:.3f} x floor")
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="BBC News articles to use.")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per pass.")
    parser.add_argument("--repeats", type=int, default=2, help="Timings per pass (min kept).")
    parser.add_argument("--json", type=str, default=None, help="Write the figures here.")
    parser.add_argument("--quick", action="store_true", help="64 rows, 1 repeat (tests).")
    parser.add_argument("--processes", action="store_true",
                        help="Also time the K=64 group pass on 2 CPU processes vs 1.")
    parser.add_argument("--queries", type=int, default=64,
                        help="Query rows of the end-to-end comparison.")
    parser.add_argument("--methods", nargs="*", default=["tracin", "if-identity", "if-ekfac",
                                                         "trak", "if-ekfac-128",
                                                         "if-identity-f16", "trak-seed1"],
                        help="Methods of the end-to-end comparison (empty: skip it).")
    parser.add_argument("--no-passes", action="store_true",
                        help="Skip the floor / group / point pass ratios (and --processes).")
    parser.add_argument("--scaling", action="store_true",
                        help="Also run the scaling (n = 1k/4k/16k) and query-heavy (n = 100k, "
                             "m = 10k) measurements on a small config-built model.")
    parser.add_argument("--inner-group-pass", type=int, default=None,
                        help=argparse.SUPPRESS)  # used by --processes under accelerate
    args = parser.parse_args()
    if args.inner_group_pass is not None:
        seconds = _group_pass_seconds(args.rows, args.batch_size, args.inner_group_pass)
        print(f"GGDA_TIMING {seconds}", flush=True)
        return
    if args.quick:
        args.rows, args.repeats, args.queries = 64, 1, 8
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    result: dict[str, Any] = {}
    if not args.no_passes:
        result = _passes(args)
    if args.processes and not args.no_passes:
        result["processes"] = run_processes(args.rows, args.batch_size, min(64, args.rows))
        print(f"group pass on 2 CPU processes / 1 process: "
              f"{result['processes']['ratio_2_to_1']:.3f}")
    if args.methods or args.scaling:
        result["exact_memory_accounting"] = exact_memory_accounting()
    if args.methods:
        k = min(64, args.rows // 4)
        result["end_to_end"] = run_end_to_end(args.rows, args.queries, args.batch_size, k,
                                              args.methods)
        _print_end_to_end(result["end_to_end"])
    if args.scaling:
        sizes, (n, m) = ([200, 400], (1000, 100)) if args.quick else \
            ([1000, 4000, 16000], (100_000, 10_000))
        result["scaling"] = scaling(sizes, m=100 if not args.quick else 10, k=64,
                                    batch_size=128)
        result["query_heavy"] = query_heavy(n, m, k=64, batch_size=128)
        print("scaling (2-layer BERT, hidden 32, LoRA q,v r=8 + head; IF-identity K=64 vs point)")
        _print_scaling(result["scaling"] + [result["query_heavy"]])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
