"""Property-based fuzzing of the public boundary (issue 18): configs, datasets and files read
back. Every input either succeeds (with the results of a clean run where one exists) or raises
a typed :class:`hf_ggda.errors.GGDAError`; no other exception type escapes.

The default suite runs a bounded number of examples per property. A longer run::

    GGDA_FUZZ_EXAMPLES=500 python -m pytest -q tests/test_fuzz.py

(``GGDA_FUZZ_EXAMPLES`` sets ``max_examples`` of every property; hypothesis keeps failing
examples in ``.hypothesis/`` and replays them first on the next run.)
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from datasets import Dataset, load_from_disk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_ggda.attributors import InfluenceConfig, InfluenceFunction, TracInConfig
from hf_ggda.errors import GGDAError
from hf_ggda.integrations.trainer import MANIFEST_NAME, read_checkpoint_manifest
from hf_ggda.scores import META_FILE, GroupScores
from hf_ggda.store import GradientStore
from hf_ggda.testing import toy_dataset

from .conftest import make_setup
from .test_store import _synthetic

EXAMPLES = int(os.environ.get("GGDA_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

#: Values a confused user (or a hand-edited JSON file) puts where a setting belongs.
WILD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["false", "true", "no", "1e-3", "nan", "inf", "", "auto", "identity",
                     "kfac", "ekfac", "unit", "sum", "float16", "-1", "16"]),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                            st.integers(), max_size=2))


def _mostly(valid, rare):
    """Elements that are ``valid`` about 4 times in 5 (so runs get through), else ``rare``."""
    return st.one_of(valid, valid, valid, valid, rare)


def _typed_or_ok(call):
    """Run ``call``; return its result, or None when it raised a typed hf_ggda error."""
    try:
        result = call()
    except GGDAError as err:
        event(f"typed error: {type(err).__name__}")
        return None
    event("accepted")
    return result


# -- configs ----------------------------------------------------------------------------------
@FUZZ
@given(st.dictionaries(_mostly(st.sampled_from(sorted(InfluenceConfig.__dataclass_fields__)),
                               st.sampled_from(["dampng", "cosin", "Batch_size", "zzz"])),
                       WILD, max_size=3))
def test_fuzz_config_dicts(options):
    for cls in (InfluenceConfig, TracInConfig):
        data = {**options, "attributor_type": cls().attributor_type}
        cfg = _typed_or_ok(lambda cls=cls, data=data: cls.from_dict(data))
        if cfg is None:
            continue
        defaults = cls()
        for name, value in cfg.to_dict().items():  # what was accepted is clean and finite
            assert not (isinstance(value, float) and not math.isfinite(value)), name
            if isinstance(getattr(defaults, name, None), bool):  # "false" never truthy
                assert isinstance(value, bool), name
                if options.get(name) in ("false", "no"):
                    assert value is False, name
        assert cls.from_dict(cfg.to_dict()) == cfg  # and round-trips


# -- datasets -----------------------------------------------------------------------------------
_SETUP = make_setup("bert", ("classifier",))
_QUERIES = toy_dataset(2, seed=4)

def _column(n: int, *kinds):
    """``n`` values of one kind each (pyarrow columns have one type)."""
    return st.one_of(*[st.lists(kind, min_size=n, max_size=n) for kind in kinds])


@st.composite
def training_rows(draw):
    n = draw(st.integers(0, 7))
    words = st.sampled_from(["market web game", "phone team", "é ☃ 日本 profit"])
    text = draw(_column(n, _mostly(words, st.sampled_from(["", " ", None])),
                        st.integers(0, 5)))
    label = draw(_column(n, _mostly(st.integers(0, 2), st.sampled_from([-100, -1, 3, 4, None])),
                         _mostly(st.sampled_from([0.0, 1.0]),
                                 st.sampled_from([0.5, math.nan, math.inf]))))
    group = draw(_column(n, _mostly(st.integers(0, 2), st.sampled_from([-2, 7, None])),
                         _mostly(st.sampled_from(["a", "b"]), st.sampled_from(["", None])),
                         _mostly(st.sampled_from([0.0, 1.0]),
                                 st.sampled_from([0.5, math.nan, math.inf, -math.inf]))))
    return Dataset.from_dict({"text": text, "label": label, "group_id": group})


@FUZZ
@given(training_rows())
def test_fuzz_training_rows(data):
    attributor = InfluenceFunction(*_SETUP, InfluenceConfig())
    scores = _typed_or_ok(lambda: attributor.fit(data).score(_QUERIES))
    if scores is not None:  # a run that succeeds is a clean run: finite, one column a group
        assert bool(torch.isfinite(scores.matrix).all())
        assert scores.matrix.shape == (len(_QUERIES), len(set(data["group_id"])))
        assert all(isinstance(t, str) for t in data["text"])
        assert all(isinstance(v, int) and 0 <= v < 3 for v in data["label"])


# -- files read back ------------------------------------------------------------------------------
def _mutations():
    """A random edit of a JSON document: truncation, a byte flip, or a value replaced."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 400), st.none()),
        st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
        st.tuples(st.just("replace"), st.integers(0, 30), WILD))


