"""The attribution card's token section: which tokens of one response a group pushed.

From :class:`~hf_ggda.attributors.tokens.TokenScores` of one causal-LM query: the response
with each target token highlighted by the chosen group's score on that token's loss (green:
the group lowers the token's loss, red: it raises it; HTML spans, every token escaped), the
tokens it pushes most, and a bar chart of all token scores (PNG, for viewers that drop inline
styles).
"""

from __future__ import annotations

import html
from typing import Any, Optional

import numpy as np

from .card_parts import _fmt, _plot_text, bar_chart_png, md_code, md_text

TOKEN_CHART_FILE = "token_scores.png"
MAX_TOKENS = 400


def _span(token: str, value: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.6
    rgb = "0,150,60" if value >= 0 else "210,40,40"
    text = html.escape(token.replace("\n", " "), quote=True)
    return (f'<span style="background-color: rgba({rgb},{alpha:.2f})" '
            f'title="{value:+.3g}">{text}</span>')


def token_section(tokens: Any, group_id: Optional[Any] = None, query_label: str = "0",
                  top: int = 5) -> tuple[dict[str, Any], bytes]:
    """The card context of the token section and its bar chart.

    Args:
        tokens: ``TokenScores`` of one query (T tokens × K groups).
        group_id: The group shown; None picks the one with the largest sequence-level score.
        query_label: How the query is named on the card (e.g. its row).
        top: How many of the group's most-pushed tokens are listed.

    Returns:
        (context for the template's ``tokens`` section, PNG bytes of the chart).

    Raises:
        KeyError: ``group_id`` is not one of the scored groups.
        ValueError: The query has no target tokens.
    """
    matrix = tokens.matrix.double().numpy()
    if matrix.shape[0] == 0:
        raise ValueError("The query has no target tokens to show.")
    if group_id is None:
        column = int(np.argmax(matrix.sum(0)))
    else:
        if group_id not in tokens.group_ids:
            raise KeyError(f"Group {group_id!r} is not among the scored groups.")
        column = tokens.group_ids.index(group_id)
    values = matrix[:MAX_TOKENS, column]
    scale = float(np.abs(values).max()) if values.size else 0.0
    spans = "".join(_span(t, float(v), scale) for t, v in zip(tokens.tokens, values))
    group = tokens.group_ids[column]
    order = np.argsort(-values, kind="stable")[:top]
    context = {
        "group": md_code(group), "query": md_text(query_label, 80),
        "total": _fmt(float(matrix[:, column].sum())), "num_tokens": int(matrix.shape[0]),
        "html": f"<p>{spans}</p>",
        "top": [{"token": md_code(tokens.tokens[i], table=True), "score": _fmt(values[i])}
                for i in order.tolist()],
        "chart_file": TOKEN_CHART_FILE}
    labels = [f"{i}:{_plot_text(t)[:12]}" for i, t in enumerate(tokens.tokens[:60])]
    png = bar_chart_png(labels, [float(v) for v in values[:60]],
                        f"Group {_plot_text(group)}: score on each response token")
    return context, png
