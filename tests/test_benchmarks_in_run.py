"""The in-run overhead benchmark runs end to end (tiny size) on the packaged MiniLM."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks" / "in_run.py"


def test_in_run_benchmark_quick_run() -> None:
    spec = importlib.util.spec_from_file_location("ggda_in_run_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(rows=32, eval_rows=8, groups=4, every=2, batch_size=16, steps=2,
                        eval_sample=4)
    assert result["weights_bit_identical"] is True
    assert result["captures"] == 2  # θ_0 and the start of the last step
    assert result["train_seconds_plain"] > 0
    assert all(math.isfinite(result[k]) and result[k] > 0
               for k in ("ratio_capture", "ratio_all_steps", "ratio_capture_sampled"))
    assert -1.0 <= result["sampled_vs_exact"]["spearman"] <= 1.0


def test_in_run_lds_benchmark_quick_run() -> None:
    """In-run vs post-hoc TracIn LDS on the fast setting's data (tiny size) runs end to end."""
    import sys

    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("ggda_in_run_lds", BENCH.parent / "in_run_lds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(rows=64, queries=8, groups=4, every=2, epochs=1, subsets=4)
    assert set(result["lds"]) == {"in_run_capture", "in_run_all", "post_hoc"}
    assert result["post_hoc_checkpoints"] >= 2
    for figures in result["lds"].values():
        assert -1.0 <= figures["lds"] <= 1.0
    assert all(result[k] > 0 for k in ("ratio_train_in_run_capture", "ratio_train_in_run_all",
                                         "ratio_post_hoc_tracin"))
