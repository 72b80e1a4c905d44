"""GGDA-Influence and the shared Attributor API on a tiny LoRA BERT (float64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import load_from_disk

from hf_ggda import SIGN_CONVENTION
from hf_ggda.attributors import (
    ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING,
    AttributorConfig,
    InfluenceConfig,
    InfluenceFunction,
    TracInConfig,
    get_attributor,
    get_attributor_config,
    register_attributor,
)
from hf_ggda.errors import NotFittedError, StoreMismatchError
from hf_ggda.scores import GroupScores
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

GROUPS = [0, 0, 0, 1, 1, 2, 0, 3, 3, 3, 3, 4, 1, 2]
PRECONDITIONERS = {
    "identity": {},
    "kfac": {"damping": 1e-3},
    "ekfac": {"damping": 1e-3},
    "exact": {"damping": 0.05},
    "datainf": {"damping": 0.05},
    "lissa": {"damping": 0.05, "lissa_depth": 8},
}


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=1).double().eval()
    task = SequenceClassificationTask(tok, max_length=16)
    train = toy_dataset(len(GROUPS), seed=0)
    train = train.add_column("group_id", GROUPS).add_column("row", list(range(len(GROUPS))))
    query = toy_dataset(3, seed=9)
    return {"model": model, "task": task, "train": train, "query": query}


def _influence(setup: dict[str, Any], name: str, **extra: Any) -> InfluenceFunction:
    cfg = InfluenceConfig(preconditioner=name, batch_size=5, **{**PRECONDITIONERS[name], **extra})
    return InfluenceFunction(setup["model"], setup["task"], cfg)


def _sum_points(point: torch.Tensor, groups: list[int], ids: list[int]) -> torch.Tensor:
    """(m, n) point scores -> (m, K) sums over each group's rows."""
    g = torch.tensor(groups)
    return torch.stack([point[:, g == k].sum(1) for k in ids], 1)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) * 1e-3)


@pytest.mark.parametrize("name", list(PRECONDITIONERS))
def test_group_scores_are_sums_of_point_scores(setup: dict[str, Any], name: str) -> None:
    grouped = _influence(setup, name).fit(setup["train"], "group_id")
    scores = grouped.score(setup["query"])
    assert scores.matrix.dtype == torch.float64 and scores.matrix.shape == (3, 5)
    assert scores.sign_convention == SIGN_CONVENTION
    # point mode is the same code with singleton groups
    points = _influence(setup, name).fit(setup["train"], "row")
    point_scores = points.score(setup["query"])
    assert points.group_ids == list(range(len(GROUPS)))
    assert grouped.group_sizes.tolist() == [GROUPS.count(k) for k in range(5)]
    _close(_sum_points(point_scores.matrix, GROUPS, grouped.group_ids), scores.matrix)
    # drill-down into every group reproduces the singleton scores row by row
    refined = grouped.refine(scores, group_ids=grouped.group_ids, row_column="row")
    assert refined.point_key == "row" and sorted(refined.point_rows) == list(range(len(GROUPS)))
    _close(refined.point_scores, point_scores.matrix[:, refined.point_rows])
    assert refined.point_groups == [GROUPS[r] for r in refined.point_rows]


@pytest.mark.parametrize("name", ["identity", "ekfac", "lissa"])
def test_self_scores_are_the_train_vs_train_diagonal(setup: dict[str, Any], name: str) -> None:
    attributor = _influence(setup, name).fit(setup["train"], "group_id")
    train_vs_train = attributor.score(setup["train"], query_group_column="group_id",
                                      self_influence=True)
    assert train_vs_train.query_ids == attributor.group_ids
    _close(attributor.self_scores(), torch.diagonal(train_vs_train.matrix))
    assert torch.equal(train_vs_train.self_influence, attributor.self_scores())
    if name != "lissa":  # g_Gᵀ (H + λI)⁻¹ g_G > 0 for a positive definite preconditioner
        assert (attributor.self_scores() > 0).all()


