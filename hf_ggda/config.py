"""Config dataclasses: JSON save/load and argparse options generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Optional, TypeVar

from .store import atomic_write_bytes

T = TypeVar("T", bound="ConfigMixin")
CONFIG_NAME = "ggda_config.json"


class ConfigMixin:
    """Adds ``to_dict``, ``save_pretrained``/``from_pretrained`` and argparse support."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (fields only)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ggda_config.json`` into ``directory`` atomically."""
        data = {"class": type(self).__name__, **self.to_dict()}
        atomic_write_bytes(Path(directory) / CONFIG_NAME, json.dumps(data, indent=1).encode())

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build from a dict, ignoring a ``class`` key.

        Raises:
            ValueError: Unknown keys (named, with the known ones).
        """
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        data = {k: v for k, v in data.items() if k != "class"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} options {unknown}; known: {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_pretrained(cls: type[T], directory: str | os.PathLike[str]) -> T:
        """Read ``ggda_config.json`` (or a JSON file path).

        Raises:
            FileNotFoundError: No config there.
        """
        path = Path(directory)
        path = path / CONFIG_NAME if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"No config at {path}; save one with save_pretrained().")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, prefix: str = "",
                      exclude: tuple[str, ...] = ()) -> None:
        """Add one ``--option`` per field, with the field's help text and default.

        Values land in ``prefix + field`` attributes; a flag that the parser already has gets
        the prefix in its name too (``--m-seed``).
        """
        hints = typing.get_type_hints(cls)
        taken = {s for a in parser._actions for s in a.option_strings}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in exclude:
                continue
            flag = f"--{f.name.replace('_', '-')}"
            if flag in taken and prefix:
                flag = f"--{prefix.strip('_')}-{f.name.replace('_', '-')}"
            kind, many = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            helptext = f.metadata.get("help", "") + f" (default: {default})"
            if many:
                parser.add_argument(flag, dest=prefix + f.name, type=kind, nargs="+",
                                    default=None, help=helptext)
            elif kind is bool:
                parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                                    default=None, help=helptext)
            else:
                parser.add_argument(flag, dest=prefix + f.name, type=kind, default=None,
                                    help=helptext)

    @classmethod
    def from_args(cls: type[T], args: argparse.Namespace, base: Optional[dict] = None,
                  prefix: str = "") -> T:
        """Build from parsed options over ``base`` values (e.g. a --config file)."""
        values = dict(base or {})
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            v = getattr(args, prefix + f.name, None)
            if isinstance(v, list) and len(v) == 1 and _accepts_scalar(hints[f.name]):
                v = v[0]
            if v is not None:
                values[f.name] = v
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls.from_dict({k: v for k, v in values.items() if k in names})


def _base_type(hint: Any) -> tuple[Any, bool]:
    """Return (element type, takes a list) of a field's type hint."""
    if typing.get_origin(hint) in (list, tuple):
        inner = typing.get_args(hint)
        return (inner[0] if inner and isinstance(inner[0], type) else str), True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if lists:
            return _base_type(lists[0])
        if len(args) == 1:
            return _base_type(args[0])
    return (hint if isinstance(hint, type) else str), False


def _accepts_scalar(hint: Any) -> bool:
    """Whether a list-typed field also takes a single value (e.g. ``Union[str, list[str]]``)."""
    if typing.get_origin(hint) is not typing.Union:
        return False
    return any(isinstance(a, type) and a is not type(None) for a in typing.get_args(hint))
