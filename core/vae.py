"""VAE decoding of video latents, frame chunks at a time, with an fp16 NaN/inf fallback."""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .guards import require_finite

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def decode_latents(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    scaling_factor: float,
    chunk: int = 8,
    progress: Optional[ProgressFn] = None,
    device: Optional[torch.device] = None,
    source: str = "the VAE",
) -> torch.Tensor:
    """[F, C, h, w] latents -> [F, H, W, 3] float32 images in 0..1 on the CPU (ComfyUI IMAGE layout).

    fp16 VAEs can overflow to NaN/inf on some inputs (sd-webui-animatediff #352); such a chunk is
    decoded again in fp32 instead of returning black frames. The finiteness of all chunks is read
    back in one transfer at the end, so the GPU never waits on the CPU between chunks. `device` is where
    the VAE computes (default: where its first weight is; under a partial load weights may wait elsewhere);
    `source` names the VAE's file in the error raised when frames stay NaN/inf.
    """
    dtype = next(vae.parameters()).dtype
    device = device or next(vae.parameters()).device
    total = latents.shape[0]
    parts = [latents[s:s + chunk] / scaling_factor for s in range(0, total, chunk)]
    images = []
    for index, part in enumerate(parts):
        images.append(vae.decode(part.to(device, dtype)).sample)
        if progress is not None:
            progress(min((index + 1) * chunk, total), total)
    if dtype != torch.float32:
        finite = torch.stack([torch.isfinite(image).all() for image in images]).cpu()
        for index in (~finite).nonzero().flatten().tolist():
            log.warning("VAE produced NaN/inf in %s; decoding frames %d-%d again in float32",
                        dtype, index * chunk, index * chunk + parts[index].shape[0] - 1)
            images[index] = _decode_fp32(vae, parts[index].to(device), dtype)
    video = torch.cat(images).float()
    # before the clamp, which would turn +-inf into white or black frames
    require_finite(video, what="decoded frames", likely_causes=(
        f"NaN/inf weights in {source}, or an overflow that decoding again in float32 did not cure"))
    video = video.div_(2).add_(0.5).clamp_(0, 1)
    return video.permute(0, 2, 3, 1).to("cpu").contiguous()


def _decode_fp32(vae: torch.nn.Module, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    vae.to(torch.float32)
    try:
        return vae.decode(part.float()).sample
    finally:
        vae.to(dtype)
