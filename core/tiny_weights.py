"""Helpers for tiny random models written in real file layouts (tests, benchmarks, `flipbook demo`).

Each path's own module (e.g. lightning/tiny_models.py) builds its networks at small widths and
renames the keys to the real files' names; these helpers fill the weights and write the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Small random weights everywhere (default inits leave some layers at zero, hiding wiring bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("pe"):
                continue
            scale = 1.0 / max(1, param[0].numel() if param.ndim > 1 else 1) ** 0.5  # 1/sqrt(fan_in)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * scale * (0.3 if param.ndim == 1 else 1))


def write_safetensors(state: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `state` with its floating tensors in `dtype` (integer tensors keep theirs)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return path
