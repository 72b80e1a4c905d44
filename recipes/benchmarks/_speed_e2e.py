"""End-to-end and scaling measurements for ``speed.py`` (group attribution vs point mode).

* ``end_to_end``: for TracIn (two saved checkpoints), IF-identity, IF-EK-FAC and TRAK, the
  wall time of grouping (Grad-K-Means, K groups, in the attribution pass or with a forward pass
  of its own; or random groups, or point mode K = n) + ``fit`` (with an on-disk gradient
  store) + ``score`` of every query row, as ratios to the end-to-end floor — one plain
  forward+backward pass over the training rows and the query rows — with the peak resident
  memory above the starting point and the store's size on disk; and the agreement (Pearson,
  per-query Spearman) of each shortcut with the exact method it stands for.
* ``scaling``: a small BERT built from a config (+ LoRA) on n = 1k, 4k, 16k rows: time and
  peak memory of the floor, the group path (IF-identity, K = 64) and the point path.
* ``query_heavy``: the same small model with n = 100,000 rows and m = 10,000 queries, where
  scoring (m × n × d for the point method) dominates.

Memory is the resident set size of this process sampled every 5 ms by a thread (psutil), minus
its value when the measured call starts; each figure is the peak of one call. So that freed
memory leaves the resident set (and one call's buffers cannot hide the next call's peak),
:func:`exact_memory_accounting` makes glibc serve every allocation of 64 KB or more by ``mmap``
and unmap it when freed; it is switched on before the end-to-end and scaling runs (the page
faults this costs fall on the floor and on the methods alike).
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch

#: Attributor configurations of the end-to-end comparison (``tracin`` runs over two saved
#: checkpoints, each with its learning rate; its ratios are per checkpoint).
METHODS: dict[str, dict[str, Any]] = {
    "tracin": {"attributor_type": "tracin", "learning_rates": [1.0, 1.0]},
    "if-identity": {"attributor_type": "influence", "preconditioner": "identity"},
    "if-ekfac": {"attributor_type": "influence", "preconditioner": "ekfac", "damping": 1e-3},
    # EK-FAC with factors and eigenvalues fitted on a seeded sample of 128 training rows
    "if-ekfac-128": {"attributor_type": "influence", "preconditioner": "ekfac", "damping": 1e-3,
                     "curvature_rows": 128},
    "trak": {"attributor_type": "trak", "projection_dim": 512},
    # shortcuts, each checked against the exact method it stands for (SHORTCUTS)
    "if-identity-f16": {"attributor_type": "influence", "preconditioner": "identity",
                        "factorised_dim": 16},
    "trak-seed1": {"attributor_type": "trak", "projection_dim": 512, "seed": 1},
}
#: Ways of grouping the training rows: Grad-K-Means inside the attribution pass, Grad-K-Means
#: with its own forward pass first, random groups (no grouping cost), point mode (K = n).
GROUPINGS = ("grad-kmeans-1pass", "grad-kmeans-2pass", "random", "point")
#: Exact method each shortcut is checked against (same groups, same queries).
SHORTCUTS = {"if-ekfac-128": "if-ekfac", "if-identity-f16": "if-identity",
             "trak-seed1": "trak"}


def exact_memory_accounting() -> bool:
    """glibc only: allocations >= 64 KB by mmap, returned to the system when freed.

    Returns:
        Whether the setting was applied (False on other C libraries).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class PeakRSS:
    """Context manager measuring the peak resident memory (MB) above its starting value."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._start = 0

    def _sample(self) -> None:
        peak = self._start
        while not self._stop.is_set():
            peak = max(peak, self._proc.memory_info().rss)
            time.sleep(self.interval)
        peak = max(peak, self._proc.memory_info().rss)
        self.peak_mb = (peak - self._start) / 2**20

    def __enter__(self) -> "PeakRSS":
        self._start = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, peak MB above start) of one call."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mb


def folder_mb(path: Path) -> float:
    """Size of the files under ``path`` in MB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def floor_pass(model: Any, task: Any, dataset: Any, batch_size: int) -> None:
    """Tokenise + one plain forward+backward pass over ``dataset`` (summed loss into .grad)."""
    params = [p for p in model.parameters() if p.requires_grad]
    prepared = task.prepare(dataset).select_columns(list(task.feature_columns))
    model.eval()
    for start in range(0, len(prepared), batch_size):
        batch = task.collate(prepared[start:start + batch_size])
        task.per_row_loss(model, batch).sum().backward()
    for p in params:
        p.grad = None


