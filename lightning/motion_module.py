"""AnimateDiff motion modules: layout/family/version detection and loading into diffusers.

Detection follows AnimateDiff-Evolved's rules (Kosinkadink/ComfyUI-AnimateDiff-Evolved animatediff/motion_module_ad.py, normalize_ad_state_dict):
base family from the highest down-block index (3 -> SD1.5, 2 -> SDXL); version v2 when a
mid block exists, else v3 for a 32-frame PE on SD1.5, else v1; frame limit = PE length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..core.checkpoints import load_state_dict
from ..core.errors import UnsupportedCheckpointError
from ..core.model_handle import adopt_tensors

MOTION_HEADS = 8  # every published AnimateDiff module (guoyww configs, diffusers MotionAdapter default)
MOTION_NORM_GROUPS = 32
ORIGINAL = "original"  # guoyww / Lightning `_comfyui` / AnimateDiff-Evolved
DIFFUSERS = "diffusers"  # diffusers MotionAdapter / Lightning `_diffusers`


@dataclass(frozen=True)
class MotionModuleInfo:
    layout: str
    family: str  # "sd15" | "sdxl"
    version: str  # "v1" | "v2" | "v3"
    max_frames: int  # positional-encoding length
    channels: tuple[int, ...]
    layers_per_block: int


def inspect_motion_module(state: dict[str, torch.Tensor], file_name: str = "motion module") -> MotionModuleInfo:
    """Recognise the layout, base family, version and frame limit from the tensors alone."""
    keys = list(state)
    layout = _detect_layout(keys, file_name)
    down_indices = {int(m[1]) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    families = {3: "sd15", 2: "sdxl"}
    if not down_indices or max(down_indices) not in families:
        raise UnsupportedCheckpointError(
            f"{file_name}: down blocks {sorted(down_indices)} fit neither SD1.5 (0-3) nor SDXL (0-2) motion modules."
        )
    family = families[max(down_indices)]
    has_mid = any(k.startswith("mid_block.") for k in keys)
    pe_key = next((k for k in keys if k.endswith("pos_encoder.pe") or k.endswith("pos_embed.pe")), None)
    # a diffusers file saved without its (recomputable) PE buffers: every v2/v3 module was trained with 32
    max_frames = int(state[pe_key].shape[1]) if pe_key else 32
    version = "v2" if has_mid else ("v3" if family == "sd15" and max_frames == 32 else "v1")
    channels = tuple(
        int(state[_proj_in_key(i, keys)].shape[0]) for i in range(max(down_indices) + 1)
    )
    layers = len({m[1] for k in keys if (m := re.match(r"down_blocks\.0\.motion_modules\.(\d+)\.", k))})
    return MotionModuleInfo(layout, family, version, max_frames, channels, layers)


def _proj_in_key(block: int, keys: list[str]) -> str:
    prefix = f"down_blocks.{block}.motion_modules.0."
    return next(k for k in keys if k.startswith(prefix) and k.endswith("proj_in.weight"))


def _detect_layout(keys: list[str], file_name: str) -> str:
    if any("temporal_attentions" in k or k.endswith("pos_encoder.positional_encoding") for k in keys):
        raise UnsupportedCheckpointError(
            f"{file_name} is a HotShot-XL temporal-layers file; Flipbook loads AnimateDiff motion modules only."
        )
    motion = [k for k in keys if ".motion_modules." in k]
    original = [k for k in motion if ".temporal_transformer." in k]
    if original and not any("pos_encoder" in k for k in original):
        raise UnsupportedCheckpointError(
            f"{file_name} has motion modules without positional encodings (AnimateLCM-style); not supported yet. "
            "Use an AnimateDiff v2/v3 or AnimateDiff-Lightning motion module."
        )
    if any(".temporal_transformer." in k for k in motion):
        return ORIGINAL
    if any(".transformer_blocks.0.attn1." in k for k in motion):
        return DIFFUSERS
    sample = ", ".join(keys[:3]) or "no tensors"
    raise UnsupportedCheckpointError(
        f"{file_name} is not an AnimateDiff motion module in a known layout (first keys: {sample}). Expected "
        "'down_blocks.N.motion_modules.M.temporal_transformer.*' (AnimateDiff / Lightning _comfyui) or "
        "'down_blocks.N.motion_modules.M.transformer_blocks.0.attn1.*' (diffusers / Lightning _diffusers)."
    )


def to_diffusers_layout(state: dict[str, torch.Tensor], info: MotionModuleInfo) -> dict[str, torch.Tensor]:
    """MotionAdapter key names for either layout, with one `pos_embed.pe` per transformer block.

    Original-layout files keep a PE copy per attention block (`attention_blocks.N.pos_encoder.pe`);
    diffusers' converter drops those, so the first copy is carried over as the block's `pos_embed.pe`
    (the values are the same sinusoid). A file without PE tensors gets them computed.
    """
    if info.layout == DIFFUSERS:
        weights = dict(state)
    else:
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

        weights = convert_animatediff_checkpoint_to_diffusers(state)
        for key, value in state.items():
            if key.endswith(".attention_blocks.0.pos_encoder.pe"):
                block = key.replace(".temporal_transformer.", ".").replace(".attention_blocks.0.pos_encoder.pe", "")
                weights[block + ".pos_embed.pe"] = value
    for key in [k for k in weights if k.endswith(".transformer_blocks.0.norm1.weight")]:
        pe_key = key.replace(".norm1.weight", ".pos_embed.pe")
        if pe_key not in weights:
            weights[pe_key] = sinusoidal_positions(info.max_frames, weights[key].shape[0])
    return weights


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """AnimateDiff's PositionalEncoding: pe[0, p, 2i] = sin(p * w_i), pe[0, p, 2i+1] = cos(p * w_i)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * freq)
    pe[0, :, 1::2] = torch.cos(position * freq)
    return pe


