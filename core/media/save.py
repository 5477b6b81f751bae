"""Saving frames as video files that carry the ComfyUI workflow, atomically and under unique names.

Every format either restores its workflow when dropped onto ComfyUI, or comes with a first-frame
PNG sidecar that does (GIF always; WebM when the metadata outgrows the frontend's 2 MiB window),
and the result says which, so the node can tell the user.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from ..errors import InvalidSettingError, NonFiniteResultError, VideoWriteError
from .files import SIDECAR_SUFFIX, atomic_output, output_folder
from .writers import FORMATS, AudioTrack, OutputFormat, VideoSettings, write_png

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
__all__ = ["AudioTrack", "FORMATS", "SavedVideo", "VideoSettings", "check_format_settings", "frames_to_array",
           "save_video"]


@dataclass(frozen=True)
class SavedVideo:
    path: Path
    subfolder: str
    format: str
    frames: int
    width: int
    height: int
    sidecar: Optional[Path] = None  # first-frame PNG carrying the workflow, when the video cannot
    notes: tuple[str, ...] = field(default_factory=tuple)


def frames_to_array(frames: torch.Tensor, sixteen_bit: bool = False, even: bool = True) -> np.ndarray:
    """ComfyUI IMAGE [F, H, W, C] float 0..1 -> uint8 (or uint16) RGB; edge-padded to even sizes for YUV 4:2:0."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] < 1:
        got = f"shape {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InvalidSettingError(f"Expected IMAGE frames [F, H, W, 3], got {got}.")
    _check_finite(frames)
    scale, dtype = (65535, torch.int32) if sixteen_bit else (255, torch.uint8)
    array = (frames[..., :3].float().clamp(0, 1) * scale).round().to(dtype).cpu().numpy()
    array = array.astype(np.uint16) if sixteen_bit else array
    pad_h, pad_w = (array.shape[1] % 2, array.shape[2] % 2) if even else (0, 0)
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return array


def _check_finite(frames: torch.Tensor) -> None:
    """NaN would be clamped to black and inf to white without a word: refuse them, naming the frames.

    Per-frame max/min (NaN propagates through both) instead of isfinite(): no full-size temporary.
    """
    if not frames.is_floating_point() or frames.numel() == 0:
        return
    dims = tuple(range(1, frames.ndim))
    colour = frames[..., :3]  # alpha is dropped when saving: NaN there harms nothing
    finite = (torch.isfinite(colour.amax(dim=dims)) & torch.isfinite(colour.amin(dim=dims))).cpu()
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    listed = ", ".join(map(str, bad[:8])) + (", …" if len(bad) > 8 else "")
    raise NonFiniteResultError(
        f"IMAGE frames contain NaN/infinite values in {len(bad)} of {len(finite)} frames (frame {listed}); "
        "Save Video needs finite values 0..1 (NaN would be saved as black). Fix the node that made them, "
        "e.g. decode the VAE in fp32 or lower cfg.")


def _checked_audio(audio: Optional[AudioTrack]) -> Optional[AudioTrack]:
    """Audio the encoders can take: [channels, samples] with some of each, at a positive whole sample rate."""
    if audio is None:
        return None
    shape = tuple(getattr(audio.samples, "shape", ()))
    if len(shape) != 2:
        raise InvalidSettingError(f"Audio samples have shape {list(shape)}; they must be [channels, samples].")
    if 0 in shape:
        raise InvalidSettingError(f"Audio has no samples (shape [channels, samples] = {list(shape)}); connect audio "
                                  "with sound in it or disconnect the audio input.")
    rate = audio.sample_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate <= 0 \
            or rate != int(rate):
        raise InvalidSettingError(f"Audio sample_rate={rate!r}: it must be a whole number of samples per second "
                                  "above 0, e.g. 44100 or 48000; fix the node that made the audio.")
    return dataclasses.replace(audio, sample_rate=int(rate))


def _format(format_id: str) -> OutputFormat:
    if format_id not in FORMATS:
        raise InvalidSettingError(f"Unknown format {format_id!r}; choose one of {', '.join(FORMATS)}.")
    return FORMATS[format_id]


def check_format_settings(format_id: str, crf: int, pix_fmt: str) -> None:
    """The cheap per-format checks, also run by the node before the workflow starts."""
    _validate(_format(format_id), VideoSettings(crf=crf, pix_fmt=pix_fmt))


