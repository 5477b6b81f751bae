"""Saving frames as a video whose embedded workflow restores when dropped into ComfyUI."""
from __future__ import annotations

from ..core.metadata import build_metadata
from . import _comfy
from .specs import NodeResult, NodeSpec, Param

FORMATS = ("mp4",)


def _save(images, filename_prefix, fps, format, crf, prompt=None, extra_pnginfo=None) -> NodeResult:
    from ..core.video import VideoSettings, save_mp4

    metadata = build_metadata(prompt, extra_pnginfo, disabled=_comfy.metadata_disabled())
    saved = save_mp4(
        images, _comfy.output_dir(), filename_prefix, VideoSettings(fps=fps, crf=crf), metadata,
        progress=_comfy.progress_reporter(int(images.shape[0])),
    )
    entry = {"filename": saved.path.name, "subfolder": saved.subfolder, "type": "output", "format": "video/mp4"}
    return NodeResult((), {"images": [entry], "animated": (True,)})


SAVE_VIDEO = NodeSpec(
    node_id="FlipbookSaveVideo",
    display_name="Flipbook Save Video",
    category="Flipbook/Video",
    description="Saves IMAGE frames as H.264 MP4 with the workflow and prompt embedded the way ComfyUI's frontend "
                "reads them: drop the file onto ComfyUI to get this workflow back.",
    inputs=(
        Param("images", "IMAGE", "Frames from any node (ComfyUI IMAGE batch)."),
        Param("filename_prefix", "STRING", "Sub-folder/name inside ComfyUI's output folder; a counter keeps every "
              "save unique.", {"default": "flipbook/video"}),
        Param("fps", "FLOAT", "Frames per second (AnimateDiff clips: 8).",
              {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.1}),
        Param("format", "COMBO", "Container/codec: H.264 MP4.", {"default": "mp4"}, choices=lambda: list(FORMATS)),
        Param("crf", "INT", "H.264 quality: lower is better and bigger (17-23 typical).",
              {"default": 19, "min": 0, "max": 51}),
    ),
    outputs=(),
    run=_save,
    hidden=("prompt", "extra_pnginfo"),
    output_node=True,
)

SPECS = (SAVE_VIDEO,)
