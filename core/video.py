"""Encoding frames to video files that carry the ComfyUI workflow.

MP4: H.264 through PyAV (ComfyUI's own video library), metadata set on the container before any
stream is added and `movflags=use_metadata_tags+faststart`, so the keys land as `mdta` entries in
moov/udta/meta (what the frontend's ISOBMFF reader looks for) and moov precedes mdat, which keeps
files of any size restorable. Never a `comment` tag (VideoHelperSuite's reader hangs on one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from .errors import InvalidSettingError, VideoWriteError
from .video_files import atomic_output, output_folder

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class VideoSettings:
    fps: float = 8.0
    crf: int = 19
    pix_fmt: str = "yuv420p"


@dataclass(frozen=True)
class SavedVideo:
    path: Path
    subfolder: str
    frames: int
    width: int
    height: int


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE [F, H, W, C] float 0..1 -> uint8 RGB, padded by edge pixels to even sizes (yuv420p)."""
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] < 1:
        raise InvalidSettingError(f"Expected IMAGE frames [F, H, W, 3], got shape {tuple(frames.shape)}.")
    array = (frames[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return array


def encode_mp4(
    path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
    progress: Optional[ProgressFn] = None,
) -> None:
    import av

    if not 0 < settings.fps <= 240:
        raise InvalidSettingError(f"fps={settings.fps}: use a value between 0 and 240.")
    rate = Fraction(settings.fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4", options={"movflags": "use_metadata_tags+faststart"}) as container:
        for key, value in metadata.items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = settings.pix_fmt
        stream.options = {"crf": str(settings.crf)}
        for index, image in enumerate(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            if progress is not None:
                progress(index + 1, len(frames))
        container.mux(stream.encode())


def save_mp4(
    frames: torch.Tensor, output_dir: Path, filename_prefix: str, settings: VideoSettings,
    metadata: Mapping[str, str], progress: Optional[ProgressFn] = None,
) -> SavedVideo:
    """Encode to a temp file, then claim a new `<prefix>_00001_.mp4`; a failure leaves nothing behind."""
    array = frames_to_uint8(frames)
    folder, base, subfolder = output_folder(Path(output_dir), filename_prefix)
    with atomic_output(folder, base, ".mp4") as (temp, final):
        try:
            encode_mp4(temp, array, settings, metadata, progress)
        except (OSError, ValueError) as exc:
            if isinstance(exc, InvalidSettingError):
                raise
            raise VideoWriteError(f"Encoding {base}.mp4 failed: {exc}. Nothing was written.") from None
    return SavedVideo(final[0], subfolder, array.shape[0], array.shape[2], array.shape[1])