def _attribute(model: Any, task: Any, method: str, train: Any, queries: Any, grouping: str,
               k: int, batch_size: int, store: Path, checkpoints: list[str]) -> Any:
    """Group (``grouping``) + fit + score; returns the scores and the grouped rows' ids."""
    from hf_ggda.attributors import get_attributor
    from hf_ggda.grouping import GradKMeansGrouper

    config = {**METHODS[method], "batch_size": batch_size}
    if config["attributor_type"] == "tracin":
        config["checkpoints"] = checkpoints
    attributor = get_attributor(model, task, config)
    grouper = GradKMeansGrouper(num_groups=k, seed=0)
    if grouping == "grad-kmeans-1pass":
        attributor.fit(train, store=str(store), grouper=grouper)
    elif grouping == "grad-kmeans-2pass":
        attributor.fit(grouper.assign(train, model=model, task=task), store=str(store))
    else:
        attributor.fit(train, "row_id" if grouping == "point" else "group_id", store=str(store))
    return attributor.score(queries), attributor.train_dataset["group_id"]


def agreement(a: Any, b: Any) -> dict[str, float]:
    """Pearson correlation of two score matrices and the mean per-query Spearman."""
    from scipy.stats import spearmanr

    x, y = a.matrix.double().numpy(), b.matrix.double().numpy()
    per_query = [spearmanr(u, v).statistic for u, v in zip(x, y)]
    return {"pearson": float(np.corrcoef(x.ravel(), y.ravel())[0, 1]),
            "spearman_per_query": float(np.nanmean(per_query))}


