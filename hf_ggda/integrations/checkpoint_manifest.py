"""``ggda_checkpoints.json``: the checkpoint list ``GGDACallback`` writes for post-hoc TracIn.

One record per ``checkpoint-N`` folder the Trainer saved (its step, folder, learning rate and
where that rate came from). Read back as untrusted input: validated against the schema of
format version 1, unknown versions refused, recorded paths confined to the Trainer's folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..attributors import TracInConfig
from ..attributors.checkpoints import confined_path
from ..errors import CheckpointManifestError

MANIFEST_NAME = "ggda_checkpoints.json"
MANIFEST_VERSION = 1


@dataclass
class CheckpointRecord:
    """One saved checkpoint in the manifest.

    Attributes:
        step: Global step N of ``checkpoint-N``.
        path: Folder name relative to the Trainer's output_dir.
        learning_rate: Learning rate used for step N (None if it could not be found).
        learning_rate_source: ``"log_history"``, ``"optimizer"``, ``"log_history_before"``
            or ``"none"``.
        epoch: Training epoch at the save.
        adapter: Whether the folder holds a PEFT adapter (else full weights).
    """

    step: int
    path: str
    learning_rate: Optional[float]
    learning_rate_source: str
    epoch: Optional[float]
    adapter: bool


def read_checkpoint_manifest(output_dir: str | Path) -> list[CheckpointRecord]:
    """Read ``ggda_checkpoints.json`` of a Trainer output folder (untrusted input: validated
    against the schema of format version 1; recorded paths must stay inside ``output_dir``).

    Args:
        output_dir: The Trainer's output_dir.

    Returns:
        The records, sorted by step.

    Raises:
        FileNotFoundError: No manifest there.
        CheckpointManifestError: (a ``ValueError``) The manifest is not valid JSON, has an
            unknown format version, fails the schema, or records a path that is absolute or
            leaves ``output_dir``.
    """
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {MANIFEST_NAME} in {str(output_dir)!r}: train with "
                                "GGDACallback in the Trainer's callbacks.")
    fix = ("Restore it from the training run, delete it to start a new manifest, or pass "
           "checkpoints and learning_rates to TracInConfig yourself.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointManifestError(f"{path} is not a valid {MANIFEST_NAME} ({err}). "
                                      f"{fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise CheckpointManifestError(f"{path} is not a valid {MANIFEST_NAME}: expected an "
                                      f"object with a 'checkpoints' list. {fix}")
    version = data.get("format_version")
    if isinstance(version, bool) or version != MANIFEST_VERSION:
        raise CheckpointManifestError(
            f"{path} has format_version {version!r}; this hf_ggda reads version "
            f"{MANIFEST_VERSION}. Upgrade hf_ggda, or {fix[0].lower()}{fix[1:]}")
    return sorted((_record(r, output_dir, path, fix) for r in data["checkpoints"]),
                  key=lambda r: r.step)


def _record(raw: Any, root: str | Path, source: Path, fix: str) -> CheckpointRecord:
    """One validated manifest record."""
    names = {f for f in CheckpointRecord.__dataclass_fields__}
    if not isinstance(raw, dict) or set(raw) != names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointManifestError(f"{source} is not a valid {MANIFEST_NAME}: a checkpoint "
                                      f"record must have the fields {sorted(names)}, got "
                                      f"{got}. {fix}")

    def number(value: Any, nullable: bool) -> bool:
        if value is None:
            return nullable
        return not isinstance(value, bool) and isinstance(value, (int, float)) and \
            math.isfinite(value)

    checks = {"step": isinstance(raw["step"], int) and not isinstance(raw["step"], bool)
              and raw["step"] >= 0,
              "learning_rate": number(raw["learning_rate"], True),
              "learning_rate_source": isinstance(raw["learning_rate_source"], str),
              "epoch": number(raw["epoch"], True), "adapter": isinstance(raw["adapter"], bool)}
    bad = [f"{k}={raw[k]!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise CheckpointManifestError(f"{source} is not a valid {MANIFEST_NAME}: bad values "
                                      f"{bad} (steps are integers >= 0, rates and epochs "
                                      f"finite numbers or null). {fix}")
    confined_path(root, raw["path"], str(source))
    return CheckpointRecord(**raw)


def tracin_config_from_manifest(output_dir: str | Path, **overrides: Any) -> TracInConfig:
    """Build a :class:`~hf_ggda.attributors.TracInConfig` over the recorded checkpoints.

    Args:
        output_dir: The Trainer's output_dir.
        **overrides: Other TracInConfig fields (projection, batch size, ...).

    Returns:
        A config with absolute ``checkpoints`` and their ``learning_rates``.

    Raises:
        FileNotFoundError: No manifest, or a recorded folder was deleted.
        ValueError: A recorded learning rate is missing or the manifest is empty.
        CheckpointManifestError: As :func:`read_checkpoint_manifest`.
    """
    records = read_checkpoint_manifest(output_dir)
    if not records:
        raise ValueError(f"The manifest in {str(output_dir)!r} lists no checkpoints.")
    source = str(Path(output_dir) / MANIFEST_NAME)
    paths = [confined_path(output_dir, r.path, source) for r in records]
    gone = [str(p) for p in paths if not p.is_dir()]
    if gone:
        raise FileNotFoundError(f"Recorded checkpoints were deleted: {gone}.")
    missing = [r.step for r in records if r.learning_rate is None]
    if missing:
        raise ValueError(f"No learning rate recorded for steps {missing}; pass "
                         "learning_rates to TracInConfig yourself.")
    rates = [float(r.learning_rate) for r in records if r.learning_rate is not None]
    return TracInConfig(checkpoints=[str(p) for p in paths], learning_rates=rates, **overrides)
