"""Wan LoRA files in every format users have -> one list of patches on the original Wan tensor names.

One small reader per format maps a key to (module path in original Wan names, part), in the manner of
ComfyUI's comfy/lora_convert.py; `read_wan_lora` groups the parts into patches and accounts for every
key: applied (by kind), expected-unmatched (the image-conditioning keys of an I2V LoRA on a T2V model),
or unmatched, which is an error for a known format. Formats (wan-lora-nag.md section 3):
- musubi-tuner / kohya: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (names matched against the underscored name of every real module, never split on `_`); Wan-Fun
  writes `lora_unet__blocks_...` (ComfyUI lora_convert.convert_lora_wan_fun);
- ComfyUI / Kijai / diffusion-pipe / lightx2v: `diffusion_model.<module>.lora_A/lora_B.weight` or
  `.lora_down/.lora_up.weight`, optional `.alpha` (none = scale 1), `.diff` (weight), `.diff_b` (bias),
  `.diff_m` (`blocks.N.modulation`, `head.modulation`; lightx2v tools/extract/lora_extractor.py),
  `.set_weight` (comfy/lora.py);
- diffusers / peft: `transformer.blocks.0.attn1.to_q.lora_A.weight` (+ `lora_B.bias`), bare `blocks.`
  in diffusers or original names, peft's `.default.` (DiffSynth) and `base_model.model.` prefixes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional

import torch

# key ending -> part; longest first so `.lora_B.default.weight` is not read as something shorter
PARTS = MappingProxyType({
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".lora_B.default.bias": "up_bias",
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias", ".alpha": "alpha", ".diff_b": "diff_b", ".diff_m": "diff_m", ".diff": "diff",
    ".set_weight": "set", ".dora_scale": "dora",
    ".hada_w1_a": "loha", ".hada_w1_b": "loha", ".hada_w2_a": "loha", ".hada_w2_b": "loha", ".lokr_w1": "lokr",
    ".lokr_w2": "lokr",
})
# the tensor each direct-diff part changes, relative to its module
DIFF_TARGETS = MappingProxyType({"diff": ".weight", "diff_b": ".bias", "diff_m": ".modulation", "set": ".weight"})
IMAGE_KEYS = re.compile(r"(^img_emb\.|\.k_img\b|\.v_img\b|\.norm_k_img\b|add_k_proj|add_v_proj|norm_added_k|"
                        r"image_embedder)")


@dataclass(frozen=True)
class LoraFormat:
    id: str
    label: str
    prefix: str  # stripped before the module path
    naming: str  # "original", "underscored" or "diffusers" module names
    source: str


FORMATS = MappingProxyType({f.id: f for f in (
    LoraFormat("musubi", "musubi-tuner / kohya (lora_unet_)", "lora_unet_", "underscored",
               "kohya-ss/musubi-tuner networks/lora_wan.py"),
    LoraFormat("musubi_fun", "Wan-Fun (lora_unet__)", "lora_unet__", "underscored",
               "ComfyUI comfy/lora_convert.py convert_lora_wan_fun"),
    LoraFormat("comfy", "ComfyUI / Kijai / lightx2v (diffusion_model.)", "diffusion_model.", "original",
               "ComfyUI comfy/lora.py; ModelTC/LightX2V tools/extract/lora_extractor.py"),
    LoraFormat("diffusers", "diffusers / peft (transformer.)", "transformer.", "diffusers",
               "huggingface/diffusers loaders/lora_pipeline.py WanLoraLoaderMixin"),
    LoraFormat("peft", "peft (base_model.model.)", "base_model.model.", "auto",
               "huggingface/peft save_pretrained"),
    LoraFormat("diffsynth", "DiffSynth (pipe.dit.)", "pipe.dit.", "original", "modelscope/DiffSynth-Studio"),
    LoraFormat("bare", "bare module names (blocks.)", "", "auto", "DiffSynth / finetrainers exports"),
)})
SD_LORA = re.compile(r"^(lora_te\d?_|lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block))")


@dataclass(frozen=True)
class KeyPart:
    module: str  # module path in original Wan names ("blocks.0.self_attn.q"), or the raw path when unknown
    part: str  # "up", "down", "alpha", "diff", ...
    known: bool  # the module path was understood
    tensor: bool = False  # the path names a tensor itself (its diff targets it directly)


def detect_format(keys: list[str]) -> Optional[LoraFormat]:
    """The format whose prefix most keys carry (longest prefix first), or None (an SD LoRA or unknown file)."""
    if any(SD_LORA.match(k) for k in keys):
        return None
    for fmt in sorted(FORMATS.values(), key=lambda f: -len(f.prefix)):
        if fmt.prefix and sum(k.startswith(fmt.prefix) for k in keys) * 2 > len(keys):
            return fmt
    return FORMATS["bare"] if any(k.startswith("blocks.") for k in keys) else None


def _split_part(key: str) -> tuple[str, Optional[str]]:
    for ending in sorted(PARTS, key=len, reverse=True):
        if key.endswith(ending):
            return key[: -len(ending)], PARTS[ending]
    if key.endswith("diff_m") and key.rpartition(".")[2] == "diff_m":  # `blocks.0.diff_m` has no module part
        return key[: -len(".diff_m")], "diff_m"
    return key, None


def module_translators(original_tensors: list[str], diffusers_of: Callable[[list[str]], Mapping[str, str]]):
    """Lookups from underscored and diffusers module names to original ones, built from the model's own tensors."""
    modules = sorted({name.rpartition(".")[0] for name in original_tensors if "." in name})
    underscored = {m.replace(".", "_"): m for m in modules}
    renamed = diffusers_of(original_tensors)
    diffusers = {new.rpartition(".")[0]: old.rpartition(".")[0] for old, new in renamed.items()}
    return underscored, diffusers, set(modules), set(original_tensors)


