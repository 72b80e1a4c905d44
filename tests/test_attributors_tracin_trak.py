"""GGDA-TracIn over checkpoints and GGDA-TRAK (kernels, out-to-loss weights, ensembles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from hf_ggda.attributors import (
    TRAK,
    InfluenceConfig,
    InfluenceFunction,
    TensorTask,
    TracIn,
    TracInConfig,
    TRAKConfig,
    trainer_checkpoints,
)
from hf_ggda.attributors.checkpoints import learning_rate_at
from hf_ggda.gradients import EngineConfig, GradientEngine
from hf_ggda.tasks import CausalLMTask, SequenceClassificationTask
from hf_ggda.testing import tiny_lora, tiny_tokenizer, toy_dataset

GROUPS = [2, 0, 0, 1, 1, 2, 0, 3, 3, 1, 3, 2]


def _data() -> tuple[Any, Any]:
    train = toy_dataset(len(GROUPS), seed=1)
    train = train.add_column("group_id", GROUPS).add_column("row", list(range(len(GROUPS))))
    return train, toy_dataset(3, seed=7)


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    tok = tiny_tokenizer("bert")
    model = tiny_lora("bert", tok.vocab_size, r=1, seed=3).double().eval()
    train, query = _data()
    return {"model": model, "task": SequenceClassificationTask(tok, max_length=16),
            "train": train, "query": query}


@pytest.fixture(scope="module")
def gpt2() -> dict[str, Any]:
    tok = tiny_tokenizer("causal")
    model = tiny_lora("gpt2", tok.vocab_size, r=1, seed=4).double().eval()
    train, query = _data()
    return {"model": model, "task": CausalLMTask(tok, max_length=16), "train": train,
            "query": query}


def _perturbed_states(model: torch.nn.Module, n: int) -> list[dict[str, torch.Tensor]]:
    """Adapter state dicts (PEFT format) near the current weights."""
    base = get_peft_model_state_dict(model)
    gen = torch.Generator().manual_seed(0)
    return [{k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in base.items()} for _ in range(n)]


def _save_adapters(model: torch.nn.Module, states: list[dict[str, torch.Tensor]],
                   dirs: list[Path]) -> None:
    original = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    for state, d in zip(states, dirs):
        set_peft_model_state_dict(model, state)
        model.save_pretrained(str(d))
    set_peft_model_state_dict(model, original)


def _sum_points(point: torch.Tensor, ids: list[int]) -> torch.Tensor:
    g = torch.tensor(GROUPS)
    return torch.stack([point[:, g == k].sum(1) for k in ids], 1)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) * 1e-3)


def _check_linear(make: Any, setup: dict[str, Any]) -> None:
    """score(G) = Σ_{i∈G} score({i}); the drill-down equals the singleton fit."""
    grouped = make().fit(setup["train"], "group_id")
    scores = grouped.score(setup["query"])
    singles = make().fit(setup["train"], "row").score(setup["query"])
    _close(_sum_points(singles.matrix, grouped.group_ids), scores.matrix)
    refined = grouped.refine(scores, group_ids=grouped.group_ids, row_column="row")
    _close(refined.point_scores, singles.matrix[:, refined.point_rows])


# -- TracIn ------------------------------------------------------------------------------------
def test_tracin_over_adapter_folders(bert: dict[str, Any], tmp_path: Path) -> None:
    model, task = bert["model"], bert["task"]
    states = _perturbed_states(model, 2)
    dirs = [tmp_path / "ckpt-a", tmp_path / "ckpt-b"]
    _save_adapters(model, states, dirs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = [0.1, 0.02]
    cfg = TracInConfig(checkpoints=[str(d) for d in dirs], learning_rates=rates, batch_size=5)
    tracin = TracIn(model, task, cfg).fit(bert["train"], "group_id")
    scores = tracin.score(bert["query"])
    for k, v in model.state_dict().items():  # weights restored after every use
        assert torch.equal(v, before[k]), k
    # reference: load each checkpoint by hand and sum η_c q_c · g_c
    engine = GradientEngine(model, task, config=EngineConfig(batch_size=5))
    expected = torch.zeros_like(scores.matrix)
    for state, rate in zip(states, rates):
        set_peft_model_state_dict(model, state)
        g = engine.group_gradients(bert["train"], "group_id").gradients
        q = engine.per_example_gradients(bert["query"]).gradients
        expected += rate * q @ g.T
    model.load_state_dict(before)
    _close(scores.matrix, expected, rtol=1e-10)
    # in-memory state dicts give the same numbers
    in_memory = TracIn(model, task, TracInConfig(learning_rates=rates, batch_size=5),
                       checkpoints=states).fit(bert["train"], "group_id")
    _close(in_memory.score(bert["query"]).matrix, expected, rtol=1e-10)
    _check_linear(lambda: TracIn(model, task, cfg), bert)
    diag = torch.diagonal(tracin.score(bert["train"], query_group_column="group_id").matrix)
    _close(tracin.self_scores(), diag)


def test_tracin_without_checkpoints_is_scaled_grad_dot(bert: dict[str, Any]) -> None:
    model, task = bert["model"], bert["task"]
    tracin = TracIn(model, task, TracInConfig(learning_rates=[0.5], batch_size=5))
    assert [c.checkpoint for c in tracin.components] == [None]
    dot = InfluenceFunction(model, task, InfluenceConfig(batch_size=5))
    a = tracin.fit(bert["train"], "group_id").score(bert["query"]).matrix
    b = dot.fit(bert["train"], "group_id").score(bert["query"]).matrix
    _close(a, 0.5 * b, rtol=1e-12)


def test_tracin_reads_learning_rates_from_trainer_output(bert: dict[str, Any],
                                                         tmp_path: Path) -> None:
    model, task = bert["model"], bert["task"]
    states = _perturbed_states(model, 2)
    dirs = [tmp_path / "checkpoint-4", tmp_path / "checkpoint-2"]
    _save_adapters(model, states, dirs)
    history = [{"step": 1, "learning_rate": 1e-3, "loss": 1.0},
               {"step": 2, "learning_rate": 8e-4, "loss": 0.9},
               {"step": 3, "learning_rate": 6e-4, "loss": 0.8},
               {"step": 4, "train_loss": 0.7}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    for d, step in ((dirs[0], 4), (dirs[1], 2)):
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [e for e in history if e["step"] <= step]}))
    found, rates = trainer_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-2", "checkpoint-4"]
    assert rates == [8e-4, 6e-4]  # at step 4 nothing was logged: the last rate before it
    from_dir = TracIn(model, task, TracInConfig(trainer_output_dir=str(tmp_path), batch_size=5))
    assert [c.weight for c in from_dir.components] == rates
    # checkpoint folders given directly: each one's own trainer_state.json
    direct = TracIn(model, task, TracInConfig(checkpoints=[str(d) for d in found], batch_size=5))
    assert [c.weight for c in direct.components] == rates
    a = from_dir.fit(bert["train"], "group_id").score(bert["query"]).matrix
    b = direct.fit(bert["train"], "group_id").score(bert["query"]).matrix
    _close(a, b, rtol=1e-12)
    assert learning_rate_at([], 3) is None
    assert learning_rate_at([{"step": 5, "learning_rate": 0.5}], 3) == 0.5
    with pytest.raises(ValueError, match="learning rate"):
        TracIn(model, task, TracInConfig(checkpoints=[str(tmp_path / "nowhere")]))
    with pytest.raises(FileNotFoundError):
        TracIn(model, task, TracInConfig(trainer_output_dir=str(tmp_path / "checkpoint-2")))
    with pytest.raises(ValueError, match="learning rates for"):
        TracInConfig(checkpoints=["a", "b"], learning_rates=[0.1])


# -- TRAK --------------------------------------------------------------------------------------
def _trak(setup: dict[str, Any], ckpts: Any = None, **kwargs: Any) -> TRAK:
    cfg = TRAKConfig(**{"projection_dim": 24, "kernel": "exact", "damping": 1e-3,
                        "batch_size": 5, **kwargs})
    return TRAK(setup["model"], setup["task"], cfg, checkpoints=ckpts)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_trak_group_features_fold_out_to_loss_weights(arch: str, request: Any) -> None:
    setup = request.getfixturevalue(arch)
    trak = _trak(setup).fit(setup["train"], "group_id")
    engine = trak._engine(0, trak.components[0])
    loss_grads = engine.group_gradients(setup["train"], "group_id", fn="loss").gradients
    # ∂ℓ/∂f = −(1 − p): the Q-weighted output gradient is minus the loss gradient
    # (CausalLMTask computes token losses in float32, hence the looser tolerance there)
    _close(trak._fit.parts[0].raw, -loss_grads,  # type: ignore[union-attr]
           rtol=1e-8 if arch == "bert" else 1e-5)
    _check_linear(lambda: _trak(setup), setup)


def test_trak_self_scores_and_kernels(bert: dict[str, Any]) -> None:
    trak = _trak(bert).fit(bert["train"], "group_id")
    diag = torch.diagonal(trak.score(bert["train"], query_group_column="group_id").matrix)
    _close(trak.self_scores(), diag)
    engine = trak._engine(0, trak.components[0])
    feats = engine.per_example_gradients(bert["train"], fn=trak.output).gradients
    kernel = trak._fit.parts[0].preconditioner  # type: ignore[union-attr]
    _close(kernel.matrix(), feats.T @ feats, rtol=1e-8)
    # the batched kernel uses the K group features of the (unweighted) output function, not
    # the Q-weighted training vectors; with singleton groups it is the exact kernel
    grouped = _trak(bert, kernel="group").fit(bert["train"], "group_id")
    phi = engine.group_gradients(bert["train"], "group_id", fn=trak.output).gradients
    _close(grouped._fit.parts[0].preconditioner.matrix(), phi.T @ phi, rtol=1e-8)  # type: ignore
    weighted = grouped._fit.parts[0].raw  # type: ignore[union-attr]
    assert not torch.allclose(grouped._fit.parts[0].preconditioner.matrix(),  # type: ignore
                              weighted.T @ weighted, rtol=1e-3)
    singles = _trak(bert, kernel="group").fit(bert["train"], "row")
    point_kernel = singles._fit.parts[0].preconditioner  # type: ignore[union-attr]
    _close(point_kernel.matrix(), kernel.matrix(), rtol=1e-8)  # type: ignore[union-attr]
    # a sampled kernel: n / s times the features of a seeded sample of s rows
    sampled = _trak(bert, kernel="sample", kernel_sample_size=5).fit(bert["train"], "group_id")
    sample_kernel = sampled._fit.parts[0].preconditioner.matrix()  # type: ignore[union-attr]
    n = len(GROUPS)
    rows = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:5].tolist())
    _close(sample_kernel, (n / 5) * feats[rows].T @ feats[rows], rtol=1e-8)


@pytest.mark.parametrize("kernel", ["group", "exact"])
def test_trak_one_pass_grouping_equals_grouping_first(bert: dict[str, Any], kernel: str) -> None:
    """fit(grouper=...) gives the groups and scores of grouping first, kernel included; the
    pass's output-layer features have the loss's sign (train_sign = −1 for Q·f)."""
    from hf_ggda.grouping import GradKMeansGrouper

    grouped = GradKMeansGrouper(num_groups=3, seed=0, batch_size=5).assign(
        bert["train"], model=bert["model"], task=bert["task"])
    two = _trak(bert, kernel=kernel).fit(grouped, "group_id")
    one = _trak(bert, kernel=kernel).fit(bert["train"], grouper=GradKMeansGrouper(
        num_groups=3, seed=0, batch_size=5))
    assert one.train_dataset["group_id"] == grouped["group_id"]
    assert one.group_ids == two.group_ids == [0, 1, 2]
    kernels = [t._fit.parts[0].preconditioner.matrix() for t in (one, two)]  # type: ignore
    _close(kernels[0], kernels[1], rtol=1e-8)
    _close(one.score(bert["query"]).matrix, two.score(bert["query"]).matrix, rtol=1e-8)
    # the features of a pass of Q·f, times train_sign, are those of a pass of the loss
    grouper, n = GradKMeansGrouper(num_groups=3, seed=0), len(GROUPS)
    engine = one._engine(0, one.components[0])
    taps = [grouper.pass_tap(bert["model"], bert["task"], n, sign=sign)
            for sign in (one.train_sign(), 1.0)]
    for tap, fn in zip(taps, (one.train_fn(), "loss")):
        engine.group_gradients(bert["train"], "group_id", fn=fn, taps=[tap])
    assert one.train_sign() == -1.0
    _close(torch.as_tensor(taps[0].matrix()), torch.as_tensor(taps[1].matrix()), rtol=1e-6)


def test_trak_ensemble_averages_members(bert: dict[str, Any]) -> None:
    states = _perturbed_states(bert["model"], 2)
    both = _trak(bert, ckpts=states).fit(bert["train"], "group_id").score(bert["query"])
    first = _trak(bert, ckpts=states[:1], seed=0).fit(bert["train"], "group_id")
    second = _trak(bert, ckpts=states[1:], seed=1).fit(bert["train"], "group_id")
    mean = (first.score(bert["query"]).matrix + second.score(bert["query"]).matrix) / 2
    _close(both.matrix, mean, rtol=1e-10)


def test_trak_needs_an_output_function(bert: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="margin"):
        TRAK(bert["model"], object(), TRAKConfig())
    regression = torch.nn.Linear(2, 1).double()
    rows = Dataset.from_dict({"x": [[0.0, 1.0], [1.0, 0.0]], "y": [0.5, 1.5],
                              "group_id": [0, 1]})
    with pytest.raises(TypeError, match="classification"):
        TRAK(regression, TensorTask(loss="mse"), TRAKConfig(projection_dim=2)).fit(rows)
    with pytest.raises(ValueError, match="kernel"):
        TRAKConfig(kernel="diagonal")


def test_influence_on_causal_lm_is_additive(gpt2: dict[str, Any]) -> None:
    def make() -> InfluenceFunction:
        cfg = InfluenceConfig(preconditioner="ekfac", damping=1e-3, batch_size=5)
        return InfluenceFunction(gpt2["model"], gpt2["task"], cfg)

    _check_linear(make, gpt2)
