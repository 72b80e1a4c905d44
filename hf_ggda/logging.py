"""Rank-aware logging and progress bars.

Library code never configures the root logger. Messages are emitted on the main process only
(rank 0 under Accelerate / torchrun); progress bars use the tqdm of the Hugging Face logging
utilities so ``transformers.utils.logging.disable_progress_bar()`` silences them too.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from transformers.utils import logging as hf_logging

from .distributed import is_main_process, process_index

_LIBRARY_LOGGER = "hf_ggda"

__all__ = ["get_logger", "is_main_process", "process_index", "progress"]


class _MainProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or getattr(record, "all_ranks", False)


def get_logger(name: str) -> logging.Logger:
    """Return a logger under ``hf_ggda`` that only speaks on the main process.

    Args:
        name: Usually ``__name__``.

    Returns:
        A standard ``logging.Logger``; pass ``extra={"all_ranks": True}`` to log on every rank.
    """
    if not name.startswith(_LIBRARY_LOGGER):
        name = f"{_LIBRARY_LOGGER}.{name}"
    logger = logging.getLogger(name)
    if not any(isinstance(f, _MainProcessFilter) for f in logger.filters):
        logger.addFilter(_MainProcessFilter())
    return logger


def progress(iterable: Optional[Iterable[Any]] = None, **kwargs: Any) -> Any:
    """Wrap ``iterable`` in an HF tqdm bar, shown on the main process only.

    Args:
        iterable: What to iterate.
        **kwargs: Passed to tqdm (``total``, ``desc``, ...).

    Returns:
        The tqdm-wrapped iterable.
    """
    disable = kwargs.pop("disable", False) or not is_main_process()
    disable = disable or not hf_logging.is_progress_bar_enabled()
    return hf_logging.tqdm(iterable, disable=disable, **kwargs)
