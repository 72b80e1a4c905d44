"""Curvature for influence functions: preconditioners v -> (H + λI)⁻¹ v.

H is the Hessian of the summed training loss over the selected parameters (unprojected).
"""

from __future__ import annotations

from typing import Any

from .base import (
    CurvatureContext,
    CurvatureError,
    IdentityPreconditioner,
    MatrixPreconditioner,
    Preconditioner,
    psd_solve,
)
from .datainf import DataInf
from .hessian import ExactHessian, LiSSA, hessian_vector_products
from .kfac import EKFAC, KFAC

#: Preconditioners by name.
PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    cls.name: cls for cls in (IdentityPreconditioner, KFAC, EKFAC, LiSSA, DataInf, ExactHessian)
}


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


__all__ = [
    "EKFAC",
    "KFAC",
    "PRECONDITIONERS",
    "CurvatureContext",
    "CurvatureError",
    "DataInf",
    "ExactHessian",
    "IdentityPreconditioner",
    "LiSSA",
    "MatrixPreconditioner",
    "Preconditioner",
    "hessian_vector_products",
    "make_preconditioner",
    "psd_solve",
]
