"""Inputs of a Lightning run beyond the prompt: frames to restyle (video-to-video, image-to-animation) and
CONDITIONING from ComfyUI's CLIPTextEncode; checked against the request before any model runs."""
from __future__ import annotations

from typing import Optional

import torch

from ..core.errors import InvalidSettingError
from ..core.guards import require_finite
from ..core.model_handle import LocalMemory, MemoryPolicy

DECODE_CHUNK = 8  # frames per VAE call (as the decode)


def check_init(request) -> None:
    if request.denoise != 1.0 and request.init_latents is None:
        raise InvalidSettingError(f"denoise={request.denoise} needs input frames (init_images or latent): without "
                                  "them there is nothing to keep; use denoise 1 for text-to-animation.")
    if request.init_latents is None:
        return
    frames, channels, h, w = request.init_latents.shape
    if channels != 4 or (h, w) != (request.height // 8, request.width // 8) or frames not in (1, request.frames):
        raise InvalidSettingError(
            f"The input is {frames} frames of {w * 8}x{h * 8} ({channels}-channel latents), but the sampler is set to "
            f"{request.frames} frames of {request.width}x{request.height}: set frames to {frames} (or 1 input "
            f"image for image-to-animation) and the size to {w * 8}x{h * 8}, or resize the input.")


def check_contexts(model, request) -> None:
    for name, context in (("positive", request.positive_context), ("negative", request.negative_context)):
        if context is not None:
            _check_context(model, context, what=f"The {name} CONDITIONING",
                           fix="Encode the prompt with CLIPTextEncode on the CLIP of this SD1.5 checkpoint.")


def check_host_context(model, context: torch.Tensor) -> torch.Tensor:
    """The embeddings the host's CLIP gave for a prompt, checked like a CONDITIONING."""
    return _check_context(model, context, what="The CLIP input's prompt embedding",
                          fix="Connect the CLIP of an SD1.5 checkpoint (Load Checkpoint's CLIP output).")


def _check_context(model, context: torch.Tensor, *, what: str, fix: str) -> torch.Tensor:
    width = model.unet.config.cross_attention_dim
    if context.ndim != 3 or context.shape[0] != 1 or context.shape[-1] != width:
        raise InvalidSettingError(
            f"{what} is {tuple(context.shape)}, but {model.checkpoint_name} reads [1, tokens, {width}] (SD1.5's "
            f"CLIP; SDXL's is 2048 wide, SD2's 1024). {fix}")
    return context


def encode_frames(model, images: torch.Tensor, memory: Optional[MemoryPolicy] = None) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 -> the VAE's latents [F, 4, H/8, W/8] in the UNet's space (the mean of
    the encoder's distribution, as ComfyUI's VAE Encode takes it), a chunk of frames at a time."""
    vae = model.handle["vae"]
    (memory or LocalMemory(model.handle)).prepare([vae], _vae_working_bytes(min(len(images), DECODE_CHUNK),
                                                                          images.shape[1], images.shape[2],
                                                                          vae.dtype or model.dtype))
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), DECODE_CHUNK):
            pixels = images[start:start + DECODE_CHUNK].permute(0, 3, 1, 2).to(vae.load_device, vae.dtype) * 2 - 1
            parts.append(model.vae.encode(pixels).latent_dist.mean.float().cpu() * model.scaling_factor)
    latents = torch.cat(parts)
    require_finite(latents, what="encoded input frames", likely_causes=(
        f"NaN/inf in the input images, or an fp16 overflow in the VAE of {model.checkpoint_name} (try ComfyUI's "
        "--fp32-vae)"))
    return latents


def _vae_working_bytes(frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    from .pipeline import vae_working_bytes

    return vae_working_bytes(frames, height, width, dtype)