def _mutate(raw: bytes, mutation) -> bytes:
    kind, where, value = mutation
    if kind == "truncate":
        return raw[:where % (len(raw) + 1)]
    if kind == "flip":
        i = where % len(raw)
        return raw[:i] + bytes([raw[i] ^ value]) + raw[i + 1:]
    obj = json.loads(raw)
    keys = sorted(obj) if isinstance(obj, dict) else []
    if not keys:
        return raw
    obj[keys[where % len(keys)]] = value
    return json.dumps(obj, allow_nan=True).encode()


@pytest.fixture(scope="module")
def saved_scores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scores") / "s"
    attributor = InfluenceFunction(*_SETUP, InfluenceConfig())
    scores = attributor.fit(toy_dataset(9).add_column("group_id", [0, 1, 2] * 3)).score(
        _QUERIES)
    scores.save_pretrained(str(folder))
    return folder, scores


@FUZZ
@given(_mutations())
def test_fuzz_scores_file(saved_scores, tmp_path_factory, mutation):
    folder, clean = saved_scores
    work = tmp_path_factory.mktemp("fuzz") / "s"
    shutil.copytree(folder, work)
    raw = (work / META_FILE).read_bytes()
    (work / META_FILE).write_bytes(_mutate(raw, mutation))
    loaded = _typed_or_ok(lambda: GroupScores.from_pretrained(str(work)))
    if loaded is not None and (work / META_FILE).read_bytes() == raw:
        assert torch.equal(loaded.matrix, clean.matrix)  # unchanged file: the clean result
        assert loaded.group_ids == clean.group_ids


@FUZZ
@given(_mutations())
def test_fuzz_store_manifest(tmp_path_factory, mutation):
    path = tmp_path_factory.mktemp("store") / "s"
    _synthetic(path)
    clean = GradientStore.open(path).load()
    mpath = path / "manifest.json"
    raw = mpath.read_bytes()
    mpath.write_bytes(_mutate(raw, mutation))
    store = _typed_or_ok(lambda: GradientStore.open(path))
    if store is not None:
        loaded = _typed_or_ok(store.load)
        if loaded is not None:
            assert torch.equal(loaded, clean)  # anything that loads is the clean matrix
    assert (path / "shards").is_dir()  # nothing deleted


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["step", "path", "learning_rate",
                                                 "learning_rate_source", "epoch", "adapter"]),
                                st.one_of(WILD, st.sampled_from(
                                    ["checkpoint-1", "../x", "/etc", "a/../../b", "C:\\x"])),
                                min_size=0, max_size=6), max_size=3),
       st.one_of(st.just(1), WILD))
def test_fuzz_checkpoint_manifest(tmp_path_factory, records, version):
    root = tmp_path_factory.mktemp("trainer")
    (root / MANIFEST_NAME).write_text(json.dumps({"format_version": version,
                                                  "checkpoints": records}, allow_nan=True))
    read = _typed_or_ok(lambda: read_checkpoint_manifest(root))
    for record in read or []:
        resolved = (root / record.path).resolve()
        assert resolved == root.resolve() or root.resolve() in resolved.parents


# -- the command line ---------------------------------------------------------------------------
def _cli(argv, capsys):
    """Run ``hf-ggda argv`` in-process: (exit status, stderr). argparse's own usage errors
    (exit 2 from ``SystemExit``) count as typed."""
    from hf_ggda.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    return code, err


