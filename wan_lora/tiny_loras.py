"""Tiny random Wan LoRAs in every real key layout, for the tiny transformer (tests, `flipbook demo wan`).

Each writer returns the file and the patches it wrote in plain terms (original tensor name -> what to add),
so a test can merge a checkpoint by hand from the formula without the loader's code. Key layouts:
wan-lora-nag.md section 3 (musubi-tuner, Wan-Fun, ComfyUI/Kijai/diffusion-pipe, lightx2v, diffusers/peft,
DiffSynth).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .tiny_transformer import ATTENTION_LINEARS, TinyWanSizes, tiny_wan_state, wan_meta_state

FORMATS = ("musubi", "musubi_fun", "comfy", "lightx2v", "diffusers", "diffsynth", "i2v")
DIFFUSERS_LINEARS = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v",
                     "o": "to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def block_linears(layers: int) -> list[str]:
    """The Linear modules style LoRAs train (musubi's default targets: every block's attention and FFN)."""
    names = []
    for i in range(layers):
        names += [f"blocks.{i}.{a}.{n}" for a in ("self_attn", "cross_attn") for n in ATTENTION_LINEARS]
        names += [f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.2"]
    return names


def _diffusers_module(module: str) -> str:
    parts = module.split(".")
    block, rest = ".".join(parts[:2]), ".".join(parts[2:])
    if rest.startswith("ffn"):
        return f"{block}.{DIFFUSERS_LINEARS[rest]}"
    attention, linear = rest.split(".")
    return f"{block}.{DIFFUSERS_LINEARS[attention]}.{DIFFUSERS_LINEARS[linear]}"


def _pair(shape: tuple[int, int], rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = shape
    return (torch.randn(out_features, rank, generator=generator) * 0.05,
            torch.randn(rank, in_features, generator=generator) * 0.05)


def write_tiny_lora(path: Path, *, fmt: str, sizes: TinyWanSizes = TinyWanSizes(), rank: int = 4, seed: int = 1,
                    alpha: Optional[float] = None, trigger: Optional[str] = None):
    """A LoRA file in `fmt`; returns (path, plain) with plain = {tensor: ('lora', up, down, alpha/rank) | ('diff', d)}."""
    from safetensors.torch import save_file

    base = wan_meta_state(sizes)  # shapes only
    generator = torch.Generator().manual_seed(seed)
    tensors, plain = {}, {}
    alpha = float(rank) / 2 if alpha is None and fmt in ("musubi", "musubi_fun", "comfy") else alpha
    modules = block_linears(sizes.layers)
    if fmt == "lightx2v":
        modules += ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"]
    for module in modules:
        up, down = _pair(tuple(base[module + ".weight"].shape), rank, generator)
        key = _pair_key(module, fmt)
        tensors[key + _suffix(fmt, "down")], tensors[key + _suffix(fmt, "up")] = down, up
        if alpha is not None and fmt != "lightx2v":
            tensors[key + ".alpha"] = torch.tensor(alpha)
        plain[module + ".weight"] = ("lora", up, down, (alpha / rank) if alpha is not None else 1.0)
    if fmt == "lightx2v":
        _lightx2v_diffs(base, tensors, plain, generator)
    if fmt == "i2v":  # an I2V LoRA: the image-conditioning keys T2V does not have
        for i in range(sizes.layers):
            for name in ("k_img", "v_img"):
                tensors[f"diffusion_model.blocks.{i}.cross_attn.{name}.lora_A.weight"] = torch.zeros(rank, 128)
                tensors[f"diffusion_model.blocks.{i}.cross_attn.{name}.lora_B.weight"] = torch.zeros(128, rank)
            tensors[f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff"] = torch.zeros(128)
    metadata = {"ss_network_dim": str(rank), "modelspec.architecture": "wan2.1-t2v-14b/lora"}
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().to(torch.bfloat16) if v.is_floating_point() and v.ndim else v
               for k, v in tensors.items()}, str(path), metadata=metadata)
    # the file holds bf16: the plain patches are what it really contains
    plain = {k: (v[0], v[1].to(torch.bfloat16).float(), v[2].to(torch.bfloat16).float(), v[3]) if v[0] == "lora"
             else (v[0], v[1].to(torch.bfloat16).float()) for k, v in plain.items()}
    return path, plain


def _pair_key(module: str, fmt: str) -> str:
    if fmt in ("musubi", "musubi_fun"):
        return ("lora_unet__" if fmt == "musubi_fun" else "lora_unet_") + module.replace(".", "_")
    if fmt == "diffusers":
        return "transformer." + _diffusers_module(module)
    if fmt == "diffsynth":
        return module
    return "diffusion_model." + module


def _suffix(fmt: str, part: str) -> str:
    if fmt in ("musubi", "musubi_fun", "lightx2v"):
        return {"down": ".lora_down.weight", "up": ".lora_up.weight"}[part]
    if fmt == "diffsynth":
        return {"down": ".lora_A.default.weight", "up": ".lora_B.default.weight"}[part]
    return {"down": ".lora_A.weight", "up": ".lora_B.weight"}[part]


def _lightx2v_diffs(base, tensors, plain, generator) -> None:
    """lightx2v's extractor: 1-D or small parameters as direct diffs (.diff / .diff_b / .diff_m)."""
    for name, value in base.items():
        small = value.ndim == 1 or value.numel() < 1_000_000
        if name.endswith(".bias"):
            key = "diffusion_model." + name[: -len(".bias")] + ".diff_b"
        elif name.endswith("modulation"):
            key = "diffusion_model." + name[: -len(".modulation")] + ".diff_m"
        elif name.endswith(".weight") and small and (value.ndim == 1 or name in ("head.head.weight",
                                                                               "patch_embedding.weight")):
            key = "diffusion_model." + name[: -len(".weight")] + ".diff"
        else:
            continue
        delta = torch.randn(value.shape, generator=generator) * 0.01
        tensors[key] = delta
        plain[name] = ("diff", delta)


def merged_by_hand(plain_loras: list[tuple[dict, float]], sizes: TinyWanSizes = TinyWanSizes()) -> dict:
    """The base tensors with each LoRA merged from the formula W += s * (alpha/r) * up @ down, W += s * diff."""
    state = {k: v.clone() for k, v in tiny_wan_state(sizes).items()}
    for plain, strength in plain_loras:
        for name, patch in plain.items():
            if patch[0] == "lora":
                _, up, down, factor = patch
                state[name] = state[name] + strength * factor * (up @ down)
            else:
                state[name] = state[name] + strength * patch[1].reshape(state[name].shape)
    return state

