"""The project's ``evaluate`` metric modules, loaded from their folders (no Hub access).

``evaluate.load("accuracy")`` downloads its script from the Hub; these modules ship inside
the package and load by path::

    from hf_ggda.metrics import load_metric

    lds = load_metric("group_lds")
    lds.compute(predictions=predicted_subset_scores, references=measured_outputs)
    detection = load_metric("noisy_label_detection")
    detection.compute(scores=suspicion, references=is_flipped, fractions=[0.1, 0.2])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..logging import get_logger

logger = get_logger(__name__)

_HERE = Path(__file__).resolve().parent
#: Names of the bundled metric modules.
METRICS: tuple[str, ...] = ("group_lds", "noisy_label_detection")


def metric_path(name: str) -> Path:
    """Return the folder of a bundled metric module.

    Args:
        name: One of :data:`METRICS` (``-`` works for ``_``).

    Returns:
        The folder holding ``<name>/<name>.py``.

    Raises:
        ValueError: Unknown name.
        FileNotFoundError: The module file is missing (package data not installed).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; bundled metrics: {list(METRICS)}.")
    folder = _HERE / key
    if not (folder / f"{key}.py").exists():
        raise FileNotFoundError(f"{folder / (key + '.py')} is missing: the package was "
                                "installed without its metric files (package data).")
    return folder


def load_metric(name: str, **kwargs: Any) -> Any:
    """Load a bundled metric with ``evaluate.load(<its folder>)``, offline.

    Args:
        name: One of :data:`METRICS`.
        **kwargs: Passed to ``evaluate.load`` (``cache_dir``, ``experiment_id``,
            ``num_process``, ``process_id``, ...).

    Returns:
        The ``evaluate.EvaluationModule``.

    Raises:
        ValueError: Unknown name.
        FileNotFoundError: The module file is missing.
    """
    import evaluate

    folder = metric_path(name)
    logger.debug("Loading metric %s from %s.", name, folder)
    return evaluate.load(str(folder), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
