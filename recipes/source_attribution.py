"""Which sources of my training data help or hurt my evaluation? Validated by retraining.

Twelve named sources of BBC News rows (``_sources_bench.py``: clean, hard-but-correct, flipped
labels, near-duplicates, a spurious marker, truncated, shuffled, off-topic) train a classifier
on the packaged MiniLM-L6's frozen features (mean-pooled, 128 tokens) with a linear head, by
seeded mini-batch AdamW with an L2 penalty. :func:`hf_ggda.sources.attribute_sources`
(GGDA-Influence, EK-FAC, one group per source) ranks the sources by their effect on the
validation loss, with bootstrap intervals, and drills into the two most harmful ones.

Validation: leave-one-source-out retraining from the same initialisation for every seed gives
each source's actual effect on the validation loss (Spearman with the prediction, per seed and
with an interval over sources); removing the r = 1, 2, 3 top-flagged sources is judged on the
held-out test set against removing r random sources and the r sources of highest mean
training loss (the baseline a user gets for free), each retrained over the same seeds.

Cost: GGDA (fit + score + bootstrap + drill-down) against one training run and against the
leave-one-source-out retraining it predicts, both on the same cached features; the shared
feature pass (embedding every article once) is reported beside them.

Why the frozen-feature setting: 12 × 3 leave-one-out retrainings plus the removal runs are
affordable on 2 CPU cores only for a head on cached features; the library call is the same for
a LoRA-fine-tuned model (see the README).

Run::

    python recipes/source_attribution.py --json sources.json
    python recipes/source_attribution.py --quick --output /tmp/src --json /tmp/src.json
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "benchmarks")]

from _common import Timings, base_parser, parse_sized, recipe_run, say, setup_run, write_figures  # noqa: E402
from _sources_bench import KINDS, Bench, build_bench  # noqa: E402

from hf_ggda.tasks import ROW_COLUMN  # noqa: E402

FULL = {"per_source": 100, "eval_rows": 200, "test_rows": 400, "pool_rows": 300, "seeds": 3,
        "epochs": 40, "random_draws": 12}
QUICK = {"per_source": 10, "eval_rows": 24, "test_rows": 24, "pool_rows": 20, "seeds": 2,
         "epochs": 10, "random_draws": 2}


def parse_args(argv: Optional[list[str]]) -> Any:
    """Parse the command line (sizes default to the full or ``--quick`` settings)."""
    ap = base_parser(__doc__.split("\n")[0], "outputs/source_attribution")
    for name, text in (("per-source", "Rows per source."), ("eval-rows", "Validation rows."),
                       ("test-rows", "Test rows."), ("pool-rows", "Candidates for hard rows."),
                       ("seeds", "Training seeds."), ("epochs", "Epochs per training run."),
                       ("random-draws", "Random source subsets per r (r >= 2).")):
        ap.add_argument(f"--{name}", type=int, default=None, help=text)
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate.")
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the mean loss.")
    ap.add_argument("--batch-size", type=int, default=32, help="Rows per step.")
    ap.add_argument("--preconditioner", default="ekfac", help="GGDA-Influence preconditioner.")
    ap.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples.")
    return parse_sized(ap, argv, FULL, QUICK)


def embed(texts: Sequence[str]) -> np.ndarray:
    """MiniLM-L6 features of the texts, cached by content."""
    from _fidelity_fast import cached_embeddings, default_cache_dir

    keys = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
    emb, _ = cached_embeddings(list(texts), keys, 128, default_cache_dir())
    return emb.astype(np.float64)


class Trainer:
    """Seeded mini-batch AdamW on a linear head: loss = mean CE + (l2 / 2)·‖θ‖².

    Args:
        x: (n, d) training features; y: (n,) labels.
        args: Parsed arguments (lr, l2, batch size, epochs).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, args: Any) -> None:
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(list(y)).long()
        self.args = args
        self.runs, self.seconds = 0, 0.0

    def fit(self, rows: np.ndarray, seed: int) -> torch.nn.Linear:
        """Train from the seed's initialisation on ``rows``."""
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = torch.nn.Linear(self.x.shape[1], 5).double()  # the same init for every rows
        opt = torch.optim.AdamW(model.parameters(), lr=self.args.lr, weight_decay=0.0)
        gen = np.random.default_rng(seed)
        x, y = self.x[torch.as_tensor(rows)], self.y[torch.as_tensor(rows)]
        for _ in range(self.args.epochs):
            order = torch.as_tensor(gen.permutation(len(rows)))
            for b in range(0, len(rows), self.args.batch_size):
                idx = order[b:b + self.args.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.5 * self.args.l2 * sum(
                    (p * p).sum() for p in model.parameters())
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.runs += 1
        self.seconds += time.perf_counter() - start
        return model.eval()


def losses(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy."""
    with torch.no_grad():
        return F.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(list(y)).long(),
                               reduction="none").numpy()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == np.asarray(list(y))).mean())


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def attribute(model: torch.nn.Module, bench: Bench, feats: dict[str, np.ndarray],
              args: Any) -> Any:
    """GGDA source attribution of the seed-0 model against the validation set."""
    from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, TensorTask
    from hf_ggda.sources import attribute_sources
    from hf_ggda.tasks import ROW_COLUMN

    n = len(bench.train)
    train = Dataset.from_dict({"x": feats["train"].tolist(), "y": list(bench.train["label"]),
                               "source": list(bench.train["source"]),
                               ROW_COLUMN: list(bench.train[ROW_COLUMN])})
    val = Dataset.from_dict({"x": feats["validation"].tolist(),
                             "y": list(bench.validation["label"])})
    attributor = InfluenceFunction(model, TensorTask(loss="cross_entropy"), InfluenceConfig(
        preconditioner=args.preconditioner, damping=n * args.l2, batch_size=256))
    return attribute_sources(attributor, train, {"validation": val}, "source",
                             bootstrap=args.bootstrap, seed=args.seed, drill_sources=2)


def retrain_effects(trainer: Trainer, bench: Bench, feats: dict[str, np.ndarray],
                    seeds: Sequence[int]) -> dict[str, Any]:
    """Full and leave-one-source-out runs per seed: validation loss sums, test accuracy."""
    src = np.asarray(list(bench.train["source"]))
    names = sorted(set(src))
    yv, yt = bench.validation["label"], bench.test["label"]
    out: dict[str, Any] = {"sources": names, "full": [], "loso": {s: [] for s in names}}
    for seed in seeds:
        full = trainer.fit(np.arange(len(src)), seed)
        out["full"].append({"val_loss": float(losses(full, feats["validation"], yv).sum()),
                            "test_acc": accuracy(full, feats["test"], yt)})
        for s in names:
            m = trainer.fit(np.flatnonzero(src != s), seed)
            out["loso"][s].append({"val_loss": float(losses(m, feats["validation"], yv).sum()),
                                   "test_acc": accuracy(m, feats["test"], yt)})
        say(f"seed {seed}: full + {len(names)} leave-one-source-out runs")
    return out


def removal_gain(trainer: Trainer, bench: Bench, feats: dict[str, np.ndarray],
                 drop: Sequence[str], seeds: Sequence[int], full: list[dict[str, float]]
                 ) -> float:
    """Mean over seeds of test accuracy(without ``drop``) − test accuracy(all)."""
    keep = np.flatnonzero(~np.isin(np.asarray(list(bench.train["source"])), list(drop)))
    return float(np.mean([accuracy(trainer.fit(keep, seed), feats["test"], bench.test["label"])
                          - f["test_acc"] for seed, f in zip(seeds, full)]))


def gains(trainer: Trainer, bench: Bench, feats: dict[str, np.ndarray], ranking: list[str],
          by_loss: list[str], effects: dict[str, Any], seeds: Sequence[int],
          draws: int, seed: int) -> dict[int, dict[str, float]]:
    """Test-accuracy gain of removing r sources chosen by GGDA, by loss, at random."""
    names, full = effects["sources"], effects["full"]
    single = {s: float(np.mean([l["test_acc"] - f["test_acc"] for l, f in
                                zip(effects["loso"][s], full)])) for s in names}
    rng = np.random.default_rng(seed + 7)
    out = {}
    for r in (1, 2, 3):
        pick = (lambda chosen: single[chosen[0]]) if r == 1 else \
            (lambda chosen: removal_gain(trainer, bench, feats, chosen, seeds, full))
        random_gain = float(np.mean(list(single.values()))) if r == 1 else float(np.mean(
            [pick(list(rng.choice(names, r, replace=False))) for _ in range(draws)]))
        out[r] = {"ggda": pick(ranking[:r]), "loss": pick(by_loss[:r]), "random": random_gain}
        say(f"r = {r}: {out[r]}")
    return out


def _interval(pred: np.ndarray, actual: np.ndarray, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = [spearman(pred[i], actual[i]) for i in
            (rng.integers(0, len(pred), len(pred)) for _ in range(1000))]
    vals = [v for v in vals if np.isfinite(v)]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def summarise(report: Any, effects: dict[str, Any], mean_loss: dict[str, float],
              seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Spearman(predicted, actual) per seed and pooled; the per-source table."""
    names = effects["sources"]
    table = {r["source"]: r for r in report.table.to_list()}
    pred = np.array([table[s]["score"] for s in names])
    deltas = np.array([[l["val_loss"] - f["val_loss"] for l, f in
                        zip(effects["loso"][s], effects["full"])] for s in names])  # (S, seeds)
    per_seed = [spearman(pred, deltas[:, j]) for j in range(deltas.shape[1])]
    mean_delta = deltas.mean(1)
    rho = {"mean_over_seeds": float(np.mean(per_seed)), "per_seed": per_seed,
           "seed_mean_effects": spearman(pred, mean_delta),
           "interval_over_sources": _interval(pred, mean_delta, seed)}
    acc = {s: float(np.mean([l["test_acc"] - f["test_acc"] for l, f in
                             zip(effects["loso"][s], effects["full"])])) for s in names}
    rows = [{"source": s, "kind": KINDS.get(s, "?"), "rows": table[s]["rows"],
             "predicted": table[s]["score"], "ci_low": table[s]["ci_low"],
             "ci_high": table[s]["ci_high"], "actual_val_loss_delta": float(mean_delta[i]),
             "actual_test_acc_delta_when_removed": acc[s], "mean_train_loss": mean_loss[s]}
            for i, s in enumerate(names)]
    return rho, sorted(rows, key=lambda r: r["predicted"])


def drill_figures(report: Any, bench: Bench) -> dict[str, Any]:
    """Within each drilled source: do the most harmful point scores find its corrupted rows?

    Returns:
        {source: {"rows", "corrupt", "auc"}}; AUC of −(point score) against the ``corrupt``
        flag (None where the source's rows are all corrupted or all clean).
    """
    from sklearn.metrics import roc_auc_score

    point = report.point_scores()
    corrupt = list(bench.train["corrupt"])
    src = list(bench.train["source"])
    out = {}
    for name in sorted({s for flagged in report.flagged.values() for s in flagged}):
        rows = [r for r in point if src[r] == name]
        flags = [corrupt[r] for r in rows]
        auc = None if len(set(flags)) < 2 else \
            float(roc_auc_score(flags, [-point[r] for r in rows]))
        out[str(name)] = {"rows": len(rows), "corrupt": int(sum(flags)), "auc": auc}
    return out


def write_outputs(run: Any, bench: Bench, report: Any) -> None:
    """The scored training rows, the report files and the attribution card, into the run."""
    from hf_ggda.atomic import atomic_write_bytes
    from hf_ggda.integrations.cards import write_attribution_card

    scored = report.to_dataset_columns(bench.train)
    run.dataset("train_scored", scored)
    report.save(run.folder("report"))
    readme = write_attribution_card(
        run.folder("card"), report.scores["validation"], bench.train, group_column="source",
        model_name="MiniLM-L6 features + linear head", pretty_name="Source attribution bench",
        grouping="one group per named source", limits=[
            "Scores predict the effect of removing a whole source on the validation loss "
            "(first-order influence); intervals are bootstrap intervals over validation rows."])
    atomic_write_bytes(readme, (readme.read_text() + "\n## Sources\n\n" + report.to_markdown()
                                + "\n\n![sources](../report/sources.png)\n").encode())


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the bench; print and write the figures."""
    args = parse_args(argv)
    out = setup_run(args)
    times = Timings()
    cache: dict[str, np.ndarray] = {}

    def feats_of(data: Dataset) -> np.ndarray:
        key = hashlib.sha256("\n".join(list(data["text"])).encode()).hexdigest()
        if key not in cache:
            cache[key] = embed(list(data["text"]))
        return cache[key]

    def hard_losses(clean: Dataset, pool: Dataset) -> np.ndarray:
        model = Trainer(feats_of(clean), clean["label"], args).fit(np.arange(len(clean)), 99)
        return losses(model, feats_of(pool), pool["label"])

    with times.stage("features"):
        bench = build_bench(args.per_source, args.eval_rows, args.test_rows, args.pool_rows,
                            args.seed, hard_losses)
        # one row key shared by the text rows and the feature rows that are attributed
        bench.train = bench.train.add_column(ROW_COLUMN, list(range(len(bench.train))))
        feats = {k: feats_of(getattr(bench, k)) for k in ("train", "validation", "test")}
    trainer = Trainer(feats["train"], bench.train["label"], args)
    seeds = [args.seed + s for s in range(args.seeds)]
    model = trainer.fit(np.arange(len(bench.train)), seeds[0])
    one_run = trainer.seconds
    with times.stage("ggda"):
        report = attribute(model, bench, feats, args)
    src = np.asarray(list(bench.train["source"]))
    row_loss = losses(model, feats["train"], bench.train["label"])
    mean_loss = {s: float(row_loss[src == s].mean()) for s in sorted(set(src))}
    with times.stage("loso"):
        effects = retrain_effects(trainer, bench, feats, seeds)
    rho, per_source = summarise(report, effects, mean_loss, args.seed)
    by_loss = sorted(mean_loss, key=lambda s: -mean_loss[s])
    gain = gains(trainer, bench, feats, report.ranking("validation"), by_loss, effects, seeds,
                 args.random_draws, args.seed)
    loso_runs = len(seeds) * (1 + len(mean_loss))
    figures = {
        "spearman_loso": rho, "gain_top_r": gain, "per_source": per_source,
        "flagged": [str(s) for s in report.ranking("validation")[:3]],
        "drill_down": drill_figures(report, bench),
        "highest_loss": by_loss[:3],
        "cost_ratio": {"ggda_over_one_training": times.wall["ggda"] / one_run,
                       "ggda_over_loso": times.wall["ggda"] / times.wall["loso"],
                       "loso_runs": loso_runs},
        "cost_s": {"ggda": times.wall["ggda"], "one_training": one_run,
                   "loso": times.wall["loso"], "shared_features": times.wall["features"]},
        "setting": {k: getattr(args, k) for k in (*FULL, "lr", "l2", "batch_size",
                                                  "preconditioner", "bootstrap", "seed")},
        "command": " ".join(["python recipes/source_attribution.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d")}
    with recipe_run(out, "source_attribution", args) as run:
        write_outputs(run, bench, report)
        write_figures(figures, args.json, run)
    print(f"Spearman(predicted, leave-one-source-out) = {rho['mean_over_seeds']:.3f} "
          f"(per seed {[round(v, 3) for v in rho['per_seed']]}); gains {gain}; "
          f"GGDA {figures['cost_ratio']['ggda_over_loso']:.4f} x the LOSO retraining")
    return figures


if __name__ == "__main__":
    main()
