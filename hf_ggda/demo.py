"""The main job on the embedded default: MiniLM-L6 + LoRA on BBC News, grouped and attributed.

Steps: split the packaged BBC News articles into train / validation; fine-tune LoRA (q, v) and
the head of the packaged MiniLM-L6; group the training rows with Grad-K-Means; score every
group against the validation set with GGDA-Influence (grad-dot) and compute each group's
self-influence; write the scored datasets, the scores and a summary. Nothing is downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import SIGN_CONVENTION
from .logging import get_logger

logger = get_logger(__name__)

FULL = {"train": 800, "val": 200, "max_length": 64, "steps": 150}
QUICK = {"train": 96, "val": 24, "max_length": 32, "steps": 8}


def _title(text: str) -> str:
    return text.split("\n", 1)[0][:70]


def run_demo(output: str = "outputs/demo", quick: bool = False, num_groups: int = 32,
             seed: int = 0) -> dict[str, Any]:
    """Run the demo and write its outputs.

    Args:
        output: Output folder (``train/``, ``queries/``, ``scores/``, ``summary.json``).
        quick: A small run (under a minute) for tests.
        num_groups: K.
        seed: Seed of the split, training and grouping.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        GroupingError: ``num_groups`` is larger than the training set.
    """
    from .attributors import InfluenceConfig, InfluenceFunction
    from .data import load_bbc_news, load_minilm_classifier
    from .grouping import get_grouper
    from .integrations.cards import write_attribution_card
    from .pipeline import RunWriter, score_queries
    from .tasks import SequenceClassificationTask
    from .training import finetune

    size = QUICK if quick else FULL
    num_groups = min(num_groups, 8) if quick else num_groups
    start = time.perf_counter()
    data = load_bbc_news(limit=size["train"] + size["val"], seed=seed)
    split = data.train_test_split(test_size=size["val"], seed=seed, stratify_by_column="label")
    train, val = split["train"], split["test"]
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=seed)
    task = SequenceClassificationTask(tokenizer, max_length=size["max_length"])
    losses = finetune(model, task, train, steps=size["steps"], batch_size=16, lr=1e-3,
                      seed=seed)
    # equal-size groups within each class: no singleton or giant cluster dominates the ranking
    grouper = get_grouper("grad-kmeans", num_groups=num_groups, per_class=True, balanced=True,
                          seed=seed)
    attributor = InfluenceFunction(model, task, InfluenceConfig(preconditioner="identity",
                                                                batch_size=32))
    # one pass: the grouping features come from the attribution pass's own output gradients
    attributor.fit(train, grouper=grouper)
    train = attributor.train_dataset
    out = Path(output)
    with RunWriter(out, kind="demo", config=attributor.config.to_dict()) as run:
        scores, scored, queries = score_queries(attributor, train, val, group_column="group_id",
                                                top_k=3, self_influence=True)
        run.dataset("train", scored)
        run.dataset("queries", queries)
        run.result("scores", scores)
        run.folder("adapter", model.save_pretrained)  # LoRA + head, for `hf-ggda attribute`
        run.dataset("validation", val)  # the raw queries, for `hf-ggda attribute`
        run.folder("card", lambda path: write_attribution_card(
            path, scores, scored, model=model, query_dataset=val,
            grouping=f"grad-kmeans (per class, K = {num_groups})",
            pretty_name="BBC News attribution (hf_ggda demo)"))
        summary = _summary(scores, scored, losses, num_groups, time.perf_counter() - start)
        run.json("summary.json", summary)
    _print(summary, out)
    return summary


def _summary(scores: Any, scored: Any, losses: list[float], k: int,
             seconds: float) -> dict[str, Any]:
    total = scores.aggregated()
    order = total.argsort(descending=True).tolist()
    ids = scores.group_ids
    titles: dict[Any, list[str]] = {}
    labels: dict[Any, list[int]] = {}
    for g, text, y in zip(scored["group_id"], scored["text"], scored["label"]):
        titles.setdefault(g, []).append(_title(text))
        labels.setdefault(g, []).append(y)
    names = scored.features["label"].names

    def describe(i: int) -> dict[str, Any]:
        g = ids[i]
        return {"group": g, "score": float(total[i]), "size": len(titles[g]),
                "label": names[max(set(labels[g]), key=labels[g].count)],
                "examples": titles[g][:3]}

    return {"method": "GGDA-Influence (identity / grad-dot)", "grouping": "grad-kmeans",
            "num_groups": k, "train_rows": len(scored), "queries": scores.num_queries,
            "sign_convention": SIGN_CONVENTION, "train_loss_first": losses[0],
            "train_loss_last": losses[-1], "seconds": seconds,
            "most_helpful": [describe(i) for i in order[:3]],
            "least_helpful": [describe(i) for i in order[-3:][::-1]]}


def _print(summary: dict[str, Any], out: Path) -> None:
    print(f"GGDA demo: {summary['train_rows']} BBC News articles in {summary['num_groups']} "
          f"grad-kmeans groups, scored against {summary['queries']} validation articles "
          f"({summary['method']}); {summary['seconds']:.0f} s.")
    print(f"Sign convention: {summary['sign_convention']}.")
    for title, key in (("Most helpful groups", "most_helpful"),
                       ("Least helpful groups", "least_helpful")):
        print(f"{title}:")
        for g in summary[key]:
            print(f"  group {g['group']:>3} ({g['label']}, {g['size']} rows) score "
                  f"{g['score']:+.4g}: {g['examples'][0]!r}")
    print(f"Wrote {out}/train (columns ggda_group_score, ggda_group_rank, "
          f"ggda_self_influence), {out}/queries, {out}/scores, {out}/adapter, "
          f"{out}/validation, {out}/card (README.md + plots), {out}/summary.json")
