"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2, midpoint form) for flow-matching models, data (x0) prediction.

The time variable is lambda = log(alpha / sigma) with alpha = 1 - sigma (x_sigma = (1 - sigma) x0 +
sigma noise). Wan 2.1's `dpm++` solver (Wan-Video/Wan2.1 wan/utils/fm_solvers.py
FlowDPMSolverMultistepScheduler: order 2, dpmsolver++, midpoint, lower_order_final, final sigma 0)
and diffusers' DPMSolverMultistepScheduler with use_flow_sigmas run the same steps: first order on
the first step and on the last (to sigma 0), second order between. One evaluation per step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sampling import DenoiserFn, StepCallback
from .schedules import flow_half_log_snr


def _first_order(x: torch.Tensor, sigma_from: float, sigma_to: float, x0: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ 1 (= DDIM in x0 form): x_to = (sigma_to / sigma_from) x - alpha_to (e^-h - 1) x0."""
    h = flow_half_log_snr(sigma_to) - flow_half_log_snr(sigma_from)
    return (sigma_to / sigma_from) * x - (1 - sigma_to) * math.expm1(-h) * x0


def _second_order(x: torch.Tensor, sigmas: tuple[float, float, float], x0: torch.Tensor,
                  x0_previous: torch.Tensor) -> torch.Tensor:
    """Multistep midpoint update from sigma_from with the previous estimate at sigma_previous.

    `sigmas` = (sigma_previous, sigma_from, sigma_to)."""
    sigma_previous, sigma_from, sigma_to = sigmas
    lambda_previous, lambda_from = flow_half_log_snr(sigma_previous), flow_half_log_snr(sigma_from)
    h = flow_half_log_snr(sigma_to) - lambda_from
    ratio = (lambda_from - lambda_previous) / h
    slope = (x0 - x0_previous) / ratio
    return _first_order(x, sigma_from, sigma_to, x0) - 0.5 * (1 - sigma_to) * math.expm1(-h) * slope


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) over flow sigmas (descending, ending in 0)."""
    values = [float(s) for s in sigmas]
    total = len(values) - 1
    previous: Optional[torch.Tensor] = None
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        sigma_to = values[i + 1]
        if previous is None or sigma_to == 0:  # first step: no history; last step: to sigma 0, lambda is infinite
            x = _first_order(x, values[i], sigma_to, denoised)
        else:
            x = _second_order(x, (values[i - 1], values[i], sigma_to), denoised, previous)
        previous = denoised
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x
