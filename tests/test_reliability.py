"""The bad-input contract, walked as a table, plus determinism, fault injection and a property
test of group linearity."""

from __future__ import annotations

import errno
import json
import os
import random
import warnings

import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_ggda.attributors import InfluenceConfig, InfluenceFunction
from hf_ggda.errors import (
    ColumnTypeError,
    EmptyDatasetError,
    GroupingError,
    ManifestError,
    MissingColumnError,
    ModelChangedError,
    NonFiniteError,
    NoParametersError,
    NotFittedError,
    PartialSelectionWarning,
    StoreMismatchError,
    StoreNotFoundError,
    StorePathError,
    TokenizationMismatchError,
)
from hf_ggda.fingerprint import hash_model, hash_tensors
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.grouping import get_grouper
from hf_ggda.params import ParameterSelection
from hf_ggda.store import GradientStore
from hf_ggda.testing import tiny_model, tiny_tokenizer, toy_dataset

from .conftest import make_setup
from .test_cli import saved_model  # noqa: F401 (fixture)
from .test_engine import grouped
from .test_store import _create_args, _snapshot, _synthetic


def _frozen_model():
    tok = tiny_tokenizer("bert")
    model = tiny_model("bert", len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _nan_fit(setup):
    model, task = setup

    def nan_rows(m, batch):
        loss = task.per_row_loss(m, batch)
        return loss * torch.where(batch["labels"] == 1, float("nan"), 1.0)

    GradientEngine(model, task).group_gradients(grouped(), fn=nan_rows)


def _tokenisation_changed(setup):
    model, task = setup
    attributor = InfluenceFunction(model, task, InfluenceConfig()).fit(grouped())
    task.max_length = 8
    attributor.score(toy_dataset(3))


# (name, call(setup, tmp_path), expected error type, words the message must contain)
BAD_INPUTS = [
    ("empty train", lambda s, p: InfluenceFunction(*s).fit(grouped().select([])),
     EmptyDatasetError, ["empty", "0 rows"]),
    ("empty query", lambda s, p: InfluenceFunction(*s).fit(grouped()).score(
        toy_dataset(3).select([])), EmptyDatasetError, ["empty"]),
    ("missing label column", lambda s, p: InfluenceFunction(*s).fit(
        grouped().remove_columns("label")), MissingColumnError, ["'label'", "'text'"]),
    ("missing text column", lambda s, p: InfluenceFunction(*s).fit(
        grouped().rename_column("text", "body")), MissingColumnError, ["'text'", "'body'"]),
    ("missing group column", lambda s, p: InfluenceFunction(*s).fit(toy_dataset(5)),
     MissingColumnError, ["group_id"]),
    ("text column of ints", lambda s, p: InfluenceFunction(*s).fit(Dataset.from_dict(
        {"text": [1, 2], "label": [0, 1], "group_id": [0, 1]})), ColumnTypeError, ["text"]),
    ("K < 1", lambda s, p: get_grouper("random", num_groups=0), GroupingError, ["0"]),
    ("K > n", lambda s, p: get_grouper("random", num_groups=50).assign(toy_dataset(10)),
     GroupingError, ["50", "10"]),
    ("stratified class too small", lambda s, p: get_grouper(
        "stratified", num_groups=6, allocation="equal").assign(Dataset.from_dict(
            {"text": ["a"] * 10, "label": [0] * 9 + [1]})), GroupingError, ["class"]),
    ("column grouping with nulls", lambda s, p: get_grouper("column", column="src").assign(
        Dataset.from_dict({"text": ["a", "b"], "src": ["x", None]})), GroupingError,
     ["null"]),
    ("frozen model", lambda s, p: ParameterSelection.resolve(_frozen_model()),
     NoParametersError, ["classifier.weight", "get_peft_model"]),
    ("pattern matching nothing", lambda s, p: ParameterSelection.resolve(s[0], ["zzz.*"]),
     NoParametersError, ["No parameters selected"]),
    ("NaN loss", lambda s, p: _nan_fit(s), NonFiniteError, ["rows", "NaN"]),
    ("score before fit", lambda s, p: InfluenceFunction(*s).score(toy_dataset(3)),
     NotFittedError, ["fit"]),
    ("store path missing", lambda s, p: GradientStore.open(p / "nope"), StoreNotFoundError,
     ["does not exist"]),
    ("not a store", lambda s, p: GradientStore.open(p), StoreNotFoundError,
     ["not a gradient store"]),
    ("query tokenised differently", lambda s, p: _tokenisation_changed(s),
     TokenizationMismatchError, ["max_length", "fit"]),
]


@pytest.mark.parametrize("name, call, error, words", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_table(bert_setup, tmp_path, name, call, error, words):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error) as info:
        call(bert_setup, tmp_path)
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


def test_partial_pattern_warns_or_errors_in_strict_mode(bert_setup):
    model, _ = bert_setup
    spec = [r".*lora_A.*", "no.such.param"]
    with pytest.warns(PartialSelectionWarning):
        ParameterSelection.resolve(model, spec)
    with pytest.raises(ValueError, match="no.such.param"):
        ParameterSelection.resolve(model, spec, strict=True)


def test_store_from_another_config_and_reuse_across_batch_sizes(bert_setup, tmp_path):
    model, task = bert_setup
    store = str(tmp_path / "s")
    GradientEngine(model, task, config=EngineConfig(batch_size=4)).group_gradients(
        grouped(), store=store)
    with pytest.raises(StoreMismatchError, match="projection"):
        GradientEngine(model, task, config=EngineConfig(projection_dim=8)).group_gradients(
            grouped(), store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reuse is silent
        GradientEngine(model, task, config=EngineConfig(batch_size=7)).group_gradients(
            grouped(), store=store)


def test_full_disk_keeps_previous_complete_state(bert_setup, tmp_path, monkeypatch):
    model, task = bert_setup
    store = str(tmp_path / "s")
    engine = GradientEngine(model, task, config=EngineConfig(shard_rows=8))
    first = engine.group_gradients(grouped(), store=store)
    with torch.no_grad():  # a new request for the same path must overwrite
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.5)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        engine.group_gradients(grouped(), store=store, overwrite=True)
    monkeypatch.undo()
    old = GradientStore.open(store)  # the old manifest and shards are intact and readable
    assert old.complete and torch.equal(old.load(), first.gradients)
    assert not [f for f in os.listdir(tmp_path / "s") if f.endswith(".tmp")]


# -- gradient-store paths that are files, manifests that cannot be trusted (read back as untrusted
#    input): each raises a typed error naming the fix, and nothing in the folder changes
def test_store_path_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "grads.bin"
    file.write_bytes(b"user data")
    before = _snapshot(tmp_path)
    for call in (lambda: GradientStore.create(file, **_create_args()),
                 lambda: GradientStore.create(file, **_create_args(), write=False),
                 lambda: GradientStore.open(file)):
        with pytest.raises(StorePathError) as info:
            call()
        assert str(file) in str(info.value) and "not a folder" in str(info.value)
        assert "new path or an empty folder" in str(info.value)
        assert isinstance(info.value, NotADirectoryError)
    with pytest.raises(StorePathError, match="lies under"):
        GradientStore.create(file / "sub", **_create_args())
    assert _snapshot(tmp_path) == before


def test_bad_json_manifest_is_refused_and_kept(tmp_path):
    path = tmp_path / "s"
    _synthetic(path)
    mpath = path / "manifest.json"
    mpath.write_bytes(mpath.read_bytes()[:40])  # a torn / hand-mangled file
    before = _snapshot(path)
    for call in (lambda: GradientStore.open(path),
                 lambda: GradientStore.create(path, **_create_args(), overwrite=True)):
        with pytest.raises(ManifestError, match="not valid JSON") as info:
            call()
        assert "delete that folder" in str(info.value) and "another" in str(info.value)
        assert isinstance(info.value, ValueError)
    assert _snapshot(path) == before


def test_manifest_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "s" / "manifest.json").mkdir(parents=True)
    before = _snapshot(tmp_path)
    with pytest.raises(ManifestError, match="not a regular file") as info:
        GradientStore.create(tmp_path / "s", **_create_args(), overwrite=True)
    assert "new or empty" in str(info.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("version", [99, 0, "2", None])
def test_unknown_manifest_version_is_refused(tmp_path, version):
    path = tmp_path / "s"
    _synthetic(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = version
    (path / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(path)
    for call in (lambda: GradientStore.open(path),
                 lambda: GradientStore.create(path, **_create_args(), overwrite=True)):
        with pytest.raises(ManifestError, match=f"format_version {version!r}") as info:
            call()
        assert "Upgrade hf_ggda" in str(info.value) and "delete that folder" in str(info.value)
    assert _snapshot(path) == before


# name: (a hand edit of the manifest, words the error message must contain)
EDITS = {
    "dim": (lambda m: m.__setitem__("dim", 5), "edited by hand"),
    "group id": (lambda m: m["group_ids"].__setitem__(0, 99), "edited by hand"),
    "gap in shards": (lambda m: m["shard_bounds"][1].__setitem__(0, 3), "consecutive"),
    "dtype": (lambda m: m.__setitem__("dtype", "int8"), "'int8'"),
    "complete flag": (lambda m: m.__setitem__("complete", "yes"), "'yes'"),
    "extra field": (lambda m: m.__setitem__("note", "mine"), "'note'"),
    "missing field": (lambda m: m.pop("fingerprint"), "'fingerprint'"),
    "hash removed": (lambda m: m.pop("request"), "'request'"),
    "duplicate ids": (lambda m: m["group_ids"].__setitem__(1, 0), "duplicate"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_hand_edited_manifest_is_refused(tmp_path, edit):
    path = tmp_path / "s"
    _synthetic(path)
    manifest = json.loads((path / "manifest.json").read_text())
    change, words = EDITS[edit]
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(path)
    for call in (lambda: GradientStore.open(path),
                 lambda: GradientStore.create(path, **_create_args(), overwrite=True),
                 lambda: GradientStore.create(path, **_create_args(), write=False)):
        with pytest.raises(ManifestError) as info:
            call()
        message = str(info.value)
        assert words in message and "Restore the file" in message
        assert "another (new or empty) store path" in message
    assert _snapshot(path) == before


def test_manifest_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "s"
    _synthetic(path)
    (path / "manifest.json").write_text("[1, 2]")
    before = _snapshot(path)
    with pytest.raises(ManifestError, match="not a JSON object"):
        GradientStore.open(path)
    assert _snapshot(path) == before


def test_same_seeds_give_bit_identical_scores(tmp_path):
    runs = []
    for _ in range(2):
        model, task = make_setup("bert", ("classifier",))
        data = get_grouper("random", num_groups=5, seed=3).assign(toy_dataset(30))
        attributor = InfluenceFunction(model, task, InfluenceConfig(projection_dim=16, seed=2))
        runs.append(attributor.fit(data).score(toy_dataset(4, seed=9)).matrix)
    assert torch.equal(runs[0], runs[1])


def test_fault_injection_five_kills_then_bit_identical(bert_setup, tmp_path, monkeypatch):
    """Kill the run at a random shard boundary five times; the final store is bit-identical."""
    model, task = bert_setup
    engine = GradientEngine(model, task, config=EngineConfig(shard_rows=4))
    data = grouped()
    reference = engine.group_gradients(data, store=str(tmp_path / "ref"))
    original = GradientStore.write_shard
    rng = random.Random(0)
    for attempt in range(5):
        budget = rng.randint(0, 2)  # shards this attempt may write before it is killed

        def dying(self, index, grads, budget=[budget]):
            if budget[0] == 0:
                raise KeyboardInterrupt(f"killed (attempt {attempt})")
            budget[0] -= 1
            original(self, index, grads)

        monkeypatch.setattr(GradientStore, "write_shard", dying)
        try:
            engine.group_gradients(data, store=str(tmp_path / "s"))
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(GradientStore, "write_shard", original)
    final = engine.group_gradients(data, store=str(tmp_path / "s"))
    assert torch.equal(final.gradients, reference.gradients)
    for name in os.listdir(tmp_path / "ref" / "shards"):
        assert (tmp_path / "s" / "shards" / name).read_bytes() == \
            (tmp_path / "ref" / "shards" / name).read_bytes()


_SETUP = make_setup("bert", ("classifier",))
_DATA = toy_dataset(16)
_ATTRIBUTOR = InfluenceFunction(*_SETUP, InfluenceConfig())
_POINT = _ATTRIBUTOR.fit(_DATA.add_column("group_id", list(range(16)))).score(
    toy_dataset(3, seed=4)).matrix


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=16, max_size=16))
def test_group_linearity_property(groups):
    """For any grouping, score(G) = Σ_{i∈G} score({i}) (identity IF, float64)."""
    scores = _ATTRIBUTOR.fit(_DATA.add_column("group_id", groups)).score(
        toy_dataset(3, seed=4))
    labels = torch.tensor(groups)
    expected = torch.stack([_POINT[:, labels == g].sum(1) for g in scores.group_ids], dim=1)
    torch.testing.assert_close(scores.matrix, expected, rtol=1e-6, atol=1e-10)


def test_cli_store_path_that_is_a_file_exits_2(saved_model, capsys):
    """The store's OSError kinds (here: a path that is a file) are one clean CLI line too."""
    from hf_ggda.cli import main

    d = saved_model
    (d / "st").write_bytes(b"user data")
    argv = ["attribute", "influence", "--model", str(d / "base"), "--train", str(d / "train"),
            "--queries", str(d / "queries.jsonl"), "--max-length", "16", "--store",
            str(d / "st"), "--group-column", "label", "--output", str(d / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hf-ggda: error:" in err and "not a folder" in err and "Traceback" not in err
    assert (d / "st").read_bytes() == b"user data" and not (d / "o").exists()


# -- the model state: results carry the weight hash of fit(); new gradients from other weights
#    are refused, and every weight (frozen base weights too) is in the hash
def _edit_lora(model, delta):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(delta)


def test_score_after_the_weights_changed_raises_and_writes_nothing(bert_setup, tmp_path):
    model, task = bert_setup
    attributor = InfluenceFunction(model, task, InfluenceConfig()).fit(
        grouped(), store=str(tmp_path / "s"))
    queries = toy_dataset(3, seed=4)
    before = attributor.score(queries)
    assert before.fingerprints["train"][0]["model"] == \
        before.fingerprints["query_gradients"][0]["model"]  # results carry the weight hash
    snapshot = _snapshot(tmp_path)
    _edit_lora(model, 0.5)  # e.g. training went on after fit()
    calls = {"score": lambda: attributor.score(queries),
             "chunked score": lambda: attributor.score(queries, query_chunk=1),
             "drill-down": lambda: attributor.refine(before, top_k=1, query_dataset=queries),
             "row self-influence": lambda: attributor.row_self_scores(grouped().select([0]))}
    for name, call in calls.items():
        with pytest.raises(ModelChangedError) as info:
            call()
        message = str(info.value)
        assert "changed since fit()" in message, name
        assert "Call fit() again" in message and "restore the weights" in message, name
        assert isinstance(info.value, RuntimeError)
    assert _snapshot(tmp_path) == snapshot  # nothing written, nothing lost
    _edit_lora(model, -0.5)  # the weights fit() saw: scoring works again, same numbers
    torch.testing.assert_close(attributor.score(queries).matrix, before.matrix)


def test_frozen_base_weight_edit_is_seen_by_store_and_score(bert_setup, tmp_path):
    model, task = bert_setup
    store = str(tmp_path / "s")
    engine = GradientEngine(model, task)
    engine.group_gradients(grouped(), store=store)
    attributor = InfluenceFunction(model, task, InfluenceConfig()).fit(grouped())
    frozen = next(p for n, p in model.named_parameters()
                  if not p.requires_grad and "word_embeddings" in n)
    with torch.no_grad():
        frozen.view(-1)[1] += 1e-3  # one value of a frozen base weight
    snapshot = _snapshot(tmp_path)
    with pytest.raises(StoreMismatchError, match="'model'") as info:
        engine.group_gradients(grouped(), store=store)  # no stale store reused
    assert "overwrite=True" in str(info.value)
    with pytest.raises(ModelChangedError, match="Call fit\\(\\) again"):
        attributor.score(toy_dataset(2))
    assert _snapshot(tmp_path) == snapshot


def test_weight_hash_covers_every_value_of_large_tensors():
    """Large weights were once hashed by a 4,096-value stride; now every value counts."""
    layer = torch.nn.Linear(2048, 1024, bias=False)
    layer.weight.requires_grad_(False)
    before = hash_model(layer)
    original = layer.weight.view(-1)[1].item()
    with torch.no_grad():
        layer.weight.view(-1)[1] += 1.0  # between two strided samples
    assert hash_model(layer) != before
    sampled = hash_model(layer, sampled=["weight"])  # the explicit opt-in shortcut
    with torch.no_grad():
        layer.weight.view(-1)[1] = original
    assert hash_model(layer) == before and hash_model(layer, sampled=["weight"]) == sampled
    for dtype in (torch.bfloat16, torch.float16, torch.bool):  # any dtype streams as bytes
        t = torch.zeros(3000, dtype=dtype)
        edited = t.clone().index_fill_(0, torch.tensor([7]), 1)
        assert hash_tensors([("t", t)]) != hash_tensors([("t", edited)])