def _validate(fmt: OutputFormat, settings: VideoSettings) -> None:
    fps = settings.fps
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and 0 < fps <= 240):
        raise InvalidSettingError(f"fps={fps!r}: the frame rate must be a finite number above 0 and at most 240, "
                                  "e.g. 8, 16 or 23.976; set fps (a VIDEO input brings its own rate).")
    for name in ("crf", "loop", "quality"):  # linked values skip the node's queue-time type check
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidSettingError(f"{name}={value!r} is not a whole number; set {name} on the Save Video node.")
    if fmt.crf_max is not None and not 0 <= settings.crf <= fmt.crf_max:
        raise InvalidSettingError(f"crf={settings.crf}: {fmt.id} takes 0-{fmt.crf_max} (lower = better quality).")
    if fmt.pix_fmts and settings.pix_fmt not in fmt.pix_fmts:
        raise InvalidSettingError(
            f"pix_fmt={settings.pix_fmt!r} is not available for {fmt.id}; choose one of {', '.join(fmt.pix_fmts)}."
        )
    if settings.loop < 0 or not 0 <= settings.quality <= 100:
        raise InvalidSettingError(f"loop must be >= 0 and quality 0-100, got {settings.loop} and {settings.quality}.")


def _playback_notes(fmt: OutputFormat, settings: VideoSettings) -> list[str]:
    """H.264 profiles browsers do not decode: the file is fine, but ComfyUI's preview stays blank."""
    if fmt.id != "mp4":
        return []
    if settings.pix_fmt != "yuv420p" or settings.crf == 0:
        what = "crf 0 (lossless)" if settings.crf == 0 else settings.pix_fmt
        return [f"MP4 with {what} uses an H.264 profile browsers cannot play, so the preview may stay blank; "
                "the file plays in VLC/ffmpeg-based players. Use yuv420p with crf >= 1 for browsers."]
    return []


def _restores(fmt: OutputFormat, metadata: Mapping[str, str]) -> tuple[bool, Optional[str]]:
    if not metadata:
        return True, None
    if not fmt.restores:
        return False, f"{fmt.id.upper()} files cannot carry a workflow ComfyUI reads; drop the .png sidecar instead."
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if fmt.read_window is not None and size > fmt.read_window - 100 * 1024:
        return False, (f"The workflow ({size / 2**20:.1f} MiB) is too big for ComfyUI's {fmt.read_window // 2**20} MiB "
                       f"{fmt.id} reader; drop the .png sidecar to restore it, or save as MP4.")
    return True, None


def save_video(
    frames: torch.Tensor, output_dir: Path, filename_prefix: str, format_id: str, settings: VideoSettings,
    metadata: Mapping[str, str], audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None,
) -> SavedVideo:
    """Encode to a temp file, then claim `<prefix>_00001_.<ext>`; a failure or cancel leaves nothing behind.

    Every input is checked before the folder is touched, so bad input writes nothing at all.
    """
    fmt = _format(format_id)
    _validate(fmt, settings)
    folder, base, subfolder = output_folder(Path(output_dir), filename_prefix=filename_prefix)
    video_codec = bool(fmt.pix_fmts)  # pix_fmt and crf mean nothing to the image formats
    array = frames_to_array(frames, sixteen_bit=video_codec and "10" in settings.pix_fmt, even=video_codec)
    audio = _checked_audio(audio)
    if settings.pingpong and len(array) > 2:
        array = np.concatenate([array, array[-2:0:-1]])
    notes = _playback_notes(fmt, settings)
    if audio is not None and fmt.audio_codec is None:
        notes.append(f"{fmt.id} has no audio track; the audio input was not saved (use mp4 or webm).")
        audio = None
    restores, why = _restores(fmt, metadata)
    notes += [] if restores else [why]
    sidecar = None if restores else SIDECAR_SUFFIX
    with atomic_output(folder, base=base, suffix=fmt.suffix, sidecar_suffix=sidecar) as out:
        _write(fmt.writer, out.temp, f"{base}{fmt.suffix}", array, settings, metadata, audio, progress)
        if out.sidecar_temp is not None:  # written before the video is published: both appear, or neither
            first = array[:1] if array.dtype == np.uint8 else (array[:1] >> 8).astype(np.uint8)
            _write(write_png, out.sidecar_temp, f"the {SIDECAR_SUFFIX} sidecar", first, settings, metadata)
    for note in notes:
        log.warning("%s", note)
    return SavedVideo(out.path, subfolder, fmt.id, array.shape[0], array.shape[2], array.shape[1], out.sidecar,
                      tuple(notes))


def _write(writer: Callable[..., None], path: Path, what: str, *args) -> None:
    """Run a writer; its OS and codec errors become one VideoWriteError (the temp files are removed by the caller)."""
    try:
        writer(path, *args)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, InvalidSettingError):
            raise
        raise VideoWriteError(f"Writing {what} failed: {exc}. Nothing was written.") from None
