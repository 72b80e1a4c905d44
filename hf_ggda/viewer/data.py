"""What the attribution viewer shows, read from a run folder (no UI code here).

A *run folder* is what an ``hf-ggda`` command, the demo or a recipe wrote: a training-rows
dataset (``train/``, ``train_scored/`` or ``scored/``; or the folder itself, as ``hf-ggda group``
and ``prune`` write it) and, where present, a result (``scores/`` with a query axis,
``self_influence/`` without one, or the per-evaluation ``scores-*/`` of ``hf-ggda sources``),
the scored queries (``queries/``) and a per-source table (``sources/``). Every table is a
:class:`pandas.DataFrame` so that the UI layer only lays them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
from datasets import Dataset, load_from_disk

from ..errors import RunFolderError

ROW_FOLDERS = ("train", "train_scored", "scored", "kept")
RESULT_FOLDERS = ("scores", "self_influence")
SCORE_COLUMNS = ("ggda_group_score", "ggda_self_influence", "ggda_group_rank",
                 "ggda_point_score", "ggda_point_self_influence")
ANY = "(all)"


def _is_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()


def _find_rows(folder: Path) -> Path:
    if _is_dataset(folder):
        return folder
    for name in ROW_FOLDERS:
        if _is_dataset(folder / name):
            return folder / name
    raise RunFolderError(
        f"No training rows in {str(folder)!r}: expected one of "
        f"{', '.join(n + '/' for n in ROW_FOLDERS)} (a `save_to_disk` dataset) or the folder to be "
        "a dataset itself. Pass the --output folder of an hf-ggda command, the demo or a recipe.")


def _find_result(folder: Path) -> Optional[Any]:
    from ..scores import GroupScores
    from ..self_influence import SelfInfluence

    found = [folder / n for n in RESULT_FOLDERS if (folder / n).is_dir()]
    for parent in (folder, folder / "report"):  # `hf-ggda sources`: report/scores-<eval>/
        found += sorted(p for p in parent.glob("scores-*") if p.is_dir())
    if not found:
        return None
    loader = SelfInfluence if found[0].name == "self_influence" else GroupScores
    return loader.from_pretrained(found[0])


def _text_column(rows: Dataset) -> Optional[str]:
    for name in ("text", "prompt", "instruction", "question", "content"):
        if name in rows.column_names:
            return name
    strings = [n for n, f in rows.features.items()
               if getattr(f, "dtype", None) in ("string", "large_string")]
    return strings[0] if strings else None


def _finite(value: Any) -> Optional[float]:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@dataclass
class RunView:
    """A run folder opened for viewing.

    Attributes:
        folder: The run folder.
        rows: The training rows (with their ``ggda_*`` columns where scored).
        result: ``GroupScores``, ``SelfInfluence`` or None (columns only).
        queries: The scored query rows, if the run has any.
        sources: The per-source table of ``hf-ggda sources``, if any.
        group_column: Column of ``rows`` holding group ids (None: no grouping).
        text_column: Column shown as the row text (None: none found).
    """

    folder: Path
    rows: Dataset
    result: Any  # GroupScores, SelfInfluence or None
    queries: Optional[Dataset]
    sources: Optional[Dataset]
    group_column: Optional[str]
    text_column: Optional[str]

    @property
    def mode(self) -> str:
        """``"query"`` (scores per query), ``"self"`` (self-influence) or ``"columns"``."""
        if self.result is None:
            return "columns"
        return "self" if self.result.query_mode == "self" else "query"

    @property
    def label_column(self) -> Optional[str]:
        """``label`` when the rows have one."""
        return "label" if "label" in self.rows.column_names else None

    @property
    def source_column(self) -> Optional[str]:
        """``source`` when the rows have one."""
        return "source" if "source" in self.rows.column_names else None

    def choices(self, column: Optional[str]) -> list[str]:
        """The filter choices of a column: ``(all)`` then its distinct values as text."""
        if column is None:
            return [ANY]
        return [ANY, *sorted({str(v) for v in self.rows[column]})]

    def query_choices(self) -> list[str]:
        """One entry per query (``"i: text"``), empty without a query axis."""
        if self.mode != "query":
            return []
        texts: list[Any] = list(self.result.query_ids)
        if self.queries is not None and len(self.queries) == self.result.num_queries:
            column = _text_column(self.queries)
            if column is not None:
                texts = self.queries[column]
        return [f"{i}: {' '.join(str(t).split())[:80]}" for i, t in enumerate(texts)]

    # -- tables -------------------------------------------------------------------------------
    def _frame(self) -> pd.DataFrame:
        wanted = (self.group_column, self.text_column, self.label_column, self.source_column,
                  *SCORE_COLUMNS)
        keep = [c for c in wanted if c and c in self.rows.column_names]
        frame = self.rows.select_columns(list(dict.fromkeys(keep))).to_pandas()
        frame.insert(0, "row", range(len(frame)))
        return frame

    def _filtered(self, label: str = ANY, source: str = ANY) -> pd.DataFrame:
        frame = self._frame()
        if label != ANY and self.label_column:
            frame = frame[frame[self.label_column].astype(str) == label]
        if source != ANY and self.source_column:
            frame = frame[frame[self.source_column].astype(str) == source]
        return frame

    def _group_values(self) -> dict[str, dict[Any, Optional[float]]]:
        """Per-group values from the result (exact) or from the rows' columns."""
        out: dict[str, dict[Any, Optional[float]]] = {}
        if self.result is not None:
            ids = self.result.group_ids
            name = "self_influence" if self.mode == "self" else "score"
            out[name] = {str(g): _finite(v) for g, v in zip(ids, self.result.aggregated().tolist())}
            si = getattr(self.result, "self_influence", None)
            if self.mode == "query" and si is not None:
                out["self_influence"] = {str(g): _finite(v) for g, v in zip(ids, si.tolist())}
            return out
        frame = self._frame()
        for column, name in (("ggda_group_score", "score"),
                             ("ggda_self_influence", "self_influence")):
            if column in frame and self.group_column:
                first = frame.groupby(frame[self.group_column].astype(str))[column].first()
                out[name] = {g: _finite(v) for g, v in first.items()}
        return out

    def group_table(self, sort_by: str = "score", label: str = ANY,
                    source: str = ANY) -> pd.DataFrame:
        """Groups (with rows matching the filters), ranked by score or self-influence.

        Args:
            sort_by: ``"score"`` (most helpful first) or ``"self_influence"`` (highest first).
            label: Keep groups with rows of this label (``(all)``: no filter).
            source: Keep groups with rows of this source.

        Returns:
            Columns ``group``, ``rows`` (matching rows), ``score`` / ``self_influence`` where
            known, best first.

        Raises:
            RunFolderError: The rows have no group column.
        """
        if self.group_column is None:
            raise RunFolderError(f"The rows in {str(self.folder)!r} have no group column "
                                 "(`group_id`): group them first (`hf-ggda group ...`).")
        frame = self._filtered(label, source)
        sizes = frame.groupby(frame[self.group_column].astype(str)).size()
        table = pd.DataFrame({"group": sizes.index.astype(str), "rows": sizes.values})
        for name, values in self._group_values().items():
            table[name] = [values.get(g) for g in table["group"]]
        if sort_by in table:
            table = table.sort_values(sort_by, ascending=False, na_position="last", kind="stable")
        return table.reset_index(drop=True)

    def group_rows(self, group: str, label: str = ANY, source: str = ANY) -> pd.DataFrame:
        """The rows of one group (matching the filters), highest point score first."""
        frame = self._filtered(label, source)
        if self.group_column is None:
            return frame.iloc[0:0]
        frame = frame[frame[self.group_column].astype(str) == str(group)]
        for column in ("ggda_point_score", "ggda_point_self_influence"):
            if column in frame and frame[column].notna().any():
                frame = frame.sort_values(column, ascending=False, na_position="last")
                break
        return frame.reset_index(drop=True)

    def query_groups(self, query: Union[int, str], k: int = 10) -> pd.DataFrame:
        """The ``k`` most helpful and ``k`` most harmful groups for one query.

        Raises:
            RunFolderError: The run has no query axis.
            IndexError: The query is out of range.
        """
        index = self._query_index(query)
        k = max(1, min(k, (self.result.num_groups + 1) // 2))
        best = self.result.top_k(index, k=k)
        worst = self.result.top_k(index, k=k, largest=False)
        rows = [("helpful", g, s) for g, s in best] + [("harmful", g, s) for g, s in worst]
        return pd.DataFrame(rows, columns=["effect", "group", "score"]).astype({"group": str})

    def query_rows(self, query: Union[int, str], k: int = 10) -> pd.DataFrame:
        """The drilled-down training rows of highest point score for one query (may be empty).

        Raises:
            RunFolderError: The run has no query axis.
            IndexError: The query is out of range.
        """
        index = self._query_index(query)
        points = self.result.point_scores
        if points is None or points.shape[1] == 0:
            return pd.DataFrame(columns=["row", "group", "score"])
        row = points[index]
        order = row.argsort(descending=True)[:k].tolist()
        keys, groups = self.result.point_rows, self.result.point_groups
        table = pd.DataFrame({"row": [keys[i] for i in order],
                              "group": [str(groups[i]) for i in order],
                              "score": [float(row[i]) for i in order]})
        if self.text_column and self.result.point_key is None:
            texts = self.rows[self.text_column]
            table["text"] = [str(texts[int(r)])[:200] if 0 <= int(r) < len(texts) else ""
                             for r in table["row"]]
        return table

    def _query_index(self, query: Union[int, str]) -> int:
        if self.mode != "query":
            raise RunFolderError(f"The run in {str(self.folder)!r} has no query axis "
                                 f"({self.mode}): open an `hf-ggda attribute` run for queries.")
        index = int(str(query).split(":", 1)[0]) if isinstance(query, str) else int(query)
        if not 0 <= index < self.result.num_queries:
            raise IndexError(f"Query {index} is out of range for {self.result.num_queries}.")
        return index

    def export(self, groups: list[str], output: Union[str, Path], label: str = ANY,
               source: str = ANY) -> tuple[Path, int]:
        """Write the rows of the chosen groups (matching the filters) as a dataset.

        Returns:
            The folder written and its number of rows.

        Raises:
            RunFolderError: No group chosen, or the output is inside the run folder.
        """
        from ..atomic import save_dataset_atomic

        out = Path(output).resolve()
        if not groups:
            raise RunFolderError("Choose at least one group to export.")
        if out == self.folder.resolve() or self.folder.resolve() in out.parents:
            raise RunFolderError(f"Export to a folder outside the run, not {str(out)!r}.")
        frame = self._filtered(label, source)
        wanted = set(map(str, groups))
        positions = frame[frame[self.group_column].astype(str).isin(wanted)]["row"].tolist()
        save_dataset_atomic(self.rows.select(positions), out)
        return out, len(positions)


def open_run(folder: Union[str, Path]) -> RunView:
    """Open a run folder for viewing.

    Args:
        folder: The ``--output`` folder of an ``hf-ggda`` command, the demo or a recipe.

    Returns:
        The opened run.

    Raises:
        RunFolderError: The folder does not exist or holds no training rows.
        ScoresFileError: A result file fails its checks.
    """
    from ..pipeline import MANIFEST, read_run

    path = Path(folder)
    if not path.is_dir():
        raise RunFolderError(f"Run folder {str(path)!r} does not exist (or is not a folder).")
    if (path / MANIFEST).is_file():
        read_run(path)  # a run written by hf_ggda: every entry checked before it is shown
    rows = load_from_disk(str(_find_rows(path)))
    if not isinstance(rows, Dataset):
        raise RunFolderError(f"{str(path)!r} holds a DatasetDict; pass one split's folder.")
    result = _find_result(path)
    group_column = getattr(result, "group_column", None) or "group_id"
    if group_column not in rows.column_names:
        group_column = "source" if "source" in rows.column_names else None
    extra = {name: next((load_from_disk(str(p)) for p in (path / name, path / "report" / name)
                         if _is_dataset(p)), None) for name in ("queries", "sources")}
    return RunView(folder=path, rows=rows, result=result, queries=extra["queries"],
                   sources=extra["sources"], group_column=group_column,
                   text_column=_text_column(rows))
