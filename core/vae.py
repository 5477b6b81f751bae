"""VAE decoding of video latents, frame chunks at a time, with an fp16 NaN/inf fallback."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def decode_latents(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    scaling_factor: float,
    chunk: int = 8,
    progress: Optional[ProgressFn] = None,
) -> torch.Tensor:
    """[F, C, h, w] latents -> [F, H, W, 3] float32 images in 0..1 (ComfyUI IMAGE layout).

    fp16 VAEs can overflow to NaN/inf on some inputs (sd-webui-animatediff #352); such a chunk is
    decoded again in fp32 instead of returning black frames.
    """
    frames = []
    total = latents.shape[0]
    for start in range(0, total, chunk):
        part = latents[start:start + chunk] / scaling_factor
        frames.append(_decode_chunk(vae, part).cpu())
        if progress is not None:
            progress(min(start + chunk, total), total)
    video = torch.cat(frames)
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _decode_chunk(vae: torch.nn.Module, part: torch.Tensor) -> torch.Tensor:
    dtype = next(vae.parameters()).dtype
    image = vae.decode(part.to(dtype)).sample
    if dtype != torch.float32 and not torch.isfinite(image).all():
        log.warning("VAE produced NaN/inf in %s; decoding this chunk again in float32", dtype)
        vae.to(torch.float32)
        try:
            image = vae.decode(part.float()).sample
        finally:
            vae.to(dtype)
    return image.float()
