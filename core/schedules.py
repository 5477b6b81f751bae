"""Noise schedules and timestep spacings for discrete-time (DDPM-trained) models.

Sigmas follow the k-diffusion convention: sigma_t = sqrt((1 - alphabar_t) / alphabar_t), a
schedule is a descending 1-D tensor that ends in 0. Names are diffusers' names; the ComfyUI
names differ and are given in comments, because the two projects use "linear" for different
curves (ComfyUI/LDM "sqrt_linear" == diffusers "linear").
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import math

import numpy as np
import torch

from .errors import InvalidSettingError

NUM_TRAIN_TIMESTEPS = 1000


def betas_linear(beta_start: float, beta_end: float, n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers "linear" (ComfyUI "sqrt_linear"): betas evenly spaced. AnimateDiff's training schedule."""
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)


def betas_scaled_linear(beta_start: float, beta_end: float, n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers "scaled_linear" (ComfyUI "linear"): sqrt(beta) evenly spaced. Stable Diffusion's default."""
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2


BETA_SCHEDULES: MappingProxyType[str, Callable[..., np.ndarray]] = MappingProxyType(
    {"linear": betas_linear, "scaled_linear": betas_scaled_linear}
)


def discrete_sigmas(beta_schedule: str, beta_start: float, beta_end: float) -> torch.Tensor:
    """The model's sigma for every training timestep, ascending ([NUM_TRAIN_TIMESTEPS], float64)."""
    if beta_schedule not in BETA_SCHEDULES:
        raise InvalidSettingError(
            f"Unknown beta schedule {beta_schedule!r}; known: {sorted(BETA_SCHEDULES)}."
        )
    betas = BETA_SCHEDULES[beta_schedule](beta_start, beta_end)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return torch.from_numpy(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def timesteps_trailing(steps: int, n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers "trailing" spacing: start at the last timestep, even strides down (4 -> 999, 749, 499, 249)."""
    return (np.arange(n, 0, -n / steps).round() - 1).astype(np.int64)


def timesteps_leading(steps: int, n: int = NUM_TRAIN_TIMESTEPS, steps_offset: int = 1) -> np.ndarray:
    """diffusers "leading" spacing with steps_offset, as AnimateDiff's DDIM configs use (25 -> 961 … 1)."""
    ratio = n // steps
    return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + steps_offset


def timesteps_linspace(steps: int, n: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """diffusers "linspace" spacing: evenly from the last to the first timestep (4 -> 999, 666, 333, 0)."""
    return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)


TIMESTEP_SPACINGS: MappingProxyType[str, Callable[[int], np.ndarray]] = MappingProxyType(
    {"trailing": timesteps_trailing, "leading": timesteps_leading, "linspace": timesteps_linspace}
)
# ComfyUI's scheduler names for the same spacing (comfy/samplers.py): `simple` takes every (1000 / steps)-th
# timestep from the last, which is trailing for 1, 2, 4 and 8 steps (3 steps: 333 where trailing has 332);
# `sgm_uniform` spaces timesteps evenly from 999 (4 steps: 999, 749.25, 499.5, 249.75: within one timestep).
# The AnimateDiff-Lightning card tells ComfyUI users to pick sgm_uniform.
COMFY_SPACING_NAMES = MappingProxyType({"sgm_uniform": "trailing", "simple": "trailing"})


def canonical_spacing(name: str) -> str:
    """A timestep spacing id from a diffusers or ComfyUI scheduler name."""
    return COMFY_SPACING_NAMES.get(name, name)


def sigmas_for_steps(model_sigmas: torch.Tensor, spacing: str, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """Sampling sigmas (descending, ending in 0) and their integer timesteps for `steps` steps."""
    if spacing not in TIMESTEP_SPACINGS:
        raise InvalidSettingError(f"Unknown timestep spacing {spacing!r}; known: {sorted(TIMESTEP_SPACINGS)}.")
    if steps < 1:
        raise InvalidSettingError(f"steps must be at least 1, got {steps}.")
    timesteps = TIMESTEP_SPACINGS[spacing](steps)
    sigmas = torch.cat([model_sigmas[torch.from_numpy(timesteps.copy())], model_sigmas.new_zeros(1)])
    return sigmas.float(), timesteps


def schedule_tail(sigmas: torch.Tensor, timesteps: np.ndarray, denoise: float) -> tuple[torch.Tensor, np.ndarray]:
    """The last floor(denoise * steps) steps of a schedule: a partial denoise (video-to-video, image-to-animation)
    that stays on the timesteps a distilled model was trained for instead of a schedule of its own (diffusers'
    AnimateDiffVideoToVideoPipeline.get_timesteps: int(steps * strength); ComfyUI's KSampler denoise instead
    builds int(steps / denoise) steps, off the trained grid)."""
    steps = len(timesteps)
    if not (0.0 < denoise <= 1.0):
        raise InvalidSettingError(f"denoise={denoise}: use a number above 0 and at most 1 (1 = from pure noise; "
                                  "0.3-0.5 keeps the input video's layout and motion).")
    run = int(denoise * steps + 1e-9)  # 0.5 x 4 is 2 even where the float product is 1.9999...
    if run < 1:
        raise InvalidSettingError(
            f"denoise={denoise} of {steps} steps runs no step (floor({denoise} x {steps}) = 0): use at least "
            f"{1 / steps:.3g}, or the 8-step variant for finer steps.")
    return sigmas[steps - run:], timesteps[steps - run:]


def sigma_to_timestep(sigma: torch.Tensor, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep for a sigma, interpolating in log-sigma (k-diffusion DiscreteSchedule.sigma_to_t)."""
    log_sigmas = model_sigmas.log().to(sigma.device)
    log_sigma = sigma.to(log_sigmas.dtype).log()
    dists = log_sigma - log_sigmas[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape)


# --- flow matching (Wan 2.1): sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma noise, t = 1000 sigma ---


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's time shift sigma' = shift sigma / (1 + (shift - 1) sigma) (Wan-Video/Wan2.1 wan/utils/fm_solvers*.py;
    ComfyUI model_sampling.time_snr_shift; diffusers flow_shift): shift > 1 spends more steps at high noise."""
    if not shift > 0:
        raise InvalidSettingError(f"shift={shift}: the flow shift must be a positive number (Wan 2.1 T2V: 5.0).")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma, the time variable of the flow-matching solvers
    (UniPC, DPM-Solver++); +inf at sigma 0, -inf at sigma 1."""
    if sigma <= 0:
        return math.inf
    return -math.inf if sigma >= 1 else math.log(1 - sigma) - math.log(sigma)


def flow_sigmas_unipc(steps: int, shift: float) -> torch.Tensor:
    """Wan's UniPC schedule: linspace(0.999, 0, steps + 1) without its last point, shifted, then a final 0
    (Wan-Video/Wan2.1 wan/utils/fm_solvers_unipc.py FlowUniPCMultistepScheduler.set_timesteps)."""
    _require_steps(steps)
    start = torch.linspace(0.999, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigmas(start, shift), start.new_zeros(1)]).float()


def flow_sigmas_dpmpp(steps: int, shift: float) -> torch.Tensor:
    """Wan's DPM++ schedule: linspace(1, 0, steps + 1)[:steps], shifted, then a final 0
    (Wan-Video/Wan2.1 wan/utils/fm_solvers.py get_sampling_sigmas)."""
    _require_steps(steps)
    start = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:steps]
    return torch.cat([shift_sigmas(start, shift), start.new_zeros(1)]).float()


FLOW_SCHEDULES: MappingProxyType[str, Callable[[int, float], torch.Tensor]] = MappingProxyType(
    {
        "unipc": flow_sigmas_unipc,
        "dpm++": flow_sigmas_dpmpp,
        # the distilled Euler steps: linspace(1, 0, n + 1)[:n] shifted, as lightx2v's WanStepDistillScheduler
        # indexes them (4 steps at shift 5: 1, 0.9375, 0.8333, 0.625), the same points as Wan's dpm++ schedule
        "euler": flow_sigmas_dpmpp,
    }
)


def _require_steps(steps: int) -> None:
    if steps < 1:
        raise InvalidSettingError(f"steps must be at least 1, got {steps}.")
