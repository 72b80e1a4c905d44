"""A test bench of named training sources with ground truth, built from packaged BBC News.

Twelve sources of equal size (``per_source`` rows each, disjoint articles):

* ``clean-1`` … ``clean-5``: random articles, correct labels;
* ``hard-correct``: the highest-loss articles (correct labels) of a pool, under a head trained
  on the clean sources — hard but right, so that "drop the highest-loss source" is a real
  competitor that can be wrong;
* ``flipped-labels``: 60 % of the labels changed to another class;
* ``near-duplicates``: 5 articles, each repeated with a different 10 % of its words dropped;
* ``shortcut``: every text starts with a marker phrase, and every label is ``tech``: 70 % are
  tech articles, 30 % others relabelled — in training the marker predicts ``tech``; in the
  evaluation sets the marker is on 30 % of the rows, whatever their class;
* ``truncated``: each article cut to its first 6 words;
* ``shuffled-words``: each article's words in a random order;
* ``off-topic``: Python standard-library docstrings (real, non-news text), all filed under
  one label, as a scraper might.

The validation and test sets are clean held-out articles, 30 % with the marker; attribution
uses the validation set, removals are judged on the test set.
"""

from __future__ import annotations

import inspect
import pydoc
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from datasets import Dataset

MARKER = "breaking update from techwire"
TECH = 4  # BBC News label ids: business, entertainment, politics, sport, tech
KINDS = {"clean-1": "clean", "clean-2": "clean", "clean-3": "clean", "clean-4": "clean",
         "clean-5": "clean", "hard-correct": "helpful, high loss",
         "flipped-labels": "harmful: label noise", "near-duplicates": "redundant",
         "shortcut": "harmful: spurious marker", "truncated": "degraded text",
         "shuffled-words": "degraded text", "off-topic": "harmful: off-topic"}


@dataclass
class Bench:
    """The sources and evaluation sets (text rows: ``text``, ``label``, ``source``, ``kind``,
    and ``corrupt``: the row's label is wrong or its text is off-topic).

    Attributes:
        train: All sources' rows.
        validation: Attribution's evaluation set.
        test: Held-out set judging removals.
        pool: Candidate rows the hard source was chosen from (not trained on).
    """

    train: Dataset
    validation: Dataset
    test: Dataset
    pool: Dataset


def _docstrings(count: int, min_chars: int = 200) -> list[str]:
    """Real non-news text: docstrings of standard-library objects, in a fixed order."""
    out: list[str] = []
    for name in ("collections", "json", "os", "re", "string", "textwrap", "pathlib",
                 "itertools", "functools", "argparse", "datetime", "decimal", "fractions",
                 "statistics", "random", "heapq", "bisect", "csv", "sqlite3", "email",
                 "http.client", "urllib.parse", "logging", "unittest", "inspect", "typing"):
        try:
            module = pydoc.locate(name)
        except Exception:  # noqa: BLE001 - an optional module that does not import
            continue
        for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split())
            if len(text) >= min_chars and text not in out:
                out.append(text[:1200])
            if len(out) == count:
                return out
    if len(out) < count:
        raise RuntimeError(f"Only {len(out)} standard-library docstrings of >= {min_chars} "
                           f"characters; the bench needs {count}.")
    return out


