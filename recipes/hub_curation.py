"""Hub dataset curation with GGDA: which source of a data mixture hurts the model?

BBC News training articles are dealt at random into four pseudo-sources (a ``source``
column); one source, chosen by the seed, is corrupted: a share of its labels is flipped
(``--corruption labels``) or the words of its texts are shuffled (``--corruption text``).
MiniLM-L6 + LoRA (q, v; head saved) is fine-tuned on the mixture, the ``column`` grouper
makes one group per source, and GGDA-Influence (identity preconditioner) scores each source
against a clean validation split. The corrupted source should come out as the least helpful
(``corrupted_source_rank`` = 1). A drill-down (``Attributor.refine``) then scores the rows of
the least helpful source one by one, to see whether its corrupted rows are the harmful ones.

The scored mixture is written with ``save_to_disk`` and staged for the Hub with
``push_scored_dataset(..., dry_run=True)`` together with its attribution card (no network).

Run::

    python recipes/hub_curation.py --json curation.json
    python recipes/hub_curation.py --quick --output /tmp/hc --json /tmp/hc.json
    python recipes/hub_curation.py --corruption text
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Timings, accuracy, base_parser, bbc_splits, detection,  # noqa: E402
                     flip_labels, found_curve, parse_sized, recipe_run, replace_column, say,
                     setup_run, write_figures)

FULL = {"train_rows": 1000, "val_rows": 200, "max_length": 64, "steps": 100}
QUICK = {"train_rows": 96, "val_rows": 16, "max_length": 32, "steps": 6}
SOURCES = ("source_a", "source_b", "source_c", "source_d")


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/hub_curation")
    ap.add_argument("--train-rows", type=int, default=None, help="Articles in the mixture.")
    ap.add_argument("--val-rows", type=int, default=None, help="Clean validation articles.")
    ap.add_argument("--max-length", type=int, default=None, help="Tokens per article.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps.")
    ap.add_argument("--batch-size", type=int, default=16, help="Fine-tuning batch size.")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    ap.add_argument("--corruption", choices=("labels", "text"), default="labels",
                    help="Flip labels of the corrupted source, or shuffle its words.")
    ap.add_argument("--corrupt-fraction", type=float, default=0.5,
                    help="Share of the corrupted source's rows that are corrupted.")
    ap.add_argument("--repo-id", type=str, default="hf-ggda/bbc-news-mixture-scored",
                    help="Hub dataset repository of the (dry-run) push.")
    ap.add_argument("--attr-batch-size", type=int, default=32, help="Rows per gradient pass.")
    args = parse_sized(ap, argv, FULL, QUICK)
    if not 0.0 < args.corrupt_fraction <= 1.0:
        ap.error(f"--corrupt-fraction must be in (0, 1], got {args.corrupt_fraction}.")
    return args


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """Return ``text`` with its words in a random order (same bag of words).

    Args:
        text: The text.
        rng: Random generator.

    Returns:
        The shuffled text.
    """
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def make_mixture(train: Any, corruption: str, fraction: float,
                 seed: int) -> tuple[Any, str, np.ndarray]:
    """Deal rows into the four sources and corrupt one of them.

    Args:
        train: Clean BBC News rows.
        corruption: ``"labels"`` or ``"text"``.
        fraction: Share of the corrupted source's rows to corrupt.
        seed: Seed of the deal, of the corrupted source and of the corruption.

    Returns:
        (the mixture with ``source``, ``corrupted`` and ``row`` columns, the corrupted
        source's name, 0/1 corrupted flag per row).
    """
    rng = np.random.default_rng(seed)
    n = len(train)
    source_of = np.empty(n, dtype=np.int64)
    source_of[rng.permutation(n)] = np.arange(n) % len(SOURCES)
    bad = int(rng.integers(len(SOURCES)))
    members = np.flatnonzero(source_of == bad)
    labels = np.asarray(train["label"])
    flags = np.zeros(n, dtype=np.int64)
    if corruption == "labels":
        noisy, sub_flags = flip_labels(labels[members], fraction, 5, seed + 1)
        labels = labels.copy()
        labels[members] = noisy
        flags[members] = sub_flags
        train = replace_column(train, "label", labels.tolist())
    else:
        chosen = rng.choice(members, int(round(fraction * len(members))), replace=False)
        flags[chosen] = 1
        texts = list(train["text"])
        for i in chosen:
            texts[i] = shuffle_words(texts[i], rng)
        train = replace_column(train, "text", texts)
    train = train.add_column("source", [SOURCES[s] for s in source_of])
    train = train.add_column("corrupted", flags.tolist())
    train = train.add_column("row", list(range(n)))
    return train, SOURCES[bad], flags


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes) the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction
    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.grouping import get_grouper
    from hf_ggda.integrations.cards import write_attribution_card
    from hf_ggda.integrations.hub import push_scored_dataset
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.training import finetune

    times = Timings()
    train, val = bbc_splits([args.train_rows, args.val_rows], seed=args.seed)
    train, bad_source, flags = make_mixture(train, args.corruption, args.corrupt_fraction,
                                            args.seed)
    say(f"{len(train)} articles in {len(SOURCES)} sources; {bad_source} has "
        f"{int(flags.sum())} corrupted rows ({args.corruption}); fine-tuning {args.steps} steps")
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=args.seed)
    task = SequenceClassificationTask(tokenizer, max_length=args.max_length)
    with times.stage("finetune"):
        losses = finetune(model, task, train, args.steps, args.batch_size, args.lr, args.seed,
                          desc=None)
    with times.stage("attribution"):
        grouper = get_grouper("column", column="source")
        grouped = grouper.assign(train)
        names = grouper.describe().extra["values"]  # group id -> source name
        attributor = InfluenceFunction(model, task, InfluenceConfig(
            preconditioner="identity", batch_size=args.attr_batch_size))
        attributor.fit(grouped)
        scores = attributor.score(val, aggregate="sum", self_influence=True)
    totals = scores.aggregated().double().numpy()
    order = np.argsort(totals, kind="stable")  # least helpful first
    ranking = [names[attributor.group_ids[k]] for k in order]
    worst = attributor.group_ids[int(order[0])]
    with times.stage("drilldown"):
        refined = attributor.refine(scores, group_ids=[worst], row_column="row")
    point = refined.point_scores.sum(0).double().numpy()
    rows = np.asarray(refined.point_rows)
    drill = detection(-point, flags[rows], fractions=(0.5,))

    scored = refined.to_dataset_columns(grouped, row_column="row")
    with recipe_run(out, "hub_curation", args) as run:
        run.dataset("scored", scored)
        curves = {}
        if flags[rows].sum() > 0:  # the drilled source holds corrupted rows: plot how fast
            curves[f"Corrupted rows of {names[worst]} found, most harmful first"] = \
                found_curve(drill, "its corrupted rows", inspected=names[worst])
        card = write_attribution_card(
            run.folder("card"), scores, scored, model=model, query_dataset=val,
            grouping="column `source` (group_id = position of the source in sorted order: "
                     + ", ".join(f"{k} = {v}" for k, v in names.items()) + ")",
            pretty_name="BBC News mixture of four sources, scored with GGDA",
            license="other", curves=curves, limits=[
                f"{bad_source} was corrupted on purpose ({args.corruption}, column "
                "`corrupted`) to test the curation.",
                "Rows of the least helpful source carry point scores (`ggda_point_score`)."],
            extra_metadata={"recipe": "hub_curation", "source_ranking_least_helpful_first":
                            ranking})
        with times.stage("stage_push"):
            plan = push_scored_dataset(scored, args.repo_id, card_dir=card.parent, dry_run=True,
                                       staging_dir=run.folder("push"))
        figures: dict[str, Any] = {
            "corrupted_source_rank": ranking.index(bad_source) + 1,
            "num_sources": len(SOURCES),
            "corrupted_source": bad_source,
            "source_ranking_least_helpful_first": ranking,
            "source_scores": {names[g]: float(t) for g, t in zip(attributor.group_ids, totals)},
            "source_self_influence": {names[g]: float(v) for g, v in
                                      zip(attributor.group_ids, scores.self_influence.tolist())},
            "drilldown_source": names[worst],
            "drilldown_corrupted_recall_at_50": drill["recall_at_50"],
            "drilldown_corrupted_auc": drill["auc"],
            "val_accuracy": accuracy(model, task, val),
            "train_loss_first": float(np.mean(losses[:5])),
            "train_loss_last": float(np.mean(losses[-5:])),
            "push_plan": {"repo_id": plan.repo_id, "dry_run": plan.dry_run, "pushed": plan.pushed,
                          "num_rows": plan.num_rows, "columns": plan.columns,
                          "card_files": plan.card_files, "staging_dir": str(out / "push")},
            "timings": times.to_dict(), "args": vars(args)}
        write_figures(figures, args.json, run)
    print("Sources, least helpful first (validation score, > 0 helps): "
          + ", ".join(f"{s} {figures['source_scores'][s]:+.4g}" for s in ranking))
    print(f"corrupted source {bad_source}: rank {figures['corrupted_source_rank']} of "
          f"{len(SOURCES)} (1 = least helpful)")
    print(f"drill-down into {names[worst]}: corrupted rows found in the most harmful half "
          f"{drill['recall_at_50']:.3f}, AUC {drill['auc']:.3f}")
    print(f"Wrote {out}/scored, {out}/card, {out}/push (dry-run staging for {args.repo_id}), "
          f"{out}/figures.json")
    return figures


if __name__ == "__main__":
    main()
