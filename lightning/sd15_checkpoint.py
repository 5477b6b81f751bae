"""SD1.5 single-file checkpoints (original LDM layout) -> diffusers UNet, VAE and CLIP text encoder.

Key prefixes of the real files: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE),
`cond_stage_model.transformer.` (CLIP text model, HF names). The architecture config starts from
the bundled v1-inference values and re-reads every size from the tensor shapes, so fine-tunes,
pruned files and our tiny test models load through the same code. The key renaming itself is
diffusers' (single_file_utils); nothing here reaches a hub.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoints import load_state_dict
from ..core.errors import UnsupportedCheckpointError

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_HEAD_DIM = 64  # CLIP ViT-L/14 text heads are 64 wide (768 / 12)


@dataclass(frozen=True)
class SD15Components:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    scaling_factor: float


def detect_base_family(keys: set[str]) -> str:
    """'sd15', 'sdxl', 'sd2' or 'unknown', from sentinel keys (diffusers infer_diffusers_model_type idea)."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in keys) and any(k.startswith(UNET_PREFIX) for k in keys):
        return "sd15"
    return "unknown"


def load_sd15_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SD15Components:
    """Load an SD1.5 single-file checkpoint (safetensors, or a weights-only pickle) onto device/dtype."""
    path = Path(path)
    state = load_state_dict(path)
    family = detect_base_family(set(state))
    if family != "sd15":
        raise UnsupportedCheckpointError(_family_message(path.name, family))
    original = infer_original_config(state)
    channels = original["model"]["params"]["unet_config"]["params"]["in_channels"]
    if channels != 4:
        raise UnsupportedCheckpointError(
            f"{path.name} is an SD1.5 {'inpainting' if channels == 9 else 'special-purpose'} model ({channels} input "
            "channels); text-to-animation needs a plain SD1.5 checkpoint (4 input channels)."
        )
    unet = _build_unet(state, original, dtype, device)
    vae = _build_vae(state, original, dtype, device)
    text_encoder = _build_text_encoder(state, dtype).to(device)
    scaling = float(original["model"]["params"]["scale_factor"])
    return SD15Components(unet=unet, vae=vae, text_encoder=text_encoder, scaling_factor=scaling)


def _family_message(name: str, family: str) -> str:
    if family == "unknown":
        return (
            f"{name} is not a Stable Diffusion 1.5 single-file checkpoint: it has no "
            f"'{UNET_PREFIX}*' and '{CLIP_PREFIX}*' tensors. Pick an SD1.5 checkpoint from models/checkpoints "
            "(a diffusers folder, LoRA or VAE file cannot be used here)."
        )
    return (
        f"{name} is an {family.upper()} checkpoint, but AnimateDiff-Lightning motion modules are SD1.5 only. "
        "Pick an SD1.5 checkpoint (e.g. epiCRealism, ToonYou, DreamShaper 8)."
    )


def infer_original_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The LDM config of this checkpoint: bundled SD1.5 values with all sizes read from tensor shapes."""
    base = json.loads((MODELS_DIR / "sd15" / "v1-inference.json").read_text())
    config = copy.deepcopy(base)
    params = config["model"]["params"]
    params["unet_config"]["params"].update(_unet_shape_params(state))
    params["first_stage_config"]["params"]["ddconfig"].update(_vae_shape_params(state))
    return config


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _unet_shape_params(state: dict[str, torch.Tensor]) -> dict[str, Any]:
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


def _vae_shape_params(state: dict[str, torch.Tensor]) -> dict[str, Any]:
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


def _load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, ignore=(), assign=False) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=assign)
    missing = [k for k in missing if not any(i in k for i in ignore)]
    unexpected = [k for k in unexpected if not any(i in k for i in ignore)]
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"The checkpoint's {what} does not match the SD1.5 architecture: {len(missing)} missing tensors "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it an SD1.5 "
            "model in the original single-file layout?"
        )


def _materialize(model_class, config: dict[str, Any], weights: dict[str, torch.Tensor], what: str,
                 dtype: torch.dtype, device: torch.device | str):
    """Build on the meta device and adopt the file's tensors (no random init, no second copy)."""
    with torch.device("meta"):
        model = model_class(**config)
    _load_into(model, {k: v.to(device, dtype) for k, v in weights.items()}, what, assign=True)
    return model.eval()


def _build_unet(state, original: dict[str, Any], dtype: torch.dtype, device: torch.device | str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original, state)
    weights = convert_ldm_unet_checkpoint(state, config)
    return _materialize(UNet2DConditionModel, config, weights, "UNet", dtype, device)


def _build_vae(state, original: dict[str, Any], dtype: torch.dtype, device: torch.device | str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(original, state)
    weights = convert_ldm_vae_checkpoint(state, config)
    return _materialize(AutoencoderKL, config, weights, "VAE", dtype, device)


def _build_text_encoder(state: dict[str, torch.Tensor], dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    # files name the tensors `…transformer.text_model.*`, some older ones `…transformer.*` (ComfyUI accepts both)
    weights = {k[len(CLIP_PREFIX):].removeprefix("text_model."): v for k, v in state.items()
               if k.startswith(CLIP_PREFIX)}
    base = json.loads((MODELS_DIR / "sd15" / "text_encoder_config.json").read_text())
    token_embedding = weights["embeddings.token_embedding.weight"]
    hidden = token_embedding.shape[1]
    base.update(
        vocab_size=token_embedding.shape[0],
        hidden_size=hidden,
        intermediate_size=weights["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(weights, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        max_position_embeddings=weights["embeddings.position_embedding.weight"].shape[0],
        projection_dim=hidden,
    )
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    model = CLIPTextModel(CLIPTextConfig(**base))
    if any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers < 5 keeps the `text_model.` level in CLIPTextModel's own names
        weights = {"text_model." + k: v for k, v in weights.items()}
    _load_into(model, weights, "text encoder", ignore=("position_ids",))
    return torch.nn.Module.to(model, dtype).eval()
