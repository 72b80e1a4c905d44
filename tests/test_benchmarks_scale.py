"""The scale benchmark runs end to end on tiny models and reports what the issue asks for."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_quick_run(tmp_path: Path) -> None:
    module = _load("ggda_scale", BENCH / "scale.py")
    result = module.main(["--quick", "--json", str(tmp_path / "scale.json")])
    assert (tmp_path / "scale.json").exists()
    for key in ("floor_s", "group_pass_ratio", "point_pass_ratio", "score_ratio", "peak_mb",
                "budget_mb", "store_mb"):
        assert key in result
    assert set(result["group_pass_ratio"]) == {"8", "32"}
    ratios = [result["point_pass_ratio"], result["score_ratio"],
              *result["group_pass_ratio"].values()]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    row = result["w2"][0]
    assert row["dim"] < row["d"]  # factorised vectors are smaller than the gradients
    assert row["store_mb"]["group_8"] < row["store_mb"]["point"]
    assert result["llm"]["model"] == "tiny-llama" and result["llm"]["point_pass_ratio"] > 0


def test_gpu_check_refuses_to_run_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import torch

    module = _load("ggda_gpu_check", BENCH / "gpu_check.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        module.main()
