"""The check that the model still holds the weights an attributor was fitted with.

:meth:`~hf_ggda.attributors.Attributor.fit` keeps the training vectors of the weights it saw
(their hash is the ``model`` field of each component's fingerprint, and of every result). New
gradients taken afterwards -- query vectors in ``score``, drill-down rows, row self-influence,
token scores -- must come from the same weights, or old training vectors would silently be
mixed with new query vectors. Every such path calls :func:`check_model_unchanged` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelChangedError
from ..fingerprint import hash_model

__all__ = ["check_model_unchanged"]


def check_model_unchanged(model: torch.nn.Module, fit_fingerprint: Mapping[str, Any],
                          where: str) -> None:
    """Raise unless ``model`` holds the weights whose hash ``fit_fingerprint`` recorded.

    Call it inside the component's ``activate`` context (a TracIn checkpoint's weights are
    compared with that checkpoint's fit).

    Args:
        model: The attributor's model, as it is now.
        fit_fingerprint: The fingerprint of the component's training vectors (from ``fit``).
        where: What was about to be computed, for the message (e.g. ``"score"``).

    Raises:
        ModelChangedError: A parameter or buffer changed since ``fit`` (training, a loaded
            adapter, an in-place edit, a dtype or device cast that changed values).
    """
    fitted = fit_fingerprint.get("model")
    if fitted is None:
        return
    now = hash_model(model)
    if now != fitted:
        raise ModelChangedError(
            f"The model's weights changed since fit() (weight hash {fitted} at fit, {now} now), "
            f"so {where} would mix training vectors of the old weights with gradients of the "
            "new ones. Call fit() again on the model as it is now, or restore the weights "
            "fit() saw (e.g. reload the checkpoint) before calling it.")
