"""Checks that turn a silent wrong result (NaN/inf turning into black frames) into a typed error."""
from __future__ import annotations

import torch

from .errors import NonFiniteResultError


def require_finite(tensor: torch.Tensor, *, what: str, likely_causes: str) -> None:
    """Raise when any value is NaN or infinite (one device-to-host read, after a whole stage)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteResultError(
            f"The {what} contain {bad} NaN/infinite values of {tensor.numel()}, so the video would be black. "
            f"Likely causes: {likely_causes}."
        )
