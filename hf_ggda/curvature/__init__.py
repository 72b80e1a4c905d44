"""Curvature for influence functions: preconditioners v -> (H + λI)⁻¹ v.

H is the Hessian of the summed training loss over the selected parameters (unprojected).
"""

from __future__ import annotations

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
from .registry import PRECONDITIONERS, make_preconditioner, register_preconditioner

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
    "register_preconditioner",
]
