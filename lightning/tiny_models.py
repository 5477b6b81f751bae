"""Tiny random models written in the exact key layouts of the real files.

Used by the tests, the benchmark and `flipbook demo`: an SD1.5 single-file checkpoint in the
original LDM layout and AnimateDiff motion modules in both published layouts (original, as the
Lightning `_comfyui` files, and diffusers MotionAdapter, as the `_diffusers` files). Only the
sizes are small; names, prefixes and block structure are those of the real files, and they
load through the same loaders users' files go through.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
import torch

from ..core.tiny_weights import randomize, write_safetensors  # noqa: F401  (re-exported for callers)
from .ldm_names import unet_to_ldm  # noqa: F401  (re-exported for callers)
from .sd15_checkpoint import CLIP_PREFIX, VAE_PREFIX


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of the generated models; the block structure is always SD1.5's."""

    unet_channels: tuple[int, ...] = (32, 64, 128, 128)  # widths change where SD1.5 changes them (skip convs)
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers: int = 2  # as SD1.5 (num_res_blocks 2): every key a real file has
    text_hidden: int = 32
    text_layers: int = 2
    motion_max_seq_length: int = 32


# the real SD1.5 (v1-inference.yaml) and AnimateDiff v2 / Lightning widths, for GPU benchmarks
SD15_REAL_SIZES = TinySizes(unet_channels=(320, 640, 1280, 1280), vae_channels=(128, 256, 512, 512), vae_layers=2,
                            text_hidden=768, text_layers=12)


# the smallest SD1.5 file ComfyUI's own loaders read (CheckpointLoaderSimple, LoraLoader): its model detection
# wants model_channels 320 and context_dim 768 (comfy/supported_models.py SD15.unet_config), its CLIP and VAE are
# built at their real sizes (sd1_clip_config.json; the SD VAE ddconfig); the widths stay 320 at every level
COMFY_READABLE_SIZES = TinySizes(unet_channels=(320, 320, 320, 320), vae_channels=(128, 256, 512, 512),
                                 vae_layers=2, text_hidden=768, text_layers=12)


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> original `first_stage_model.*` keys (1x1 conv attention)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        out[VAE_PREFIX + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `cond_stage_model.transformer.text_model.*` (SD1.x files)."""
    out = {}
    for key, value in state.items():
        if "position_ids" in key:
            continue
        key = key if key.startswith("text_model.") else "text_model." + key
        out[CLIP_PREFIX + key] = value
    return out


def motion_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers MotionAdapter keys -> original AnimateDiff keys (as in `*_comfyui.safetensors`)."""
    out = {}
    for key, value in state.items():
        new = re.sub(r"(\.motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        new = (new.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
               .replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1."))
        if new.endswith(".pos_embed.pe"):
            for block in (0, 1):  # the original layout keeps one PE buffer per attention block
                out[new.replace(".pos_embed.pe", f".attention_blocks.{block}.pos_encoder.pe")] = value.clone()
            continue
        out[new] = value
    return out


def tiny_sd15_state_dict(sizes: TinySizes = TinySizes(), seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete SD1.5 single-file checkpoint (UNet + VAE + CLIP) in the LDM layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=sizes.unet_channels, layers_per_block=2,
        cross_attention_dim=sizes.text_hidden, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=sizes.vae_channels, layers_per_block=sizes.vae_layers, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels), norm_num_groups=32,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes.text_hidden, intermediate_size=sizes.text_hidden * 4,
        num_hidden_layers=sizes.text_layers, num_attention_heads=max(1, sizes.text_hidden // 64),
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=sizes.text_hidden,
    ))
    for i, module in enumerate((unet, vae, text)):
        randomize(module, seed + i)
    up_has_attn = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    state = unet_to_ldm(unet.state_dict(), 2, up_has_attn)
    state.update(vae_to_ldm(vae.state_dict(), len(sizes.vae_channels)))
    state.update(clip_to_ldm(text.state_dict()))
    return {k: v.contiguous() for k, v in state.items()}


def tiny_motion_state_dict(
    sizes: TinySizes = TinySizes(), layout: str = "original", family: str = "sd15", seed: int = 10
) -> dict[str, torch.Tensor]:
    """A motion module: layout 'original' (AnimateDiff/_comfyui) or 'diffusers'; family 'sd15' or 'sdxl'."""
    from diffusers import MotionAdapter

    channels = sizes.unet_channels if family == "sd15" else sizes.unet_channels[:3]
    adapter = MotionAdapter(
        block_out_channels=channels, motion_layers_per_block=2, motion_num_attention_heads=8,
        motion_norm_num_groups=32, motion_max_seq_length=sizes.motion_max_seq_length,
        use_motion_mid_block=family == "sd15",
    )
    randomize(adapter, seed)
    state = adapter.state_dict()
    if layout == "original":
        state = motion_to_original(state)
    return {k: v.contiguous() for k, v in state.items()}


def tiny_motion_lora(motion_state: dict[str, torch.Tensor], *, rank: int = 4, seed: int = 20,
                     layout: str = "guoyww") -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A camera-motion LoRA for a motion module in the original layout: guoyww's key names (or diffusers'
    converted ones, `unet.` + attn1/attn2), no alpha. Returns (file tensors, {original weight: (up, down)})."""
    generator = torch.Generator().manual_seed(seed)
    tensors, plain = {}, {}
    for key, value in motion_state.items():
        block, _, leaf = key.rpartition(".attention_blocks.")
        if not block or not leaf.endswith(".weight") or leaf.split(".")[1] not in ("to_q", "to_k", "to_v", "to_out"):
            continue
        index, name = leaf.split(".")[0], leaf.split(".")[1]
        up = torch.randn(value.shape[0], rank, generator=generator) * 0.05
        down = torch.randn(rank, value.shape[1], generator=generator) * 0.05
        if layout == "guoyww":
            stem = f"{block}.attention_blocks.{index}.processor.{name}_lora"
        else:
            stem = f"unet.{block.replace('.temporal_transformer', '')}.attn{int(index) + 1}.processor.{name}_lora"
        tensors[stem + ".down.weight"], tensors[stem + ".up.weight"] = down, up
        plain[key] = (up, down)
    return tensors, plain


def tiny_kohya_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, *, rank: int = 4, seed: int = 30,
                    locon: bool = False) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """A kohya-format SD1.5 LoRA for these networks: every transformer Linear and proj_in/proj_out (1x1 convs),
    the CLIP attention and MLP layers, alpha = rank / 2; `locon` adds the resnets' 3x3 convs. Returns (file
    tensors, {(network, module name): the weight delta at strength 1})."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    targets = [("unet", "lora_unet_", n, m) for n, m in unet.named_modules()
               if ".attentions." in n and "motion_modules" not in n
               and (isinstance(m, torch.nn.Linear) or n.endswith(("proj_in", "proj_out")))]
    if locon:
        targets += [("unet", "lora_unet_", n, m) for n, m in unet.named_modules()
                    if ".resnets." in n and n.endswith(("conv1", "conv2"))]
    targets += [("text_encoder", "lora_te_", n, m) for n, m in text_encoder.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for network, prefix, name, layer in targets:
        out_features, in_features = layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])
        down = torch.randn(rank, in_features, *kernel, generator=generator) * 0.1
        up = torch.randn(out_features, rank, *((1,) * len(kernel)), generator=generator) * 0.1
        stem = prefix + ("text_model." + name if network == "text_encoder" and not name.startswith("text_model")
                         else name).replace(".", "_")
        tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = down, up
        tensors[stem + ".alpha"] = torch.tensor(rank / 2)
        deltas[(network, name)] = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    return tensors, deltas