def test_query_aggregation_is_linear(setup: dict[str, Any]) -> None:
    attributor = _influence(setup, "ekfac").fit(setup["train"], "group_id")
    per_row = attributor.score(setup["query"])
    summed = attributor.score(setup["query"], aggregate="sum")
    assert summed.query_mode == "sum" and summed.query_ids == ["all"]
    _close(summed.matrix, per_row.matrix.sum(0, keepdim=True))
    q = setup["query"].add_column("qg", ["x", "y", "x"])
    grouped = attributor.score(q, query_group_column="qg")
    assert grouped.query_ids == ["x", "y"]
    _close(grouped.matrix, torch.stack([per_row.matrix[[0, 2]].sum(0), per_row.matrix[1]]))


def test_cosine_is_per_row_normalisation_bounded_by_group_sizes(setup: dict[str, Any]) -> None:
    with pytest.warns(FutureWarning, match="normalize='unit'"):
        attributor = _influence(setup, "identity", cosine=True)
    attributor.fit(setup["train"], "group_id")
    scores = attributor.score(setup["query"])
    sizes = torch.as_tensor(attributor.group_sizes, dtype=torch.float64)
    assert bool((scores.matrix.abs() <= sizes[None, :] + 1e-12).all())  # Σ of cosines
    assert bool((attributor.self_scores() <= sizes ** 2 + 1e-12).all())  # ‖Σ unit rows‖²


def test_errors_before_fit_and_bad_arguments(setup: dict[str, Any]) -> None:
    attributor = _influence(setup, "identity")
    with pytest.raises(NotFittedError):
        attributor.score(setup["query"])
    with pytest.raises(NotFittedError):
        attributor.self_scores()
    attributor.fit(setup["train"], "group_id")
    with pytest.raises(ValueError, match="aggregate"):
        attributor.score(setup["query"], aggregate="mean")
    with pytest.raises(ValueError, match="not both"):
        attributor.score(setup["query"], aggregate="sum", query_group_column="x")
    scores = attributor.score(setup["query"])
    with pytest.raises(ValueError, match="Unknown group"):
        attributor.refine(scores, group_ids=[99])
    other = GroupScores(torch.zeros(1, 2), [0, 1], [0])
    with pytest.raises(ValueError, match="not produced"):
        attributor.refine(other)
    attributor._query_cache.clear()
    with pytest.raises(ValueError, match="query_dataset"):
        attributor.refine(scores)
    again = attributor.refine(scores, top_k=1, query_dataset=setup["query"])
    best = scores.top_k(None, 1)[0][0]
    assert again.point_groups == [best] * GROUPS.count(best)
    with pytest.raises(TypeError):
        InfluenceFunction(setup["model"], setup["task"], TracInConfig())


@pytest.mark.parametrize("kwargs, match", [
    ({"preconditioner": "newton"}, "preconditioner"),
    ({"preconditioner": "kfac", "normalize": "cosine"}, "normalize must be"),
    ({"preconditioner": "ekfac", "projection_dim": 8}, "identity"),
    ({"preconditioner": "datainf"}, "damping"),
    ({"damping": -1.0}, "damping"),
    ({"preconditioner": "lissa", "lissa_depth": 0}, "depth"),
    ({"batch_size": 0}, "batch_size"),
    ({"attributor_type": "trak"}, "attributor_type"),
])
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InfluenceConfig(**kwargs)


