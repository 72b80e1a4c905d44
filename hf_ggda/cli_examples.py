"""One worked example per ``hf-ggda`` command, shown at the end of its ``--help``.

Every example runs on the files the demo writes (``hf-ggda demo`` → ``outputs/demo``) and the
packaged MiniLM-L6 (``--model minilm``), so it can be pasted as is after the demo.
"""

from __future__ import annotations

import argparse

_MODEL = "--model minilm --adapter outputs/demo/adapter --num-labels 5 --max-length 64"
_GROUP_EXTRA = {
    "random": "--num-groups 8 --seed 0",
    "stratified": "--label-column label --num-groups 10",
    "column": "--column label",
    "kmeans-input": "--num-groups 8 --balanced",
    "kmeans-repr": f"{_MODEL} --num-groups 8 --balanced",
    "grad-kmeans": f"{_MODEL} --num-groups 8 --balanced",
}
_METHOD_EXTRA = {
    "influence": "--preconditioner ekfac --damping 1e-3",
    "tracin": "",
    "trak": "--projection-dim 256",
}


def example(path: tuple[str, ...]) -> str:
    """The example command line for a command path such as ``("attribute", "tracin")``.

    Raises:
        KeyError: No example is written for ``path``.
    """
    head, *rest = path
    name = rest[0] if rest else ""
    if head == "demo":
        return "hf-ggda demo --quick --output outputs/demo"
    if head == "group":
        return (f"hf-ggda group {name} --data outputs/demo/validation --output runs/grouped "
                f"{_GROUP_EXTRA[name]}")
    if head == "attribute":
        return (f"hf-ggda attribute {name} {_MODEL} --train outputs/demo/train --queries "
                f"outputs/demo/validation --output runs/{name} --drill-down 2 "
                f"{_METHOD_EXTRA[name]}").rstrip()
    if head == "self-influence":
        return (f"hf-ggda self-influence {name} {_MODEL} --train outputs/demo/train "
                f"--output runs/self --drill-down 2 {_METHOD_EXTRA[name]}").rstrip()
    if head == "sources":
        return (f"hf-ggda sources {name} {_MODEL} --train runs/with_source --source-column "
                "source --eval dev=outputs/demo/validation --output runs/sources")
    if head == "prune":
        return ("hf-ggda prune --run runs/influence --fraction 0.2 --balance-column label "
                "--output runs/pruned")
    if head == "view":
        return "hf-ggda view outputs/demo --port 7860"
    if head == "card":
        return ('hf-ggda card --run runs/influence --output runs/card --model-name '
                '"MiniLM-L6 + LoRA (demo)"')
    raise KeyError(path)


def add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Set the epilog of every leaf command under ``parser`` to its worked example.

    Raises:
        KeyError: A command has no example (a new command must get one).
    """
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and path:
        parser.epilog = f"example (after `hf-ggda demo`):\n  {example(path)}"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in subs:
        for name, child in action.choices.items():
            add_examples(child, (*path, name))
