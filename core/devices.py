"""Device and precision choice, computed when asked (never at import)."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(preferred: Optional[str] = None) -> torch.device:
    """CUDA when present (or the explicitly named device), else CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what the Lightning card runs), fp32 on CPU (fp16 CPU kernels are slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32