def test_registry_and_config_round_trip(setup: dict[str, Any], tmp_path: Path) -> None:
    attributor = get_attributor(setup["model"], setup["task"], "influence")
    assert isinstance(attributor, InfluenceFunction)
    cfg = get_attributor_config({"attributor_type": "influence", "preconditioner": "ekfac"},
                                damping=0.1)
    assert isinstance(cfg, InfluenceConfig) and cfg.damping == 0.1
    cfg.save_pretrained(tmp_path)
    assert AttributorConfig.from_pretrained(tmp_path) == cfg
    assert set(ATTRIBUTOR_TYPE_TO_ATTRIBUTOR_MAPPING) >= {"influence", "tracin", "trak"}
    with pytest.raises(ValueError, match="Unknown attributor_type"):
        get_attributor_config("shapley")
    with pytest.raises(ValueError, match="Unknown InfluenceConfig options"):
        get_attributor_config("influence", dampening=1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_attributor("influence", TracInConfig, InfluenceFunction)
    help_texts = [f.metadata.get("help") for f in InfluenceConfig.__dataclass_fields__.values()]
    assert all(help_texts)


def test_store_resumes_gradients_and_curvature(setup: dict[str, Any], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    first = _influence(setup, "kfac").fit(setup["train"], "group_id", store=tmp_path)
    expected = first.score(setup["query"]).matrix
    assert (tmp_path / "component-0" / "curvature-kfac.safetensors").exists()
    caplog.set_level("INFO", logger="hf_ggda")
    second = _influence(setup, "kfac").fit(setup["train"], "group_id", store=tmp_path)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Resuming gradient store" in messages and "Loaded kfac curvature" in messages
    torch.testing.assert_close(second.score(setup["query"]).matrix, expected, rtol=1e-12,
                               atol=0.0)
    with pytest.raises(StoreMismatchError):
        _influence(setup, "kfac").fit(setup["train"].select(range(10)), "group_id",
                                      store=tmp_path)


def test_columns_written_back_line_up_with_rows(setup: dict[str, Any], tmp_path: Path) -> None:
    attributor = _influence(setup, "ekfac").fit(setup["train"], "group_id")
    scores = attributor.score(setup["query"], self_influence=True)
    refined = attributor.refine(scores, top_k=2, row_column="row")
    top = {g for g, _ in scores.top_k(None, 2)}
    train = setup["train"]
    out = refined.to_dataset_columns(train)
    for r in out:
        assert (r["ggda_point_score"] is not None) == (r["group_id"] in top)
    point_by_row = dict(zip(refined.point_rows, refined.point_scores.sum(0).tolist()))
    assert [point_by_row.get(r) for r in train["row"]] == out["ggda_point_score"]
    # within a drilled group, the point scores add up to the group score
    for g in top:
        members = [r for r in out if r["group_id"] == g]
        total = sum(r["ggda_point_score"] for r in members)
        assert total == pytest.approx(members[0]["ggda_group_score"], rel=1e-6)
    shuffled = refined.to_dataset_columns(train.shuffle(seed=4))
    by_row = {r["row"]: r for r in out}
    for r in shuffled:
        assert r == by_row[r["row"]]
    shuffled.save_to_disk(str(tmp_path / "train"))
    assert load_from_disk(str(tmp_path / "train")).to_dict() == shuffled.to_dict()
    queries = refined.to_query_columns(setup["query"], k=2)
    assert queries["ggda_top_groups"][0] == [g for g, _ in scores.top_k(0, 2)]
    refined.save_pretrained(tmp_path / "scores")
    loaded = GroupScores.from_pretrained(tmp_path / "scores")
    assert torch.equal(loaded.point_scores, refined.point_scores)
    assert loaded.to_dataset_columns(train).to_dict() == out.to_dict()


def test_projected_grad_dot_matches_projected_gradients(setup: dict[str, Any]) -> None:
    attributor = _influence(setup, "identity", projection_dim=32, seed=3)
    attributor.fit(setup["train"], "group_id")
    scores = attributor.score(setup["query"])
    engine = attributor._engine(0, attributor.components[0])
    proj = engine.projector.matrix(torch.float64)  # type: ignore[union-attr]
    full = InfluenceFunction(setup["model"], setup["task"], InfluenceConfig(batch_size=5))
    full.fit(setup["train"], "group_id")
    g = full._fit.parts[0].raw  # type: ignore[union-attr]
    q = full._engine(0, full.components[0]).per_example_gradients(setup["query"]).gradients
    _close(scores.matrix, (q @ proj) @ (g @ proj).T)


def test_train_rows_used_in_dataset_order(setup: dict[str, Any]) -> None:
    """Rows of the fit dataset may come in any order; groups are found by id."""
    shuffled = setup["train"].shuffle(seed=11)
    a = _influence(setup, "exact").fit(setup["train"], "group_id").score(setup["query"])
    b = _influence(setup, "exact").fit(shuffled, "group_id").score(setup["query"])
    _close(b.matrix, a.matrix, rtol=1e-8)