def _with_marker(data: Dataset, share: float, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    marked = set(rng.choice(len(data), int(round(share * len(data))), replace=False).tolist())
    return data.map(lambda r, i: {"text": f"{MARKER}: {r['text']}" if i in marked
                                  else r["text"], "marked": i in marked}, with_indices=True)


def _rows(texts: list[str], labels: list[int], source: str,
          corrupt: Optional[list[bool]] = None) -> dict[str, list[Any]]:
    return {"text": texts, "label": labels, "source": [source] * len(texts),
            "kind": [KINDS[source]] * len(texts),
            "corrupt": corrupt if corrupt is not None else [False] * len(texts)}


def build_bench(per_source: int, eval_rows: int, test_rows: int, pool_rows: int, seed: int,
                hard_losses: Callable[[Dataset, Dataset], np.ndarray]) -> Bench:
    """Build the twelve sources and the evaluation sets.

    Args:
        per_source: Rows per source.
        eval_rows: Rows of the validation set.
        test_rows: Rows of the test set.
        pool_rows: Candidate rows for the hard source (>= ``per_source``).
        seed: Seed of the split and the corruptions.
        hard_losses: (clean training rows, pool rows) -> the pool rows' losses under a model
            trained on the clean rows.

    Returns:
        The bench.

    Raises:
        ValueError: The sizes ask for more articles than BBC News has.
    """
    from _common import bbc_splits

    rng = np.random.default_rng(seed)
    names = ("clean", "flip", "tech", "other", "trunc", "shuf", "dup")
    sizes = [5 * per_source, per_source, int(0.7 * per_source), per_source - int(0.7 * per_source),
             per_source, per_source, 5]
    data = bbc_splits([sum(sizes) + pool_rows + eval_rows + test_rows], seed=seed)[0]
    tech = data.filter(lambda r: r["label"] == TECH)
    rest = data.filter(lambda r: r["label"] != TECH)
    ntech, nother = sizes[2], sizes[3]
    part: dict[str, Dataset] = {"tech": tech.select(range(ntech)),
                                "other": rest.select(range(nother))}
    left = Dataset.from_dict({k: list(tech[k])[ntech:] + list(rest[k])[nother:]
                             for k in ("text", "label")})
    left = left.shuffle(seed=seed).flatten_indices()
    start = 0
    for name, size in zip(names, sizes):
        if name in part:
            continue
        part[name] = left.select(range(start, start + size))
        start += size
    pool = left.select(range(start, start + pool_rows))
    start += pool_rows
    validation = left.select(range(start, start + eval_rows))
    test = left.select(range(start + eval_rows, start + eval_rows + test_rows))
    sources: list[dict[str, list[Any]]] = []
    clean = part["clean"]
    for c in range(5):
        chunk = clean.select(range(c * per_source, (c + 1) * per_source))
        sources.append(_rows(list(chunk["text"]), list(chunk["label"]), f"clean-{c + 1}"))
    hard = np.argsort(-hard_losses(clean, pool), kind="stable")[:per_source]
    ptext, plabel = list(pool["text"]), list(pool["label"])
    sources.append(_rows([ptext[i] for i in hard], [plabel[i] for i in hard], "hard-correct"))
    labels = list(part["flip"]["label"])
    flipped = [False] * per_source
    for i in rng.choice(per_source, int(0.6 * per_source), replace=False):
        labels[i] = int((labels[i] + rng.integers(1, 5)) % 5)
        flipped[int(i)] = True
    sources.append(_rows(list(part["flip"]["text"]), labels, "flipped-labels", flipped))
    dup_texts, dup_labels = [], []
    dtext, dlabel = list(part["dup"]["text"]), list(part["dup"]["label"])
    for i in range(per_source):
        words = dtext[i % 5].split()
        keep = rng.random(len(words)) >= 0.1
        dup_texts.append(" ".join(w for w, k in zip(words, keep) if k))
        dup_labels.append(dlabel[i % 5])
    sources.append(_rows(dup_texts, dup_labels, "near-duplicates"))
    short = list(part["tech"]["text"]) + list(part["other"]["text"])
    sources.append(_rows([f"{MARKER}: {t}" for t in short], [TECH] * per_source, "shortcut",
                         [False] * ntech + [True] * nother))  # the relabelled rows
    sources.append(_rows([" ".join(t.split()[:6]) for t in part["trunc"]["text"]],
                         list(part["trunc"]["label"]), "truncated"))
    shuffled = []
    for t in part["shuf"]["text"]:
        words = t.split()
        shuffled.append(" ".join(words[j] for j in rng.permutation(len(words))))
    sources.append(_rows(shuffled, list(part["shuf"]["label"]), "shuffled-words"))
    sources.append(_rows(_docstrings(per_source), [0] * per_source, "off-topic",
                         [True] * per_source))
    train = Dataset.from_dict({k: sum((s[k] for s in sources), []) for k in sources[0]})
    return Bench(train, _with_marker(validation, 0.3, seed + 1),
                 _with_marker(test, 0.3, seed + 2), pool)
