"""The bundled evaluate metric modules load by path, offline, and match scipy/sklearn."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"

import math
import socket
from typing import Any, Iterator

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from hf_ggda.metrics import METRICS, load_metric, metric_path


@pytest.fixture(scope="module")
def no_network() -> Iterator[list[Any]]:
    """Record (and refuse) every socket connection while the metrics load and compute."""
    import evaluate

    attempts: list[Any] = []
    original = socket.socket.connect
    patch = pytest.MonkeyPatch()  # in case evaluate was imported before the variable was set
    patch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    yield attempts
    socket.socket.connect = original  # type: ignore[method-assign]
    patch.undo()


@pytest.fixture(scope="module")
def lds(no_network: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_metric("group_lds", cache_dir=str(tmp_path_factory.mktemp("lds")))


@pytest.fixture(scope="module")
def detection(no_network: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_metric("noisy-label-detection",
                       cache_dir=str(tmp_path_factory.mktemp("det")))


def test_modules_load_by_path_offline(lds: Any, detection: Any,
                                      no_network: list[Any]) -> None:
    import evaluate

    assert isinstance(lds, evaluate.Metric) and isinstance(detection, evaluate.Metric)
    assert set(lds.features) == {"predictions", "references"}
    assert set(detection.features) == {"scores", "references"}
    assert [metric_path(m).name for m in METRICS] == list(METRICS)
    assert no_network == []
    with pytest.raises(ValueError, match="Unknown metric"):
        load_metric("accuracy")


def test_group_lds_matches_scipy(lds: Any) -> None:
    rng = np.random.default_rng(0)
    queries, subsets = 12, 30
    measured = rng.normal(size=(queries, subsets))
    predicted = measured + rng.normal(scale=1.5, size=(queries, subsets))
    predicted[0, :5] = predicted[0, 5]  # ties use average ranks, as in scipy
    out = lds.compute(predictions=predicted, references=measured)
    rhos = np.array([stats.spearmanr(p, r).statistic for p, r in zip(predicted, measured)])
    np.testing.assert_allclose(out["spearman_per_query"], rhos, rtol=1e-12)
    assert out["lds"] == pytest.approx(rhos.mean(), rel=1e-12)
    half = stats.norm.ppf(0.975) * stats.sem(rhos)
    assert (out["lds_ci_low"], out["lds_ci_high"]) == \
        (pytest.approx(rhos.mean() - half), pytest.approx(rhos.mean() + half))
    assert out["lds_std"] == pytest.approx(rhos.std(ddof=1))
    assert (out["num_queries"], out["num_undefined"]) == (queries, 0)
    # losses fall when helpful groups are kept: negating flips every correlation
    flipped = lds.compute(predictions=predicted, references=measured,
                          references_are_losses=True)
    assert flipped["lds"] == pytest.approx(-out["lds"])
    # percentile bootstrap over queries
    boot = lds.compute(predictions=predicted, references=measured, interval="bootstrap",
                       n_resamples=500, seed=3, confidence=0.9)
    idx = np.random.default_rng(3).integers(0, queries, size=(500, queries))
    low, high = np.quantile(rhos[idx].mean(1), [0.05, 0.95])
    assert (boot["lds_ci_low"], boot["lds_ci_high"]) == (pytest.approx(low),
                                                        pytest.approx(high))
    assert low < boot["lds"] < high


def test_group_lds_ragged_constant_and_batches(lds: Any) -> None:
    preds = [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.3, 0.1]]
    refs = [[1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [2.0, 1.0]]
    out = lds.compute(predictions=preds, references=refs)
    assert out["spearman_per_query"][0] == pytest.approx(0.5)
    assert math.isnan(out["spearman_per_query"][1])  # constant predictions: undefined
    assert (out["num_queries"], out["num_undefined"]) == (2, 1)
    assert out["lds"] == pytest.approx(0.75)
    for p, r in zip(preds, refs):  # streaming through evaluate's add_batch
        lds.add_batch(predictions=[p], references=[r])
    assert lds.compute()["lds"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        lds.compute(predictions=[[1.0, 2.0]], references=[[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="interval"):
        lds.compute(predictions=preds, references=refs, interval="t")


def _recall_reference(scores: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    k = math.ceil(fraction * len(scores))
    top = np.argsort(-scores)[:k]
    return float(flipped[top].sum() / flipped.sum())


def test_noisy_label_detection_matches_references(detection: Any) -> None:
    rng = np.random.default_rng(1)
    n = 203
    flipped = (rng.random(n) < 0.15).astype(int)
    scores = rng.normal(size=n) + 1.2 * flipped  # flipped rows look more suspicious
    out = detection.compute(scores=scores, references=flipped,
                            fractions=[0.1, 0.2, 0.025], return_curve=True)
    for key, f in (("recall_at_10", 0.1), ("recall_at_20", 0.2), ("recall_at_2p5", 0.025)):
        assert out[key] == pytest.approx(_recall_reference(scores, flipped, f))
    assert out["auc"] == pytest.approx(roc_auc_score(flipped, scores), rel=1e-12)
    assert (out["num_rows"], out["num_flipped"]) == (n, int(flipped.sum()))
    curve = np.array(out["curve_recall"])
    assert len(curve) == n + 1 and curve[0] == 0 and curve[-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve) >= -1e-12)
    assert out["curve_recall"][20] == pytest.approx(_recall_reference(scores, flipped,
                                                                      20 / n))


def test_noisy_label_detection_ties_and_errors(detection: Any) -> None:
    # group scores: 3 tied rows (1 flipped) straddle the cutoff of 1 and 2 rows
    scores, flipped = [1.0, 1.0, 1.0, 0.0], [1, 0, 0, 1]
    out = detection.compute(scores=scores, references=flipped, fractions=[0.25, 0.5, 1.0])
    assert out["recall_at_25"] == pytest.approx(1 / 6)
    assert out["recall_at_50"] == pytest.approx(2 / 6)
    assert out["recall_at_100"] == pytest.approx(1.0)
    assert out["auc"] == pytest.approx(roc_auc_score(flipped, scores))
    none = detection.compute(scores=[0.1, 0.2], references=[0, 0])
    assert math.isnan(none["recall_at_10"]) and math.isnan(none["auc"])
    with pytest.raises(ValueError, match="0 \\(clean\\) or 1"):
        detection.compute(scores=[0.1, 0.2], references=[0, 2])
    with pytest.raises(ValueError, match="fractions"):
        detection.compute(scores=[0.1, 0.2], references=[0, 1], fractions=[1.5])
