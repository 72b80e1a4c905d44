"""The ``hf-ggda view RUN`` command."""

from __future__ import annotations

import argparse
from typing import Any


def add_view_parser(sub: Any) -> None:
    """Add the ``view`` command to the CLI's subparsers."""
    view = sub.add_parser("view", help="Serve an interactive viewer (Gradio) over a run folder.")
    view.add_argument("run", help="The --output folder of an hf-ggda command, the demo or a "
                                  "recipe.")
    view.add_argument("--host", default="127.0.0.1",
                      help="Interface to listen on (loopback: the results stay local).")
    view.add_argument("--port", type=int, default=7860, help="Port to listen on.")


def run_view(args: argparse.Namespace) -> None:
    """Serve the viewer until interrupted.

    Raises:
        RunFolderError: The folder is not a run, or Gradio is not installed.
    """
    from .app import serve

    print(f"hf-ggda view: open http://{args.host}:{args.port} (Ctrl+C stops it)")
    serve(args.run, host=args.host, port=args.port, block=True)