def end_to_end(model: Any, task: Any, train: Any, queries: Any, k: int, batch_size: int,
               methods: list[str], groupings: tuple[str, ...] = GROUPINGS) -> dict[str, Any]:
    """Grouping + fit + score of every query, per method and way of grouping.

    Returns:
        {"floor_s", "floor_peak_mb", "queries", "k", "methods": {method: {grouping:
        {"s", "ratio", "peak_mb", "store_mb"}, "speedup": point_s / best group s,
        "ratio_per_checkpoint"...}}, "agreement": {pair: {"pearson", "spearman_per_query"}}}.
    """
    n = len(train)
    rng = np.random.default_rng(0)
    train = train.add_column("group_id", rng.permutation(np.arange(n) % k).tolist())
    train = train.add_column("row_id", list(range(n)))
    ckpt_dir = Path(tempfile.mkdtemp(prefix="ggda-e2e-ckpt-"))
    checkpoints = []
    for c in range(2):  # two saved checkpoints (the same weights: the cost is what counts)
        model.save_pretrained(str(ckpt_dir / f"checkpoint-{c}"))
        checkpoints.append(str(ckpt_dir / f"checkpoint-{c}"))
    floor_pass(model, task, train.select(range(min(n, 2 * batch_size))), batch_size)
    floor_s, floor_mb = measure(lambda: (floor_pass(model, task, train, batch_size),
                                         floor_pass(model, task, queries, batch_size)))
    out: dict[str, Any] = {"floor_s": floor_s, "floor_peak_mb": floor_mb, "k": k,
                           "rows": n, "queries": len(queries), "methods": {},
                           "agreement": {}}
    kept: dict[tuple[str, str], Any] = {}
    for method in methods:
        per_ckpt = len(METHODS[method].get("learning_rates", [1.0]))
        row: dict[str, Any] = {"checkpoints": per_ckpt}
        # a shortcut runs where its exact method ran, with the one-pass grouping only
        ways = [g for g in groupings if g == "grad-kmeans-1pass"] if method in SHORTCUTS \
            else groupings
        for grouping in ways:
            folder = Path(tempfile.mkdtemp(prefix=f"ggda-e2e-{method}-{grouping}-"))
            result: list[Any] = []
            try:
                seconds, peak = measure(lambda: result.append(_attribute(
                    model, task, method, train, queries, grouping, k, batch_size,
                    folder / "store", checkpoints)))
                row[grouping] = {"s": seconds, "ratio": seconds / floor_s,
                                 "ratio_per_checkpoint": seconds / floor_s / per_ckpt,
                                 "peak_mb": peak, "store_mb": folder_mb(folder / "store")}
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            kept[(method, grouping)] = result[0]
        groups = [g for g in ways if g != "point"]
        if "point" in row and groups:
            row["speedup"] = row["point"]["s"] / min(row[g]["s"] for g in groups)
        out["methods"][method] = row
        if "grad-kmeans-1pass" in ways and "grad-kmeans-2pass" in ways:
            one, two = kept[(method, "grad-kmeans-1pass")], kept[(method, "grad-kmeans-2pass")]
            same = list(one[1]) == list(two[1])
            out["agreement"][f"{method}: 1-pass vs 2-pass grouping"] = {
                **agreement(one[0], two[0]), "same_groups": same}
    for fast, exact in SHORTCUTS.items():
        for grouping in groupings:
            if (fast, grouping) in kept and (exact, grouping) in kept:
                out["agreement"][f"{fast} vs {exact} ({grouping})"] = agreement(
                    kept[(fast, grouping)][0], kept[(exact, grouping)][0])
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out


def small_setup(hidden: int = 32, seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer BERT classifier built from a config with LoRA (q, v; r = 8) + head."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer("bert")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden, num_labels=3,
        max_position_embeddings=64))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             init_lora_weights=False,
                                             modules_to_save=["classifier"]))
    return model, SequenceClassificationTask(tokenizer, max_length=16)


def _scaling_point(model: Any, task: Any, n: int, m: int, k: int,
                   batch_size: int) -> dict[str, float]:
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction
    from hf_ggda.testing import toy_dataset

    train = toy_dataset(n, seed=1).add_column("group_id", (np.arange(n) % k).tolist())
    train = train.add_column("row_id", list(range(n)))
    queries = toy_dataset(m, seed=2)
    for ds in (train, queries):
        task.prepare(ds)  # tokenisation is cached: every path below starts from tokens
    floor_pass(model, task, train.select(range(min(n, 2 * batch_size))), batch_size)
    row = {"rows": n, "queries": m}
    row["floor_s"], row["floor_peak_mb"] = measure(
        lambda: (floor_pass(model, task, train, batch_size),
                 floor_pass(model, task, queries, batch_size)))
    for side, column in (("group", "group_id"), ("point", "row_id")):
        def run() -> None:
            att = InfluenceFunction(model, task, InfluenceConfig(batch_size=batch_size))
            att.fit(train, column).score(queries)
        row[f"{side}_s"], row[f"{side}_peak_mb"] = measure(run)
    row["speedup"] = row["point_s"] / row["group_s"]
    return row


def scaling(sizes: list[int], m: int, k: int, batch_size: int) -> list[dict[str, float]]:
    """Floor, group (IF-identity, K = ``k``) and point time / peak memory for each n."""
    model, task = small_setup()
    return [_scaling_point(model, task, n, m, k, batch_size) for n in sizes]


def query_heavy(n: int, m: int, k: int, batch_size: int) -> dict[str, float]:
    """The query-heavy case: n training rows, m queries, IF-identity at K = ``k`` vs point."""
    model, task = small_setup()
    return _scaling_point(model, task, n, m, k, batch_size)
