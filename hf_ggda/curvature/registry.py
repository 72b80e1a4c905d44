"""Registry of preconditioners, in the style of :mod:`hf_ggda.attributors.registry`.

Each curvature module registers its classes (``register_preconditioner``) under their
``name``; ``make_preconditioner`` builds one from a name and options. This module sits below
the curvature modules: it holds the mapping and imports the base class for annotations only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Preconditioner

#: Preconditioners by name.
PRECONDITIONERS: dict[str, type[Preconditioner]] = {}


def register_preconditioner(cls: type[Preconditioner]) -> None:
    """Register a preconditioner class under its ``name``.

    Raises:
        ValueError: The class has no ``name``, or the name is taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be set to register it.")
    known = PRECONDITIONERS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"Preconditioner {cls.name!r} is already registered.")
    PRECONDITIONERS[cls.name] = cls


def make_preconditioner(name: str, **options: Any) -> Preconditioner:
    """Build a preconditioner by name.

    Args:
        name: One of :data:`PRECONDITIONERS` (identity, kfac, ekfac, lissa, datainf, exact).
        **options: Constructor arguments (``damping`` and method-specific ones).

    Returns:
        The unfitted preconditioner.

    Raises:
        ValueError: Unknown name or bad options.
    """
    if name not in PRECONDITIONERS:
        raise ValueError(f"Unknown preconditioner {name!r}; choose from "
                         f"{sorted(PRECONDITIONERS)}.")
    return PRECONDITIONERS[name](**options)
