"""The ``hf-ggda`` command: group, attribute, self-influence, sources, prune, card, the demo.

Every subcommand reads local models and datasets (``save_to_disk`` folders or
json/jsonl/csv/parquet files), takes its options from the config dataclasses (``--help`` lists
each with its meaning), accepts ``--config FILE.json`` for the same options, and writes a
dataset folder with the score columns plus the scores. Errors print one line
(``hf-ggda: error: ...``), no traceback, and exit with status 2; ``hf-ggda --debug ...``
prints the traceback too. Inputs are checked before any computation: options (types, ranges,
unknown keys of ``--config``), output folders (not a file, never one of the inputs), and the
data against the model (labels vs the head, token ids vs the embeddings).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from .cli_common import (
    TaskArgs,
    _add_io,
    _check_outputs,
    _file_options,
    _int_at_least,
    _load,
    _Parser,
    _read_data,
    _validate,
)
from .errors import GGDAError, MissingColumnError, RunFolderError


def _build_parser() -> argparse.ArgumentParser:
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING
    from .grouping import GROUPERS

    parser = _Parser(prog="hf-ggda", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="On an error, print the full traceback as well.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Run the main job on the packaged MiniLM-L6 + BBC News.")
    demo.add_argument("--output", default="outputs/demo", help="Output folder.")
    demo.add_argument("--quick", action="store_true", help="A small, fast run (tests).")
    demo.add_argument("--num-groups", type=_int_at_least(1), default=32,
                      help="K, the number of groups.")
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
            g.add_argument("--num-labels", type=_int_at_least(1), default=None,
                           help="Classes of a new head.")
            TaskArgs.add_arguments(g)
        cls.config_class.add_arguments(g, prefix="g_")

    attribute = sub.add_parser("attribute", help="Score training groups against queries.")
    methods = attribute.add_subparsers(dest="method", required=True)
    for name, cfg in sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.items()):
        m = methods.add_parser(name, help=(cfg.__doc__ or "").strip().splitlines()[0])
        _add_io(m, queries=True)
        m.add_argument("--top-k", type=_int_at_least(1), default=5,
                       help="Top groups per query column.")
        m.add_argument("--drill-down", type=_int_at_least(0), default=0,
                       help="Re-score the rows of this many top groups at point level.")
        cfg.add_arguments(m, prefix="m_", exclude=("attributor_type",))

    selfinf = sub.add_parser("self-influence",
                             help="Rank groups by self-influence (noisy / harmful data).")
    s_methods = selfinf.add_subparsers(dest="method", required=True)
    for name, cfg in sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.items()):
        m = s_methods.add_parser(name, help=(cfg.__doc__ or "").strip().splitlines()[0])
        _add_io(m, queries=False)
        m.add_argument("--drill-down", type=_int_at_least(0), default=0,
                       help="Also compute row self-influence for the rows of this many groups "
                            "of highest self-influence.")
        cfg.add_arguments(m, prefix="m_", exclude=("attributor_type",))
    _add_prune_and_card(sub)
    from .cli_sources import add_sources_parser

    add_sources_parser(sub)
    from .viewer.cli import add_view_parser

    add_view_parser(sub)
    from .cli_examples import add_examples

    add_examples(parser)
    return parser


def _add_prune_and_card(sub: Any) -> None:
    from .pruning import RANKS

    run_help = ("Output folder of `hf-ggda attribute` (train/ with the group column, and "
                "scores/) or of `hf-ggda self-influence` (train/ and self_influence/).")
    prune = sub.add_parser("prune", help="Drop the least helpful groups of an attribute run, "
                                         "or the groups of highest self-influence.")
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
    card.add_argument("--top-k", type=_int_at_least(1), default=5,
                      help="Most helpful / harmful groups shown.")
    card.add_argument("--license", default=None, help="License in the card metadata.")


def _attribute(args: argparse.Namespace, with_queries: bool) -> None:
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING, get_attributor
    from .distributed import rank_and_world
    from .pipeline import RunWriter, score_queries, score_self

    cfg_cls = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[args.method]
    base = _file_options(args.config, [TaskArgs, cfg_cls])
    config = cfg_cls.from_args(args, {"attributor_type": args.method, **base}, prefix="m_")
    out = Path(args.output)
    query_path = args.queries if with_queries else None
    _check_outputs([out],  # the run folder: RunWriter replaces only an earlier run of ours
                   [args.train, query_path, args.store, args.model, args.adapter, args.config])
    model, task = _load(args, base)
    train = _read_data(args.train, "--train")
    queries = _read_data(args.queries, "--queries") if with_queries else None
    if args.group_column not in train.column_names:
        raise MissingColumnError(args.group_column, train.column_names, role="group column")
    _validate(task, model, train, *([queries] if with_queries else []))
    attributor = get_attributor(model, task, config)
    attributor.fit(train, group_column=args.group_column, store=args.store,
                   overwrite=args.overwrite)
    with RunWriter(out, kind=args.command, config=config.to_dict()) as run:
        if with_queries:
            result, train_out, query_out = score_queries(
                attributor, train, queries, group_column=args.group_column,
                drill_down=args.drill_down, top_k=args.top_k)
            run.dataset("queries", query_out)
        else:  # no query axis: never written as a query score
            result, train_out = score_self(attributor, train, group_column=args.group_column,
                                           drill_down=args.drill_down)
        run.dataset("train", train_out)
        run.result("scores" if with_queries else "self_influence", result)
        run.attributor_config(config)
    if rank_and_world()[0] == 0:
        print(f"Wrote {out}: {len(train_out)} training rows scored over "
              f"{len(attributor.group_ids)} groups.")


def _group(args: argparse.Namespace) -> None:
    import numpy as np

    from .distributed import rank_and_world
    from .grouping import GROUPERS, get_grouper
    from .grouping.base import skew_warning
    from .pipeline import write_dataset

    config_class = GROUPERS[args.grouper].config_class
    with_model = bool(getattr(args, "model", None))
    base = _file_options(args.config, [config_class] + ([TaskArgs] if with_model else []))
    config = config_class.from_args(args, base, prefix="g_")
    _check_outputs([], [args.data, getattr(args, "model", None),
                        getattr(args, "adapter", None), args.config],
                   datasets=[Path(args.output)])
    data = _read_data(args.data, "--data")
    model = task = None
    if with_model:
        model, task = _load(args, base)
        _validate(task, model, data)
    grouper = get_grouper(args.grouper, config=config)
    grouped = grouper.assign(data, model=model, task=task)
    write_dataset(grouped, args.output)
    report = grouper.describe()
    if rank_and_world()[0] == 0:
        print(f"Wrote {args.output}: {report.num_rows} rows in {report.num_groups} groups "
              f"(sizes {report.size_min}..{report.size_max}, median "
              f"{report.size_median}).")
        warning = skew_warning(np.asarray(report.sizes), hasattr(config, "balanced"))
        if warning:
            print(f"hf-ggda: warning: {warning}", file=sys.stderr)


def _load_run(run: str) -> tuple[Any, Any]:
    """(train rows, GroupScores or SelfInfluence) of a run folder.

    Raises:
        RunFolderError: Not a complete run folder, or one without a result.
        ScoresFileError: The result files fail their checks.
    """
    from .pipeline import read_run

    contents = read_run(run)
    if "train" not in contents.datasets or len(contents.results) != 1:
        raise RunFolderError(
            f"{run!r} is a {contents.kind!r} run without one result and its train/ rows: pass "
            "the --output folder of one `hf-ggda attribute` or `hf-ggda self-influence` run.")
    return contents.datasets["train"], next(iter(contents.results.values()))


def _prune(args: argparse.Namespace) -> None:
    from .pipeline import RunWriter
    from .pruning import prune_dataset

    out = Path(args.output)
    _check_outputs([out], [args.run])
    train, scores = _load_run(args.run)
    res = prune_dataset(train, scores, args.fraction, args.rank, args.balance_column)
    report = {"fraction": args.fraction, "rank": args.rank,
              "ranked_by": "self-influence (highest dropped first)"
              if scores.query_mode == "self" else "group score (least helpful dropped first)",
              "balance_column": args.balance_column, "rows": len(train),
              "kept_rows": len(res.kept), "dropped_fraction": res.dropped_fraction,
              "dropped_groups": [str(g) for g in res.dropped_groups]}
    with RunWriter(out, kind="prune", config={"run": str(args.run)}) as run:
        run.dataset("kept", res.kept)
        run.dataset("dropped", res.dropped)
        run.json("pruning.json", report)
    print(f"Wrote {out}: kept {len(res.kept)} of {len(train)} rows, dropped "
          f"{len(res.dropped_groups)} groups ({100 * res.dropped_fraction:.1f}% of the rows).")


def _card(args: argparse.Namespace) -> None:
    from .integrations.cards import write_attribution_card
    from .pipeline import RunWriter, read_run

    _check_outputs([Path(args.output)], [args.run])
    train, scores = _load_run(args.run)
    queries = read_run(args.run).datasets.get("queries")
    with RunWriter(Path(args.output), kind="card", config={"run": str(args.run)}) as run:
        readme = run.written_by(lambda folder: write_attribution_card(
            folder, scores, train, model_name=args.model_name, pretty_name=args.pretty_name,
            card_type=args.card_type, text_column=args.text_column,
            label_column=args.label_column, top_k=args.top_k, license=args.license,
            query_dataset=queries))
    print(f"Wrote {Path(args.output) / Path(readme).name} and its plots.")


def _one_line(err: BaseException) -> str:
    """The error as one line (its message already names the fix)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-ggda``.

    Returns:
        0 on success, 2 on an error (one ``hf-ggda: error: ...`` line, no traceback unless
        ``--debug``), 1 on an internal error (a bug: one line pointing at ``--debug``, which
        shows the traceback), 130 when interrupted.
    """
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            _check_outputs([Path(args.output)], [])
            run_demo(args.output, quick=args.quick, num_groups=args.num_groups,
                     seed=args.seed)
        elif args.command == "group":
            _group(args)
        elif args.command == "prune":
            _prune(args)
        elif args.command == "card":
            _card(args)
        elif args.command == "sources":
            from .cli_sources import run_sources

            run_sources(args)
        elif args.command == "view":
            from .viewer.cli import run_view

            run_view(args)
        else:
            _attribute(args, with_queries=args.command == "attribute")
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("hf-ggda: interrupted", file=sys.stderr)
        return 130
    except (GGDAError, OSError) as err:  # bad input: one line naming the fix, exit 2
        if args.debug:
            traceback.print_exc()
        print(f"hf-ggda: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(f"hf-ggda: internal error (a bug, not your input): {type(err).__name__}: "
              f"{_one_line(err)}; rerun with `hf-ggda --debug ...` for the traceback and "
              "report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
