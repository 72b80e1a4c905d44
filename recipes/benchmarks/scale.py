"""Attribution at scale: factorised projected gradients of every linear layer.

Workloads (every figure a ratio to the floor measured in the same run, or MB):

* **W2**: MiniLM-L6 without adapters, attribution through all its linear layers (d ≈ 10.6M),
  BBC News cut into windows of ``--words`` words (so n can exceed the 2,225 articles), at
  ``--max-length`` tokens; for each n: the floor (a plain forward+backward pass over the n rows
  with weight gradients of the same layers), the group pass at each K (IF-identity ``fit``
  with a gradient store), point mode (the n per-example vectors written to a store shard by
  shard), and scoring ``--queries`` queries against the largest K (query gradients + scores).
* **LLM**: the packaged SmolLM2-135M with all its linear layers, instruction rows made from
  BBC News (article head -> topic): group pass ÷ floor, point pass ÷ floor, peak, store size.

Peak memory is the resident set above its value when the call starts (psutil, sampled every
5 ms, glibc told to unmap freed blocks). The dense projection of these gradients does not fit:
its d × p matrix alone is d·p·4 bytes (reported as ``dense_projection_mb``).

Usage::

    python recipes/benchmarks/scale.py --json scale.json            # W2 n = 1k/4k/16k + LLM
    python recipes/benchmarks/scale.py --quick --json quick.json    # tiny models, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _speed_e2e import exact_memory_accounting, folder_mb, measure  # noqa: E402


def bbc_windows(n: int, words: int) -> Any:
    """n rows of ``words`` consecutive words of the BBC News articles (label = the article's).

    Raises:
        ValueError: The articles hold fewer than n windows.
    """
    from datasets import Dataset

    from hf_ggda.data import load_bbc_news

    texts, labels = [], []
    for text, label in zip(*(lambda d: (d["text"], d["label"]))(load_bbc_news(seed=0))):
        tokens = text.split()
        for start in range(0, len(tokens) - words + 1, words):
            texts.append(" ".join(tokens[start:start + words]))
            labels.append(label)
    if len(texts) < n:
        raise ValueError(f"The BBC articles give {len(texts)} windows of {words} words; asked "
                         f"for {n}. Use fewer words per window.")
    order = np.random.default_rng(0).permutation(len(texts))[:n]
    return Dataset.from_dict({"text": [texts[i] for i in order],
                              "label": [labels[i] for i in order]})


def floor(model: Any, task: Any, data: Any, batch_size: int, names: set[str]) -> None:
    """Tokenise + one forward+backward pass with weight gradients of the ``names`` params."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    prepared = task.prepare(data).select_columns(list(task.feature_columns))
    model.eval()
    try:
        for start in range(0, len(prepared), batch_size):
            batch = task.collate(prepared[start:start + batch_size])
            task.per_row_loss(model, batch).sum().backward()
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])


def _config(k: int, batch_size: int, budget_mb: int) -> dict[str, Any]:
    return {"attributor_type": "influence", "preconditioner": "identity", "selection": "linear",
            "factorised_dim": k, "batch_size": batch_size, "memory_budget": budget_mb << 20}


def run_size(model: Any, task: Any, train: Any, queries: Any, ks: list[int], k: int,
             batch_size: int, budget_mb: int) -> dict[str, Any]:
    """Floor, group passes, point pass and scoring for one n (see the module docstring)."""
    from hf_ggda.attributors import get_attributor
    from hf_ggda.gradients import GradientEngine

    n = len(train)
    cfg = _config(k, batch_size, budget_mb)
    probe = get_attributor(model, task, cfg)
    names = set(probe.selection.names)
    task.prepare(train), task.prepare(queries)
    floor(model, task, train.select(range(min(n, 2 * batch_size))), batch_size, names)
    floor_s, floor_mb = measure(lambda: floor(model, task, train, batch_size, names))
    out: dict[str, Any] = {"rows": n, "queries": len(queries), "floor_s": floor_s,
                           "floor_peak_mb": floor_mb, "group_pass_ratio": {}, "peak_mb": {},
                           "store_mb": {}}
    engine = GradientEngine(model, task, probe.selection, probe.engine_config(
        probe.components[0]))
    out["dim"], out["d"] = engine.dim, engine.selection.numel
    out["dense_projection_mb"] = engine.selection.numel * engine.dim * 4 / 2**20
    last: Optional[Any] = None
    for groups in [g for g in ks if g <= n]:
        data = train.add_column("group_id", (np.arange(n) % groups).tolist())
        folder = Path(tempfile.mkdtemp(prefix=f"ggda-scale-{groups}-"))
        att = get_attributor(model, task, cfg)
        seconds, peak = measure(lambda: att.fit(data, store=str(folder)))
        out["group_pass_ratio"][str(groups)] = seconds / floor_s
        out["peak_mb"][f"group_{groups}"] = peak
        out["store_mb"][f"group_{groups}"] = folder_mb(folder)
        shutil.rmtree(folder, ignore_errors=True)
        last = (groups, att)
    folder = Path(tempfile.mkdtemp(prefix="ggda-scale-point-"))
    seconds, peak = measure(lambda: engine.per_example_gradients(
        train, store=str(folder / "points"), keep=False))
    out["point_pass_ratio"] = seconds / floor_s
    out["peak_mb"]["point"] = peak
    out["store_mb"]["point"] = folder_mb(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if last is not None:
        groups, att = last
        seconds, peak = measure(lambda: att.score(queries))
        out["score_ratio"] = seconds / floor_s
        out["score_groups"] = groups
        out["peak_mb"]["score"] = peak
    return out


def minilm_linear(max_length: int) -> tuple[Any, Any]:
    """The packaged MiniLM-L6 classifier (no adapters) and its task."""
    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.tasks import SequenceClassificationTask

    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=None)
    return model, SequenceClassificationTask(tokenizer, max_length=max_length)


