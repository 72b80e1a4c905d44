"""Config dataclasses: JSON save/load, argparse options generated from the fields, and
validation of every value against the field's type.

Every field assignment of a :class:`ConfigMixin` dataclass (the constructor's, ``replace``'s,
``from_dict``'s, or a later ``config.x = ...``) is checked against the field's type hint before
the class's own ``__post_init__`` range checks run:

- ``bool``: ``True``/``False``, the integers 0/1, or the strings ``"true"``/``"false"`` (also
  ``yes``/``no``, ``on``/``off``, ``1``/``0``, any case); any other string is refused, never
  truthy by accident.
- ``int``: integers only (not ``True``, not ``16.0``, not ``"16"``).
- ``float``: finite numbers only (NaN and Inf are refused); integers become floats.
- ``str``: strings (or ``os.PathLike``, turned into ``str``); a list or a number is refused.
- ``Optional[...]``, ``Union[...]``, ``list[...]`` / ``tuple[...]``: checked arm by arm and
  element by element.

Wrong values raise :class:`~hf_ggda.errors.ConfigTypeError` / :class:`~hf_ggda.errors.ConfigError`
naming the config, the field, the expected type, the value and the fix. Unknown keys (in
``from_dict``, ``from_pretrained`` or a CLI ``--config`` file) name the closest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, TypeVar

from .atomic import atomic_write_bytes
from .errors import ConfigError, ConfigTypeError, GGDAError

T = TypeVar("T", bound="ConfigMixin")
CONFIG_NAME = "ggda_config.json"
#: Key of a saved config naming its class (ignored when it names the class being loaded).
CLASS_KEY = "class"

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_UNIONS = (typing.Union, types.UnionType)


class _Mismatch(Exception):
    """Internal: a value does not fit a type hint (turned into a ConfigTypeError)."""

    def __init__(self, fix: str = "") -> None:
        super().__init__(fix)
        self.fix = fix


class ConfigMixin:
    """Adds typed assignment, ``to_dict``, ``save_pretrained``/``from_pretrained`` and argparse
    support to a dataclass.

    A subclass's own ``__post_init__`` range and choice checks may raise a plain
    ``ValueError`` / ``TypeError``; it is re-raised as :class:`~hf_ggda.errors.ConfigError` /
    :class:`~hf_ggda.errors.ConfigTypeError` (subclasses of those) naming the config class, so
    every bad option surfaces as a typed hf_ggda error.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        post = cls.__dict__.get("__post_init__")
        if post is not None and not getattr(post, "_ggda_typed", False):
            cls.__post_init__ = _typed_post_init(post)  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        """Check (and normalise) a field's value against its type hint before storing it.

        Raises:
            ConfigTypeError: The value has the wrong type for the field.
            ConfigError: A float field got NaN or Inf.
        """
        # (classes are hashable; typeshed types ConfigMixin.__hash__ as an instance method)
        hint = _field_hints(type(self)).get(name)  # type: ignore[arg-type]
        if hint is not None:
            value = _checked(type(self).__name__, name, hint, value)
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (fields only)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``ggda_config.json`` into ``directory`` atomically.

        Raises:
            OSError: The file cannot be written.
        """
        data = {CLASS_KEY: type(self).__name__, **self.to_dict()}
        atomic_write_bytes(Path(directory) / CONFIG_NAME,
                           json.dumps(data, indent=1, allow_nan=False).encode())

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from a dict; a ``class`` key must name this class (or a subclass of it).

        Raises:
            ConfigError: ``data`` is not a mapping, names another config class, or has unknown
                keys (the message names the closest valid key).
            ConfigTypeError: A value has the wrong type for its field.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"A {cls.__name__} must be built from a JSON object / dict of "
                              f"options, got {type(data).__name__}: {data!r:.200}. Write the "
                              'options as {"name": value, ...}.')
        data = dict(data)
        saved_class = data.pop(CLASS_KEY, None)
        if saved_class is not None and saved_class not in _class_names(cls):
            raise ConfigError(
                f"These options were saved from a {saved_class!r}, not a {cls.__name__}. Load "
                f"them with {saved_class}.from_pretrained / from_dict, or remove the "
                f"{CLASS_KEY!r} key.")
        check_known_keys(data, [cls], where=f"{cls.__name__} options")
        try:
            return cls(**data)
        except GGDAError:
            raise
        except TypeError as err:  # a value check of the config's __post_init__
            raise ConfigTypeError(f"{cls.__name__}: {err}") from err
        except ValueError as err:
            raise ConfigError(f"{cls.__name__}: {err}") from err

    @classmethod
    def from_pretrained(cls: type[T], directory: str | os.PathLike[str]) -> T:
        """Read ``ggda_config.json`` (or a JSON file path).

        Raises:
            FileNotFoundError: No config there.
            ConfigError: The file is not valid JSON, or its options are wrong (see
                :meth:`from_dict`).
        """
        path = Path(directory)
        path = path / CONFIG_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"No config at {path}; save one with save_pretrained().")
        return cls.from_dict(read_json_options(path))

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
                parser.add_argument(flag, dest=prefix + f.name,
                                    action=argparse.BooleanOptionalAction, default=None,
                                    help=helptext)
            else:
                parser.add_argument(flag, dest=prefix + f.name, type=kind, default=None,
                                    help=helptext)

    @classmethod
    def from_args(cls: type[T], args: argparse.Namespace, base: Optional[dict] = None,
                  prefix: str = "") -> T:
        """Build from parsed options over ``base`` values (e.g. a --config file).

        Keys of ``base`` that are not fields of this class are left out (one file may hold
        the options of several configs; check it with :func:`check_known_keys`).

        Raises:
            ConfigError: As :meth:`from_dict`.
            ConfigTypeError: As :meth:`from_dict`.
        """
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


def _typed_post_init(post: Any) -> Any:
    """Wrap a ``__post_init__`` so its plain ValueError / TypeError become typed config errors.

    Args:
        post: The class's own ``__post_init__``.

    Returns:
        The wrapper (marked, so it is never wrapped twice).
    """
    @functools.wraps(post)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            post(self, *args, **kwargs)
        except GGDAError:
            raise
        except (ValueError, TypeError) as err:
            kind = ConfigTypeError if isinstance(err, TypeError) else ConfigError
            raise kind(f"Invalid {type(self).__name__}: {err} Change this option (the message "
                       "names the allowed values) and retry.") from err

    checked._ggda_typed = True  # type: ignore[attr-defined]
    return checked


def field_names(classes: Iterable[type]) -> list[str]:
    """Return the sorted field names of some config dataclasses."""
    return sorted({f.name for c in classes for f in dataclasses.fields(c)})


def check_known_keys(data: Mapping[str, Any], classes: Iterable[type], where: str,
                     extra: Iterable[str] = ()) -> None:
    """Refuse keys that are fields of none of ``classes``, naming the closest valid key.

    Args:
        data: The options (e.g. a ``--config`` file's object).
        classes: The config dataclasses the options may belong to.
        where: How to name the options in the message (``"--config file x.json"``).
        extra: Further accepted keys (e.g. ``"class"``).

    Raises:
        ConfigError: A key is not a string, or matches no field.
    """
    valid = field_names(classes)
    accepted = set(valid) | set(extra)
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"Option names in {where} must be strings, got {bad[:5]}.")
    unknown = sorted(k for k in data if k not in accepted)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = _closest(key, valid)
        hints.append(f"{key!r} (did you mean {close!r}?)" if close else
                     f"{key!r} (no valid option is close to it)")
    raise ConfigError(f"Unknown {where} {unknown}: {', '.join(hints)}. Fix the spelling or remove "
                      f"the key; valid options: {valid}.")


def read_json_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object of options from a file (a config read back: untrusted input).

    Args:
        path: A JSON file.

    Returns:
        The object.

    Raises:
        FileNotFoundError: No file there.
        ConfigError: The file is a folder, cannot be decoded, is not valid JSON (NaN and
            Infinity included), or does not hold an object.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No config file at {str(p)!r}.")
    if not p.is_file():
        raise ConfigError(f"The config path {str(p)!r} is not a file; pass a JSON file "
                          '({"option": value, ...}).')
    try:
        data = json.loads(p.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, _NonStandardJSON) as err:
        raise ConfigError(f"The config file {str(p)!r} is not valid JSON ({err}). Fix the file "
                          '(e.g. {"damping": 0.01, "cosine": false}) or pass another one.'
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"The config file {str(p)!r} holds a JSON {type(data).__name__}, "
                          'not an object; write the options as {"name": value, ...}.')
    return data


class _NonStandardJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonStandardJSON(f"{name} is not a JSON number; write a finite number")


def _closest(key: str, valid: list[str]) -> Optional[str]:
    norm = key.strip().lower().replace("-", "_")
    if norm in valid:
        return norm
    found = difflib.get_close_matches(norm, valid, n=1, cutoff=0.6)
    return found[0] if found else None


def _class_names(cls: type) -> set[str]:
    names: set[str] = {cls.__name__}
    todo: list[type] = [cls]
    while todo:
        subs: list[type] = todo.pop().__subclasses__()
        for sub in subs:
            names.add(sub.__name__)
            todo.append(sub)
    return names


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields ({} when they cannot be resolved)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _describe(hint: Any) -> str:
    """Human words for a type hint (``an integer or null``)."""
    origin = typing.get_origin(hint)
    if origin in _UNIONS:
        return " or ".join("null (None)" if a is type(None) else _describe(a)
                           for a in typing.get_args(hint))
    if origin in (list, tuple):
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_plural(inner[0])}" if inner else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "finite numbers",
            str: "strings"}.get(hint, _describe(hint))


def _checked(owner: str, name: str, hint: Any, value: Any) -> Any:
    try:
        return _coerce(hint, value)
    except _Mismatch as bad:
        if bad.fix == "non-finite":
            what = "hold finite numbers" if isinstance(value, (list, tuple)) else \
                "be a finite number"
            raise ConfigError(f"{owner}.{name} must {what}, got {value!r:.200}. NaN or Inf "
                              "would silently turn the results into zeros or NaN; pass a "
                              "finite value.") from None
        fix = bad.fix or f"pass {_describe(hint)}"
        raise ConfigTypeError(f"{owner}.{name} must be {_describe(hint)}, got {value!r:.200} "
                              f"({type(value).__name__}). Fix: {fix}.") from None


def _coerce(hint: Any, value: Any) -> Any:
    """Return ``value`` normalised to ``hint``, or raise _Mismatch (with a fix)."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in _UNIONS:
        return _coerce_union(hint, value)
    if origin in (list, tuple):
        return _coerce_sequence(hint, value)
    if hint is bool:
        return _coerce_bool(value)
    if hint is int:
        return _coerce_int(value)
    if hint is float:
        return _coerce_float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            raise _Mismatch("pass a single string, not a list")
        raise _Mismatch("pass a string (in JSON: quoted)")
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch("pass an object / dict")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch()
    return value


def _coerce_union(hint: Any, value: Any) -> Any:
    arms = typing.get_args(hint)
    if value is None:
        if type(None) in arms:
            return None
        raise _Mismatch(f"pass {_describe(hint)} (null is not allowed here)")
    fixes = []
    for arm in arms:
        if arm is type(None):
            continue
        try:
            return _coerce(arm, value)
        except _Mismatch as bad:
            if bad.fix == "non-finite":
                raise
            fixes.append(bad.fix)
    raise _Mismatch(fixes[0] if len(fixes) == 1 else "")


def _coerce_sequence(hint: Any, value: Any) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _Mismatch("pass a list (in JSON: [...]); a string or a single value is not one")
    inner = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if not inner:
        return value
    items = [_coerce(inner[0], v) for v in value]
    return type(value)(items)


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Mismatch('use true or false (JSON booleans, or the strings "true" / "false")')
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise _Mismatch("use true or false")


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise _Mismatch("pass a number, not true/false")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        whole = f"such as {int(v)}" if math.isfinite(v) and v.is_integer() else "without decimals"
        raise _Mismatch(f"pass a whole number {whole}")
    if isinstance(value, str):
        raise _Mismatch("write the number without quotes")
    raise _Mismatch()


def _coerce_float(value: Any) -> float:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise _Mismatch("pass a number, not true/false")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise _Mismatch("non-finite")
        return v
    if isinstance(value, str):
        raise _Mismatch("write the number without quotes")
    raise _Mismatch()


def _base_type(hint: Any) -> tuple[Any, bool]:
    """Return (element type, takes a list) of a field's type hint."""
    if typing.get_origin(hint) in (list, tuple):
        inner = typing.get_args(hint)
        return (inner[0] if inner and isinstance(inner[0], type) else str), True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in _UNIONS:
        lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if lists:
            return _base_type(lists[0])
        if len(args) == 1:
            return _base_type(args[0])
    return (hint if isinstance(hint, type) else str), False


def _accepts_scalar(hint: Any) -> bool:
    """Whether a list-typed field also takes a single value (e.g. ``Union[str, list[str]]``)."""
    if typing.get_origin(hint) not in _UNIONS:
        return False
    return any(isinstance(a, type) and a is not type(None) for a in typing.get_args(hint))
