"""ComfyUI registrations. Node ids are prefixed `Flipbook` and never renamed.

Inside a ComfyUI that has the V3 node API (`comfy_api.latest`), the pack registers V3 nodes through
`comfy_entrypoint`; otherwise (older ComfyUI, headless runs, tests) the same specs become V1 classes.
"""
from __future__ import annotations

from . import _comfy
from .lightning_batch import SPECS as BATCH_SPECS
from .lightning_nodes import SPECS as LIGHTNING_SPECS
from .v1 import v1_class
from .video_nodes import SPECS as VIDEO_SPECS
from .wan_nodes import SPECS as WAN_SPECS

_comfy.register_model_folders()
SPECS = (*LIGHTNING_SPECS, *BATCH_SPECS, *WAN_SPECS, *VIDEO_SPECS)
V1_SPECS = tuple(spec for spec in SPECS if not spec.needs_video_api)
NODE_CLASS_MAPPINGS = {spec.node_id: v1_class(spec) for spec in V1_SPECS}
NODE_DISPLAY_NAME_MAPPINGS = {spec.node_id: spec.display_name for spec in V1_SPECS}


def v3_entrypoint():
    """The V3 `comfy_entrypoint`, or None when ComfyUI's V3 API is not importable."""
    api = _comfy.v3_api()
    if api is None:
        return None
    from .v3 import v3_entrypoint as build

    specs = SPECS if _comfy.has_video_api() else V1_SPECS
    return build(specs, api)
