"""The Gradio app of ``hf-ggda view``: groups, their rows, queries and export over a run folder.

Gradio is imported only here (``pip install "hf_ggda[viewer]"``); every table comes from
:mod:`hf_ggda.viewer.data`, which is tested without a browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import pandas as pd

from ..errors import RunFolderError
from ..logging import get_logger
from .data import ANY, RunView, open_run

logger = get_logger(__name__)
TOP = 15


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as err:
        raise RunFolderError("The viewer needs Gradio: pip install 'hf_ggda[viewer]' "
                             "(or pip install gradio).") from err
    return gr


def _bars(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """The top and bottom groups by ``by`` for the bar chart."""
    if by not in table or table[by].isna().all():
        return pd.DataFrame({"group": [], by: []})
    known = table.dropna(subset=[by])
    picked = pd.concat([known.head(TOP), known.tail(TOP)]).drop_duplicates("group")
    return picked[["group", by]].reset_index(drop=True)


def _sort_keys(view: RunView) -> list[str]:
    table = view.group_table()
    return [c for c in ("score", "self_influence", "rows") if c in table]


def build_app(view: RunView) -> Any:
    """The Gradio Blocks app over one opened run.

    Raises:
        RunFolderError: Gradio is not installed, or the rows have no group column.
    """
    gr = _gradio()
    keys = _sort_keys(view)
    first = view.group_table(keys[0])
    with gr.Blocks(title=f"hf-ggda: {view.folder.name}") as app:
        gr.Markdown(f"# hf-ggda run `{view.folder}`\n{len(view.rows)} training rows, "
                    f"{len(first)} groups; result: **{view.mode}**. Positive scores help "
                    "(the query loss falls when the group is up-weighted).")
        with gr.Row():
            sort_by = gr.Dropdown(keys, value=keys[0], label="Rank groups by", elem_id="sort")
            label = gr.Dropdown(view.choices(view.label_column), value=ANY, label="Label",
                                elem_id="label", interactive=view.label_column is not None)
            source = gr.Dropdown(view.choices(view.source_column), value=ANY, label="Source",
                                 elem_id="source", interactive=view.source_column is not None)
        bars = gr.BarPlot(_bars(first, keys[0]), x="group", y=keys[0], label="Top and bottom "
                          "groups", elem_id="bars", sort="-y")
        groups = gr.Dataframe(first, label="Groups", elem_id="groups", interactive=False)
        top = first["group"].iloc[0] if len(first) else None
        group = gr.Dropdown(first["group"].tolist(), value=top, label="Group (its rows)",
                            elem_id="group")
        rows = gr.Dataframe(view.group_rows(top) if top is not None else None,
                            label="Rows of the group", elem_id="rows", interactive=False)
        with gr.Row():
            chosen = gr.Dropdown(first["group"].tolist(), multiselect=True,
                                 label="Groups to export", elem_id="chosen")
            target = gr.Textbox(label="Export folder (a new `save_to_disk` dataset)",
                                elem_id="target")
            export = gr.Button("Export rows", elem_id="export")
        status = gr.Markdown(elem_id="status")
        _query_tab(gr, view)

        def refresh(by: str, lab: str, src: str) -> tuple[Any, ...]:
            table = view.group_table(by, lab, src)
            names = table["group"].tolist()
            return (table, gr.update(value=_bars(table, by), y=by),
                    gr.update(choices=names, value=None), gr.update(choices=names))

        for widget in (sort_by, label, source):
            widget.change(refresh, [sort_by, label, source], [groups, bars, group, chosen])
        group.change(lambda g, lab, src: view.group_rows(g, lab, src) if g else None,
                     [group, label, source], rows)
        export.click(lambda picked, out, lab, src: _export(view, picked, out, lab, src),
                     [chosen, target, label, source], status)
    return app


def _query_tab(gr: Any, view: RunView) -> None:
    """The query picker with its top groups and rows (only where the run has queries)."""
    queries = view.query_choices()
    if not queries:
        gr.Markdown(f"This run has no query axis ({view.mode}); open an `hf-ggda attribute` "
                    "run to see scores per query.")
        return
    gr.Markdown("## Per query")
    query = gr.Dropdown(queries, value=queries[0], label="Query", elem_id="query")
    top = gr.Dataframe(view.query_groups(0), label="Most helpful and harmful groups",
                       elem_id="query_groups", interactive=False)
    points = gr.Dataframe(view.query_rows(0), label="Drilled-down rows (point scores)",
                          elem_id="query_rows", interactive=False)
    query.change(lambda q: (view.query_groups(q), view.query_rows(q)), query, [top, points])


def _export(view: RunView, picked: list[str], output: str, label: str, source: str) -> str:
    if not output:
        return "Give an export folder."
    try:
        path, n = view.export(list(picked or []), output, label, source)
    except (RunFolderError, OSError) as err:
        return f"Not exported: {err}"
    return f"Exported {n} rows to `{path}`."


def serve(folder: Union[str, Path], host: str = "127.0.0.1", port: int = 7860,
          block: bool = True) -> Any:
    """Open a run folder and serve the viewer.

    Args:
        folder: The run folder.
        host: Interface to listen on (loopback by default: results stay on this machine).
        port: Port to listen on.
        block: Wait until interrupted (the CLI); False returns the running app (tests).

    Returns:
        The running Gradio app.

    Raises:
        RunFolderError: The folder is not a run, or Gradio is not installed.
    """
    app = build_app(open_run(folder))
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
               inbrowser=False, share=False, quiet=True)
    logger.info("hf-ggda view: serving %s on http://%s:%d", folder, host, port)
    return app
