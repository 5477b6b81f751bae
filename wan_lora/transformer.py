"""Wan 2.1 T2V transformer files (ComfyUI's `diffusion_models/`) -> diffusers WanTransformer3DModel.

Files carry the original Wan module names (Wan-Video/Wan2.1 wan/modules/model.py), bare (14B repacks,
Kijai's files) or under `model.diffusion_model.` (the 1.3B repack) or `diffusion_model.`. The
architecture is read from the tensor shapes as ComfyUI does (comfy/model_detection.py: dim from
`head.modulation`, heads = dim // 128, ffn from `blocks.0.ffn.0`, layers counted, T2V vs I2V by
`img_emb.*`); diffusers' own converter renames the keys. Storage: bf16/fp16/fp32 weights are cast to
the compute dtype at load; fp8 Linear weights of the blocks (98% of the 14B model's bytes) stay fp8
and are cast per layer at forward (core/quantized.StoredLinear), so the 14B fp8 file needs ~14 GB,
not 28; fp8_scaled files keep their scales beside those weights. Every other fp8 tensor (embeddings,
norms, modulation, head) is dequantized at load: diffusers reads the time embedder's dtype for its
input, and these tensors are small.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict, read_safetensors_header
from ..core.errors import UnsupportedCheckpointError
from ..core.families import FAMILY_NAMES, detect_base_family
from ..core.model_handle import FP8_DTYPES, Component
from ..core.quantized import dequantized, device_holds_fp8, split_fp8_scales, storage_name, store_linear

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI model_detection.unet_prefix_from_state_dict
HEAD_DIM = 128  # every Wan 2.x model (wan/configs: dim / num_heads)
# (dim, layers) of the released T2V models (wan/configs/wan_t2v_14B.py, wan_t2v_1_3B.py)
SIZES = {(5120, 40): "14B", (1536, 30): "1.3B"}
DOWNLOAD = ("https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/tree/main/split_files/diffusion_models "
            "(wan2.1_t2v_14B_fp8_e4m3fn.safetensors, _fp8_scaled, _bf16 or _fp16)")
_HINT = f"Download the model again: {DOWNLOAD}."


@dataclass(frozen=True)
class WanTransformerLayout:
    """What a transformer file's tensors say about it, read before any weight is loaded."""

    path: Path
    fingerprint: tuple[int, int]
    prefix: str  # stripped from every key
    config: dict[str, Any]  # diffusers WanTransformer3DModel arguments
    size: str  # "14B", "1.3B" or "custom"
    storage: str  # "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2" or "fp8_scaled"
    fp8_linears: frozenset[str]  # original names of block Linears kept in fp8 (cast per layer at forward)
    row_scaled: frozenset[str]  # those of them with one scale per output row
    scaled: bool
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # original tensor name -> shape (LoRAs)

    @property
    def text_dim(self) -> int:
        return self.config["text_dim"]


