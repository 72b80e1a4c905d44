"""Which parameters to attribute through: PEFT adapters (default), trainable ones, or names;
and where a model's output layer is (:func:`find_head`).

Gradients are taken for the selected parameters only; every other weight is a constant
(``requires_grad=False`` while the engine runs, restored afterwards).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from .errors import NoParametersError, PartialSelectionWarning
from .logging import get_logger

logger = get_logger(__name__)

SelectionSpec = Union[str, Sequence[str]]


def _peft_names(model: torch.nn.Module) -> list[str]:
    """Names of a PeftModel's adapter parameters for its active adapter (any PEFT method)."""
    adapter = getattr(model, "active_adapter", "default")
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    prefix = getattr(getattr(model, "base_model", None), "prefix", None)
    names = []
    for name, _ in model.named_parameters():
        in_adapter = f".{adapter}." in f".{name}." or name.endswith(f".{adapter}")
        is_tuner = prefix is not None and prefix in name
        is_saved = ".modules_to_save." in name
        is_prompt = name.startswith("prompt_encoder.")
        if (is_tuner or is_saved or is_prompt) and in_adapter:
            names.append(name)
    return names


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the weights and biases of every Linear / Conv1D layer (tied weights that the
    model names elsewhere, e.g. a GPT-2 head tied to the embeddings, are not included)."""
    from transformers.pytorch_utils import Conv1D

    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            owned |= {id(p) for p in module.parameters(recurse=False)}
    chosen = []
    for mname, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            for pname, _ in module.named_parameters(recurse=False):
                chosen.append(f"{mname}.{pname}" if mname else pname)
    names = dict(model.named_parameters())
    return [n for n in names if n in set(chosen) and id(names[n]) in owned]


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@dataclass(frozen=True)
class ParameterSelection:
    """An ordered set of selected parameter names with their shapes.

    Attributes:
        names: Selected parameter names, in ``model.named_parameters()`` order.
        shapes: Their shapes.
        how: How they were selected (for fingerprints and messages).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    how: str

    @property
    def numel(self) -> int:
        """Total number of selected scalars d."""
        total = 0
        for shape in self.shapes:
            total += int(torch.Size(shape).numel())
        return total

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Return each name's [start, stop) slice in the flat gradient vector."""
        out, pos = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = int(torch.Size(shape).numel())
            out[name] = (pos, pos + n)
            pos += n
        return out

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Return the selected parameter tensors of ``model`` in order."""
        named = dict(model.named_parameters())
        return [named[n] for n in self.names]

    def to_dict(self) -> dict[str, object]:
        """Plain-data form (fingerprints, manifests)."""
        return {"how": self.how, "names": list(self.names),
                "shapes": [list(s) for s in self.shapes]}

    @contextlib.contextmanager
    def only_selected_require_grad(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block, exactly the selected parameters require gradients."""
        chosen = set(self.names)
        saved = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for n, p in model.named_parameters():
                p.requires_grad_(n in chosen)
            yield
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(saved[n])

    @classmethod
    def resolve(
        cls, model: torch.nn.Module, spec: SelectionSpec = "auto", strict: bool = False
    ) -> "ParameterSelection":
        """Select parameters.

        Args:
            model: The model (a ``PeftModel`` or any torch module).
            spec: ``"auto"`` (PEFT adapters on a PeftModel, else trainable parameters),
                ``"peft"``, ``"trainable"``, ``"linear"`` (the weights and biases of every
                ``nn.Linear`` / ``Conv1D`` layer, for fine-tuning without PEFT), or a list of
                exact names, regular expressions (full match) or shell-style patterns such as
                ``"*.attention.*"`` (fnmatch) of parameter names.
            strict: Raise instead of warning when some requested names match nothing.

        Returns:
            The selection.

        Raises:
            NoParametersError: Nothing was selected.
            ValueError: ``spec`` is unknown, or (strict) some names matched nothing.
        """
        all_names = [n for n, _ in model.named_parameters()]
        if isinstance(spec, str) and spec == "linear":
            names, how = _linear_names(model), "linear"
        elif isinstance(spec, str) and spec in ("auto", "peft", "trainable"):
            how = spec
            if spec == "peft" or (spec == "auto" and _is_peft(model)):
                if not _is_peft(model):
                    raise NoParametersError("selection='peft' (the model is not a PeftModel)",
                                            all_names)
                names = _peft_names(model)
                how = "peft"
            else:
                names = [n for n, p in model.named_parameters() if p.requires_grad]
                how = "trainable"
        else:
            patterns = [spec] if isinstance(spec, str) else list(spec)
            names, unmatched = cls._match(all_names, patterns)
            how = f"names={patterns}"
            if unmatched and names:
                msg = (f"Parameter patterns {unmatched} matched nothing (others matched "
                       f"{len(names)} parameters). Check the names with "
                       "`[n for n, _ in model.named_parameters()]`.")
                if strict:
                    raise ValueError(msg)
                warnings.warn(msg, PartialSelectionWarning, stacklevel=2)
        if not names:
            raise NoParametersError(f"selection {how!r}", all_names)
        named = dict(model.named_parameters())
        shapes = tuple(tuple(named[n].shape) for n in names)
        logger.info("Selected %d parameter tensors (%s).", len(names), how)
        return cls(tuple(names), shapes, how)

    @staticmethod
    def _match(all_names: list[str], patterns: list[str]) -> tuple[list[str], list[str]]:
        chosen: set[str] = set()
        unmatched = []
        for pat in patterns:
            try:
                regex: Optional[re.Pattern[str]] = re.compile(pat)
            except re.error:  # e.g. "*.mlp.*": a shell-style pattern only
                regex = None
            hits = {n for n in all_names if n == pat or (regex is not None and regex.fullmatch(n))
                    or fnmatch.fnmatchcase(n, pat)}
            if not hits:
                unmatched.append(pat)
            chosen |= hits
        return [n for n in all_names if n in chosen], unmatched


def find_head(model: torch.nn.Module) -> torch.nn.Module:
    """Return the output layer (classifier / score / lm_head) of a model, PEFT-wrapped or not.

    Args:
        model: A transformers model or a ``PeftModel`` around one.

    Returns:
        The module whose input is the penultimate representation.

    Raises:
        ValueError: No output layer could be found.
    """
    get_base = getattr(model, "get_base_model", None)
    base: torch.nn.Module = get_base() if get_base is not None else model
    for name in ("classifier", "score"):
        head = getattr(base, name, None)
        if head is not None:
            linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
            if isinstance(head, torch.nn.Linear) or not linears:
                return head
            return linears[-1]
    get_output = getattr(base, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    if output is not None:
        return output
    raise ValueError(
        f"Cannot find the output layer of {type(base).__name__}: expected an attribute "
        "'classifier', 'score' or output embeddings. Subclass the task and override "
        "`output_gradient`."
    )
