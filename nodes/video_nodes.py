"""Saving frames as a video whose embedded workflow restores when dropped into ComfyUI."""
from __future__ import annotations

from ..core.metadata import build_metadata
from . import _comfy

CATEGORY = "Flipbook/Video"
FORMATS = ("mp4",)


class FlipbookSaveVideo:
    DESCRIPTION = (
        "Saves IMAGE frames as H.264 MP4 with the workflow and prompt embedded the way ComfyUI's frontend "
        "reads them: drop the file onto ComfyUI to get this workflow back."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames from any node (ComfyUI IMAGE batch)."}),
                "filename_prefix": ("STRING", {"default": "flipbook/video",
                                               "tooltip": "Sub-folder/name inside ComfyUI's output folder; a "
                                                          "counter keeps every save unique."}),
                "fps": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 240.0, "step": 0.1,
                                  "tooltip": "Frames per second (AnimateDiff clips: 8)."}),
                "format": (list(FORMATS), {"default": "mp4", "tooltip": "Container/codec: H.264 MP4."}),
                "crf": ("INT", {"default": 19, "min": 0, "max": 51,
                                "tooltip": "H.264 quality: lower is better and bigger (17-23 typical)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, filename_prefix, fps, format, crf, prompt=None, extra_pnginfo=None):
        from ..core.video import VideoSettings, save_mp4

        metadata = build_metadata(prompt, extra_pnginfo, disabled=_comfy.metadata_disabled())
        saved = save_mp4(
            images, _comfy.output_dir(), filename_prefix, VideoSettings(fps=fps, crf=crf), metadata,
            progress=_comfy.progress_reporter(int(images.shape[0])),
        )
        entry = {"filename": saved.path.name, "subfolder": saved.subfolder, "type": "output", "format": "video/mp4"}
        return {"ui": {"images": [entry], "animated": (True,)}, "result": ()}
