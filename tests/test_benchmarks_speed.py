"""The speed benchmark runs end to end (tiny size) and reports finite ratios."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

SPEED = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks" / "speed.py"


def test_speed_benchmark_quick_run():
    spec = importlib.util.spec_from_file_location("ggda_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(rows=32, batch_size=16, ks=[16], repeats=1)
    assert result["floor_s"] > 0
    assert set(result["group_pass_ratio"]) == {"16"}
    ratios = [result["point_pass_ratio"], *result["group_pass_ratio"].values()]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert result["selected_params"] == 6 * 2 * (8 * 384 * 2) + 384 * 5 + 5