def _assert_clean_exit(code, err, output):
    """Exit 0, or exit 2 with one ``hf-ggda: error:`` line (or argparse's usage message),
    never a traceback or an internal error; a failed run wrote nothing at ``output``."""
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        if not any(line.startswith("usage:") for line in lines):  # argparse's own message
            ours = [line for line in lines if line.startswith("hf-ggda: error:")]
            assert len(ours) == 1 and lines[-1] == ours[0], err  # the one line, at the end
        assert not output.exists() or not any(output.iterdir()), "a failed run wrote files"


_GROUPER_KEYS = st.sampled_from(["num_groups", "seed", "column", "num_grups", "grouper_type"])
#: Paths a confused user passes: missing, a file, an empty folder, a dataset with no rows.
_DATA = st.sampled_from(["ok", "missing", "file", "empty_dir", "no_rows", "output"])


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_fuzz")
    toy_dataset(12).save_to_disk(str(d / "ok"))
    Dataset.from_dict({"text": [], "label": []}).save_to_disk(str(d / "no_rows"))
    (d / "file").write_text("not a dataset")
    (d / "empty_dir").mkdir()
    return d


@FUZZ
@given(data=_DATA, num_groups=_mostly(st.sampled_from(["3", "12"]),
                                      st.sampled_from(["0", "-1", "13", "1e3", "x", ""])),
       config=st.one_of(st.none(), st.binary(max_size=20),
                        st.dictionaries(_GROUPER_KEYS, WILD, max_size=3)),
       output_is=st.sampled_from(["new", "file", "user_folder"]))
def test_fuzz_cli_group(cli_files, tmp_path_factory, capsys, data, num_groups, config,
                        output_is):
    """``hf-ggda group random`` with fuzzed paths, options and ``--config`` files."""
    run = tmp_path_factory.mktemp("run")
    output = run / "grouped"
    if output_is == "file":
        output.write_text("mine")
    elif output_is == "user_folder":
        output.mkdir()
        (output / "notes.txt").write_text("mine")
    argv = ["group", "random", "--data", output if data == "output" else cli_files / data,
            "--output", output, "--num-groups", num_groups]
    if config is not None:
        path = run / "config.json"
        path.write_bytes(config if isinstance(config, bytes) else
                         json.dumps(config, allow_nan=True).encode())
        argv += ["--config", path]
    code, err = _cli(argv, capsys)
    if output_is != "new":  # the user's own file or folder is never touched
        mine = output if output_is == "file" else output / "notes.txt"
        assert mine.read_text() == "mine"
        assert code == 2, err
        return
    _assert_clean_exit(code, err, output)
    if code == 0:
        grouped = load_from_disk(str(output))
        assert len(grouped) == 12 and "group_id" in grouped.column_names


_INFLUENCE_KEYS = _mostly(st.sampled_from(["damping", "preconditioner", "batch_size", "normalize",
                                           "strict", "selection", "factorised_dim"]),
                          st.sampled_from(["dampng", "attributor_type", "zzz"]))


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from hf_ggda.testing import tiny_lora, tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("cli_model")
    tok = tiny_tokenizer("bert")
    tiny_model("bert", len(tok)).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    tiny_lora("bert", len(tok), modules_to_save=("classifier",)).save_pretrained(d / "adapter")
    toy_dataset(10).save_to_disk(str(d / "train"))
    toy_dataset(3, seed=5).save_to_disk(str(d / "queries"))
    return d


@FUZZ
@given(config=st.one_of(st.binary(max_size=16), st.dictionaries(_INFLUENCE_KEYS, WILD,
                                                               max_size=3)),
       top_k=_mostly(st.sampled_from(["1", "3"]), st.sampled_from(["0", "-2", "a"])))
def test_fuzz_cli_attribute(cli_model, tmp_path_factory, capsys, config, top_k):
    """``hf-ggda attribute influence`` with fuzzed ``--config`` files and options."""
    d, run = cli_model, tmp_path_factory.mktemp("attr")
    path = run / "config.json"
    path.write_bytes(config if isinstance(config, bytes) else
                     json.dumps(config, allow_nan=True).encode())
    output = run / "out"
    code, err = _cli(["attribute", "influence", "--model", d / "base", "--adapter",
                      d / "adapter", "--train", d / "train", "--queries", d / "queries",
                      "--group-column", "label", "--output", output, "--config", path,
                      "--top-k", top_k], capsys)
    _assert_clean_exit(code, err, output)
    if code == 0:
        from hf_ggda.pipeline import read_run

        contents = read_run(output)
        assert contents.kind and contents.results
        for result in contents.results.values():
            assert bool(torch.isfinite(result.matrix).all())
