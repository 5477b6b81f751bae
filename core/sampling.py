"""Samplers as small pure functions over a denoiser callable (k-diffusion contract).

A denoiser maps (x, sigma) to its estimate of the clean sample. Randomness comes only from
noise that the caller creates with an explicit seed on the CPU, so a seed gives the same
video on any device.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> x0; core.denoisers.Denoiser is one


class StepCallback(Protocol):
    """Called after each step; may raise to interrupt (ComfyUI's progress hook does)."""

    def __call__(self, step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None: ...


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator, float32 (ComfyUI comfy/sample.py convention)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Euler method for the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn).

    With eta = 0 this is also DDIM, so one function serves AnimateDiff's DDIM presets too.
    """
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x

