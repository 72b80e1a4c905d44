"""Reading result folders back: one schema-checked loader for safetensors + JSON pairs.

Every result the project saves (:class:`~hf_ggda.scores.GroupScores`,
:class:`~hf_ggda.self_influence.SelfInfluence`) is a folder with one ``.safetensors`` file of
tensors and one ``.json`` file of everything else. Both files are untrusted when read back:
the JSON must be an object of a known ``format_version`` whose fields match a schema (every
field present, of its type, nothing unknown), ids must be finite scalars, and the tensors
must be floating point and of the expected names. Problems raise
:class:`~hf_ggda.errors.ScoresFileError` whose message says how to recover.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load

from .errors import ScoresFileError

#: A schema: field -> (accepted types, may be null).
Schema = Mapping[str, tuple[tuple[type, ...], bool]]


@dataclass(frozen=True)
class ResultFormat:
    """What one kind of result folder holds.

    Attributes:
        what: How messages name the file (``"scores file"``).
        version: The one ``format_version`` this code reads.
        tensors_file: Name of the safetensors file.
        meta_file: Name of the JSON file.
        schema: Fields of the JSON (besides ``format_version``).
        required_tensors: Tensors that must be present.
        optional_tensors: Tensors that may be present.
        fix: What the user should do when the folder cannot be used.
        tag: Value of the JSON's ``format`` field (None: the field is not written).
    """

    what: str
    version: int
    tensors_file: str
    meta_file: str
    schema: Schema
    required_tensors: tuple[str, ...]
    optional_tensors: tuple[str, ...]
    fix: str
    tag: str | None = None

    def error(self, path: Path, problem: str) -> ScoresFileError:
        """The typed error for ``path`` with ``problem`` and the fix."""
        return ScoresFileError(f"The {self.what} {str(path)!r} cannot be trusted: {problem}. "
                               f"{self.fix}")


def refuse_constant(name: str) -> Any:
    """``json.loads`` hook refusing NaN and Infinity.

    Raises:
        ValueError: Always.
    """
    raise ValueError(f"{name} is not a JSON number")


def scalar_ok(value: Any, kinds: tuple[type, ...]) -> bool:
    """Whether ``value`` is one of ``kinds`` (never a bool) and finite if a float."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def read_result(folder: Path, fmt: ResultFormat) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a result folder.

    Args:
        folder: The folder.
        fmt: What it must hold.

    Returns:
        (JSON fields without ``format`` / ``format_version``, tensors).

    Raises:
        FileNotFoundError: A file is missing.
        ScoresFileError: Bad JSON or safetensors, an unknown format or version, a field that
            fails the schema, or tensors of the wrong names or dtypes.
    """
    for name in (fmt.tensors_file, fmt.meta_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} not found: not a folder with a "
                                    f"saved {fmt.what}.")
    meta = _read_meta(folder / fmt.meta_file, fmt)
    try:
        tensors = st_load((folder / fmt.tensors_file).read_bytes())
    except Exception as err:
        raise fmt.error(folder / fmt.tensors_file,
                        f"it cannot be read as safetensors ({err})") from None
    names = set(tensors)
    if names - {*fmt.required_tensors, *fmt.optional_tensors} or \
            not set(fmt.required_tensors) <= names:
        raise fmt.error(folder / fmt.tensors_file,
                        f"it must hold a {' and a '.join(map(repr, fmt.required_tensors))} "
                        f"tensor (and optionally {', '.join(fmt.optional_tensors)}); it holds "
                        f"{sorted(names)}")
    for name, value in tensors.items():
        if not value.is_floating_point():
            raise fmt.error(folder / fmt.tensors_file,
                            f"tensor {name!r} has dtype {value.dtype}, not floating point")
    return meta, tensors


def _read_meta(path: Path, fmt: ResultFormat) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise fmt.error(path, f"it is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise fmt.error(path, f"it holds a JSON {type(meta).__name__}, not an object")
    if fmt.tag is not None and meta.get("format") != fmt.tag:
        raise fmt.error(path, f"its 'format' is {meta.get('format')!r:.60}, not {fmt.tag!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or version != fmt.version:
        raise ScoresFileError(
            f"The {fmt.what} {str(path)!r} has format_version {version!r:.40}; this hf_ggda "
            f"reads version {fmt.version}. Upgrade hf_ggda to read it, or {fmt.fix[0].lower()}"
            f"{fmt.fix[1:]}")
    meta.pop("format_version")
    if fmt.tag is not None:
        meta.pop("format")
    unknown = sorted(set(meta) - set(fmt.schema))
    missing = sorted(set(fmt.schema) - set(meta))
    if unknown or missing:
        raise fmt.error(path, f"unknown fields {unknown}, missing fields {missing}")
    for key, (kinds, nullable) in fmt.schema.items():
        value = meta[key]
        if not (value is None and nullable) and not isinstance(value, kinds):
            raise fmt.error(path, f"field {key!r} must be "
                                  f"{' or '.join(k.__name__ for k in kinds)}"
                                  f"{' or null' if nullable else ''}, got {value!r:.100}")
    return meta


def check_ids(path: Path, fmt: ResultFormat, meta: Mapping[str, Any],
              kinds: Mapping[str, tuple[type, ...]], unique: tuple[str, ...]) -> None:
    """Id lists must hold finite scalars of ``kinds``; those in ``unique`` no duplicates.

    Raises:
        ScoresFileError: A bad or duplicated id.
    """
    for key, allowed in kinds.items():
        values = meta.get(key) or []
        bad = [v for v in values if not scalar_ok(v, allowed)]
        if bad:
            raise fmt.error(path, f"{key} must hold finite numbers or strings, got "
                                  f"{bad[:5]!r:.100}")
    for key in unique:
        values = meta.get(key) or []
        if len(set(values)) != len(values):
            raise fmt.error(path, f"{key} holds duplicate ids")


__all__ = ["ResultFormat", "check_ids", "read_result", "refuse_constant", "scalar_ok"]
