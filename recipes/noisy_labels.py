"""Noisy-label detection on BBC News with GGDA: group self-influence, then a drill-down.

Flips a seeded 10% of the training labels, fine-tunes MiniLM-L6 + LoRA (q, v; head saved),
groups the training rows with Grad-K-Means within each (noisy) label, and ranks the groups by
their self-influence per row (GGDA-Influence, identity preconditioner: ‖g_G‖² / |G|², the
squared norm of the group's mean gradient). Only the rows of the top groups (``--drill``, a
share of the data) get per-example gradients; they are inspected first, by point-level
self-influence ‖g_i‖², then the other rows by their group's rank.

Figures: the share of flipped labels found after inspecting 10% / 20% of the rows (GGDA
path, full point-level self-influence, training loss, random), and the cost of the GGDA path
relative to the full point-level self-influence (process CPU time, which is less sensitive to
other jobs on a shared machine than wall time; both are written). A batch-1 loop of
per-example gradients (the classic point implementation) is timed on a sample of rows and
extrapolated, for a second cost reference.

Run::

    python recipes/noisy_labels.py --json noisy.json               # full (see notes/recipes.md)
    python recipes/noisy_labels.py --quick --output /tmp/nl --json /tmp/nl.json
    python recipes/noisy_labels.py --selection auto                 # LoRA + head gradients
    python recipes/noisy_labels.py --method tracin                  # summed over snapshots

Outputs under ``--output``: ``train_scored/`` (save_to_disk: noisy and clean labels, flags,
group, group scores, self-influence, point self-influence of drilled rows, inspection rank),
``card/`` (attribution card with the recall curves), ``figures.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (HEAD_SELECTION, Timings, base_parser, bbc_splits, detection,  # noqa: E402
                     flip_labels, found_curve, make_attributor, parse_sized, predict,
                     recall_figures, recipe_run, replace_column, say, select_until, setup_run,
                     write_figures)

FULL = {"train_rows": 1600, "val_rows": 200, "max_length": 64, "steps": 150, "groups": 100,
        "loop_sample": 48, "checkpoints": 3, "cleanlab_folds": 5}
QUICK = {"train_rows": 128, "val_rows": 16, "max_length": 32, "steps": 10, "groups": 8,
         "loop_sample": 4, "checkpoints": 2, "cleanlab_folds": 2}
ROW_COLUMN = "row"
RECALLS = ("recall_at_10", "recall_at_20")


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/noisy_labels")
    ap.add_argument("--train-rows", type=int, default=None, help="Training articles.")
    ap.add_argument("--val-rows", type=int, default=None,
                    help="Clean validation articles (group scores on the card).")
    ap.add_argument("--noise", type=float, default=0.1, help="Share of labels flipped.")
    ap.add_argument("--noise-kind", choices=("uniform", "pair"), default="uniform",
                    help="Flip to a uniformly drawn other class, or always to the next class "
                         "(class-conditional noise, which a model partly learns).")
    ap.add_argument("--cleanlab-folds", type=int, default=None,
                    help="Folds of cleanlab's cross-validated baseline (0: skip).")
    ap.add_argument("--max-length", type=int, default=None, help="Tokens per article.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps.")
    ap.add_argument("--batch-size", type=int, default=16, help="Fine-tuning batch size.")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    ap.add_argument("--groups", type=int, default=None, help="K (groups).")
    ap.add_argument("--grouper", type=str, default="grad-kmeans",
                    help="Grouper name (grad-kmeans, kmeans-repr, kmeans-input, stratified...).")
    ap.add_argument("--no-per-class", action="store_true",
                    help="Cluster all rows together instead of within each noisy label.")
    ap.add_argument("--method", choices=("influence", "tracin"), default="influence",
                    help="Self-influence at the final weights (GGDA-Influence, identity), or "
                         "summed over parameter snapshots taken during fine-tuning "
                         "(GGDA-TracIn).")
    ap.add_argument("--checkpoints", type=int, default=None,
                    help="Evenly spaced snapshots for --method tracin.")
    ap.add_argument("--selection", choices=("head", "auto"), default="head",
                    help="Attributed parameters: the classifier head (last-layer influence) "
                         "or 'auto' (LoRA adapters + head).")
    ap.add_argument("--group-stat", choices=("mean", "per-row", "sum"), default="mean",
                    help="Group ranking: ‖g_G‖²/|G|² (mean), ‖g_G‖²/|G| (per-row) or ‖g_G‖².")
    ap.add_argument("--drill", type=float, default=0.15,
                    help="Share of rows drilled into (whole top groups).")
    ap.add_argument("--attr-batch-size", type=int, default=32, help="Rows per gradient pass.")
    ap.add_argument("--loop-sample", type=int, default=None,
                    help="Rows timed with a batch-1 gradient loop (0: skip).")
    args = parse_sized(ap, argv, FULL, QUICK)
    if not 0.0 < args.drill <= 1.0:
        ap.error(f"--drill must be in (0, 1], got {args.drill}.")
    return args


def group_statistic(self_influence: np.ndarray, sizes: np.ndarray, kind: str) -> np.ndarray:
    """Turn group self-influence ‖g_G‖² into a ranking statistic.

    Args:
        self_influence: (K,) group self-influence.
        sizes: (K,) group sizes.
        kind: ``"mean"`` (÷|G|²), ``"per-row"`` (÷|G|) or ``"sum"``.

    Returns:
        (K,) statistic, higher = more suspicious.
    """
    power = {"mean": 2.0, "per-row": 1.0, "sum": 0.0}[kind]
    return self_influence / sizes.astype(np.float64) ** power


def inspection_scores(group_of_row: np.ndarray, group_stat: np.ndarray,
                      drilled_rows: np.ndarray, point_si: np.ndarray) -> np.ndarray:
    """Suspicion of every row: drilled rows first (by point self-influence), then the others
    by their group's statistic (rows of one group tie).

    Args:
        group_of_row: (n,) group index of each row.
        group_stat: (K,) group statistic.
        drilled_rows: Indices of the drilled rows.
        point_si: Point self-influence of ``drilled_rows`` (same order).

    Returns:
        (n,) scores; a higher score is inspected earlier.
    """
    n = len(group_of_row)
    group_rank = np.empty(len(group_stat))
    group_rank[np.argsort(-group_stat, kind="stable")] = np.arange(len(group_stat))
    scores = -group_rank[group_of_row].astype(np.float64)  # in (-K, 0]
    order = np.argsort(-point_si, kind="stable")
    ranked = np.empty(len(point_si))
    ranked[order] = np.arange(len(point_si))
    scores[drilled_rows] = 2.0 * n - ranked  # above every undrilled row
    return scores


def point_self_influence(engine: Any, components: Sequence[Any], model: Any,
                         dataset: Any) -> np.ndarray:
    """Point-level self-influence Σ_c w_c ‖g_i(θ_c)‖² of every row (per-example gradients).

    Args:
        engine: A :class:`~hf_ggda.gradients.GradientEngine` on the attributed parameters.
        components: The attributor's components (checkpoints with weights; one for Influence).
        model: The model the components load their weights into.
        dataset: The rows.

    Returns:
        (n,) self-influence.
    """
    total = np.zeros(len(dataset))
    for comp in components:
        with comp.activate(model):
            grads = engine.per_example_gradients(dataset).gradients
        total += comp.weight * (grads.double() ** 2).sum(1).numpy()
        del grads
    return total


def cleanlab_baseline(train: Any, args: Any) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab on out-of-fold probabilities of fresh fine-tunes with the recipe's settings.

    Returns:
        (suspicion per row, cleanlab's flagged rows).
    """
    from _baselines import cleanlab_scores, out_of_fold_probs

    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.training import finetune

    def fit(rows: Any, seed: int) -> tuple[Any, Any]:
        model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=seed)
        task = SequenceClassificationTask(tokenizer, max_length=args.max_length)
        finetune(model, task, rows, args.steps, args.batch_size, args.lr, seed, desc=None)
        return model, task

    probs = out_of_fold_probs(train, args.cleanlab_folds, args.seed, fit)
    return cleanlab_scores(np.asarray(train["label"]), probs)