def strip_prefix(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    for prefix in PREFIXES:
        if sum(k.startswith(prefix) for k in state) > 5:
            return prefix, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return "", dict(state)


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    return read_safetensors_header(path).get("__metadata__", {}) or {}


def inspect_wan_transformer(path: str | Path) -> WanTransformerLayout:
    """Check the file is a Wan 2.1 T2V transformer and read its architecture and storage."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    prefix, state = strip_prefix(load_state_dict(path))  # memory-mapped: only shapes and dtypes are read
    _require_t2v(path.name, state)
    weights = split_fp8_scales(state, metadata=_metadata(path), file_name=path.name, hint=_HINT)
    config = _config_from_shapes(path.name, weights.tensors)
    # kept fp8 and cast (and scaled: per tensor or per row) at each forward: the block Linears
    fp8_linears = frozenset(k[: -len(".weight")] for k, v in weights.tensors.items()
                            if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2
                            and v.dtype in FP8_DTYPES)
    row_scaled = frozenset(layer for layer in fp8_linears if weights.scales.get(layer, torch.ones(())).ndim == 2)
    return WanTransformerLayout(
        path=path, fingerprint=fingerprint, prefix=prefix, config=config,
        size=SIZES.get((config["num_attention_heads"] * HEAD_DIM, config["num_layers"]), "custom"),
        storage=storage_name(weights.tensors, weights.scaled), fp8_linears=fp8_linears, row_scaled=row_scaled,
        scaled=weights.scaled,
        shapes=MappingProxyType({k: tuple(v.shape) for k, v in weights.tensors.items()}),
    )


def _require_t2v(name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse every Wan file that is not a 2.1 text-to-video transformer, naming what it is."""
    what = None
    if "head.modulation" not in state or "patch_embedding.weight" not in state:
        family = detect_base_family(state)
        what = (f"a {FAMILY_NAMES[family]} model" if family not in ("unknown", "wan")
                else "not a Wan transformer (no 'head.modulation' / 'patch_embedding' tensors)")
    elif any(k.startswith(("vace_blocks.", "vace_patch_embedding")) for k in state):
        what = "a Wan VACE (video editing/control) model"
    elif "img_emb.emb_pos" in state:
        what = "a Wan 2.1 FLF2V (first-last-frame-to-video) model"
    elif any(k.startswith("img_emb.") for k in state):
        what = "a Wan 2.1 I2V (image-to-video) model"
    else:
        channels, dim = state["patch_embedding.weight"].shape[1], state["head.modulation"].shape[-1]
        if channels == 48 and dim == 3072:
            what = "Wan 2.2 TI2V-5B (48-channel latents, its own VAE)"
        elif channels == 36:
            what = "a Wan 2.2 I2V A14B expert (36 input channels)"
        elif channels != 16:
            what = f"a Wan control/inpaint model ({channels} input channels; T2V has 16)"
        elif re.search(r"wan[\W_]?2[\W_]?2", name.lower()):
            # the Wan 2.2 T2V A14B experts have exactly the 2.1 14B shapes: only the name tells them apart
            what = "a Wan 2.2 A14B expert (by its name: Wan 2.2 samples with two experts, high and low noise)"
    if what is not None:
        raise UnsupportedCheckpointError(
            f"{name} is {what}, but this loader needs a Wan 2.1 text-to-video transformer. Put one in "
            f"models/diffusion_models: {DOWNLOAD}."
        )


def _config_from_shapes(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    try:
        dim = state["head.modulation"].shape[-1]
        patch = tuple(state["patch_embedding.weight"].shape[2:])
        layers = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        config = {
            "patch_size": patch,
            "num_attention_heads": dim // HEAD_DIM,
            "attention_head_dim": HEAD_DIM,
            "in_channels": state["patch_embedding.weight"].shape[1],
            "out_channels": state["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
            "text_dim": state["text_embedding.0.weight"].shape[1],
            "freq_dim": state["time_embedding.0.weight"].shape[1],
            "ffn_dim": state["blocks.0.ffn.0.weight"].shape[0],
            "num_layers": layers,
            "cross_attn_norm": "blocks.0.norm3.weight" in state,
            "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in state else None,
            "eps": 1e-6,
        }
    except KeyError as exc:
        shard = re.search(r"-\d{5}-of-\d{5}", name)
        raise UnsupportedCheckpointError(
            f"{name} lacks {exc}, which every Wan transformer file has"
            + (" (it is one shard of a multi-file model: use a single-file release)" if shard else
               " (the download may be incomplete)") + f". Use a single-file Wan 2.1 T2V model: {DOWNLOAD}."
        ) from None
    if dim % HEAD_DIM or layers == 0:
        raise UnsupportedCheckpointError(
            f"{name}: width {dim} with {layers} blocks is not a Wan layout (widths are multiples of {HEAD_DIM}); "
            f"use a Wan 2.1 T2V model: {DOWNLOAD}."
        )
    return config


def diffusers_names(original: list[str]) -> dict[str, str]:
    """Original Wan tensor name -> diffusers name, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return dict(zip(original, convert_wan_transformer_to_diffusers(dict.fromkeys(original))))


def transformer_weights(layout: WanTransformerLayout, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The file's tensors under diffusers names: block Linears of an fp8 file stay fp8 (with their
    `weight_scale` in a scaled file), every other fp8 tensor is dequantized to `dtype` one at a time (no
    float32 copy of the whole model)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = layout.path
    _, state = strip_prefix(load_state_dict(path, expect=layout.fingerprint))
    weights = split_fp8_scales(state, metadata=_metadata(path), file_name=path.name, hint=_HINT)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights.tensors.items():
        layer = name.rpartition(".")[0]
        if layer in layout.fp8_linears and name.endswith(".weight"):
            tensors[name] = tensor
            if layout.scaled:
                tensors[layer + ".weight_scale"] = weights.scales[layer]
        elif tensor.dtype in FP8_DTYPES or (name.endswith(".weight") and layer in weights.scales):
            tensors[name] = dequantized(tensor, weights.scales.get(layer) if name.endswith(".weight") else None).to(dtype)
        else:
            tensors[name] = tensor
    return convert_wan_transformer_to_diffusers(tensors)


def transformer_component(layout: WanTransformerLayout, *, load_device: torch.device, offload_device: torch.device,
                          dtype: torch.dtype) -> Component:
    """The transformer on the meta device, fp8 block Linears as StoredLinear; weights adopted from the file."""
    from diffusers import WanTransformer3DModel

    if layout.fp8_linears and not device_holds_fp8(torch.device(load_device)):
        # e.g. Apple's MPS: every fp8 weight is dequantized to the compute dtype when read
        layout = replace(layout, fp8_linears=frozenset(), row_scaled=frozenset())
    with torch.device("meta"):
        module = WanTransformer3DModel(**layout.config).eval()
    renamed = diffusers_names([layer + ".weight" for layer in sorted(layout.fp8_linears)])
    for original, diffusers_name in renamed.items():
        store_linear(module.get_submodule(diffusers_name.rpartition(".")[0]), scaled=layout.scaled,
                     per_row=original[: -len(".weight")] in layout.row_scaled)
    return Component(name="transformer", module=module, weights=lambda: transformer_weights(layout, dtype),
                     load_device=load_device, offload_device=offload_device, dtype=dtype, keep_dtypes=FP8_DTYPES,
                     finish=_after_read)


def _after_read(module: torch.nn.Module) -> None:
    """The RoPE tables are non-persistent buffers no file holds: build them where the weights are (float32).
    LoRA factors of an earlier read are dropped: the weights are the file's again (lora_apply)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from .lora_apply import clear_patches

    clear_patches(module)
    device = module.patch_embedding.weight.device
    with torch.device(device):
        module.rope = WanRotaryPosEmbed(module.config.attention_head_dim, module.config.patch_size,
                                        module.rope.max_seq_len)
