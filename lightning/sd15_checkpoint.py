"""SD1.5 single-file checkpoints (original LDM layout) -> diffusers UNet, VAE and CLIP text encoder.

Key prefixes of the real files: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE),
`cond_stage_model.transformer.` (CLIP text model, HF names). The architecture config starts from
the bundled v1-inference values and re-reads every size from the tensor shapes, so fine-tunes,
pruned files and our tiny test models load through the same code. The key renaming itself is
diffusers' (single_file_utils); nothing here reaches a hub. Networks are built on the meta device;
`weights` functions read the file (memory-mapped) and return tensors under the networks' names.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..core.bundled import bundled_json
from ..core.checkpoints import file_fingerprint, load_state_dict
from ..core.errors import UnsupportedCheckpointError
from ..core.families import FAMILY_NAMES, SD_CLIP_PREFIX, SD_UNET_PREFIX, detect_base_family
from ..core.model_handle import Component

UNET_PREFIX = SD_UNET_PREFIX
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = SD_CLIP_PREFIX
CLIP_HEAD_DIM = 64  # CLIP ViT-L/14 text heads are 64 wide (768 / 12)


@dataclass(frozen=True)
class SD15Layout:
    """What the tensors say about the architecture, read before any weight is loaded."""

    name: str  # the file's name, or what the host handed over ("the MODEL input")
    # read(prefix): the tensors under that LDM prefix, as they are to be loaded (a changed file is refused)
    read: Callable[[str], Mapping[str, torch.Tensor]]
    original_config: dict[str, Any]  # LDM config (v1-inference with sizes from the shapes)
    unet_config: dict[str, Any]  # diffusers UNet2DConditionModel config
    vae_config: dict[str, Any]  # diffusers AutoencoderKL config
    text_config: Optional[dict[str, Any]]  # transformers CLIPTextConfig values; None: the host encodes the prompt
    scaling_factor: float


def inspect_sd15_checkpoint(path: str | Path) -> SD15Layout:
    """Check the file is a plain SD1.5 checkpoint and read its architecture from the tensor shapes."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    state = load_state_dict(path)  # memory-mapped: only the shapes are read here
    family = detect_base_family(state)
    if family != "sd15":
        raise UnsupportedCheckpointError(family_message(path.name, family))

    def read(prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in load_state_dict(path, expect=fingerprint).items() if k.startswith(prefix)}

    return inspect_sd15_state(path.name, state, read=read)