def flagged_figures(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision / recall of a flagged set against the flipped rows."""
    hits = float((flagged & truth.astype(bool)).sum())
    return {"flagged_fraction": float(flagged.mean()),
            "precision": hits / max(float(flagged.sum()), 1.0),
            "recall": hits / max(float(truth.sum()), 1.0)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes) the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.gradients import EngineConfig, GradientEngine
    from hf_ggda.grouping import get_grouper
    from hf_ggda.integrations.cards import write_attribution_card
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.training import finetune_with_snapshots

    times = Timings()
    train, val = bbc_splits([args.train_rows, args.val_rows], seed=args.seed)
    clean = np.asarray(train["label"])
    noisy, flipped = flip_labels(clean, args.noise, 5, args.seed)
    if args.noise_kind == "pair":  # the same rows, each flipped to the next class
        noisy = np.where(flipped.astype(bool), (clean + 1) % 5, clean)
    train = replace_column(train, "label", noisy.tolist())
    train = train.add_column("clean_label", clean.tolist(), feature=train.features["label"])
    train = train.add_column("flipped", flipped.tolist())
    train = train.add_column(ROW_COLUMN, list(range(len(train))))
    n = len(train)
    say(f"{n} training articles, {int(flipped.sum())} labels flipped; fine-tuning "
        f"{args.steps} steps")
    model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=args.seed)
    task = SequenceClassificationTask(tokenizer, max_length=args.max_length)
    with times.stage("finetune"):
        losses, snapshots = finetune_with_snapshots(
            model, task, train, args.steps, args.batch_size, args.lr, args.seed,
            min(args.checkpoints, args.steps) if args.method == "tracin" else 1)
    task.prepare(train)  # tokenisation is shared by every path: keep it out of the timings
    task.prepare(val)

    with times.stage("loss_ranking"):
        row_loss, _ = predict(model, task, train)

    selection = HEAD_SELECTION if args.selection == "head" else "auto"
    say(f"GGDA path: {args.grouper} (K = {args.groups}), group self-influence, drill-down")
    with times.stage("group_grouping"):
        kwargs: dict[str, Any] = {"num_groups": args.groups, "seed": args.seed}
        if args.grouper not in ("random", "column", "stratified") and not args.no_per_class:
            kwargs["per_class"] = True
        grouper = get_grouper(args.grouper, **kwargs)
        grouped = grouper.assign(train, model=model, task=task) if grouper.uses_model \
            else grouper.assign(train)
    attributor = make_attributor(args.method, model, task, snapshots, args.lr,
                                 args.attr_batch_size, selection)
    with times.stage("group_gradients"):
        attributor.fit(grouped)
        group_si = attributor.self_scores().double().numpy()
    ids = attributor.group_ids
    sizes = attributor.group_sizes
    index = {g: k for k, g in enumerate(ids)}
    group_of_row = np.array([index[g] for g in grouped["group_id"]])
    engine = GradientEngine(model, task, attributor.selection,
                            EngineConfig(batch_size=args.attr_batch_size))
    with times.stage("group_drilldown"):
        stat = group_statistic(group_si, sizes, args.group_stat)
        chosen = select_until(np.argsort(-stat, kind="stable"), sizes, args.drill * n)
        drilled = np.flatnonzero(np.isin(group_of_row, chosen))
        point_si = point_self_influence(engine, attributor.components, model,
                                        grouped.select(drilled))
    suspicion = inspection_scores(group_of_row, stat, drilled, point_si)
    group_path = ["group_grouping", "group_gradients", "group_drilldown"]

    say("Reference: full point-level self-influence")
    with times.stage("point_self_influence"):
        full_point_si = point_self_influence(engine, attributor.components, model, grouped)
    loop_per_row = None
    if args.loop_sample > 0:
        loop_engine = GradientEngine(model, task, attributor.selection,
                                     EngineConfig(batch_size=1))
        sample = grouped.select(range(min(args.loop_sample, n)))
        with times.stage("point_loop_sample"):
            point_self_influence(loop_engine, attributor.components, model, sample)
        loop_per_row = times.cpu["point_loop_sample"] / len(sample)

    clean_lab = None
    if args.cleanlab_folds:
        say(f"Baseline: cleanlab on {args.cleanlab_folds}-fold out-of-fold probabilities")
        with times.stage("cleanlab"):
            clean_lab = cleanlab_baseline(train, args)

    say("Validation scores (card) and figures")
    with times.stage("validation_scores"):
        scores = attributor.score(val, aggregate="sum", self_influence=True)
    val_total = scores.aggregated().double().numpy()

    results = {
        "ggda": detection(suspicion, flipped),
        "group_only": detection(stat[group_of_row], flipped),
        "point": detection(full_point_si, flipped),
        "loss": detection(row_loss, flipped),
        "random": detection(np.zeros(n), flipped),
        "validation_harm": detection(-(val_total / sizes)[group_of_row], flipped),
    }
    if clean_lab is not None:
        results["cleanlab"] = detection(clean_lab[0], flipped)
    group_cpu = times.total(group_path)
    figures: dict[str, Any] = {
        **recall_figures(results, {
            "ggda": ("", RECALLS + ("auc",)), "loss": ("loss_baseline_", RECALLS),
            "random": ("random_", RECALLS), "point": ("point_", RECALLS),
            "group_only": ("group_only_", RECALLS),
            "validation_harm": ("validation_harm_", ("recall_at_20",)),
            **({"cleanlab": ("cleanlab_", RECALLS)} if clean_lab is not None else {})}),
        "cleanlab_flagged": None if clean_lab is None else flagged_figures(clean_lab[1], flipped),
        "cost_cpu_s": {"ggda_path": group_cpu, "point_self_influence":
                       times.cpu["point_self_influence"], "loss_ranking":
                       times.cpu["loss_ranking"], "cleanlab": times.cpu.get("cleanlab"),
                       "finetune": times.cpu["finetune"]},
        "noise_kind": args.noise_kind,
        "cost_ratio_vs_point": group_cpu / times.cpu["point_self_influence"],
        "cost_ratio_vs_point_wall": times.total(group_path, "wall")
        / times.wall["point_self_influence"],
        "cost_ratio_vs_point_loop": None if loop_per_row is None
        else group_cpu / (loop_per_row * n),
        "drilled_fraction": len(drilled) / n,
        "flipped_in_drilled": float(flipped[drilled].sum() / max(flipped.sum(), 1)),
        "num_rows": n, "num_flipped": int(flipped.sum()), "num_groups": len(ids),
        "train_loss_first": float(np.mean(losses[:5])),
        "train_loss_last": float(np.mean(losses[-5:])),
        "method": args.method, "selection": attributor.selection.how,
        "parameters": attributor.selection.numel,
        "timings": times.to_dict(), "args": vars(args),
    }

    scored = scores.to_dataset_columns(grouped)
    point_col: list[Optional[float]] = [None] * n
    for r, v in zip(drilled, point_si):
        point_col[int(r)] = float(v)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-suspicion, kind="stable")] = np.arange(1, n + 1)
    scored = scored.add_column("ggda_point_self_influence", point_col)
    scored = scored.add_column("ggda_inspection_rank", rank.tolist())
    scored = scored.add_column("train_loss", row_loss.astype(float).tolist())
    with recipe_run(out, "noisy_labels", args) as run:
        run.dataset("train_scored", scored)
        curves = {title: found_curve(results[key], "flipped labels") for key, title in (
            ("ggda", "Flipped labels found (GGDA groups + drill-down)"),
            ("loss", "Flipped labels found (training-loss ranking)"))}
        write_attribution_card(
            run.folder("card"), scores, scored, model=model, query_dataset=val,
            grouping=f"{args.grouper} within each noisy label (K = {len(ids)})",
            pretty_name="BBC News with 10% flipped labels: GGDA noisy-label detection",
            curves=curves, limits=[
                "Labels were flipped on purpose (column `flipped`); `clean_label` is the truth.",
                "Group scores are against a clean validation split; detection uses "
                "self-influence (`ggda_self_influence`, `ggda_point_self_influence`)."],
            extra_metadata={"recipe": "noisy_labels",
                            "figures": {k: figures[k] for k in ("recall_at_10", "recall_at_20",
                                                                "loss_baseline_recall_at_20",
                                                                "cost_ratio_vs_point")}})
        write_figures(figures, args.json, run)
    print_summary(figures, times, out)
    return figures


def print_summary(fig: dict[str, Any], times: Timings, out: Path) -> None:
    """Print the headline table."""
    print(f"Noisy-label detection: {fig['num_flipped']} of {fig['num_rows']} labels flipped, "
          f"K = {fig['num_groups']} groups, {fig['method']}, attributed parameters: "
          f"{fig['selection']} ({fig['parameters']})")
    print(f"{'ranking':<34}{'recall@10%':>11}{'recall@20%':>11}")
    for name, key in (("GGDA groups + drill-down", ""), ("GGDA groups only", "group_only_"),
                      ("point self-influence (all rows)", "point_"),
                      ("training loss", "loss_baseline_"), ("random", "random_"),
                      ("cleanlab (out-of-fold)", "cleanlab_")):
        if fig.get(key + "recall_at_10") is None:
            continue
        print(f"{name:<34}{fig[key + 'recall_at_10']:>11.3f}{fig[key + 'recall_at_20']:>11.3f}")
    print(f"drilled {fig['drilled_fraction']:.1%} of rows holding "
          f"{fig['flipped_in_drilled']:.1%} of the flipped labels")
    loop = fig["cost_ratio_vs_point_loop"]
    print(f"cost of the GGDA path / full point self-influence: {fig['cost_ratio_vs_point']:.2f} "
          f"(CPU), {fig['cost_ratio_vs_point_wall']:.2f} (wall)"
          + (f"; / batch-1 loop (extrapolated): {loop:.2f}" if loop is not None else ""))
    print("CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.cpu.items()))
    print(f"Wrote {out}/train_scored, {out}/card, {out}/figures.json")


if __name__ == "__main__":
    main()
