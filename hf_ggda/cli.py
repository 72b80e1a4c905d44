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
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence

from .config import CLASS_KEY, ConfigMixin, check_known_keys, read_json_options
from .errors import (DataFileError, GGDAError, MissingColumnError, ModelLoadError,
                     OutputPathError)


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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``hf-ggda: error: ...`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print one error line naming the --help of this (sub)command and exit 2."""
        sys.stderr.write(f"hf-ggda: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``low`` (checked before any computation)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _add_io(p: argparse.ArgumentParser, queries: bool) -> None:
    p.add_argument("--model", required=True,
                   help="Local model folder (transformers format), or 'minilm' for the "
                        "packaged MiniLM-L6.")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to attach.")
    p.add_argument("--num-labels", type=_int_at_least(1), default=None,
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


def _file_options(path: Optional[str], classes: Iterable[type]) -> dict[str, Any]:
    """Read a --config file and refuse keys none of ``classes`` has.

    Raises:
        FileNotFoundError: No such file.
        ConfigError: Bad JSON, not an object, or an unknown key (the closest valid one named).
    """
    if path is None:
        return {}
    data = read_json_options(path)
    check_known_keys(data, classes, where=f"options in --config {path!r}", extra=(CLASS_KEY,))
    data.pop(CLASS_KEY, None)
    return data


def _check_outputs(outputs: Sequence[Path], inputs: Sequence[Optional[str]],
                   files: Sequence[Path] = (), datasets: Sequence[Path] = ()) -> None:
    """Refuse output paths that are (or lie under) files, or whose writing would replace an
    input (e.g. re-scoring a run in place: ``--train run/train --output run``), before any
    computation.

    Args:
        outputs: Output folders (that may exist).
        inputs: Input paths given on the command line (None: not given).
        files: Output files (an existing file is replaced; a folder there is refused).
        datasets: Dataset folders written by ``save_dataset_atomic``: only an empty one, or
            one an earlier hf_ggda run wrote, may already exist.

    Raises:
        OutputPathError: With the fix (another output folder).
    """
    from .integrations.hub import check_replaceable

    for out in [*outputs, *files, *datasets]:
        for parent in [out, *out.parents]:
            if parent == out and out in files:
                if out.is_dir():
                    raise OutputPathError(f"The output file {str(out)!r} is a folder; move it "
                                          "away or pass another --output folder.")
                continue
            if parent.exists() and not parent.is_dir():
                where = "is" if parent == out else f"lies under {str(parent)!r}, which is"
                raise OutputPathError(f"The output path {str(out)!r} {where} a file, not a "
                                      "folder; pass a new path or an existing folder.")
        target = Path(os.path.abspath(out))
        for given in inputs:
            if given is None or given == "minilm":
                continue
            source = Path(os.path.abspath(given))
            if source == target or target in source.parents:
                raise OutputPathError(
                    f"Writing {str(out)!r} would replace the input {given!r} while it is "
                    "read (re-scoring a run in place?); pass another --output folder.")
            if source in target.parents and (source / "state.json").is_file():
                raise OutputPathError(
                    f"Writing {str(out)!r} would put outputs inside the input dataset folder "
                    f"{given!r} (a save_to_disk folder); pass an --output folder outside it.")
    for folder in datasets:
        check_replaceable(folder)


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by hf_ggda's own code (its message is already ours)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = str(Path(__file__).resolve().parent)
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(here)


def _cause(err: BaseException) -> str:
    inner = err.__cause__ or err.__context__ or err
    return f"{type(inner).__name__}: {' '.join(str(inner).split())}"


def _read_data(spec: str, option: str) -> Any:
    """Load a dataset for an option; a library's failure becomes one typed error.

    Raises:
        FileNotFoundError: No such path.
        DataFileError: The file or folder cannot be read as a dataset.
    """
    from .integrations.io import load_local_dataset

    try:
        return load_local_dataset(spec)
    except Exception as err:  # noqa: BLE001 - datasets / pyarrow raise many kinds
        if isinstance(err, (GGDAError, FileNotFoundError)) or _raised_here(err):
            raise
        raise DataFileError(f"Cannot read {option} {spec!r} as a dataset ({_cause(err)}). "
                            "Pass a folder written by Dataset.save_to_disk or a well-formed "
                            ".json/.jsonl/.csv/.parquet file with a header / one object per "
                            "line.") from err


def _validate(task: Any, model: Any, *datasets: Any) -> None:
    """Check the data against the model (labels vs head, ids vs embeddings) before any pass."""
    for data in datasets:
        task.validate(task.prepare(data), model)


def _load(args: argparse.Namespace, base: dict[str, Any]) -> tuple[Any, Any]:
    """Load the model, its tokenizer and the task.

    Raises:
        FileNotFoundError: No model / adapter folder.
        ModelLoadError: transformers / peft cannot load the folder.
        ConfigError: Bad task options.
    """
    from .integrations.io import load_local_model

    targs = TaskArgs.from_args(args, base)
    path = args.model
    if path == "minilm":
        from .data import minilm_path

        path = minilm_path()
    try:
        model, tokenizer = load_local_model(path, targs.task_type, args.adapter,
                                            args.num_labels)
    except Exception as err:  # noqa: BLE001 - transformers / peft raise many kinds
        if isinstance(err, (GGDAError, FileNotFoundError)) or _raised_here(err):
            raise
        raise ModelLoadError(
            f"Cannot load the model {args.model!r}"
            f"{f' with the adapter {args.adapter!r}' if args.adapter else ''} ({_cause(err)}). "
            "Pass a folder written by save_pretrained (config.json, weights and tokenizer "
            "files), check --task-type, and --num-labels against the saved head."
        ) from err
    return model, targs.build(tokenizer)


def _attribute(args: argparse.Namespace, with_queries: bool) -> None:
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING, get_attributor
    from .integrations.distributed import barrier, rank_and_world
    from .integrations.hub import save_dataset_atomic
    from .logging import get_logger

    cfg_cls = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[args.method]
    base = _file_options(args.config, [TaskArgs, cfg_cls])
    config = cfg_cls.from_args(args, {"attributor_type": args.method, **base}, prefix="m_")
    out = Path(args.output)
    query_path = args.queries if with_queries else None
    _check_outputs([out / ("scores" if with_queries else "self_influence")],
                   [args.train, query_path, args.store, args.model, args.adapter, args.config],
                   files=[out / "ggda_config.json"],
                   datasets=[out / "train", *([out / "queries"] if with_queries else [])])
    model, task = _load(args, base)
    train = _read_data(args.train, "--train")
    queries = _read_data(args.queries, "--queries") if with_queries else None
    if args.group_column not in train.column_names:
        raise MissingColumnError(args.group_column, train.column_names, role="group column")
    _validate(task, model, train, *([queries] if with_queries else []))
    attributor = get_attributor(model, task, config)
    attributor.fit(train, group_column=args.group_column, store=args.store,
                   overwrite=args.overwrite)
    rank, _ = rank_and_world()
    result: Any
    if with_queries:
        result = attributor.score(queries, self_influence=False)
        if args.drill_down:
            result = attributor.refine(result, top_k=args.drill_down, query_dataset=queries)
    else:  # no query axis: never written as a query score
        result = attributor.self_influence(drill_top=args.drill_down)
    train_out = result.to_dataset_columns(train, group_column=args.group_column)
    if rank == 0:  # one writer; every process computed the same scores
        if with_queries:
            save_dataset_atomic(result.to_query_columns(queries, k=args.top_k), out / "queries")
        save_dataset_atomic(train_out, out / "train")
        result.save_pretrained(str(out / ("scores" if with_queries else "self_influence")))
        config.save_pretrained(str(out))
    barrier()
    get_logger(__name__).info("Wrote %s (train/, %s).", out,
                              "scores/, queries/" if with_queries else "self_influence/")
    if rank == 0:
        print(f"Wrote {out}: {len(train_out)} training rows scored over "
              f"{len(attributor.group_ids)} groups.")


def _group(args: argparse.Namespace) -> None:
    from .grouping import GROUPERS, get_grouper
    from .grouping.base import skew_warning

    import numpy as np
    from .integrations.distributed import barrier, rank_and_world
    from .integrations.hub import save_dataset_atomic

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
    if rank_and_world()[0] == 0:
        save_dataset_atomic(grouped, Path(args.output))
    barrier()
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
        FileNotFoundError: Neither scores/ nor self_influence/ is in the folder.
        ScoresFileError: The result files fail their checks.
    """
    from .scores import GroupScores
    from .self_influence import SelfInfluence

    folder = Path(run)
    found = [name for name in ("scores", "self_influence") if (folder / name).is_dir()]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{'Both' if found else 'Neither'} scores/ {'and' if found else 'nor'} "
            f"self_influence/ in {run!r}: pass the --output folder of one `hf-ggda attribute` "
            "or `hf-ggda self-influence` run.")
    loader = GroupScores if found[0] == "scores" else SelfInfluence
    return _read_data(str(folder / "train"), "--run train/"), \
        loader.from_pretrained(folder / found[0])


def _prune(args: argparse.Namespace) -> None:
    from .integrations.hub import save_dataset_atomic
    from .pruning import prune_dataset
    from .store import atomic_write_bytes

    out = Path(args.output)
    _check_outputs([], [args.run], files=[out / "pruning.json"],
                   datasets=[out / "kept", out / "dropped"])
    train, scores = _load_run(args.run)
    res = prune_dataset(train, scores, args.fraction, args.rank, args.balance_column)
    save_dataset_atomic(res.kept, out / "kept")
    save_dataset_atomic(res.dropped, out / "dropped")
    report = {"fraction": args.fraction, "rank": args.rank,
              "ranked_by": "self-influence (highest dropped first)"
              if scores.query_mode == "self" else "group score (least helpful dropped first)",
              "balance_column": args.balance_column, "rows": len(train),
              "kept_rows": len(res.kept), "dropped_fraction": res.dropped_fraction,
              "dropped_groups": [str(g) for g in res.dropped_groups]}
    atomic_write_bytes(out / "pruning.json", json.dumps(report, indent=1).encode())
    print(f"Wrote {out}: kept {len(res.kept)} of {len(train)} rows, dropped "
          f"{len(res.dropped_groups)} groups ({100 * res.dropped_fraction:.1f}% of the rows).")


def _card(args: argparse.Namespace) -> None:
    from .integrations.cards import write_attribution_card

    _check_outputs([], [args.run], files=[Path(args.output) / "README.md"])
    train, scores = _load_run(args.run)
    queries = Path(args.run) / "queries"
    readme = write_attribution_card(
        args.output, scores, train, model_name=args.model_name, pretty_name=args.pretty_name,
        card_type=args.card_type, text_column=args.text_column,
        label_column=args.label_column, top_k=args.top_k, license=args.license,
        query_dataset=_read_data(str(queries), "--run queries/") if queries.is_dir() else None)
    print(f"Wrote {readme} and its plots.")


def _one_line(err: BaseException) -> str:
    """The error as one line; errors of unexpected types say so and point at --debug."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (GGDAError, ValueError, OSError, KeyError, FloatingPointError,
                        RuntimeError)):
        return text
    return (f"unexpected {type(err).__name__}: {text} (run `hf-ggda --debug ...` for the "
            "traceback and report it)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-ggda``.

    Returns:
        0 on success, 2 on an error (one ``hf-ggda: error: ...`` line, no traceback unless
        ``--debug``), 130 when interrupted.
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
        else:
            _attribute(args, with_queries=args.command == "attribute")
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("hf-ggda: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: one line, exit 2
        if args.debug:
            traceback.print_exc()
        print(f"hf-ggda: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
