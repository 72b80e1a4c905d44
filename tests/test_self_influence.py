"""Self-influence as a result of its own: exact against singleton groups, columns, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_ggda.attributors import get_attributor
from hf_ggda.errors import MissingColumnError, ScoresFileError
from hf_ggda.integrations.cards import BAR_CHART_FILE, HISTOGRAM_FILE, build_attribution_card
from hf_ggda.pruning import prune_dataset
from hf_ggda.self_influence import SelfInfluence
from hf_ggda.tasks import SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

GROUPS = [0, 0, 0, 1, 1, 2, 0, 3, 3, 3, 3, 4, 1, 2]
CONFIGS = {
    "influence-identity": {"attributor_type": "influence", "preconditioner": "identity"},
    "influence-ekfac": {"attributor_type": "influence", "preconditioner": "ekfac",
                        "damping": 1e-3},
    "influence-unit": {"attributor_type": "influence", "preconditioner": "identity",
                       "normalize": "unit"},
    "tracin": {"attributor_type": "tracin"},
    "trak": {"attributor_type": "trak", "projection_dim": 32},
}


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=1).double().eval()
    task = SequenceClassificationTask(tok, max_length=16)
    train = toy_dataset(len(GROUPS), seed=0)
    train = train.add_column("group_id", GROUPS).add_column("row", list(range(len(GROUPS))))
    return {"model": model, "task": task, "train": train}


def _fit(setup: dict[str, Any], name: str, column: str = "group_id") -> Any:
    config = {**CONFIGS[name], "batch_size": 5}
    return get_attributor(setup["model"], setup["task"], config).fit(setup["train"], column)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_row_self_influence_equals_singleton_group_self_influence(setup: dict[str, Any],
                                                                 name: str) -> None:
    points = _fit(setup, name, "row")
    rows = points.row_self_scores(setup["train"])
    torch.testing.assert_close(rows, points.self_scores(), rtol=1e-8, atol=1e-12)
    assert rows.dtype == torch.float64
    if name != "trak":  # g_iᵀ M⁻¹ g_i with M positive definite
        assert bool((rows > 0).all())


@pytest.mark.parametrize("name", ["influence-identity", "tracin"])
def test_drill_down_rows_match_point_mode(setup: dict[str, Any], name: str) -> None:
    """Grouping-independent preconditioners: drilled rows = the singleton fit's values."""
    grouped = _fit(setup, name).self_influence(drill_top=2)
    singles = _fit(setup, name, "row").self_scores()
    assert grouped.num_queries == 0 and grouped.query_mode == "self"
    top2 = [g for g, _ in grouped.top_k(k=2)]
    members = [i for i, g in enumerate(GROUPS) if g in top2]
    assert sorted(grouped.point_rows) == members  # positions: the toy rows have no key column
    assert set(grouped.point_groups) == set(top2)
    want = singles[torch.tensor(grouped.point_rows)]
    torch.testing.assert_close(grouped.point_values, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grouped.values, _fit(setup, name).self_scores())


def test_columns_by_group_id_and_row_key_and_stale_columns_removed(setup: dict[str, Any]
                                                                  ) -> None:
    result = _fit(setup, "tracin").self_influence(group_ids=[3], row_column="row")
    stale = setup["train"].add_column("ggda_group_score", [1.0] * len(GROUPS))
    shuffled = stale.shuffle(seed=3)
    out = result.to_dataset_columns(shuffled)
    assert "ggda_group_score" not in out.column_names  # a query score of an old run
    by_group = dict(zip(result.group_ids, result.values.tolist()))
    ranks = result.ranks().tolist()
    for g, value, rank in zip(out["group_id"], out["ggda_self_influence"],
                              out["ggda_self_rank"]):
        assert value == by_group[g] and rank == ranks[result.group_ids.index(g)]
    points = dict(zip(result.point_rows, result.point_values.tolist()))
    for row, g, value in zip(out["row"], out["group_id"], out["ggda_point_self_influence"]):
        assert value == (points[row] if g == 3 else None)
    with pytest.raises(MissingColumnError, match="group_id"):
        result.to_dataset_columns(setup["train"].remove_columns("group_id"))


def test_save_load_round_trip_and_untrusted_files(setup: dict[str, Any], tmp_path: Path
                                                  ) -> None:
    result = _fit(setup, "tracin").self_influence(drill_top=1, row_column="row")
    result.save_pretrained(tmp_path)
    back = SelfInfluence.from_pretrained(tmp_path)
    assert torch.equal(back.values, result.values)
    assert torch.equal(back.point_values, result.point_values)
    assert back.group_ids == result.group_ids and back.point_rows == result.point_rows
    meta_file = tmp_path / "self_influence.json"
    meta = json.loads(meta_file.read_text())
    for edit, words in [({"format_version": 9}, "format_version 9"),
                        ({"group_ids": [0, 0, 1, 2, 3]}, "duplicate"),
                        ({"extra": 1}, "unknown fields ['extra']"),
                        ({"format": "other"}, "'format'")]:
        meta_file.write_text(json.dumps({**meta, **edit}))
        with pytest.raises(ScoresFileError, match=r"(?i)re-run `hf-ggda self-influence`") as info:
            SelfInfluence.from_pretrained(tmp_path)
        assert words in str(info.value)
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "self_influence.safetensors").write_bytes(b"garbage")
    with pytest.raises(ScoresFileError, match="safetensors"):
        SelfInfluence.from_pretrained(tmp_path)


def test_prune_and_card_rank_by_self_influence(setup: dict[str, Any]) -> None:
    result = _fit(setup, "influence-identity").self_influence()
    pruned = prune_dataset(setup["train"], result, 0.2, rank="total")
    assert pruned.dropped_groups[0] == result.top_k(k=1)[0][0]
    card, images = build_attribution_card(result, setup["train"], model_name="tiny")
    text = str(card)
    assert "Highest self-influence (inspect first)" in text and "self-influence" in text
    assert "Most helpful groups" not in text and "none (self-influence)" in text
    assert set(images) == {HISTOGRAM_FILE, BAR_CHART_FILE}
    with pytest.raises(ValueError, match="no queries"):
        result.top_k(query_index=0)
