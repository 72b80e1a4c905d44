"""Checkpoints for TracIn and TRAK ensembles: load weights in place, restore them afterwards.

A checkpoint is a PEFT adapter folder (``adapter_model.safetensors``, as written by
``PeftModel.save_pretrained`` or by a ``Trainer`` checkpoint of a PEFT model), a full model
folder (``model.safetensors``), a ``.safetensors`` / ``.bin`` / ``.pt`` file, or an in-memory
state dict. Learning rates can be read from a ``Trainer`` output folder: the ``learning_rate``
logged in ``trainer_state.json`` at (or last before) each ``checkpoint-N`` step.

Files read back here (``trainer_state.json``, and the checkpoint paths recorded in
``ggda_checkpoints.json`` through :func:`confined_path`) are untrusted input: bad JSON or
non-finite learning rates raise :class:`~hf_ggda.errors.CheckpointManifestError`, and a
recorded path that is absolute or leaves its folder (``../x``) is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from ..errors import CheckpointManifestError
from ..logging import get_logger

logger = get_logger(__name__)

StateDict = Mapping[str, torch.Tensor]
CheckpointSource = Union[str, "Path", StateDict]

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
TRAINER_STATE = "trainer_state.json"


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


@dataclass
class Checkpoint:
    """Weights to load into the model for one component of a sum over checkpoints.

    Attributes:
        source: A folder, a weights file, or a state dict.
        name: A label for logs and fingerprints.
    """

    source: CheckpointSource
    name: str

    def is_adapter(self) -> bool:
        """Whether the source is a PEFT adapter folder."""
        return isinstance(self.source, (str, Path)) and any(
            (Path(self.source) / f).exists() for f in _ADAPTER_FILES)

    def load(self) -> dict[str, torch.Tensor]:
        """Read the weights.

        Returns:
            The state dict (adapter keys as PEFT saves them, or model keys).

        Raises:
            FileNotFoundError: The path holds no known weights file.
        """
        if not isinstance(self.source, (str, Path)):
            return dict(self.source)
        path = Path(self.source)
        if path.is_file():
            return _read_file(path)
        if self.is_adapter():
            from peft.utils import load_peft_weights

            return load_peft_weights(str(path), device="cpu")
        for name in _MODEL_FILES:
            if (path / name).exists():
                return _read_file(path / name)
        raise FileNotFoundError(f"No weights in {str(path)!r}: expected one of "
                                f"{_ADAPTER_FILES + _MODEL_FILES} or a weights file.")

    @contextlib.contextmanager
    def activate(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block the model holds this checkpoint's weights; they are restored after.

        Raises:
            FileNotFoundError: As :meth:`load`.
            ValueError: The weights do not fit the model.
        """
        state = self.load()
        own = model.state_dict()
        direct = all(k in own for k in state)
        if direct:
            touched = list(state)
        elif _is_peft(model):
            adapter = getattr(model, "active_adapter", "default")
            adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
            touched = [k for k in own if f".{adapter}." in k or k.endswith(f".{adapter}")]
        else:
            unknown = [k for k in state if k not in own][:5]
            raise ValueError(f"Checkpoint {self.name!r} has keys the model lacks, e.g. {unknown}.")
        saved = {k: own[k].detach().clone() for k in touched}
        try:
            self._load_into(model, state, direct)
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    own[k].copy_(v)

    def _load_into(self, model: torch.nn.Module, state: dict[str, torch.Tensor],
                   direct: bool) -> None:
        if direct:
            own = model.state_dict()
            with torch.no_grad():
                for k, v in state.items():
                    if own[k].shape != v.shape:
                        raise ValueError(f"Checkpoint {self.name!r}: {k} has shape "
                                         f"{tuple(v.shape)}, the model {tuple(own[k].shape)}.")
                    own[k].copy_(v)
            return
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"Checkpoint {self.name!r} does not fit the adapter: unexpected "
                             f"keys {unexpected[:5]}.")


def confined_path(root: str | os.PathLike[str], recorded: Any, source: str) -> Path:
    """Return ``root / recorded`` for a path recorded in a file, refusing one that leaves
    ``root``.

    The check is lexical (the recorded text is what is untrusted): absolute paths (POSIX or
    Windows, drive letters included), ``..`` components that climb above ``root``, and
    non-strings are refused. Symbolic links placed inside ``root`` by its owner are followed
    as usual.

    Args:
        root: The folder the path must stay in (e.g. a Trainer's output_dir).
        recorded: The path as read from the file.
        source: The file it was read from (for the message).

    Returns:
        The joined path.

    Raises:
        CheckpointManifestError: ``recorded`` is not a non-empty string, is absolute, or
            escapes ``root``.
    """
    fix = (f"Restore {source} from the run that wrote it (checkpoint paths are written "
           "relative to the Trainer's output_dir, e.g. 'checkpoint-500'), or pass the "
           "checkpoints to TracInConfig(checkpoints=[...]) yourself.")
    if not isinstance(recorded, str) or not recorded.strip() or "\x00" in recorded:
        raise CheckpointManifestError(f"Checkpoint path {recorded!r} in {source} is not a "
                                      f"path. {fix}")
    win = PureWindowsPath(recorded)
    if PurePosixPath(recorded).is_absolute() or win.is_absolute() or win.drive:
        raise CheckpointManifestError(f"Checkpoint path {recorded!r} in {source} is absolute; "
                                      f"only paths inside {str(root)!r} are followed. {fix}")
    parts = PurePosixPath(recorded.replace("\\", "/")).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise CheckpointManifestError(
                f"Checkpoint path {recorded!r} in {source} leaves its folder {str(root)!r} "
                f"('..'); only paths inside it are followed. {fix}")
    return Path(root) / recorded