def run_w2(sizes: list[int], m: int, ks: list[int], k: int, words: int, max_length: int,
           batch_size: int, budget_mb: int) -> list[dict[str, Any]]:
    """W2 at each n (queries: m further windows)."""
    model, task = minilm_linear(max_length)
    rows = bbc_windows(max(sizes) + m, words)
    queries = rows.select(range(max(sizes), max(sizes) + m))
    return [run_size(model, task, rows.select(range(n)), queries, ks, k, batch_size,
                     budget_mb) for n in sizes]


def run_llm(rows: int, m: int, ks: list[int], k: int, batch_size: int, budget_mb: int,
            quick: bool) -> dict[str, Any]:
    """SmolLM2-135M (or, quick, a tiny Llama) through all its linear layers."""
    from hf_ggda.tasks import CausalLMTask

    recipes = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(recipes))
    import llm_instruction_cleanup

    if quick:
        from hf_ggda.testing import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer("causal")
        model = tiny_model("llama", len(tokenizer))
        train, val = llm_instruction_cleanup.toy_instructions(rows, m, seed=0)
        name = "tiny-llama"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, file = llm_instruction_cleanup.smollm2_files()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file,
                                                     dtype=torch.float32)
        train, val = llm_instruction_cleanup.bbc_instructions(tokenizer, rows, m, prompt_tokens=48,
                                                  seed=0)
        name = "SmolLM2-135M"
    task = CausalLMTask(tokenizer, prompt_column="prompt", response_column="response",
                        max_length=64)
    out = run_size(model, task, train, val, ks, k, batch_size, budget_mb)
    out["model"] = name
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Command-line entry point; returns the figures (also written to ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--k", type=int, default=16, help="Factorised k per side.")
    parser.add_argument("--words", type=int, default=24, help="Words per BBC window.")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget-mb", type=int, default=256, help="memory_budget (MB).")
    parser.add_argument("--llm-rows", type=int, default=1000)
    parser.add_argument("--no-llm", action="store_true", help="Skip the LLM workload.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (tests, < 1 min).")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if args.quick:
        args.sizes, args.queries, args.groups, args.llm_rows = [64], 16, [8, 32], 48
    result: dict[str, Any] = {"exact_memory_accounting": exact_memory_accounting(),
                              "budget_mb": args.budget_mb, "k": args.k, "threads":
                              torch.get_num_threads()}
    result["w2"] = run_w2(args.sizes, args.queries, args.groups, args.k, args.words,
                          args.max_length, args.batch_size, args.budget_mb)
    for row in result["w2"]:
        print(f"W2 n={row['rows']:>6} d={row['d']:,} p={row['dim']:,}: group "
              + ", ".join(f"K={g} {r:.3f}x" for g, r in row["group_pass_ratio"].items())
              + f"; point {row['point_pass_ratio']:.3f}x; score {row.get('score_ratio', 0):.3f}x"
              f"; floor {row['floor_s']:.1f} s, {row['floor_peak_mb']:.0f} MB; peak "
              + ", ".join(f"{p} {v:.0f}" for p, v in row["peak_mb"].items()) + " MB")
    if not args.no_llm:
        result["llm"] = run_llm(args.llm_rows, 64 if not args.quick else 8, [64], args.k,
                                16 if not args.quick else 8, args.budget_mb, args.quick)
        row = result["llm"]
        print(f"LLM {row['model']} n={row['rows']} d={row['d']:,} p={row['dim']:,}: group K=64 "
              f"{row['group_pass_ratio'].get('64', float('nan')):.3f}x; point "
              f"{row['point_pass_ratio']:.3f}x; peak " +
              ", ".join(f"{p} {v:.0f}" for p, v in row["peak_mb"].items()) + " MB; store " +
              ", ".join(f"{p} {v:.1f}" for p, v in row["store_mb"].items()) + " MB")
    # the keys the issue asks for, from the largest n
    top = result["w2"][-1]
    result.update({key: top[key] for key in ("floor_s", "group_pass_ratio", "point_pass_ratio",
                                             "peak_mb", "store_mb") if key in top})
    result["score_ratio"] = top.get("score_ratio")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
