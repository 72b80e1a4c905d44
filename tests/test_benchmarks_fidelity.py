"""The fidelity benchmark (recipes/benchmarks/fidelity.py): --quick runs and exact checks.

The exact checks use a small synthetic linear-softmax problem (no MiniLM): subset predictions
from group scores equal sums of point scores, and on an exactly retrained convex model the
exact influence function gets a high, *positive* LDS (a sign error would make it negative).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "recipes" / "benchmarks"
SCRIPT = BENCH / "fidelity.py"
sys.path.insert(0, str(BENCH))

from _fidelity_core import (  # noqa: E402
    METHODS,
    MethodOptions,
    attribute,
    draw_subsets,
    evaluate_partition,
    predict_subsets,
    subset_rows,
    with_groups,
)
from _fidelity_fast import LinearHeadSetting  # noqa: E402

NESTED = ("group_lds", "group_lds_ci", "cost_s", "logo_spearman", "logo_pearson")


def _run_quick(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "fidelity.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out),
         "--cache-dir", str(tmp_path / "cache"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "group LDS" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def _check_result(result: dict, methods: list[str], groupings: list[str]) -> None:
    for key in (*NESTED, "grouping_cost_s", "retrain", "setup", "command", "date"):
        assert key in result, key
    ks = [str(k) for k in result["ks"]]
    assert str(result["num_train"]) in ks  # the point level
    assert sorted(result["group_lds"]) == sorted(methods)
    for method in methods:
        assert sorted(result["group_lds"][method]) == sorted(groupings)
        for grouping in groupings:
            for k in ks:
                lds = result["group_lds"][method][grouping][k]
                low, high = result["group_lds_ci"][method][grouping][k]
                assert math.isfinite(lds) and -1.0 <= lds <= 1.0, (method, grouping, k, lds)
                assert math.isfinite(low) and math.isfinite(high) and low <= lds <= high
                assert result["cost_s"][method][grouping][k] > 0
                rho = result["logo_spearman"][method][grouping][k]
                assert math.isfinite(rho) and -1.0 <= rho <= 1.0


def test_quick_fast_setting(tmp_path: Path) -> None:
    result = _run_quick(tmp_path)
    assert result["setting"] == "fast" and result["quick"]
    default = [m for m in METHODS if m != "if-ekfac-128"]  # the sampled EK-FAC is opt-in
    _check_result(result, default, ["random", "kmeans-repr", "grad-kmeans"])
    # exact retraining of a convex model: the exact influence function predicts it well
    point = str(result["num_train"])
    assert result["group_lds"]["if-exact"]["random"][point] > 0.5


def test_quick_real_setting(tmp_path: Path) -> None:
    result = _run_quick(tmp_path, "--setting", "real")
    assert result["setting"] == "real"
    _check_result(result, ["tracin", "if-identity", "if-ekfac", "trak"], ["grad-kmeans"])


@pytest.fixture(scope="module")
def synthetic() -> LinearHeadSetting:
    """A 3-class linear softmax problem on 6-d Gaussian blobs, 48 training rows, 12 queries."""
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 1.5

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, size=n)
        return centres[y] + rng.normal(size=(n, 6)), y

    x, y = draw(48)
    xq, yq = draw(12)
    return LinearHeadSetting(x, y, xq, yq, num_classes=3, l2=0.5, tracin_checkpoints=3,
                             options=MethodOptions(trak_dim=16, batch_size=16))


@pytest.mark.parametrize("method", METHODS)
def test_subset_prediction_is_sum_of_point_scores(synthetic: LinearHeadSetting,
                                                  method: str) -> None:
    n, k = len(synthetic.train), 6
    point, _ = attribute(synthetic, method, with_groups(synthetic.train, np.arange(n)), n)
    masks = draw_subsets(n, 5, seed=1)
    # singleton groups: the predicted subset score is the sum of the kept rows' point scores
    explicit = np.stack([point[:, subset_rows(np.arange(n), m)].sum(1) for m in masks], 1)
    np.testing.assert_allclose(predict_subsets(point, masks), explicit, rtol=1e-9, atol=1e-12)
    # groups: the predicted subset score is the sum of the point scores of the kept groups' rows
    ids = np.random.default_rng(2).permutation(np.arange(n) % k)
    group, _ = attribute(synthetic, method, with_groups(synthetic.train, ids), k)
    masks = draw_subsets(k, 5, seed=3)
    from_points = np.stack([point[:, subset_rows(ids, m)].sum(1) for m in masks], 1)
    scale = np.abs(from_points).max()
    np.testing.assert_allclose(predict_subsets(group, masks), from_points, rtol=1e-6,
                               atol=1e-9 * scale)


def test_sampled_ekfac_is_exact_ekfac_below_its_sample_size(synthetic: LinearHeadSetting
                                                             ) -> None:
    n = len(synthetic.train)  # 48 rows < the 128-row sample: every row is used
    grouped = with_groups(synthetic.train, np.arange(n))
    exact, _ = attribute(synthetic, "if-ekfac", grouped, n)
    sampled, _ = attribute(synthetic, "if-ekfac-128", grouped, n)
    np.testing.assert_allclose(sampled, exact, rtol=1e-10, atol=0)


def test_exact_influence_has_positive_lds_and_logo(synthetic: LinearHeadSetting) -> None:
    from hf_ggda.metrics import load_metric

    n = len(synthetic.train)
    cells, stats = evaluate_partition(synthetic, load_metric("group_lds"), ["if-exact"],
                                      np.arange(n), n, num_subsets=12, logo_groups=4, seed=0,
                                      grouping="point")
    assert stats["retrains"] == 16
    assert synthetic.max_grad_norm < 1e-5
    (cell,) = cells
    assert cell.lds["lds"] > 0.5, cell.lds  # measured 0.78; a flipped sign gives -0.78
    assert cell.logo["pearson"] > 0.8, cell.logo