def adapter_config(info: MotionModuleInfo) -> dict:
    """diffusers MotionAdapter config for this file (frame limit from its own PE length)."""
    return dict(
        block_out_channels=info.channels,
        motion_layers_per_block=info.layers_per_block,
        motion_num_attention_heads=MOTION_HEADS,
        motion_norm_num_groups=MOTION_NORM_GROUPS,
        motion_max_seq_length=info.max_frames,
        use_motion_mid_block=info.version == "v2",
    )


def motion_weights(state: dict[str, torch.Tensor], info: MotionModuleInfo) -> dict[str, torch.Tensor]:
    """This file's tensors under MotionAdapter names, checked against the architecture (storage dtype kept)."""
    from diffusers import MotionAdapter

    weights = to_diffusers_layout(state, info)
    with torch.device("meta"):
        expected = set(MotionAdapter(**adapter_config(info)).state_dict())
    if expected != set(weights):
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise UnsupportedCheckpointError(
            f"Motion module tensors do not match an AnimateDiff {info.version} module: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})."
        )
    return weights


def build_motion_adapter(state: dict[str, torch.Tensor], info: MotionModuleInfo, dtype: torch.dtype):
    """A standalone diffusers MotionAdapter with this file's weights (for diffusers pipelines and tests)."""
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter(**adapter_config(info))
    adopt_tensors(adapter, motion_weights(state, info), device=torch.device("cpu"), dtype=dtype, what="motion module")
    return adapter.eval()


def load_motion_module(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[object, MotionModuleInfo]:
    path = Path(path)
    state = load_state_dict(path)
    info = inspect_motion_module(state, path.name)
    return build_motion_adapter(state, info, dtype), info


def motion_attention_key_projections(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The to_k layers of every temporal attention (where AnimateDiff's motion scale applies)."""
    return [m.to_k for name, m in unet.named_modules() if ".motion_modules." in name and hasattr(m, "to_k")]


@contextmanager
def motion_scale(unet: torch.nn.Module, scale: float) -> Iterator[None]:
    """Scale the keys of temporal attention for the duration of a call, as AnimateDiff-Evolved's
    scale_multival does (k *= scale). The to_k projections have no bias, so scaling their output is
    exactly scaling k; forward hooks keep the weights untouched and are removed afterwards."""
    if scale == 1.0:
        yield
        return
    hooks = [layer.register_forward_hook(lambda _m, _i, output: output * scale)
             for layer in motion_attention_key_projections(unet)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
