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
SIZE_MULTIPLES = (1, 8, 16, 32, 64)


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
    _check_cuts(frame_cap=frame_cap, skip_first=skip_first, every_nth=every_nth, size_multiple=size_multiple)
    if path.stat().st_size == 0:
        raise InvalidSettingError(f"{path.name} is empty (0 bytes), so it has no video frames; upload the file again.")
    kept, seen = [], 0
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(path.name, container)
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
    except av.error.EOFError:  # the container ends before its first packet: no frames at all
        raise InvalidSettingError(f"{path.name} has no video frames (it ends before the first one); "
                                  "choose a clip with at least one frame.") from None
    except av.error.FFmpegError as exc:
        raise InvalidSettingError(f"{path.name} could not be decoded as a video: {exc}.") from None
    if not seen:
        raise InvalidSettingError(f"{path.name} has a video stream with no frames in it (0 frames decoded); "
                                  "choose a clip with at least one frame.")
    if not kept:
        raise InvalidSettingError(f"{path.name}: no frames left after skipping {skip_first} of {seen}.")
    frames = torch.from_numpy(np.stack(kept)).float().div_(255)
    return LoadedVideo(_resize_to_multiple(frames, size_multiple), fps / every_nth, seen)


def _check_cuts(*, frame_cap: int, skip_first: int, every_nth: int, size_multiple: int) -> None:
    """Name only the values that are wrong, each with its own rule."""
    rules = ((frame_cap >= 0, f"frame_cap={frame_cap} must be 0 (all frames) or more"),
             (skip_first >= 0, f"skip_first={skip_first} must be 0 or more"),
             (every_nth >= 1, f"every_nth={every_nth} must be 1 (every frame) or more"),
             (size_multiple in SIZE_MULTIPLES, f"size_multiple={size_multiple} must be one of "
                                               f"{', '.join(map(str, SIZE_MULTIPLES))}"))
    wrong = [rule for ok, rule in rules if not ok]
    if wrong:
        raise InvalidSettingError("; ".join(wrong) + ".")


def _video_stream(name: str, container):
    """The first video stream, or a message saying what the file holds instead (audio only, nothing)."""
    if container.streams.video:
        return container.streams.video[0]
    others = [stream.type for stream in container.streams]
    if not others:
        raise InvalidSettingError(f"{name} has no video frames (no streams at all); choose a clip with at least "
                                  "one frame.")
    kinds = ", ".join(sorted(set(others)))
    raise InvalidSettingError(f"{name} has no video stream, only {kinds}; choose a file with video frames "
                              "(Load Video does not load audio-only files).")


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