def _read_state(path: Path) -> dict[str, Any]:
    """Read a ``trainer_state.json`` (untrusted): a JSON object or a typed error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointManifestError(
            f"{str(path)!r} is not valid JSON ({err}). Restore it from the Trainer run, or "
            "pass checkpoints and learning_rates to TracInConfig yourself.") from None
    if not isinstance(data, dict):
        raise CheckpointManifestError(f"{str(path)!r} holds a JSON {type(data).__name__}, not "
                                      "the Trainer's state object; restore it from the run.")
    return data


def _step_of(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _log_history(paths: list[Path]) -> list[dict]:
    entries: dict[int, dict] = {}
    for p in paths:
        if not p.is_file():
            continue
        history = _read_state(p).get("log_history", [])
        if not isinstance(history, list):
            raise CheckpointManifestError(f"'log_history' in {str(p)!r} is not a list; "
                                          "restore the file from the Trainer run.")
        for e in history:
            if isinstance(e, dict) and "learning_rate" in e and "step" in e:
                step, rate = e["step"], e["learning_rate"]
                if isinstance(step, bool) or not isinstance(step, int) or \
                        isinstance(rate, bool) or not isinstance(rate, (int, float)) or \
                        not math.isfinite(rate):
                    raise CheckpointManifestError(
                        f"A log_history entry of {str(p)!r} has step {step!r} and learning_rate "
                        f"{rate!r}: expected an integer step and a finite rate. Restore the "
                        "file, or pass learning_rates to TracInConfig yourself.")
                entries[step] = e
    return [entries[s] for s in sorted(entries)]


def learning_rate_at(history: list[dict], step: int) -> Optional[float]:
    """Return the learning rate logged at ``step``, else the last one logged before it, else
    the first one logged after it (None if nothing was logged).

    Args:
        history: ``log_history`` entries with ``step`` and ``learning_rate``, sorted by step.
        step: The global step.

    Returns:
        The learning rate or None.
    """
    before = [e for e in history if int(e["step"]) <= step]
    if before:
        return float(before[-1]["learning_rate"])
    return float(history[0]["learning_rate"]) if history else None


def trainer_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[float]]:
    """Find ``checkpoint-N`` folders of a ``Trainer`` run and the learning rate at each.

    Args:
        output_dir: The Trainer's ``output_dir``.

    Returns:
        (checkpoint folders sorted by step, learning rates).

    Raises:
        FileNotFoundError: No ``checkpoint-N`` folders.
        ValueError: No ``learning_rate`` was logged in any ``trainer_state.json``.
        CheckpointManifestError: A ``trainer_state.json`` is not valid JSON or logs a
            non-finite learning rate.
    """
    root = Path(output_dir)
    dirs = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and _step_of(p) >= 0),
                  key=_step_of)
    if not dirs:
        raise FileNotFoundError(f"No checkpoint-N folders in {str(root)!r}; train with "
                                "save_strategy='steps' or 'epoch', or pass checkpoints.")
    history = _log_history([root / TRAINER_STATE] + [d / TRAINER_STATE for d in dirs])
    rates = [learning_rate_at(history, _step_of(d)) for d in dirs]
    if any(r is None for r in rates):
        raise ValueError(f"No learning_rate in the trainer_state.json files of {str(root)!r}; "
                         "pass learning_rates explicitly.")
    logger.info("Trainer checkpoints %s with learning rates %s.", [d.name for d in dirs], rates)
    return dirs, [float(r) for r in rates]  # type: ignore[arg-type]


def learning_rate_of_checkpoint(path: str | Path) -> Optional[float]:
    """Return the learning rate a ``checkpoint-N`` folder's own trainer state logged at N.

    Args:
        path: A Trainer checkpoint folder.

    Returns:
        The learning rate, or None when the folder has no usable ``trainer_state.json``.

    Raises:
        CheckpointManifestError: The file is not valid JSON, its ``global_step`` is not an
            integer, or it logs a non-finite learning rate.
    """
    p = Path(path)
    state_file = p / TRAINER_STATE
    if not state_file.is_file():
        return None
    step = _read_state(state_file).get("global_step", _step_of(p))
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointManifestError(f"global_step {step!r} in {str(state_file)!r} is not an "
                                      "integer; restore the file from the Trainer run.")
    return learning_rate_at(_log_history([state_file]), step)
