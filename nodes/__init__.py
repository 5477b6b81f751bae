"""ComfyUI node registrations. Node ids are prefixed `Flipbook` and never renamed."""
from __future__ import annotations

from . import _comfy
from .lightning_nodes import FlipbookLightningLoader, FlipbookLightningSampler
from .video_nodes import FlipbookSaveVideo

_comfy.register_model_folders()

NODE_CLASS_MAPPINGS = {
    "FlipbookLightningLoader": FlipbookLightningLoader,
    "FlipbookLightningSampler": FlipbookLightningSampler,
    "FlipbookSaveVideo": FlipbookSaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FlipbookLightningLoader": "Flipbook Lightning Loader",
    "FlipbookLightningSampler": "Flipbook Lightning Sampler",
    "FlipbookSaveVideo": "Flipbook Save Video",
}
