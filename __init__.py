"""Flipbook: fast AI animation nodes for ComfyUI (AnimateDiff-Lightning, Wan 2.1 + style LoRAs).

ComfyUI imports this file with importlib (spec_from_file_location), so everything inside the pack
is imported relatively: top-level `nodes`, `utils`, `models` belong to ComfyUI itself.
ComfyUI takes NODE_CLASS_MAPPINGS over comfy_entrypoint when both exist, so only one is exported:
the V3 entrypoint where ComfyUI has the V3 API, else the V1 mappings.
"""
from . import nodes as _nodes

WEB_DIRECTORY = "./web"  # one small extension: shows save notes (e.g. GIF -> sidecar) on the node
comfy_entrypoint = _nodes.v3_entrypoint()
if comfy_entrypoint is None:
    del comfy_entrypoint
    NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
else:
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
