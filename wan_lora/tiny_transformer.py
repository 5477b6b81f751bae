"""Tiny random Wan 2.1 T2V transformers in the real files' key layouts and storages (tests, benchmarks,
`flipbook demo wan`).

The key names are listed from the original Wan modules (Wan-Video/Wan2.1 wan/modules/model.py, as in
ComfyUI's repackaged files), not derived from diffusers; the values come from a diffusers model of the
same shape through diffusers' converter, so a test can check that converter maps exactly these names.
head_dim stays 128 (heads = dim // 128 is how loaders read the width).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.tiny_weights import randomize, write_safetensors

ATTENTION_LINEARS = ("q", "k", "v", "o")
STORAGES = ("fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "fp8_scaled_mixed")
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TinyWanSizes:
    heads: int = 1  # x 128 = dim
    layers: int = 2
    ffn: int = 256
    text_dim: int = 32  # the tiny umt5's width
    freq_dim: int = 256

    def config(self) -> dict:
        return {"num_attention_heads": self.heads, "attention_head_dim": 128, "num_layers": self.layers,
                "ffn_dim": self.ffn, "text_dim": self.text_dim, "freq_dim": self.freq_dim, "in_channels": 16,
                "out_channels": 16, "patch_size": (1, 2, 2), "cross_attn_norm": True,
                "qk_norm": "rms_norm_across_heads", "eps": 1e-6}


def original_key_names(layers: int) -> list[str]:
    """Every tensor name of a Wan 2.1 T2V file (reference: wan-lora-nag.md section 2.1)."""
    names = ["patch_embedding.weight", "patch_embedding.bias"]
    for layer in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
                  "head.head"):
        names += [f"{layer}.weight", f"{layer}.bias"]
    names.append("head.modulation")
    for i in range(layers):
        block = f"blocks.{i}"
        for attention in ("self_attn", "cross_attn"):
            for linear in ATTENTION_LINEARS:
                names += [f"{block}.{attention}.{linear}.weight", f"{block}.{attention}.{linear}.bias"]
            names += [f"{block}.{attention}.norm_q.weight", f"{block}.{attention}.norm_k.weight"]
        names += [f"{block}.norm3.weight", f"{block}.norm3.bias", f"{block}.ffn.0.weight", f"{block}.ffn.0.bias",
                  f"{block}.ffn.2.weight", f"{block}.ffn.2.bias", f"{block}.modulation"]
    return names


def wan_meta_state(sizes: TinyWanSizes = TinyWanSizes()) -> dict[str, torch.Tensor]:
    """Shapes only: meta tensors under the original Wan names (any size, 14B included, at no cost)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        theirs = WanTransformer3DModel(**sizes.config()).state_dict()
    names = original_key_names(sizes.layers)
    return {original: theirs[new] for original, new in zip(names, convert_wan_transformer_to_diffusers(
        dict.fromkeys(names)))}


def tiny_wan_state(sizes: TinyWanSizes = TinyWanSizes(), seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors under the original Wan names."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(**sizes.config())
    randomize(model, seed)
    theirs = model.state_dict()
    names = original_key_names(sizes.layers)
    renamed = convert_wan_transformer_to_diffusers(dict.fromkeys(names))
    return {original: theirs[new].detach().clone() for original, new in zip(names, renamed)}


def _is_block_linear(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2


def quantize(state: dict[str, torch.Tensor], storage: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a file in `storage`; fp8 files quantize the block Linears (as
    ComfyUI's and Kijai's fp8 files do; the other tensors stay bf16)."""
    if storage in _FLOAT:
        return {k: v.to(_FLOAT[storage]) for k, v in state.items()}, {}
    out: dict[str, torch.Tensor] = {}
    fp8 = torch.float8_e5m2 if storage == "fp8_e5m2" else torch.float8_e4m3fn
    for name, tensor in state.items():
        if not _is_block_linear(name, tensor):
            out[name] = tensor.to(torch.bfloat16)
            continue
        layer = name[: -len(".weight")]
        if storage == "fp8_scaled" or storage == "fp8_scaled_mixed":
            scale = tensor.abs().max().float() / 448.0  # e4m3fn's largest value: the scale ComfyUI's files use
            out[name] = (tensor / scale).to(fp8)
            if storage == "fp8_scaled":
                out[layer + ".scale_weight"] = scale.reshape(1)
            else:
                out[layer + ".weight_scale"] = scale.reshape(())
                out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                           dtype=torch.uint8)
        else:
            out[name] = tensor.to(fp8)
    if storage == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker: its dtype names the format
    return out, {}


def dequantized_state(quantized: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the fp8 file's weights really are, in float32 (the reference the loader is compared with)."""
    out = {}
    for name, tensor in quantized.items():
        if name.endswith((".scale_weight", ".weight_scale", ".comfy_quant")) or name == "scaled_fp8":
            continue
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        scale = quantized.get(f"{layer}.scale_weight", quantized.get(f"{layer}.weight_scale"))
        out[name] = tensor.float() * (scale.float() if scale is not None else 1.0)
    return out


def write_tiny_wan(path: Path, *, storage: str = "bf16", prefix: str = "", sizes: TinyWanSizes = TinyWanSizes(),
                   seed: int = 0) -> Path:
    """A tiny Wan 2.1 T2V transformer file in `storage`, keys under `prefix` (e.g. 'model.diffusion_model.')."""
    from safetensors.torch import save_file

    tensors, metadata = quantize(tiny_wan_state(sizes, seed), storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage in _FLOAT:
        return write_safetensors({prefix + k: v for k, v in tensors.items()}, path, dtype=_FLOAT[storage])
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


def load_on_cpu(path: Path, dtype: torch.dtype = torch.float32):
    """The transformer Component of a (tiny) file, read through the real loader onto the CPU."""
    from .transformer import inspect_wan_transformer, transformer_component

    cpu = torch.device("cpu")
    component = transformer_component(inspect_wan_transformer(path), load_device=cpu, offload_device=cpu, dtype=dtype)
    component.materialize()
    return component


def denoised_once(module: torch.nn.Module, seed: int = 0, text_dim: int = 32) -> torch.Tensor:
    """D(x, sigma 0.8) on fixed noise and a 7-token prompt: the quantity storage, format and LoRA comparisons use."""
    from ..core import denoisers
    from .conditioning import WanContext, wan_forward

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=generator)
    context = torch.zeros(1, 512, text_dim)
    context[:, :7] = torch.randn(1, 7, text_dim, generator=generator)
    denoiser = denoisers.Denoiser(forward=wan_forward(module), parameterization=denoisers.flow_prediction(),
                                  positive=WanContext.of(context, nag=False))
    return denoiser(x, torch.tensor(0.8))
