"""Which base model family a checkpoint's tensors belong to, from sentinel key prefixes.

Same idea as diffusers' `infer_diffusers_model_type` (loaders/single_file_utils.py) and ComfyUI's
`model_detection.py`: a few keys that only one family's files have. Used to refuse a file for the
wrong path with a message naming both families, before any big load.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Iterable

SD_UNET_PREFIX = "model.diffusion_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_SECOND_ENCODER = "conditioner.embedders.1."
SD2_OPENCLIP = "cond_stage_model.model."
WAN_SENTINELS = ("blocks.0.cross_attn.k.weight", "head.modulation")  # Wan 2.x transformer (any prefix)

FAMILY_NAMES = MappingProxyType({
    "sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", "wan": "Wan 2.x", "unknown": "an unknown model",
})


def detect_base_family(keys: Iterable[str]) -> str:
    """'sd15', 'sdxl', 'sd2', 'wan' or 'unknown'."""
    keys = set(keys)
    if any(k.startswith(SDXL_SECOND_ENCODER) for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_OPENCLIP) for k in keys):
        return "sd2"
    if any(k.startswith(SD_CLIP_PREFIX) for k in keys) and any(k.startswith(SD_UNET_PREFIX) for k in keys):
        return "sd15"
    if any(k.endswith(sentinel) for k in keys for sentinel in WAN_SENTINELS):
        return "wan"
    return "unknown"
