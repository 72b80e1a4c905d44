"""``hf-ggda sources METHOD``: rank the named sources of a training set by their effect on
one or more evaluation sets (:func:`hf_ggda.sources.attribute_sources`).

Writes ``OUTPUT/train`` (the training rows with ``ggda_source_*`` columns), ``OUTPUT/report``
(the per-source table as a dataset, ``sources.json``, ``sources.png`` and the scores of each
evaluation set) and ``OUTPUT/ggda_config.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _eval_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the file or folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text.rstrip("/")).stem or "evaluation", text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH or PATH, got {text!r}")
    return name, path


def add_sources_parser(sub: Any) -> None:
    """Add the ``sources`` subcommand (one sub-subcommand per attribution method)."""
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING
    from .cli_common import _add_io, _int_at_least

    sources = sub.add_parser("sources", help="Rank named training sources by their effect "
                                             "on evaluation sets, with intervals.")
    methods = sources.add_subparsers(dest="method", required=True)
    for name, cfg in sorted(ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING.items()):
        m = methods.add_parser(name, help=(cfg.__doc__ or "").strip().splitlines()[0])
        _add_io(m, queries=False)
        m.add_argument("--eval", dest="evaluations", action="append", type=_eval_spec,
                       required=True, metavar="[NAME=]PATH",
                       help="An evaluation set (repeat for several).")
        m.add_argument("--source-column", required=True,
                       help="Training column naming each row's source.")
        m.add_argument("--bootstrap", type=_int_at_least(0), default=1000,
                       help="Bootstrap resamples of evaluation rows (0: no intervals).")
        m.add_argument("--drill-sources", type=_int_at_least(0), default=2,
                       help="Drill into this many of the most harmful sources.")
        m.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
        cfg.add_arguments(m, prefix="m_", exclude=("attributor_type",))


def run_sources(args: argparse.Namespace) -> None:
    """Run ``hf-ggda sources``.

    Raises:
        GGDAError: Bad options, data or model (each a typed error naming the fix).
    """
    from .attributors import ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING, get_attributor
    from .cli_common import TaskArgs, _check_outputs, _file_options, _load, _read_data, _validate
    from .distributed import rank_and_world
    from .errors import ConfigError
    from .pipeline import RunWriter
    from .sources import attribute_sources

    cfg_cls = ATTRIBUTOR_TYPE_TO_CONFIG_MAPPING[args.method]
    base = _file_options(args.config, [TaskArgs, cfg_cls])
    config = cfg_cls.from_args(args, {"attributor_type": args.method, **base}, prefix="m_")
    names = [n for n, _ in args.evaluations]
    if len(set(names)) != len(names):
        raise ConfigError(f"Evaluation names repeat ({names}); name them with --eval NAME=PATH.")
    out = Path(args.output)
    _check_outputs([out],
                   [args.train, args.store, args.model, args.adapter, args.config,
                    *[p for _, p in args.evaluations]],
                   files=[out / "ggda_config.json"], datasets=[out / "train"])
    model, task = _load(args, base)
    train = _read_data(args.train, "--train")
    evals = {n: _read_data(p, f"--eval {n}") for n, p in args.evaluations}
    _validate(task, model, train, *evals.values())
    report = attribute_sources(get_attributor(model, task, config), train, evals,
                               args.source_column, bootstrap=args.bootstrap, seed=args.seed,
                               drill_sources=args.drill_sources, store=args.store)
    scored = report.to_dataset_columns(train)
    with RunWriter(out, kind="sources", config=config.to_dict()) as run:
        run.dataset("train", scored)
        run.folder("report", report.save)
        run.attributor_config(config)
    if rank_and_world()[0] == 0:
        worst = {n: [str(s) for s in report.ranking(n)[:3]] for n in report.evaluations}
        print(f"Wrote {out}: {len(report.table)} (evaluation, source) rows; most harmful "
              f"first: {worst}.")
