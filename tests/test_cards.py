"""Attribution cards (README + plots) and the offline Hub push path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, load_from_disk
from huggingface_hub import DatasetCard, ModelCard

from hf_ggda import SIGN_CONVENTION
from hf_ggda.errors import MissingColumnError
from hf_ggda.integrations import hub
from hf_ggda.integrations.cards import BAR_CHART_FILE, HISTOGRAM_FILE, Curve, write_attribution_card
from hf_ggda.scores import GroupScores
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

K, M = 8, 5


@pytest.fixture(scope="module")
def scored() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    train = toy_dataset(40).add_column("group_id", [(i * 3) % K for i in range(40)])
    train = train.cast_column("label", ClassLabel(names=["biz", "sport", "tech"]))
    scores = GroupScores(
        matrix=torch.randn(M, K, generator=gen, dtype=torch.float64),
        group_ids=list(range(K)), query_ids=list(range(M)),
        config={"attributor_type": "tracin", "projection_dim": 32,
                "projection_kind": "rademacher", "selection_resolved": "peft: 8 tensors"},
        fingerprints={"query": "abc"})
    return {"train": train, "scores": scores, "query": toy_dataset(M, seed=3)}


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05  # not a blank canvas
    assert float((rgb.mean(-1) < 0.9).mean()) > 0.01  # some ink: bars, text, axes


def test_card_renders_with_metadata_and_plots(scored: dict[str, Any], tmp_path: Path) -> None:
    scores, train = scored["scores"], scored["train"]
    x = np.linspace(0, 1, 11)
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=2)
    readme = write_attribution_card(
        tmp_path / "card", scores, train, model=model, query_dataset=scored["query"],
        grouping="grad-kmeans (per class)", top_k=3, examples_per_group=2,
        curves={"Noisy-label detection": Curve(x, np.sqrt(x), ylabel="recall",
                                               baseline=(x, x)),
                "Pruning": (x, 1 - x ** 2)},
        limits=["Toy data."], license="apache-2.0")
    assert readme == tmp_path / "card" / "README.md" and readme.exists()
    card = DatasetCard.load(readme)
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and "data-attribution" in meta["tags"]
    ggda = meta["ggda"]
    assert (ggda["method"], ggda["num_groups"], ggda["num_queries"]) == ("tracin", K, M)
    assert ggda["sign_convention"] == SIGN_CONVENTION and ggda["projection_dim"] == 32
    assert ggda["fingerprints"]["train_dataset"] == train._fingerprint
    assert ggda["fingerprints"]["query_dataset"] == scored["query"]._fingerprint
    assert "LORA" in ggda["adapter"] and "r=2" in ggda["adapter"]
    text = card.text
    assert "tracin" in text and f"K = {K}" in text and SIGN_CONVENTION in text
    assert "rademacher to 32 dimensions" in text and "Toy data." in text
    # top / bottom groups with example rows (class names, not ids)
    (best, best_score), = scores.top_k(None, 1)
    (worst, worst_score), = scores.top_k(None, 1, largest=False)
    assert f"**Group `{best}`**: score {best_score:.4g}" in text
    assert f"**Group `{worst}`**: score {worst_score:.4g}" in text
    first_row = train.filter(lambda r: r["group_id"] == best)[0]
    assert first_row["text"] in text
    assert any(name in text for name in ("| biz |", "| sport |", "| tech |"))
    files = [HISTOGRAM_FILE, BAR_CHART_FILE, "curve_noisy_label_detection.png",
             "curve_pruning.png"]
    for name in files:
        assert f"]({name})" in text
        _check_png(tmp_path / "card" / name)
    assert not list((tmp_path / "card").glob(".*.tmp"))  # atomic writes left no temp files


def test_model_card_and_errors(scored: dict[str, Any], tmp_path: Path) -> None:
    scores, train = scored["scores"], scored["train"]
    readme = write_attribution_card(tmp_path, scores, train, model_name="my/model",
                                    card_type="model", top_k=K)
    card = ModelCard.load(readme)
    assert card.data.to_dict()["ggda"]["model"] == "my/model"
    assert "my/model" in card.text
    assert "Every group is listed above" in card.text  # top_k = K: no separate bottom list
    with pytest.raises(MissingColumnError):
        write_attribution_card(tmp_path, scores, train.remove_columns("group_id"))
    with pytest.raises(ValueError, match="same length"):
        write_attribution_card(tmp_path, scores, train, curves={"bad": ([0, 1], [0])})
    with pytest.raises(ValueError, match="card_type"):
        write_attribution_card(tmp_path, scores, train, card_type="space")


# -- Hub push path (offline) ----------------------------------------------------------------
def _scored_dataset(scored: dict[str, Any]) -> Dataset:
    return scored["scores"].to_dataset_columns(scored["train"])


def test_push_dry_run_returns_plan(scored: dict[str, Any], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("dry run must not push")

    monkeypatch.setattr(Dataset, "push_to_hub", no_network)
    monkeypatch.setattr(DatasetCard, "push_to_hub", no_network)
    data = _scored_dataset(scored)
    card_dir = tmp_path / "card"
    write_attribution_card(card_dir, scored["scores"], scored["train"])
    plan = hub.push_scored_dataset(data, "me/scored", card_dir=card_dir, dry_run=True,
                                   staging_dir=tmp_path / "stage")
    assert plan.dry_run and not plan.pushed and plan.private
    assert (plan.repo_id, plan.num_rows) == ("me/scored", len(data))
    assert "ggda_group_score" in plan.columns and plan.fingerprint == data._fingerprint
    assert load_from_disk(str(plan.dataset_dir))["ggda_group_score"] == \
        data["ggda_group_score"]
    assert plan.card_path is not None and plan.card_path.read_text() == \
        (card_dir / "README.md").read_text()
    assert plan.card_files == sorted([BAR_CHART_FILE, HISTOGRAM_FILE])
    with pytest.raises(ValueError, match="repo_id"):
        hub.push_scored_dataset(data, "a/b/c", dry_run=True)
    with pytest.raises(FileNotFoundError, match="README"):
        hub.push_scored_dataset(data, "me/x", card_dir=tmp_path / "nothing", dry_run=True)


class _FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_file(self, **kwargs: Any) -> str:
        assert Path(kwargs["path_or_fileobj"]).exists()
        self.calls.append(("upload_file", kwargs))
        return "uploaded"


def test_push_calls_hub_with_staged_data(scored: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: dict[str, Any] = {}

    def fake_push(self: Dataset, repo_id: str, **kwargs: Any) -> str:
        recorded["dataset"] = {"repo_id": repo_id, "rows": len(self),
                               "columns": self.column_names, **kwargs}
        return "commit-data"

    def fake_card_push(self: DatasetCard, repo_id: str, **kwargs: Any) -> str:
        recorded["card"] = {"repo_id": repo_id, "text": self.text, **kwargs}
        return "commit-card"

    monkeypatch.setattr(Dataset, "push_to_hub", fake_push)
    monkeypatch.setattr(DatasetCard, "push_to_hub", fake_card_push)
    data = _scored_dataset(scored)
    card_dir = tmp_path / "card"
    write_attribution_card(card_dir, scored["scores"], scored["train"])
    api = _FakeApi()
    plan = hub.push_scored_dataset(data, "me/scored", card_dir=card_dir, token="tok",
                                   private=True, staging_dir=tmp_path / "stage", api=api)
    assert plan.pushed and not plan.dry_run
    assert recorded["dataset"] == {"repo_id": "me/scored", "rows": len(data),
                                   "columns": data.column_names, "private": True,
                                   "token": "tok", "commit_message": plan.commit_message}
    assert recorded["card"]["repo_id"] == "me/scored"
    assert recorded["card"]["repo_type"] == "dataset" and recorded["card"]["token"] == "tok"
    assert SIGN_CONVENTION in recorded["card"]["text"]
    assert api.calls[0] == ("create_repo", {"repo_id": "me/scored", "repo_type": "dataset",
                                            "private": True, "exist_ok": True, "token": "tok"})
    uploaded = sorted(c[1]["path_in_repo"] for c in api.calls if c[0] == "upload_file")
    assert uploaded == sorted([BAR_CHART_FILE, HISTOGRAM_FILE])
    assert plan.results["dataset"] == "commit-data" and plan.results["card"] == "commit-card"
