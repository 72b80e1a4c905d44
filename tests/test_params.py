"""Parameter selection: PEFT auto-detection, trainable, names/regex, empty selections."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_ggda.errors import NoParametersError, PartialSelectionWarning
from hf_ggda.params import ParameterSelection
from hf_ggda.testing import tiny_model, tiny_tokenizer

from .conftest import make_setup


def test_peft_auto_selects_adapters_and_saved_head():
    model, _ = make_setup("bert", ("classifier",))
    sel = ParameterSelection.resolve(model)
    assert sel.how == "peft"
    assert all("lora_" in n or "modules_to_save" in n for n in sel.names)
    assert any("modules_to_save" in n for n in sel.names)
    assert not any("original_module" in n for n in sel.names)
    assert sel.numel == sum(p.numel() for p in sel.parameters(model))


def test_peft_selection_survives_frozen_adapters():
    """An adapter loaded for inference (all frozen) is still found by name."""
    model, _ = make_setup("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    sel = ParameterSelection.resolve(model)
    assert len(sel.names) == 8 and all("lora_" in n for n in sel.names)


def test_other_peft_methods_are_detected():
    from peft import IA3Config, get_peft_model

    tok = tiny_tokenizer("causal")
    model = get_peft_model(tiny_model("llama", len(tok)),
                           IA3Config(target_modules=["k_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]))
    sel = ParameterSelection.resolve(model)
    assert sel.names and all("ia3_l" in n for n in sel.names)


def test_trainable_and_regex_selection():
    tok = tiny_tokenizer("bert")
    model = tiny_model("bert", len(tok))
    for n, p in model.named_parameters():
        p.requires_grad_("classifier" in n)
    assert ParameterSelection.resolve(model).names == ("classifier.weight", "classifier.bias")
    sel = ParameterSelection.resolve(model, [r".*attention\.self\.query\.weight"])
    assert len(sel.names) == 2
    with sel.only_selected_require_grad(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(sel.names)
    assert not model.bert.encoder.layer[0].attention.self.query.weight.requires_grad


def test_empty_and_partial_selections():
    tok = tiny_tokenizer("bert")
    model = tiny_model("bert", len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NoParametersError, match=r"classifier\.weight"):
        ParameterSelection.resolve(model)
    with pytest.raises(NoParametersError):
        ParameterSelection.resolve(model, ["nothing.matches"])
    with pytest.raises(NoParametersError, match="not a PeftModel"):
        ParameterSelection.resolve(model, "peft")
    with pytest.warns(PartialSelectionWarning, match=r"nothing\.matches"):
        ParameterSelection.resolve(model, ["classifier.weight", "nothing.matches"])
    with pytest.raises(ValueError, match=r"nothing\.matches"):
        ParameterSelection.resolve(model, ["classifier.weight", "nothing.matches"],
                                   strict=True)


def test_merged_adapter_has_nothing_to_select():
    model, _ = make_setup("gpt2")
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoParametersError):
            ParameterSelection.resolve(merged)
    assert isinstance(merged, torch.nn.Module)
