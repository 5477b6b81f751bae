"""Flipbook: fast AI animation nodes for ComfyUI (AnimateDiff-Lightning, Wan 2.1 + style LoRAs).

ComfyUI imports this file with importlib (spec_from_file_location), so everything inside the pack
is imported relatively: top-level `nodes`, `utils`, `models` belong to ComfyUI itself.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
