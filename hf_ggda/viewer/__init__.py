"""``hf-ggda view``: an interactive Gradio viewer over a run folder.

:func:`open_run` and :class:`RunView` (tables, filters, export) need no UI library;
:func:`serve` / :func:`build_app` need Gradio (``pip install "hf_ggda[viewer]"``).
"""

from typing import Any

from .data import RunView, open_run

__all__ = ["RunView", "add_view_parser", "build_app", "open_run", "run_view", "serve"]


def __getattr__(name: str) -> Any:  # lazy: importing hf_ggda.viewer must not need Gradio
    if name in ("serve", "build_app"):
        from . import app

        return getattr(app, name)
    if name in ("add_view_parser", "run_view"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(name)
