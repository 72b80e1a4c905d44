"""The parts of an attribution card: Markdown escaping of untrusted values and the PNG plots.

Every value that comes from data or from files read back is escaped here before it enters a
card: :func:`md_text` (HTML special characters as entities, Markdown punctuation
backslash-escaped), :func:`md_code` (a code span longer than any backtick run inside it) and
:func:`_plot_text` (no mathtext in plot labels). Plots use matplotlib's Agg canvas (no pyplot,
no global backend change).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np


@dataclass
class Curve:
    """An evaluation curve to plot on the card (e.g. recall vs fraction inspected).

    Attributes:
        x: X values.
        y: Y values, same length.
        xlabel: X axis label.
        ylabel: Y axis label.
        baseline: Optional (x, y) of a reference curve (e.g. random inspection).
    """

    x: Sequence[float]
    y: Sequence[float]
    xlabel: str = "fraction of training data"
    ylabel: str = ""
    baseline: Optional[tuple[Sequence[float], Sequence[float]]] = None


CurveSpec = Union[Curve, tuple[Sequence[float], Sequence[float]]]


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is installed in tests
        raise ImportError("Attribution cards draw plots with matplotlib: "
                          "pip install matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram_png(values: np.ndarray, title: str) -> bytes:
    """Histogram of group scores with a line at zero.

    Args:
        values: (K,) scores.
        title: Plot title.

    Returns:
        PNG bytes.
    """
    fig = _figure()
    ax = fig.subplots()
    bins = int(min(50, max(5, len(values) // 2)))
    ax.hist(values, bins=bins, color="#4C72B0", edgecolor="white")
    ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="group score (summed over queries; > 0 helps)", ylabel="groups", title=title)
    return _png(fig)


def bar_chart_png(labels: Sequence[str], values: Sequence[float], title: str) -> bytes:
    """Horizontal bars of chosen groups, green for helpful, red for harmful.

    Args:
        labels: Bar labels.
        values: Scores.
        title: Plot title.

    Returns:
        PNG bytes.
    """
    fig = _figure(6.4, max(3.0, 0.35 * len(values) + 1.2))
    ax = fig.subplots()
    pos = np.arange(len(values))[::-1]
    ax.barh(pos, values, color=["#55A868" if v >= 0 else "#C44E52" for v in values])
    ax.set_yticks(pos, labels)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set(xlabel="group score (> 0 helps the queries)", title=title)
    return _png(fig)


def curve_png(name: str, curve: Curve) -> bytes:
    """Line plot of an evaluation curve (and its baseline).

    Raises:
        ValueError: Lengths differ, fewer than 2 points, or non-finite values.
    """
    x, y = np.asarray(curve.x, dtype=float), np.asarray(curve.y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"Curve {name!r} needs x and y of the same length >= 2, got "
                         f"{x.shape} and {y.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"Curve {name!r} has NaN/Inf values.")
    fig = _figure()
    ax = fig.subplots()
    ax.plot(x, y, marker="o" if len(x) <= 30 else None, color="#4C72B0", label=name)
    if curve.baseline is not None:
        ax.plot(curve.baseline[0], curve.baseline[1], color="grey", linestyle="--",
                label="baseline")
    ax.set(xlabel=curve.xlabel, ylabel=curve.ylabel, title=name)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _png(fig)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "curve"


_MD_SPECIALS = "\\`*_[]|!#~$"
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def _one_line(value: Any, max_chars: Optional[int] = None) -> str:
    text = " ".join(str(value).split())
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def md_text(value: Any, max_chars: Optional[int] = None) -> str:
    """Escape a value for Markdown text (also inside a table cell): one line, HTML special
    characters as entities, Markdown punctuation backslash-escaped.

    Args:
        value: Any value (``str()`` of it is used).
        max_chars: Truncate to this many characters (with an ellipsis).

    Returns:
        Text that renders as itself: no link, image, emphasis, HTML tag or cell break.
    """
    out = []
    for ch in _one_line(value, max_chars):
        out.append("\\" + ch if ch in _MD_SPECIALS else _HTML.get(ch, ch))
    return "".join(out)


def md_code(value: Any, table: bool = False, max_chars: Optional[int] = 200) -> str:
    """Render a value as one Markdown code span, delimiters included.

    The delimiter is one backtick longer than the longest backtick run in the value, so the
    value cannot close the span; code spans show HTML literally. In a table cell ``|`` is
    escaped as GFM requires.

    Args:
        value: Any value (``str()`` of it is used).
        table: The span sits in a table cell.
        max_chars: Truncate to this many characters.

    Returns:
        The code span.
    """
    text = _one_line(value, max_chars)
    if not text:
        return "(empty)"
    if table:
        text = text.replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    delim = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{delim}{pad}{text}{pad}{delim}"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``."""
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, run + 1)


def _plot_text(value: Any) -> str:
    """A plot label that matplotlib shows as itself (``$`` would start mathtext)."""
    return _one_line(value, 80).replace("$", "\\$")


def _cell(value: Any, max_chars: int) -> str:
    return md_text(value, max_chars)


def _fmt(value: float) -> str:
    return f"{value:.4g}"