def parse_key(key: str, fmt: LoraFormat, translators) -> KeyPart:
    underscored, diffusers, modules, tensors = translators
    path, part = _split_part(key[len(fmt.prefix):] if key.startswith(fmt.prefix) else key)
    path = path.replace(".default", "")
    if part is None or not key.startswith(fmt.prefix):
        return KeyPart(module=path, part=part or "?", known=False)
    naming = fmt.naming
    if naming == "auto":
        naming = "diffusers" if path in diffusers and path not in modules else "original"
    if naming == "underscored":
        module = underscored.get(path.lstrip("_"))
    elif naming == "diffusers":
        module = diffusers.get(path)
    else:
        # a module, or (ComfyUI's key map for parameters that are not `.weight`) a tensor: blocks.0.modulation.diff
        module = path if (path in modules or part == "diff_m" or (path in tensors and part in ("diff", "set"))) \
            else None
    return KeyPart(module=module or path, part=part, known=module is not None, tensor=path in tensors)


UNDERSCORED_IMAGE_KEYS = re.compile(r"(^_*img_emb_|_(k_img|v_img|norm_k_img)(\.|$))")


def is_image_key(name: str) -> bool:
    """The image-conditioning modules of Wan I2V (absent from T2V: expected to stay unmatched), in original,
    diffusers or underscored (musubi: `blocks_0_cross_attn_k_img`) names."""
    plain = name.removeprefix("lora_unet_")
    return bool(IMAGE_KEYS.search(name) or UNDERSCORED_IMAGE_KEYS.search(plain))


def diff_target(module: str, part: str) -> str:
    return module + DIFF_TARGETS[part]


def lora_scale(alpha: Optional[torch.Tensor], rank: int) -> float:
    """alpha / rank, or 1 without an alpha (ComfyUI LoRAAdapter; lightx2v writes none)."""
    return 1.0 if alpha is None else float(alpha.float().reshape(-1)[0]) / rank
