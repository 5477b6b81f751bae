"""SD1.x UNet module names: diffusers UNet2DConditionModel <-> the original LDM file (`model.diffusion_model.*`).

The SD1.x block structure (v1-inference.yaml): input_blocks.0 = conv_in, then per level `layers_per_block` blocks of
(resnet, attention) and one downsampler `op`; middle_block = resnet, attention, resnet; output_blocks per level
`layers_per_block + 1` blocks of (resnet, attention) with the upsampler last. Checked against the keys of ComfyUI's
own LDM modules at SD1.5 sizes (tests/data/sd15_ldm_keys.txt). Used to write LDM files (tiny models) and to read
LoRAs whose module names follow the LDM UNet (`lora_unet_input_blocks_4_1_...`, `..._in_layers_2` in LoCon files).
"""
from __future__ import annotations

import re

import torch

from .sd15_checkpoint import UNET_PREFIX


def _resnet_ldm(name: str) -> str:
    for new, old in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        if name.startswith(new + "."):
            return old + name[len(new):]
    return name


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, up_has_attn: list[bool]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> original `model.diffusion_model.*` keys (SD1.x structure)."""
    return {UNET_PREFIX + ldm_name(key, layers_per_block, up_has_attn): value for key, value in state.items()}


def ldm_name(key: str, layers_per_block: int, up_has_attn: list[bool]) -> str:
    """One diffusers UNet parameter name (`down_blocks.0.resnets.1.conv1.weight`) -> its LDM name without the file
    prefix; KeyError for names outside the image UNet (a UNetMotionModel's motion modules)."""
    direct = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    step = layers_per_block + 1
    head, _, leaf = key.rpartition(".")
    if head in direct:
        return f"{direct[head]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * step + j}." + ("0." + _resnet_ldm(rest) if kind == "resnets" else "1." + rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_ldm(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * step + j}." + ("0." + _resnet_ldm(rest) if kind == "resnets" else "1." + rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * step + layers_per_block}.{2 if up_has_attn[i] else 1}.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def ldm_module_names(unet: torch.nn.Module) -> dict[str, str]:
    """{LDM module path: diffusers module path} for every Linear/Conv2d of the image UNet inside `unet` (a
    UNet2DConditionModel or UNetMotionModel, whose config gives layers per block and the up blocks' kinds)."""
    config = unet.config
    up_has_attn = [kind.startswith("CrossAttn") for kind in config.up_block_types]
    names = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and "motion_modules" not in name:
            try:
                names[ldm_name(name + ".weight", config.layers_per_block, up_has_attn)[: -len(".weight")]] = name
            except KeyError:
                continue
    return names
