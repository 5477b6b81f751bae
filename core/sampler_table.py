"""Every sampler by the name presets and nodes use; each is f(denoiser, x, sigmas, callback=None)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import torch

from .sampling import sample_euler
from .sampling_dpmpp import sample_dpmpp_2m
from .sampling_unipc import sample_unipc

SAMPLERS: MappingProxyType[str, Callable[..., torch.Tensor]] = MappingProxyType({
    "euler": sample_euler,  # Lightning's and lightx2v's distilled steps; DDIM at eta 0
    "unipc": sample_unipc,  # Wan 2.1's default (bh2, order 2)
    "dpm++": sample_dpmpp_2m,  # Wan 2.1's `dpm++` (DPM-Solver++ 2M)
})
