"""Attribution cards: a Hub dataset (or model) card, with plots, from ``GroupScores``.

``write_attribution_card`` renders ``model_cards/attribution_card_template.md`` (Jinja) with
what was attributed (model, adapter, fingerprints, method, grouping, K, projection, sign
convention, limits) and the results (most helpful / harmful groups with example rows), and
writes README.md plus PNG plots beside it: the score distribution, the top/bottom groups, and
optional evaluation curves (e.g. noisy-label detection or pruning). Plots are drawn with
matplotlib's Agg canvas (no pyplot, no global backend change). Every file is written
atomically, the README last.

Everything that comes from data or from files read back (group ids, model and column names,
example rows, labels, the method name, the sign convention, curve names, the configuration)
is escaped before it enters the Markdown: as text (HTML special characters as entities,
Markdown punctuation backslash-escaped, so no link, image, HTML tag or table break can be
injected), as a code span whose delimiter is longer than any backtick run inside it, or in
a code fence longer than any backtick run of the JSON. Plot labels have ``$`` escaped (no
mathtext).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from datasets import ClassLabel, Dataset

from .. import __version__
from ..atomic import atomic_write_bytes
from ..errors import MissingColumnError
from ..fingerprint import hash_json
from ..logging import get_logger
from ..scores import GroupScores
from ..self_influence import SelfInfluence
from .card_parts import (
    Curve,
    CurveSpec,
    _cell,
    _fence,
    _fmt,
    _plot_text,
    _slug,
    bar_chart_png,
    curve_png,
    histogram_png,
    md_code,
    md_text,
)

logger = get_logger(__name__)

TEMPLATE_NAME = "attribution_card_template.md"
CARD_FILE = "README.md"
HISTOGRAM_FILE = "score_distribution.png"
BAR_CHART_FILE = "top_bottom_groups.png"

DEFAULT_LIMITS = (
    "Scores are first-order estimates (gradients at the attributed weights, with a fixed "
    "curvature approximation); use them to rank groups, not to predict exact loss changes.",
    "A group is scored as one unit: its score is the sum of its rows' scores, so strong "
    "helpful and harmful rows can cancel. Drill down (Attributor.refine) before acting on "
    "single rows.",
    "Scores hold for this model, these attributed parameters and these queries only.",
)



def default_template_path() -> Path:
    """Return the bundled card template.

    Raises:
        FileNotFoundError: The template is in neither the package nor the source tree.
    """
    here = Path(__file__).resolve()
    for root in (here.parents[1], here.parents[2]):
        path = root / "model_cards" / TEMPLATE_NAME
        if path.exists():
            return path
    raise FileNotFoundError(f"Cannot find model_cards/{TEMPLATE_NAME}; pass template_path=.")


def _model_info(model: Any, model_name: Optional[str]) -> tuple[str, str]:
    name = model_name
    if name is None and model is not None:
        cfg = getattr(model, "config", None)
        name = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None) \
            or type(model).__name__
    adapter = "none (all selected weights)"
    peft_cfg = getattr(model, "peft_config", None) if model is not None else None
    if peft_cfg:
        active = getattr(model, "active_adapter", "default")
        active = active[0] if isinstance(active, (list, tuple)) else active
        cfg = peft_cfg.get(active) or next(iter(peft_cfg.values()))
        kind = getattr(cfg, "peft_type", "PEFT")
        parts = [str(getattr(kind, "value", kind))]
        for field_name in ("r", "target_modules", "modules_to_save"):
            value = getattr(cfg, field_name, None)
            if value:
                parts.append(f"{field_name}={sorted(value) if isinstance(value, set) else value}")
        adapter = ", ".join(parts)
    return name or "unspecified", adapter


def _group_rows(train: Dataset, column: str) -> dict[Any, list[int]]:
    rows: dict[Any, list[int]] = {}
    for i, g in enumerate(train[column]):
        rows.setdefault(g.item() if hasattr(g, "item") else g, []).append(i)
    return rows


def _examples(train: Dataset, rows: list[int], text_column: str, label_column: str,
              count: int, max_chars: int) -> list[dict[str, str]]:
    picked = train.select(rows[:count])
    label_feature = train.features.get(label_column)
    out = []
    for pos, row in zip(rows[:count], picked):
        if text_column in row:
            text = row[text_column]
        else:
            text = ", ".join(f"{k}={v}" for k, v in list(row.items())[:4])
        label = row.get(label_column, "")
        if isinstance(label_feature, ClassLabel) and isinstance(label, int):
            label = label_feature.int2str(label)
        out.append({"row": str(pos), "label": _cell(label, 40), "text": _cell(text, max_chars)})
    return out


def build_attribution_card(scores: GroupScores | SelfInfluence, train_dataset: Dataset, *,
                           model: Any = None, model_name: Optional[str] = None,
                           query_dataset: Optional[Dataset] = None,
                           grouping: Optional[str] = None, group_column: Optional[str] = None,
                           text_column: str = "text", label_column: str = "label",
                           top_k: int = 5, examples_per_group: int = 3, max_chars: int = 160,
                           curves: Optional[Mapping[str, CurveSpec]] = None,
                           limits: Sequence[str] = (), license: Optional[str] = None,
                           pretty_name: Optional[str] = None, card_type: str = "dataset",
                           template_path: Optional[str | os.PathLike[str]] = None,
                           extra_metadata: Optional[Mapping[str, Any]] = None,
                           token_scores: Any = None, token_query: str = "0"
                           ) -> tuple[Any, dict[str, bytes]]:
    """Render the card and its plots in memory (see :func:`write_attribution_card`).

    Returns:
        (``DatasetCard`` or ``ModelCard``, {file name: PNG bytes}).

    Raises:
        ValueError: ``top_k`` < 1, an unknown ``card_type`` or a malformed curve.
        MissingColumnError: ``train_dataset`` lacks the group column.
        FileNotFoundError: No template.
    """
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if card_type not in ("dataset", "model"):
        raise ValueError(f"card_type must be 'dataset' or 'model', got {card_type!r}.")
    column = group_column or scores.group_column
    if column not in train_dataset.column_names:
        raise MissingColumnError(column, train_dataset.column_names, role="group column")
    cfg = scores.config
    method = str(cfg.get("attributor_type", "unknown"))
    self_mode = scores.query_mode == "self"  # a SelfInfluence result: no query axis
    totals = scores.aggregated().double().numpy()
    rows = _group_rows(train_dataset, column)
    sizes = np.array([len(rows.get(g, [])) for g in scores.group_ids])
    k = min(top_k, scores.num_groups)
    top = scores.top_k(None, k)
    chosen = {g for g, _ in top}
    bottom = [(g, v) for g, v in scores.top_k(None, k, largest=False) if g not in chosen]

    def describe(pairs: list[tuple[Any, float]]) -> list[dict[str, Any]]:
        return [{"id": md_code(g), "score": _fmt(v), "size": len(rows.get(g, [])),
                 "examples": _examples(train_dataset, rows.get(g, []), text_column,
                                       label_column, examples_per_group, max_chars)}
                for g, v in pairs]

    images = {HISTOGRAM_FILE: histogram_png(
        totals, f"{_plot_text(method)}: K = {scores.num_groups} groups")}
    picked = top + bottom[::-1]
    images[BAR_CHART_FILE] = bar_chart_png(
        [f"group {_plot_text(g)} (n={len(rows.get(g, []))})" for g, _ in picked],
        [v for _, v in picked],
        f"Highest and lowest self-influence of {scores.num_groups} groups" if self_mode
        else f"Most helpful and most harmful of {scores.num_groups} groups")
    curve_items = []
    for name, spec in (curves or {}).items():
        curve = spec if isinstance(spec, Curve) else Curve(spec[0], spec[1])
        file = f"curve_{_slug(name)}.png"
        images[file] = curve_png(_plot_text(name), curve)
        curve_items.append({"name": md_text(name, 200), "file": file})
    name, adapter = _model_info(model, model_name)
    projection = cfg.get("projection_dim")
    fingerprints = {
        "train_dataset": getattr(train_dataset, "_fingerprint", None),
        "query_dataset": getattr(query_dataset, "_fingerprint", None)
        if query_dataset is not None else "not given",
        "scores": hash_json(scores.fingerprints)}
    meta = {"method": method, "num_groups": scores.num_groups,
            "num_queries": scores.num_queries, "query_mode": scores.query_mode,
            "group_column": column, "projection_dim": projection,
            "sign_convention": scores.sign_convention, "model": name, "adapter": adapter,
            "fingerprints": fingerprints, "hf_ggda_version": __version__,
            **dict(extra_metadata or {})}
    tags = ["data-attribution", "ggda", f"ggda-{method}"]
    data_cls = DatasetCardData if card_type == "dataset" else ModelCardData
    card_data = data_cls(license=license, tags=tags, ggda=meta)
    config_json = json.dumps(cfg, indent=1, default=str, sort_keys=True)
    context: dict[str, Any] = dict(
        pretty_name=md_text(pretty_name or f"GGDA attribution ({method}) of {name}", 300),
        method=md_text(method, 100), version=__version__, num_groups=scores.num_groups,
        num_queries=scores.num_queries, query_mode=scores.query_mode,
        model_name=md_code(name, table=True), adapter=md_text(adapter, 300),
        selection=_cell(cfg.get("selection_resolved", cfg.get("selection", "unknown")), 200),
        num_rows=len(train_dataset), group_column=md_code(column, table=True),
        size_min=int(sizes.min()), size_max=int(sizes.max()),
        size_median=_fmt(float(np.median(sizes))),
        grouping=md_text(grouping, 300) if grouping else
        f"by column {md_code(column, table=True)}",
        projection=f"{md_text(cfg.get('projection_kind', 'random'), 40)} to "
        f"{md_text(projection, 20)} dimensions"
        if projection else "none (exact gradient dot products)",
        fingerprints={k: md_code(v, table=True) for k, v in fingerprints.items()},
        sign_convention=md_text(scores.sign_convention, 300),
        config_json=config_json, config_fence=_fence(config_json),
        histogram_file=HISTOGRAM_FILE, bar_chart_file=BAR_CHART_FILE,
        top_groups=describe(top), bottom_groups=describe(bottom), curves=curve_items,
        limits=list(DEFAULT_LIMITS) + list(limits), self_influence=self_mode, tokens=None)
    if token_scores is not None:  # causal LMs: the response highlighted by the top group
        from .token_card import TOKEN_CHART_FILE, token_section

        context["tokens"], images[TOKEN_CHART_FILE] = token_section(
            token_scores, query_label=token_query)
    not_learned = _not_learned(cfg.get("model_check"))
    context["not_learned"] = not_learned
    if not_learned:
        context["limits"].insert(0, not_learned)
    if projection:
        context["limits"].append(f"Gradients were randomly projected to "
                                 f"{md_text(projection, 20)} "
                                 "dimensions; this adds noise that shrinks as the dimension "
                                 "grows.")
    card_cls: Any = DatasetCard if card_type == "dataset" else ModelCard  # its data class above
    template = Path(template_path) if template_path is not None else default_template_path()
    card = card_cls.from_template(card_data, template_path=str(template), **context)
    return card, images


def _not_learned(check: Any) -> str:
    """The card's warning for a classifier that had not learned (escaped), else ``""``.

    ``check`` is the ``model_check`` of a scores file (untrusted): anything but a well-formed
    failed check gives no warning.
    """
    from ..learning_check import LearningCheck

    if not isinstance(check, dict) or check.get("learned") is not False:
        return ""
    try:
        return md_text(LearningCheck(**check).message(), 800)
    except (TypeError, ValueError):
        return ""


def write_attribution_card(output_dir: str | os.PathLike[str],
                           scores: GroupScores | SelfInfluence,
                           train_dataset: Dataset, **kwargs: Any) -> Path:
    """Write README.md (a Hub card with YAML metadata) and its PNG plots into a folder.

    Args:
        output_dir: Target folder (created if needed).
        scores: The attribution scores, or a self-influence result (its own sections:
            groups of highest and lowest self-influence, no query fields).
        train_dataset: The grouped training rows (for group sizes and example rows).
        **kwargs: Options of :func:`build_attribution_card`: ``model`` / ``model_name``,
            ``query_dataset``, ``grouping`` (a description), ``group_column``,
            ``text_column``, ``label_column``, ``top_k``, ``examples_per_group``,
            ``max_chars``, ``curves`` ({title: Curve or (x, y)}), ``limits``, ``license``,
            ``pretty_name``, ``card_type`` (``"dataset"`` or ``"model"``),
            ``template_path``, ``extra_metadata``, ``token_scores`` (``TokenScores`` of one
            causal-LM query: its response highlighted by the top group) and ``token_query``
            (how that query is named).

    Returns:
        The path of README.md.

    Raises:
        ValueError: Bad options or a malformed curve.
        MissingColumnError: ``train_dataset`` lacks the group column.
        FileNotFoundError: No template.
        OSError: The files cannot be written.
    """
    out = Path(output_dir)
    card, images = build_attribution_card(scores, train_dataset, **kwargs)
    for name, data in images.items():
        atomic_write_bytes(out / name, data)
    readme = out / CARD_FILE
    atomic_write_bytes(readme, str(card).encode("utf-8"))
    logger.info("Attribution card written to %s (%d plots).", readme, len(images))
    return readme


__all__ = [
    "DEFAULT_LIMITS",
    "Curve",
    "bar_chart_png",
    "build_attribution_card",
    "curve_png",
    "default_template_path",
    "histogram_png",
    "md_code",
    "md_text",
    "write_attribution_card",
]