def inspect_sd15_state(name: str, state: Mapping[str, torch.Tensor], *,
                       read: Callable[[str], Mapping[str, torch.Tensor]], with_text_encoder: bool = True) -> SD15Layout:
    """The layout of LDM-named SD1.5 tensors (a file's, or the networks a host such as ComfyUI hands over);
    `state` gives the shapes, `read` the weights to load. Without the text encoder, the host encodes prompts."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    _check_parts(name, state)
    try:
        original = infer_original_config(state)
        text_config = _text_config(state) if with_text_encoder else None
    except (KeyError, StopIteration) as exc:
        raise UnsupportedCheckpointError(
            f"{name} lacks tensors every SD1.5 checkpoint has (e.g. {exc}); it may be pruned or damaged. "
            "Download the checkpoint again or use another SD1.5 checkpoint."
        ) from None
    context = original["model"]["params"]["unet_config"]["params"]["context_dim"]
    if text_config is not None and context != text_config["hidden_size"]:
        raise UnsupportedCheckpointError(
            f"{name}: its UNet's cross-attention expects {context}-wide text embeddings, but its text encoder "
            f"gives {text_config['hidden_size']} (SD1.5 uses 768 for both). The file mixes parts of different "
            "models; use an unmodified SD1.5 checkpoint."
        )
    channels = original["model"]["params"]["unet_config"]["params"]["in_channels"]
    if channels != 4:
        raise UnsupportedCheckpointError(
            f"{name} is an SD1.5 {'inpainting' if channels == 9 else 'special-purpose'} model ({channels} input "
            "channels); text-to-animation needs a plain SD1.5 checkpoint (4 input channels)."
        )
    return SD15Layout(
        name=name, read=read, original_config=original,
        unet_config=create_unet_diffusers_config_from_ldm(original, state),
        vae_config=create_vae_diffusers_config_from_ldm(original, state),
        text_config=text_config,
        scaling_factor=float(original["model"]["params"]["scale_factor"]),
    )


def _check_parts(name: str, state: Mapping[str, torch.Tensor]) -> None:
    if not any(k.startswith(VAE_PREFIX) for k in state):
        raise UnsupportedCheckpointError(
            f"{name} has no baked-in VAE (no '{VAE_PREFIX}*' tensors). Use a checkpoint that includes its VAE, "
            "e.g. v1-5-pruned-emaonly-fp16.safetensors, or a version of this model 'with VAE'."
        )


def family_message(name: str, family: str) -> str:
    if family == "unknown":
        return (
            f"{name} is not a Stable Diffusion 1.5 single-file checkpoint: it has no "
            f"'{UNET_PREFIX}*' and '{CLIP_PREFIX}*' tensors. Pick an SD1.5 checkpoint from models/checkpoints "
            "(a diffusers folder, LoRA or VAE file cannot be used here)."
        )
    return (
        f"{name} is a checkpoint for {FAMILY_NAMES[family]}, but AnimateDiff-Lightning motion modules are SD1.5 only. "
        "Pick an SD1.5 checkpoint (e.g. epiCRealism, ToonYou, DreamShaper 8)."
    )


def infer_original_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The LDM config of this checkpoint: bundled SD1.5 values with all sizes read from tensor shapes."""
    config = copy.deepcopy(bundled_json("sd15", "v1-inference.json"))
    params = config["model"]["params"]
    params["unet_config"]["params"].update(_unet_shape_params(state))
    params["first_stage_config"]["params"]["ddconfig"].update(_vae_shape_params(state))
    return config


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _unet_shape_params(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    p = UNET_PREFIX
    conv_in = state[p + "input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    levels = _count(state, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_inputs = _count(state, re.escape(p) + r"input_blocks\.(\d+)\.")
    num_res = (num_inputs - 1 - (levels - 1)) // levels
    mult, attn_res = [], []
    for level in range(levels):
        first = 1 + level * (num_res + 1)
        mult.append(state[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        if f"{p}input_blocks.{first}.1.proj_in.weight" in state:
            attn_res.append(2**level)
    to_k = next(v for k, v in state.items() if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in state.items() if k.startswith(p) and k.endswith(".proj_in.weight"))
    depth = _count(state, re.escape(p) + r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")
    return {
        "in_channels": conv_in.shape[1],
        "out_channels": state[p + "out.2.weight"].shape[0],
        "model_channels": model_channels,
        "channel_mult": mult,
        "num_res_blocks": num_res,
        "attention_resolutions": attn_res,
        "context_dim": to_k.shape[1],
        "use_linear_in_transformer": proj_in.ndim == 2,
        "transformer_depth": max(depth, 1),
    }


def _vae_shape_params(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    p = VAE_PREFIX
    ch = state[p + "encoder.conv_in.weight"].shape[0]
    levels = _count(state, re.escape(p) + r"encoder\.down\.(\d+)\.")
    mult = [state[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    return {
        "ch": ch,
        "ch_mult": mult,
        "num_res_blocks": _count(state, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        "z_channels": state[p + "decoder.conv_in.weight"].shape[1],
        "in_channels": state[p + "encoder.conv_in.weight"].shape[1],
        "out_ch": state[p + "decoder.conv_out.weight"].shape[0],
    }


def _text_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    weights = _clip_tensors(state)
    config = {k: v for k, v in bundled_json("sd15", "text_encoder_config.json").items() if not k.startswith("_")}
    hidden = weights["embeddings.token_embedding.weight"].shape[1]
    config.update(
        vocab_size=weights["embeddings.token_embedding.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=weights["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(weights, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        max_position_embeddings=weights["embeddings.position_embedding.weight"].shape[0],
        projection_dim=hidden,
    )
    return config


def _clip_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # files name the tensors `…transformer.text_model.*`, some older ones `…transformer.*` (ComfyUI accepts both)
    return {k[len(CLIP_PREFIX):].removeprefix("text_model."): v for k, v in state.items() if k.startswith(CLIP_PREFIX)}


def unet_weights(layout: SD15Layout) -> dict[str, torch.Tensor]:
    """The UNet's tensors under diffusers UNet2DConditionModel names (diffusers' LDM converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(layout.read(UNET_PREFIX), layout.unet_config)


def vae_weights(layout: SD15Layout) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(layout.read(VAE_PREFIX), layout.vae_config)


def text_encoder_weights(layout: SD15Layout, with_text_model_level: bool) -> dict[str, torch.Tensor]:
    weights = _clip_tensors(layout.read(CLIP_PREFIX))
    # transformers < 5 keeps the `text_model.` level in CLIPTextModel's own names
    return {"text_model." + k: v for k, v in weights.items()} if with_text_model_level else weights


def _on_meta(build):
    with torch.device("meta"):
        return build().eval()


def vae_component(layout: SD15Layout, **placement) -> Component:
    from diffusers import AutoencoderKL

    module = _on_meta(lambda: AutoencoderKL(**layout.vae_config))
    return Component(name="vae", module=module, weights=lambda: vae_weights(layout), **placement)


def text_encoder_component(layout: SD15Layout, **placement) -> Component:
    from transformers import CLIPTextConfig, CLIPTextModel

    module = _on_meta(lambda: CLIPTextModel(CLIPTextConfig(**layout.text_config)))
    nested = any(k.startswith("text_model.") for k in module.state_dict())
    return Component(name="text_encoder", module=module, weights=lambda: text_encoder_weights(layout, nested),
                     finish=_clip_position_ids, ignore=("position_ids",), **placement)


def _clip_position_ids(module: torch.nn.Module) -> None:
    """CLIP keeps its position ids in a non-persistent buffer that no file holds: rebuild it. LoRA factors of an
    earlier read are dropped: the weights are the file's again."""
    from .sd15_lora import clear_sd15_loras

    clear_sd15_loras(module)
    embeddings = module.get_submodule("text_model.embeddings" if hasattr(module, "text_model") else "embeddings")
    device = embeddings.position_embedding.weight.device
    length = embeddings.position_embedding.weight.shape[0]
    embeddings.register_buffer("position_ids", torch.arange(length, device=device).expand((1, -1)), persistent=False)


@dataclass(frozen=True)
class SD15Components:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    scaling_factor: float


def load_sd15_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SD15Components:
    """The three networks of an SD1.5 single-file checkpoint, loaded onto device/dtype (no motion module)."""
    from diffusers import UNet2DConditionModel

    layout = inspect_sd15_checkpoint(path)
    device = torch.device(device)
    placement = dict(load_device=device, offload_device=device, dtype=dtype)
    unet = Component(name="unet", module=_on_meta(lambda: UNet2DConditionModel(**layout.unet_config)),
                     weights=lambda: unet_weights(layout), **placement)
    parts = [unet, vae_component(layout, **placement), text_encoder_component(layout, **placement)]
    for part in parts:
        part.materialize()
    return SD15Components(unet=unet.module, vae=parts[1].module, text_encoder=parts[2].module,
                          scaling_factor=layout.scaling_factor)
