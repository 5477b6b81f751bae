"""Reading a video file into ComfyUI IMAGE frames (for video-to-video), with the cuts users expect."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import InvalidSettingError, ModelFileNotFoundError

ProgressFn = Callable[[int, int], None]
# .webp is not here: FFmpeg cannot decode animated WebP
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi", ".gif")


@dataclass(frozen=True)
class LoadedVideo:
    frames: torch.Tensor  # [F, H, W, 3] float32 0..1
    fps: float
    source_frames: int  # frames decoded (skipped ones included) before stopping


# AVColorSpace code -> swscale matrix name (ISO/IEC 23091-4 numbering)
_MATRICES = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "ITU601", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


def _rgb(frame) -> np.ndarray:
    """Decode with the stream's own matrix and range (untagged streams: BT.601 limited, swscale's default)."""
    colorspace = _MATRICES.get(int(frame.colorspace))
    color_range = "JPEG" if int(frame.color_range) == 2 else "MPEG"
    if frame.format.name.startswith(("rgb", "bgr", "pal", "gray")):
        image = frame.to_ndarray(format="rgb24")
    else:
        image = frame.reformat(format="rgb24", src_colorspace=colorspace, src_color_range=color_range,
                               dst_color_range="JPEG").to_ndarray()
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # phone clips: display matrix, CCW degrees
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def load_video(
    path: str | Path, frame_cap: int = 0, skip_first: int = 0, every_nth: int = 1, size_multiple: int = 1,
    progress: Optional[ProgressFn] = None,
) -> LoadedVideo:
    """Decode `path`; skip the first frames, keep every n-th, stop after `frame_cap` (0 = all), and
    resize to the nearest multiple of `size_multiple` (8 for SD latents, 16 for Wan)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"Video not found: {path}. Put it in ComfyUI's input folder or upload it.")
    if frame_cap < 0 or skip_first < 0 or every_nth < 1 or size_multiple not in (1, 8, 16, 32, 64):
        raise InvalidSettingError("frame_cap and skip_first must be >= 0, every_nth >= 1, size_multiple 1/8/16/32/64.")
    kept, seen = [], 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 8)
            _check_memory(path.name, stream, frame_cap, skip_first, every_nth)
            for frame in container.decode(stream):
                index, seen = seen, seen + 1
                if index < skip_first or (index - skip_first) % every_nth:
                    continue
                kept.append(_rgb(frame))
                if progress is not None:
                    progress(len(kept), frame_cap or len(kept))
                if frame_cap and len(kept) >= frame_cap:
                    break
    except (av.error.FFmpegError, IndexError) as exc:
        raise InvalidSettingError(f"{path.name} could not be decoded as a video: {exc}.") from None
    if not kept:
        raise InvalidSettingError(f"{path.name}: no frames left after skipping {skip_first} of {seen}.")
    frames = torch.from_numpy(np.stack(kept)).float().div_(255)
    return LoadedVideo(_resize_to_multiple(frames, size_multiple), fps / every_nth, seen)


def _check_memory(name: str, stream, frame_cap: int, skip_first: int, every_nth: int) -> None:
    """Refuse, before decoding, a clip whose float32 frames would not fit in half of this machine's RAM."""
    total = stream.frames or 0
    if not total and stream.duration and stream.time_base:
        total = int(float(stream.duration * stream.time_base) * float(stream.average_rate or 30))
    count = max(0, total - skip_first) // every_nth
    count = min(count, frame_cap) if frame_cap else count
    needed = count * stream.codec_context.width * stream.codec_context.height * 3 * 4 * 1.5
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return
    if needed > available:
        raise InvalidSettingError(
            f"{name}: about {count} frames at {stream.codec_context.width}x{stream.codec_context.height} need "
            f"{needed / 2**30:.1f} GiB as IMAGE frames, more than half of this machine's memory. Set frame_cap, "
            "skip_first or every_nth to load a part of it."
        )


def _resize_to_multiple(frames: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = frames.shape[1:3]
    new_h, new_w = (max(multiple, round(v / multiple) * multiple) for v in (height, width))
    if (new_h, new_w) == (height, width):
        return frames
    resized = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(new_h, new_w), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.clamp_(0, 1).permute(0, 2, 3, 1).contiguous()
