"""Registry of groupers, in the style of :mod:`hf_ggda.attributors.registry`.

Each grouper module registers its classes (``register_grouper``) under their ``name``;
``get_grouper`` builds one from a name and settings. This module sits below the grouper
modules: it holds the mapping and imports the base classes for annotations only.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Grouper, GrouperConfig

#: Registry: name -> grouper class.
GROUPERS: dict[str, type[Grouper]] = {}


def register_grouper(cls: type[Grouper]) -> None:
    """Register a grouper class under its ``name``.

    Raises:
        ValueError: The class has no ``name``, or the name is taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be set to register it.")
    known = GROUPERS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"Grouper {cls.name!r} is already registered.")
    GROUPERS[cls.name] = cls


def get_grouper(name: str, config: Optional[GrouperConfig] = None, **kwargs: Any) -> Grouper:
    """Build a registered grouper from its name and settings.

    Args:
        name: One of :data:`GROUPERS` (``"random"``, ``"stratified"``, ``"column"``,
            ``"kmeans-input"``, ``"kmeans-repr"``, ``"grad-kmeans"``; ``_`` works for ``-``).
        config: A ready config (instead of keyword settings).
        **kwargs: Fields of the grouper's config class.

    Returns:
        The grouper.

    Raises:
        ValueError: Unknown name or unknown setting (the message lists the valid ones).
        GroupingError: An invalid K.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in GROUPERS:
        raise ConfigError(f"Unknown grouper {name!r}; choose one of {sorted(GROUPERS)}.")
    cls = GROUPERS[key]
    valid = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(f"Unknown settings {unknown} for grouper {key!r}; valid settings: "
                         f"{sorted(valid)}.")
    return cls(config, **kwargs)
