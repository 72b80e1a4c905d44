"""The ``hf-ggda`` command: group, attribute, self-influence, prune, card, and the demo.

Every subcommand reads local models and datasets (``save_to_disk`` folders or
json/jsonl/csv/parquet files), takes its options from the config dataclasses (``--help`` lists
each with its meaning), accepts ``--config FILE.json`` for the same options, and writes a
dataset folder with the score columns plus the scores. Errors print one line, no traceback,
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ConfigMixin
from .errors import GGDAError


@dataclass
class TaskArgs(ConfigMixin):
    """How rows become model inputs and losses (see :mod:`hf_ggda.tasks`)."""

    task_type: str = field(default="classification",
                           metadata={"help": "'classification' or 'causal-lm'."})
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    label_column: str = field(default="label",
                              metadata={"help": "Column with class ids (classification)."})
    prompt_column: Optional[str] = field(
        default=None, metadata={"help": "Prompt column (causal-lm; not a target)."})
    response_column: Optional[str] = field(
        default=None, metadata={"help": "Response column (causal-lm; the targets)."})
    max_length: int = field(default=128, metadata={"help": "Truncation length in tokens."})
    reduction: str = field(default="mean",
                           metadata={"help": "Per-row token-loss reduction: mean or sum."})

    def build(self, tokenizer: Any) -> Any:
        """Instantiate the task.

        Raises:
            ValueError: Unknown task type.
        """
        from .tasks import CausalLMTask, SequenceClassificationTask

        if self.task_type == "classification":
            return SequenceClassificationTask(tokenizer, self.text_column, self.label_column,
                                              max_length=self.max_length)
        if self.task_type == "causal-lm":
            return CausalLMTask(tokenizer, self.text_column, self.prompt_column,
                                self.response_column, self.max_length, self.reduction)
        raise ValueError(f"--task-type must be 'classification' or 'causal-lm', got "
                         f"{self.task_type!r}.")


def _add_io(p: argparse.ArgumentParser, queries: bool) -> None:
    p.add_argument("--model", required=True,
                   help="Local model folder (transformers format), or 'minilm' for the "
                        "packaged MiniLM-L6.")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to attach.")
    p.add_argument("--num-labels", type=int, default=None,
                   help="Classes of a new classification head (when the model has none).")
    p.add_argument("--train", required=True,
                   help="Training data: save_to_disk folder or .json/.jsonl/.csv/.parquet.")
    if queries:
        p.add_argument("--queries", required=True, help="Query data (same formats).")
    p.add_argument("--group-column", default="group_id",
                   help="Column of group ids in the training data (see `hf-ggda group`).")
    p.add_argument("--store", default=None, help="Resumable gradient store folder.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a store made for another request instead of failing.")
    p.add_argument("--output", required=True, help="Output folder (dataset + scores).")
    p.add_argument("--config", default=None, help="JSON file with any of these options.")
    TaskArgs.add_arguments(p)


def _build_parser() -> argparse.ArgumentParser:
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING
    from .grouping import GROUPERS

    parser = argparse.ArgumentParser(prog="hf-ggda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Run the main job on the packaged MiniLM-L6 + BBC News.")
    demo.add_argument("--output", default="outputs/demo", help="Output folder.")
    demo.add_argument("--quick", action="store_true", help="A small, fast run (tests).")
    demo.add_argument("--num-groups", type=int, default=32, help="K, the number of groups.")
    demo.add_argument("--seed", type=int, default=0, help="Seed of data split and training.")

    group = sub.add_parser("group", help="Add a group_id column (Dataset.map groupers).")
    groupers = group.add_subparsers(dest="grouper", required=True)
    for name, cls in sorted(GROUPERS.items()):
        g = groupers.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0])
        g.add_argument("--data", required=True, help="Dataset folder or file.")
        g.add_argument("--output", required=True, help="Output dataset folder.")
        g.add_argument("--config", default=None, help="JSON file with any of these options.")
        if name in ("kmeans-repr", "grad-kmeans"):
            g.add_argument("--model", required=True, help="Model folder.")
            g.add_argument("--adapter", default=None, help="PEFT adapter folder.")
            g.add_argument("--num-labels", type=int, default=None,
                           help="Classes of a new head.")
            TaskArgs.add_arguments(g)
        cls.config_class.add_arguments(g, prefix="g_")

    attribute = sub.add_parser("attribute", help="Score training groups against queries.")
    methods = attribute.add_subparsers(dest="method", required=True)
    for name, cfg in sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.items()):
        m = methods.add_parser(name, help=(cfg.__doc__ or "").strip().splitlines()[0])
        _add_io(m, queries=True)
        m.add_argument("--top-k", type=int, default=5, help="Top groups per query column.")
        m.add_argument("--drill-down", type=int, default=0,
                       help="Re-score the rows of this many top groups at point level.")
        cfg.add_arguments(m, prefix="m_", exclude=("attributor_type",))

    selfinf = sub.add_parser("self-influence",
                             help="Rank groups by self-influence (noisy / harmful data).")
    s_methods = selfinf.add_subparsers(dest="method", required=True)
    for name, cfg in sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.items()):
        m = s_methods.add_parser(name, help=(cfg.__doc__ or "").strip().splitlines()[0])
        _add_io(m, queries=False)
        cfg.add_arguments(m, prefix="m_", exclude=("attributor_type",))
    _add_prune_and_card(sub)
    return parser


def _add_prune_and_card(sub: Any) -> None:
    from .pruning import RANKS

    run_help = ("Output folder of `hf-ggda attribute` (its train/ dataset with the group "
                "column, and scores/).")
    prune = sub.add_parser("prune", help="Drop the least helpful groups of a scored run.")
    prune.add_argument("--run", required=True, help=run_help)
    prune.add_argument("--fraction", type=float, default=0.2,
                       help="Share of the training rows to drop, in [0, 1).")
    prune.add_argument("--rank", choices=RANKS, default="per-row",
                       help="Order groups by score per row (a dense harm first) or in total.")
    prune.add_argument("--balance-column", default=None,
                       help="Drop the same share within each value of this column (e.g. "
                            "label, when groups were made per class).")
    prune.add_argument("--output", required=True,
                       help="Folder for kept/ and dropped/ (save_to_disk) and pruning.json.")
    card = sub.add_parser("card", help="Write an attribution card (README.md + PNG plots).")
    card.add_argument("--run", required=True, help=run_help)
    card.add_argument("--output", required=True, help="Card folder.")
    card.add_argument("--model-name", default=None, help="Model name shown on the card.")
    card.add_argument("--pretty-name", default=None, help="Title of the card.")
    card.add_argument("--card-type", choices=("dataset", "model"), default="dataset",
                      help="A Hub dataset card or model card.")
    card.add_argument("--text-column", default="text", help="Column shown as example rows.")
    card.add_argument("--label-column", default="label", help="Label column (if any).")
    card.add_argument("--top-k", type=int, default=5, help="Most helpful / harmful groups shown.")
    card.add_argument("--license", default=None, help="License in the card metadata.")


def _file_options(path: Optional[str]) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No config file at {path!r}.")
    return json.loads(p.read_text())


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .integrations.io import load_local_model

    base = _file_options(getattr(args, "config", None))
    targs = TaskArgs.from_args(args, base)
    path = args.model
    if path == "minilm":
        from .data import minilm_path

        path = minilm_path()
    model, tokenizer = load_local_model(path, targs.task_type, args.adapter, args.num_labels)
    return model, targs.build(tokenizer), base


def _attribute(args: argparse.Namespace, with_queries: bool) -> None:
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING, get_attributor
    from .integrations.distributed import barrier, rank_and_world
    from .integrations.io import load_local_dataset
    from .logging import get_logger

    model, task, base = _load(args)
    cfg_cls = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[args.method]
    config = cfg_cls.from_args(args, {"attributor_type": args.method, **base}, prefix="m_")
    train = load_local_dataset(args.train)
    attributor = get_attributor(model, task, config)
    attributor.fit(train, group_column=args.group_column, store=args.store,
                   overwrite=args.overwrite)
    out = Path(args.output)
    rank, _ = rank_and_world()
    if with_queries:
        queries = load_local_dataset(args.queries)
        scores = attributor.score(queries, self_influence=False)
        if args.drill_down:
            scores = attributor.refine(scores, top_k=args.drill_down, query_dataset=queries)
    else:
        scores = attributor.score(train.select(range(1)), self_influence=True)
    train_out = scores.to_dataset_columns(train, group_column=args.group_column)
    if rank == 0:  # one writer; every process computed the same scores
        if with_queries:
            scores.to_query_columns(queries, k=args.top_k).save_to_disk(str(out / "queries"))
        train_out.save_to_disk(str(out / "train"))
        scores.save_pretrained(str(out / "scores"))
        config.save_pretrained(str(out))
    barrier()
    get_logger(__name__).info("Wrote %s (train/, scores/%s).", out,
                              ", queries/" if with_queries else "")
    if rank == 0:
        print(f"Wrote {out}: {len(train_out)} training rows scored over "
              f"{len(attributor.group_ids)} groups.")


def _group(args: argparse.Namespace) -> None:
    from .grouping import GROUPERS, get_grouper
    from .integrations.distributed import barrier, rank_and_world
    from .integrations.io import load_local_dataset

    data = load_local_dataset(args.data)
    model = task = None
    if getattr(args, "model", None):
        model, task, base = _load(args)
    else:
        base = _file_options(args.config)
    config = GROUPERS[args.grouper].config_class.from_args(args, base, prefix="g_")
    grouper = get_grouper(args.grouper, config=config)
    grouped = grouper.assign(data, model=model, task=task)
    if rank_and_world()[0] == 0:
        grouped.save_to_disk(args.output)
    barrier()
    report = grouper.describe()
    if rank_and_world()[0] == 0:
        print(f"Wrote {args.output}: {report.num_rows} rows in {report.num_groups} groups "
              f"(sizes {report.size_min}..{report.size_max}, median "
              f"{report.size_median}).")


def _load_run(run: str) -> tuple[Any, Any]:
    from .integrations.io import load_local_dataset
    from .scores import GroupScores

    folder = Path(run)
    if not (folder / "scores").is_dir():
        raise FileNotFoundError(f"No scores/ folder in {run!r}: pass the --output folder of "
                                "`hf-ggda attribute` or `hf-ggda self-influence`.")
    return load_local_dataset(str(folder / "train")), \
        GroupScores.from_pretrained(folder / "scores")


def _prune(args: argparse.Namespace) -> None:
    from .integrations.hub import save_dataset_atomic
    from .pruning import prune_dataset
    from .store import atomic_write_bytes

    train, scores = _load_run(args.run)
    res = prune_dataset(train, scores, args.fraction, args.rank, args.balance_column)
    out = Path(args.output)
    save_dataset_atomic(res.kept, out / "kept")
    save_dataset_atomic(res.dropped, out / "dropped")
    report = {"fraction": args.fraction, "rank": args.rank,
              "balance_column": args.balance_column, "rows": len(train),
              "kept_rows": len(res.kept), "dropped_fraction": res.dropped_fraction,
              "dropped_groups": [str(g) for g in res.dropped_groups]}
    atomic_write_bytes(out / "pruning.json", json.dumps(report, indent=1).encode())
    print(f"Wrote {out}: kept {len(res.kept)} of {len(train)} rows, dropped "
          f"{len(res.dropped_groups)} groups ({100 * res.dropped_fraction:.1f}% of the rows).")


def _card(args: argparse.Namespace) -> None:
    from .integrations.cards import write_attribution_card
    from .integrations.io import load_local_dataset

    train, scores = _load_run(args.run)
    queries = Path(args.run) / "queries"
    readme = write_attribution_card(
        args.output, scores, train, model_name=args.model_name, pretty_name=args.pretty_name,
        card_type=args.card_type, text_column=args.text_column,
        label_column=args.label_column, top_k=args.top_k, license=args.license,
        query_dataset=load_local_dataset(str(queries)) if queries.is_dir() else None)
    print(f"Wrote {readme} and its plots.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-ggda``.

    Returns:
        0 on success, 2 on a user error (message printed, no traceback).
    """
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.output, quick=args.quick, num_groups=args.num_groups,
                     seed=args.seed)
        elif args.command == "group":
            _group(args)
        elif args.command == "prune":
            _prune(args)
        elif args.command == "card":
            _card(args)
        else:
            _attribute(args, with_queries=args.command == "attribute")
    except (GGDAError, ValueError, RuntimeError, FileNotFoundError, FloatingPointError,
            KeyError) as err:  # GGDAError: the store's OSError kinds (path is a file...)
        print(f"hf-ggda: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
