"""Tiny random Wan 2.1 VAEs in the key names of ComfyUI's `wan_2.1_vae.safetensors` (tests, benchmarks, demo).

The network is diffusers' AutoencoderKLWan at a small `base_dim` with Wan 2.1's block structure
(dim_mult [1,2,4,4], 2 residual blocks, temporal downsampling in the last two levels, 16 latent
channels), so every key of the real file exists, only narrower. Its names are mapped back to Wan's
own (`wan/modules/vae.py`) by `diffusers_to_wan_names`, the inverse of diffusers'
`convert_wan_vae_to_diffusers`; the tests check both directions. `kind="wan22"` and `kind="sd"` write
the few tensors by which a Wan 2.2 VAE or an SD image VAE is recognised, to test the refusals.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..core.errors import InvalidSettingError
from ..core.tiny_weights import randomize, write_safetensors

# diffusers WanResidualBlock names -> Wan's `ResidualBlock.residual` Sequential indices (RMS_norm, SiLU,
# CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d) and its `shortcut`
_RESIDUAL_NAMES = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                   ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_DIRECT_NAMES = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
                 "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
                 "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
                 "decoder.conv_out": "decoder.head.2"}


def _residual(tail: str) -> str:
    for new, old in _RESIDUAL_NAMES:
        if tail.startswith(new):
            return old + tail[len(new):]
    return tail  # resample.1.*, time_conv.*: the same in both


def _wan_name(key: str, num_res_blocks: int) -> str:
    """One AutoencoderKLWan name in Wan's names (Wan 2.1 structure: the decoder has num_res_blocks+1
    residual blocks per level, then its upsample, all in one flat `upsamples` list)."""
    head, _, leaf = key.rpartition(".")
    if head in _DIRECT_NAMES:
        return f"{_DIRECT_NAMES[head]}.{leaf}"
    per_level = num_res_blocks + 2
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_residual(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_residual(m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_residual(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
    raise KeyError(f"no Wan name known for the AutoencoderKLWan tensor {key!r}")


def diffusers_to_wan_names(state: dict[str, torch.Tensor], *, num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """AutoencoderKLWan (Wan 2.1, non-residual) names -> the names of `wan_2.1_vae.safetensors`."""
    renamed = {_wan_name(k, num_res_blocks): v for k, v in state.items()}
    if len(renamed) != len(state):
        raise ValueError(f"{len(state) - len(renamed)} AutoencoderKLWan tensors mapped onto names already taken")
    return renamed


def tiny_wan21_state_dict(*, base_dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Wan 2.1 VAE (16 latent channels, the real block structure) in Wan's key names."""
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(base_dim=base_dim)  # the other defaults are Wan 2.1's (diffusers docs)
    randomize(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    # RMS-norm gains near 1 and a damped output conv keep the random decoder's output mostly inside [-1, 1],
    # so comparisons see decoded values rather than diffusers' clamp
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
        for param in model.decoder.conv_out.parameters():
            param.mul_(0.3)
    return diffusers_to_wan_names(model.state_dict(), num_res_blocks=model.config.num_res_blocks)


def _wan22_shapes(base_dim: int) -> dict[str, tuple[int, ...]]:
    # the tensors ComfyUI (comfy/sd.py) tells a Wan 2.2 VAE by: its nested up blocks and 48 latent channels
    z, c = 48, base_dim
    return {"conv1.weight": (2 * z, 2 * z, 1, 1, 1), "conv2.weight": (z, z, 1, 1, 1),
            "encoder.conv1.weight": (c, 12, 3, 3, 3), "decoder.middle.0.residual.0.gamma": (4 * c, 1, 1, 1),
            "decoder.upsamples.0.upsamples.0.residual.2.weight": (c, c, 3, 3, 3),
            "decoder.head.2.weight": (12, c, 3, 3, 3)}


def _sd_image_vae_shapes(base_dim: int) -> dict[str, tuple[int, ...]]:
    # a few tensors of an SD/SDXL image VAE in LDM names (how most models/vae/*.safetensors are published)
    c = base_dim
    return {"encoder.conv_in.weight": (c, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (c, c, 3, 3),
            "decoder.conv_in.weight": (c, 4, 3, 3), "decoder.conv_out.weight": (3, c, 3, 3),
            "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1)}


def write_tiny_wan_vae(path: str | Path, *, base_dim: int = 8, seed: int = 0, dtype: torch.dtype = torch.float16,
                       kind: str = "wan21") -> Path:
    """Write a tiny VAE file: kind "wan21" (loads like wan_2.1_vae.safetensors), "wan22" or "sd" (refused)."""
    if kind == "wan21":
        state = tiny_wan21_state_dict(base_dim=base_dim, seed=seed)
    elif kind in ("wan22", "sd"):
        generator = torch.Generator().manual_seed(seed)
        shapes = _wan22_shapes(base_dim) if kind == "wan22" else _sd_image_vae_shapes(base_dim)
        state = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    else:
        raise InvalidSettingError(f"kind must be 'wan21', 'wan22' or 'sd', got {kind!r}.")
    return write_safetensors(state, Path(path), dtype)
