"""Process-group helpers for integration code: the names of :mod:`hf_ggda.distributed`.

They live in :mod:`hf_ggda.distributed` (the bottom layer, so the gradient engine, curvature and
attributors need not import up into ``integrations``); this module keeps the old import path
working for the command line and callers outside the package.
"""

from ..distributed import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    is_main_process,
    process_index,
    rank_and_world,
)

__all__ = ["all_gather_object", "all_reduce_max", "all_reduce_sum", "barrier",
           "is_main_process", "process_index", "rank_and_world"]
