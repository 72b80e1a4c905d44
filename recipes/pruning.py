"""Dataset pruning on BBC News with GGDA: drop the least helpful groups, retrain, compare.

For every seed: fine-tune MiniLM-L6 + LoRA (q, v; head saved) on the training split, group the
training rows with Grad-K-Means into equal-size groups within each label, score every group
against a validation split (GGDA-TracIn over parameter snapshots taken during fine-tuning, or
GGDA-Influence at the final weights with ``--method influence``; the validation loss summed:
one query gradient per snapshot), and drop the groups with the lowest score per row, within
each label, until about 10 / 20 / 30% of the rows are gone (groups that would overshoot the
budget by more than half their size are skipped; see :mod:`hf_ggda.pruning`). Retrain from
the same initialisation and seed, with the same number of steps, on the pruned data and on a
random subset of the same size; measure test accuracy.

Run::

    python recipes/pruning.py --json pruning.json                  # full: 3 seeds
    python recipes/pruning.py --quick --output /tmp/pr --json /tmp/pr.json
    python recipes/pruning.py --noise 0.1                           # with 10% flipped labels

Outputs under ``--output``: ``train_scored/`` (save_to_disk of the first seed's training rows
with ``group_id``, ``ggda_group_score``, ``ggda_group_rank`` and ``pruned_at_<p>`` flags),
``card/`` (attribution card with the accuracy-vs-pruned-fraction curve), ``figures.json``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (HEAD_SELECTION, Timings, accuracy, base_parser, bbc_splits,  # noqa: E402
                     flip_labels, make_attributor, parse_sized, recipe_run, replace_column, say,
                     setup_run, write_figures)

FULL = {"train_rows": 1000, "val_rows": 200, "test_rows": 800, "max_length": 64,
        "steps": 80, "batch_size": 16, "groups": 64, "seeds": [0, 1, 2], "checkpoints": 4}
QUICK = {"train_rows": 96, "val_rows": 16, "test_rows": 32, "max_length": 32, "steps": 4,
         "batch_size": 8, "groups": 32, "seeds": [0], "checkpoints": 2}


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/pruning")
    ap.add_argument("--train-rows", type=int, default=None, help="Training articles.")
    ap.add_argument("--val-rows", type=int, default=None, help="Validation articles (scores).")
    ap.add_argument("--test-rows", type=int, default=None, help="Test articles (accuracy).")
    ap.add_argument("--max-length", type=int, default=None, help="Tokens per article.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps (every run).")
    ap.add_argument("--batch-size", type=int, default=None, help="Fine-tuning batch size.")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate.")
    ap.add_argument("--groups", type=int, default=None, help="K (groups).")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                    help="Shares of the training rows to prune.")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="Training seeds (initialisation, batches, grouping, random pruning).")
    ap.add_argument("--method", choices=("tracin", "influence"), default="tracin",
                    help="GGDA-TracIn over snapshots, or GGDA-Influence (identity) at the end.")
    ap.add_argument("--checkpoints", type=int, default=None,
                    help="Evenly spaced parameter snapshots used by TracIn.")
    ap.add_argument("--selection", choices=("auto", "head"), default="auto",
                    help="Attributed parameters: LoRA adapters + head, or the head only.")
    ap.add_argument("--rank", choices=("per-row", "total"), default="per-row",
                    help="Order groups by score per row (density) or by total score.")
    ap.add_argument("--unbalanced-groups", action="store_true",
                    help="Plain grad-kmeans sizes (default: equal-size groups within each label, "
                         "so no single giant cluster is dropped at once).")
    ap.add_argument("--no-class-balance", action="store_true",
                    help="Prune the least helpful groups globally (default: the same share "
                         "within each label).")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="Share of training labels flipped before everything (0: clean).")
    ap.add_argument("--attr-batch-size", type=int, default=32, help="Rows per gradient pass.")
    ap.add_argument("--baselines", nargs="*", choices=ROW_BASELINES, default=list(ROW_BASELINES),
                    help="Row-level baselines pruned to the same sizes: 'el2n' drops the rows "
                         "of lowest EL2N score ‖softmax − onehot‖ (the easiest), 'loss' the "
                         "rows of highest training loss; both at the seed's fine-tuned model, "
                         "the same share within each label.")
    args = parse_sized(ap, argv, FULL, QUICK)
    if any(not 0.0 < f < 1.0 for f in args.fractions):
        ap.error(f"--fractions must be in (0, 1), got {args.fractions}.")
    return args


ROW_BASELINES = ("el2n", "loss")


def row_scores(model: Any, task: Any, data: Any) -> dict[str, np.ndarray]:
    """Per-row pruning scores, higher = pruned first: −EL2N (easy rows go) and the loss."""
    from _baselines import predict_probs

    probs = predict_probs(model, task, data)
    labels = np.asarray(data["label"])
    onehot = np.eye(probs.shape[1])[labels]
    el2n = np.linalg.norm(probs - onehot, axis=1)
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
    return {"el2n": -el2n, "loss": loss}


def prune_rows(score: np.ndarray, labels: np.ndarray, drop: int,
               balance: bool) -> np.ndarray:
    """Rows kept after dropping ``drop`` rows of highest ``score`` (the same share within
    each label when ``balance``)."""
    n = len(score)
    if not balance:
        return np.sort(np.argsort(-score, kind="stable")[drop:])
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = int(round(drop * len(rows) / n))
        out.append(rows[np.argsort(-score[rows], kind="stable")][k:])
    return np.sort(np.concatenate(out))


def key_of(fraction: float) -> str:
    """``0.2`` -> ``"20"`` (the suffix of the figure names)."""
    return f"{round(100 * fraction):d}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the recipe; returns (and writes) the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    from hf_ggda.data import load_minilm_classifier
    from hf_ggda.grouping import get_grouper
    from hf_ggda.integrations.cards import Curve, write_attribution_card
    from hf_ggda.pruning import choose_groups, prune_order
    from hf_ggda.tasks import SequenceClassificationTask
    from hf_ggda.training import finetune_with_snapshots

    times = Timings()
    train, val, test = bbc_splits([args.train_rows, args.val_rows, args.test_rows], args.seed)
    if args.noise > 0:
        noisy, _ = flip_labels(train["label"], args.noise, 5, args.seed)
        train = replace_column(train, "label", noisy.tolist())
    n = len(train)
    acc: dict[str, list[float]] = {"full": []}
    dropped: dict[str, list[float]] = {}
    for f in args.fractions:
        acc[f"pruned_{key_of(f)}"], acc[f"random_{key_of(f)}"] = [], []
        for b in args.baselines:
            acc[f"{b}_{key_of(f)}"] = []
        dropped[key_of(f)] = []
    first: Optional[dict[str, Any]] = None

    def train_and_test(model: Any, task: Any, init: dict[str, Any],
                       rows: Optional[np.ndarray], seed: int, label: str) -> list[Any]:
        model.load_state_dict(init)  # the seed's initial LoRA + head, every run
        data = train if rows is None else train.select(np.sort(rows))
        with times.stage("finetune"):
            _, snaps = finetune_with_snapshots(model, task, data, args.steps, args.batch_size,
                                               args.lr, seed, min(args.checkpoints, args.steps))
        with times.stage("evaluate"):
            acc[label].append(accuracy(model, task, test))
        say(f"seed {seed}: {label} ({len(data)} rows) test accuracy {acc[label][-1]:.4f}")
        return snaps

    for seed in args.seeds:
        model, tokenizer = load_minilm_classifier(num_labels=5, lora_r=8, seed=seed)
        task = SequenceClassificationTask(tokenizer, max_length=args.max_length)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        snapshots = train_and_test(model, task, init, None, seed, "full")
        with times.stage("attribution"):
            grouper = get_grouper("grad-kmeans", num_groups=args.groups, per_class=True,
                                  balanced=not args.unbalanced_groups, seed=seed)
            grouped = grouper.assign(train, model=model, task=task)
            selection = HEAD_SELECTION if args.selection == "head" else "auto"
            attributor = make_attributor(args.method, model, task, snapshots, args.lr,
                                         args.attr_batch_size, selection)
            attributor.fit(grouped)
            scores = attributor.score(val, aggregate="sum")
        totals = scores.aggregated().double().numpy()
        with times.stage("row_baselines"):
            baseline_scores = row_scores(model, task, train) if args.baselines else {}
        sizes = attributor.group_sizes
        index = {g: k for k, g in enumerate(attributor.group_ids)}
        group_of_row = np.array([index[g] for g in grouped["group_id"]])
        order = prune_order(totals, sizes, args.rank)
        labels = np.asarray(grouped["label"])
        class_of_group = np.zeros(len(sizes), dtype=np.int64)
        class_of_group[group_of_row] = labels
        rng = np.random.default_rng(1000 + seed)
        pruned_flags = {}
        if first is None:
            first = {"scores": scores, "grouped": grouped, "flags": pruned_flags,
                     "model": copy.deepcopy(model)}
        for f in args.fractions:
            drop = choose_groups(order, sizes, f,
                                 None if args.no_class_balance else class_of_group)
            keep = np.flatnonzero(~np.isin(group_of_row, drop))
            dropped[key_of(f)].append(1.0 - len(keep) / n)
            pruned_flags[key_of(f)] = np.isin(group_of_row, drop)
            train_and_test(model, task, init, keep, seed, f"pruned_{key_of(f)}")
            train_and_test(model, task, init, rng.choice(n, len(keep), replace=False), seed,
                           f"random_{key_of(f)}")
            for b in args.baselines:  # the same number of rows as the GGDA run drops
                train_and_test(model, task, init,
                               prune_rows(baseline_scores[b], np.asarray(train["label"]),
                                          n - len(keep), not args.no_class_balance),
                               seed, f"{b}_{key_of(f)}")

    means = {k: float(np.mean(v)) for k, v in acc.items()}
    figures: dict[str, Any] = {"acc_full": means["full"]}
    for f in args.fractions:
        k = key_of(f)
        figures[f"acc_pruned_{k}"] = means[f"pruned_{k}"]
        figures[f"acc_random_{k}"] = means[f"random_{k}"]
        for b in args.baselines:
            figures[f"acc_{b}_{k}"] = means[f"{b}_{k}"]
    figures.update({
        "baselines": list(args.baselines),
        "cost_s": {"ggda_attribution": times.wall.get("attribution", 0.0),
                   "row_baselines": times.wall.get("row_baselines", 0.0),
                   "finetune_runs": times.wall.get("finetune", 0.0)},
        "acc_std": {k: float(np.std(v)) for k, v in acc.items()},
        "acc_per_seed": acc,
        "dropped_fraction": {k: float(np.mean(v)) for k, v in dropped.items()},
        "seeds": list(args.seeds), "num_train": n, "num_test": len(test),
        "num_groups": args.groups, "timings": times.to_dict(), "args": vars(args)})

    assert first is not None
    scored = first["scores"].to_dataset_columns(first["grouped"])
    for k, flags in first["flags"].items():
        scored = scored.add_column(f"pruned_at_{k}", flags.astype(bool).tolist())
    with recipe_run(out, "pruning", args) as run:
        run.dataset("train_scored", scored)
        xs = [0.0] + [float(np.mean(dropped[key_of(f)])) for f in args.fractions]
        ys = [means["full"]] + [means[f"pruned_{key_of(f)}"] for f in args.fractions]
        yr = [means["full"]] + [means[f"random_{key_of(f)}"] for f in args.fractions]
        write_attribution_card(
            run.folder("card"), first["scores"], scored, model=first["model"], query_dataset=val,
            grouping=f"grad-kmeans within each label (K = {args.groups})",
            pretty_name="BBC News pruning with GGDA (least helpful groups dropped)",
            curves={"Test accuracy after pruning the least helpful groups (mean over seeds)":
                    Curve(xs, ys, xlabel="fraction of training rows pruned",
                          ylabel="test accuracy", baseline=(xs, yr))},
            limits=["The curve's baseline is random pruning of the same number of rows.",
                    f"Means over {len(args.seeds)} seed(s); see figures.json for the spread."],
            extra_metadata={"recipe": "pruning", "accuracy": means})
        write_figures(figures, args.json, run)
    print_summary(figures, args.fractions, out)
    return figures


def print_summary(fig: dict[str, Any], fractions: list[float], out: Path) -> None:
    """Print the headline table."""
    std = fig["acc_std"]
    print(f"Pruning BBC News ({fig['num_train']} training rows, K = {fig['num_groups']}, "
          f"seeds {fig['seeds']}): test accuracy, mean ± std over seeds")
    print(f"full data: {fig['acc_full']:.4f} ± {std['full']:.4f}")
    names = ["pruned", "random", *fig["baselines"]]
    print(f"{'pruned':>8}{'dropped':>9}" + "".join(f"{n if n != 'pruned' else 'GGDA':>18}"
                                                   for n in names))
    for f in fractions:
        k = key_of(f)
        print(f"{f:>8.0%}{fig['dropped_fraction'][k]:>9.1%}" + "".join(
            f"{fig['acc_' + n + '_' + k]:>11.4f} ± {std[n + '_' + k]:.4f}" for n in names))
    print(f"Wrote {out}/train_scored, {out}/card, {out}/figures.json")


if __name__ == "__main__":
    main()
