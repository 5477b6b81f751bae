"""Model forwards as k-diffusion denoisers D(x, sigma) -> estimate of the clean sample.

One `Denoiser` serves both model families; what differs is the parameterisation:
- epsilon prediction (SD1.5 and other DDPM-trained models): the model sees x * c_in with
  c_in = 1 / sqrt(1 + sigma^2) at the timestep t(sigma) and predicts the noise;
  x0 = x - sigma * eps (k-diffusion `external.DiscreteEpsDDPMDenoiser`).
- flow matching (Wan 2.1, rectified flow): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
  sees x itself at t = 1000 * sigma and predicts the velocity v = noise - x0; x0 = x - sigma * v
  (ComfyUI `comfy/model_sampling.py` CONST + ModelSamplingDiscreteFlow, multiplier 1000).

The denoiser owns classifier-free guidance (at CFG exactly 1 the negative is never built and
each step costs one forward), the evaluation count that benchmarks read, and the progress
callback, which is also the cancel point (ComfyUI's raises when the user interrupts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .schedules import sigma_to_timestep

# (scaled model input, timestep [1] float32 on the input's device, conditioning) -> prediction
ModelForward = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# conditionings of the CFG branches -> one batched conditioning, or None to evaluate them apart
JoinConditioning = Callable[[Sequence[Any]], Optional[Any]]
ProgressFn = Callable[[int, int], None]

FLOW_TIMESTEP_MULTIPLIER = 1000.0  # Wan: t = 1000 * sigma (ComfyUI ModelSamplingDiscreteFlow multiplier)


@dataclass(frozen=True)
class Parameterization:
    """How a model's input, timestep and output relate to (x, sigma) in k-diffusion form."""

    name: str
    input_scale: Callable[[torch.Tensor], float]  # sigma -> c_in
    timestep: Callable[[torch.Tensor], torch.Tensor]  # sigma [1] -> model timestep [1]
    initial_scale: Callable[[torch.Tensor], torch.Tensor]  # sigma_max -> std of the pure-noise start

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        # epsilon and velocity both give x0 = x - sigma * prediction
        return x - prediction * sigma


def epsilon_prediction(model_sigmas: torch.Tensor) -> Parameterization:
    """DDPM epsilon models over their discrete sigma table (ascending, one per training timestep).

    The start is scaled by sqrt(1 + sigma_max^2), as ComfyUI does for a full denoise
    (comfy/model_sampling.py EPS.noise_scaling with max_denoise). diffusers' Euler scheduler uses
    sigma_max instead for trailing/linspace spacings (init_noise_sigma); the two differ by
    1 / (2 sigma_max^2), about 0.2% at sigma_max = 14.6. Flipbook follows ComfyUI.
    """
    return Parameterization(
        name="epsilon",
        input_scale=lambda sigma: float((sigma**2 + 1) ** -0.5),
        # float32: MPS and DirectML have no float64
        timestep=lambda sigma: sigma_to_timestep(sigma, model_sigmas).to(torch.float32),
        initial_scale=lambda sigma_max: (1.0 + sigma_max**2) ** 0.5,
    )


def flow_prediction(multiplier: float = FLOW_TIMESTEP_MULTIPLIER) -> Parameterization:
    """Rectified-flow velocity models (Wan 2.1): no input scaling, t = multiplier * sigma, start = noise."""
    return Parameterization(
        name="flow",
        input_scale=lambda sigma: 1.0,
        timestep=lambda sigma: (sigma * multiplier).to(torch.float32),
        initial_scale=lambda sigma_max: sigma_max,
    )


def initial_latent(noise: torch.Tensor, sigma_max: torch.Tensor, parameterization: Parameterization,
                   init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The sampler's starting x from unit-variance noise: for a full denoise, or from `init` (the latents of
    an input video or image) for a partial one starting at sigma_max.

    Full: epsilon models start at sqrt(1 + sigma_max^2) * noise, as ComfyUI does; diffusers' Euler scheduler
    starts trailing/linspace schedules at sigma_max * noise instead (see `epsilon_prediction`). Flow
    models start at sigma_max * noise (= noise at sigma 1). Partial: init + sigma * noise for epsilon models,
    (1 - sigma) init + sigma noise for flow models (ComfyUI comfy/model_sampling.py EPS / CONST noise_scaling).
    """
    if init is None:
        return noise * parameterization.initial_scale(sigma_max)
    init = init.to(noise.device, noise.dtype)
    if parameterization.name == "flow":
        return init * (1 - sigma_max) + noise * sigma_max
    return init + noise * sigma_max


def uses_negative(cfg: float) -> bool:
    """CFG exactly 1 is the conditional prediction alone: no negative branch, one forward per step."""
    return abs(cfg - 1.0) > 1e-9


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + (cond - uncond) * scale


def _concatenate(conditionings: Sequence[Any]) -> Any:
    return torch.cat(list(conditionings))


class Denoiser:
    """D(x, sigma) for the samplers in core.sampling, over a model forward.

    `negative` is a function, called once and only when cfg != 1, so a CFG-1 run never encodes
    the negative prompt. The two CFG branches share one batch when `join` can combine their
    conditionings, else they are evaluated one after the other. `calls` counts model evaluations (a CFG batch is one evaluation);
    `progress(calls, expected_calls)` runs after each evaluation and may raise to cancel.
    """

    def __init__(self, *, forward: ModelForward, parameterization: Parameterization, positive: Any,
                 negative: Optional[Callable[[], Any]] = None, cfg: float = 1.0,
                 join: JoinConditioning = _concatenate, model_dtype: torch.dtype = torch.float32,
                 progress: Optional[ProgressFn] = None, expected_calls: int = 0) -> None:
        self.forward = forward
        self.parameterization = parameterization
        self.cfg = cfg
        self.guided = uses_negative(cfg)
        if self.guided and negative is None:
            raise ValueError(f"cfg={cfg} needs a negative conditioning")
        self.branches = (negative(), positive) if self.guided else (positive,)
        self.conditioning = join(list(self.branches)) if self.guided else positive  # None: run the branches apart
        self.model_dtype = model_dtype
        self.progress = progress
        self.expected_calls = expected_calls
        self.calls = 0  # evaluations of D (one per step for the samplers here)
        self.forwards = 0  # model forwards (two per evaluation when the CFG branches cannot share a batch)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        p = self.parameterization
        # sigma stays a 0-dim CPU tensor: arithmetic with it never makes the GPU wait for the CPU
        t = p.timestep(sigma.reshape(1)).to(x.device, non_blocking=True)
        model_input = (x * p.input_scale(sigma)).to(self.model_dtype)
        if not self.guided:
            prediction = self._forward(model_input, t, self.conditioning)
        elif self.conditioning is not None:
            uncond, cond = self._forward(torch.cat([model_input, model_input]), t, self.conditioning).chunk(2)
            prediction = classifier_free_guidance(uncond, cond, self.cfg)
        else:
            uncond, cond = (self._forward(model_input, t, branch) for branch in self.branches)
            prediction = classifier_free_guidance(uncond, cond, self.cfg)
        self.calls += 1
        if self.progress is not None:
            self.progress(self.calls, self.expected_calls)
        return p.denoised(x, sigma, prediction)

    def _forward(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: Any) -> torch.Tensor:
        self.forwards += 1
        return self.forward(model_input, t, conditioning).float()
