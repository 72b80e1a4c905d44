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


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_end_to_end_quick_run():
    module = _load("ggda_speed", SPEED)
    methods = ["tracin", "if-ekfac", "trak", "trak-seed1"]
    e2e = module.run_end_to_end(rows=32, queries=4, batch_size=16, k=8, methods=methods)
    assert e2e["floor_s"] > 0 and e2e["k"] == 8 and e2e["queries"] == 4
    assert set(e2e["methods"]) == set(methods)
    # a shortcut runs with the one-pass grouping only and is compared with its exact method
    seeds = e2e["agreement"]["trak-seed1 vs trak (grad-kmeans-1pass)"]
    assert -1 <= seeds["pearson"] <= 1 and set(e2e["methods"]["trak-seed1"]) == {
        "checkpoints", "grad-kmeans-1pass"}
    for name, row in e2e["methods"].items():
        if name == "trak-seed1":
            continue
        groupings = ("grad-kmeans-1pass", "grad-kmeans-2pass", "random")
        assert row["speedup"] == row["point"]["s"] / min(row[g]["s"] for g in groupings)
        for g in (*groupings, "point"):
            assert row[g]["ratio"] == row[g]["s"] / e2e["floor_s"]
            assert row[g]["ratio_per_checkpoint"] == row[g]["ratio"] / row["checkpoints"]
            assert math.isfinite(row[g]["peak_mb"])
        # K x d vs n x d on disk (TRAK keeps its n x p point vectors in both)
        assert 0 < row["random"]["store_mb"] <= row["point"]["store_mb"]
        assert name == "trak" or row["random"]["store_mb"] < row["point"]["store_mb"]
        assert row["checkpoints"] == (2 if name == "tracin" else 1)
        # the one-pass grouping finds the same groups and the same scores
        same = e2e["agreement"][f"{name}: 1-pass vs 2-pass grouping"]
        assert same["same_groups"] and same["pearson"] > 0.999999


def test_scaling_quick_run_and_peak_memory_probe():
    e2e = _load("ggda_speed_e2e", SPEED.parent / "_speed_e2e.py")
    rows = e2e.scaling([100, 200], m=5, k=8, batch_size=64)
    assert [r["rows"] for r in rows] == [100, 200]
    assert all(r["floor_s"] > 0 and r["group_s"] > 0 and r["point_s"] > 0 for r in rows)
    import mmap
    import time

    def allocate() -> None:
        # 64 MB mapped and touched (mmap: not served from memory the allocator kept from
        # earlier tests), held while the sampler runs
        with mmap.mmap(-1, 64 * 2**20) as block:
            for offset in range(0, len(block), 4096):
                block[offset] = 1
            time.sleep(0.3)

    _, peak = e2e.measure(allocate)
    assert peak > 40  # the sampler sees a real allocation
