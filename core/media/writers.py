"""One writer per output format, each embedding the metadata where ComfyUI's frontend looks for it.

| format | container/codec | where the workflow goes | restores on drop |
|---|---|---|---|
| mp4 | H.264 (PyAV) | moov/udta/meta `mdta` keys, movflags use_metadata_tags+faststart | yes (any size) |
| webm | VP9 (PyAV) | Matroska SimpleTags PROMPT/WORKFLOW before the first Cluster | yes (under the 2 MiB read window) |
| webp | animated WebP (Pillow) | EXIF IFD0 ASCII `prompt:` 0x0110, `workflow:` 0x010F | yes |
| png | PNG, APNG for >1 frame (Pillow) | tEXt chunks | yes |
| gif | GIF (Pillow) | nowhere: GIF has no reader; a first-frame PNG sidecar carries it | sidecar only |

Colour: video codecs get BT.709 limited-range YUV, converted explicitly and tagged in the stream
(colorspace/primaries/transfer = bt709, range = tv). Without that, swscale converts with BT.601
and leaves the stream untagged, and players that assume BT.709 for HD shift every colour.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional

import numpy as np

from .webp_container import as_animation

ProgressFn = Callable[[int, int], None]
BT709 = 1  # ISO/IEC 23091-4 code point for colorspace, primaries and transfer
LIMITED_RANGE = 1


@dataclass(frozen=True)
class VideoSettings:
    fps: float = 8.0
    crf: int = 19  # MP4 (x264 0-51) and WebM (VP9 0-63): lower is better
    pix_fmt: str = "yuv420p"
    loop: int = 0  # GIF/WebP/APNG repeat count, 0 = forever
    pingpong: bool = False
    quality: int = 90  # WebP: 0-100, 100 = lossless


@dataclass(frozen=True)
class AudioTrack:
    samples: np.ndarray  # [channels, samples] float32 in -1..1
    sample_rate: int


def _frame_ms(settings: VideoSettings) -> float:
    return 1000.0 / settings.fps


def _write_av(path: Path, container_format: str, codec: str, frames: np.ndarray, settings: VideoSettings,
              metadata: Mapping[str, str], audio: Optional[AudioTrack], audio_codec: str,
              options: dict[str, str], progress: Optional[ProgressFn]) -> None:
    import av

    rate = Fraction(settings.fps).limit_denominator(1001)
    with av.open(str(path), "w", format=container_format, options=options) as container:
        for key, value in metadata.items():  # before any stream, or the muxer drops them
            container.metadata[key] = value
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], settings.pix_fmt
        context = stream.codec_context
        context.colorspace = context.color_primaries = context.color_trc = BT709
        context.color_range = LIMITED_RANGE
        stream.options = {"crf": str(settings.crf), **({"b": "0"} if codec == "libvpx-vp9" else {})}
        sound = _encode_audio(container, audio, audio_codec, len(frames) / settings.fps) if audio else []
        source = "rgb48le" if frames.dtype == np.uint16 else "rgb24"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format=source).reformat(
                format=settings.pix_fmt, src_colorspace="ITU709", dst_colorspace="ITU709",
                src_color_range="JPEG", dst_color_range="MPEG")
            container.mux(stream.encode(frame))
            _mux_until(container, sound, (index + 1) / settings.fps)  # keep audio next to its video
            if progress is not None:
                progress(index + 1, len(frames))
        container.mux(stream.encode())
        _mux_until(container, sound, float("inf"))


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 8: "7.1"}.get(channels, "stereo")


def _encode_audio(container, audio: AudioTrack, codec: str, seconds: float) -> list:
    """All audio packets, encoded up front: the track downmixed to stereo (or kept mono), resampled to
    what the codec takes, and cut to the video's length (a longer track keeps players going)."""
    import av

    channels = audio.samples.shape[0]
    layout = "mono" if channels == 1 else "stereo"
    rate = 48000 if codec == "libopus" or audio.sample_rate > 96000 else audio.sample_rate  # Opus: 48 kHz
    stream = container.add_stream(codec, rate=rate, layout=layout)
    samples = np.ascontiguousarray(audio.samples[:, : int(round(seconds * audio.sample_rate))].astype(np.float32))
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=_layout(channels))
    frame.sample_rate, frame.pts, frame.time_base = audio.sample_rate, 0, Fraction(1, audio.sample_rate)
    resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=rate,
                                  frame_size=stream.codec_context.frame_size)
    packets = []
    for chunk in [*resampler.resample(frame), *resampler.resample(None), None]:
        packets += stream.encode(chunk)
    return packets


def _mux_until(container, packets: list, seconds: float) -> None:
    while packets and (packets[0].pts is None or packets[0].pts * packets[0].time_base <= seconds):
        container.mux(packets.pop(0))


def write_mp4(path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
              audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None) -> None:
    """H.264 MP4; faststart puts moov (and the workflow) first, so files of any size restore."""
    _write_av(path, "mp4", "libx264", frames, settings, metadata, audio, "aac",
              {"movflags": "use_metadata_tags+faststart"}, progress)


def write_webm(path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
               audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None) -> None:
    """VP9 WebM; ffmpeg's Matroska muxer writes the tags upper-cased in the header."""
    _write_av(path, "webm", "libvpx-vp9", frames, settings, metadata, audio, "libopus", {}, progress)


def _pil_frames(frames: np.ndarray, progress: Optional[ProgressFn] = None):
    """Pillow images; each frame reports progress, which is also ComfyUI's cancel point."""
    from PIL import Image

    images = []
    for index, image in enumerate(frames):
        images.append(Image.fromarray(image))
        if progress is not None:
            progress(index + 1, len(frames) + 1)
    return images


def webp_exif(metadata: Mapping[str, str]) -> bytes:
    """IFD0 ASCII tags as ComfyUI core writes them: 0x0110 `prompt:…`, other keys from 0x010F down."""
    from PIL import Image

    exif = Image.Exif()
    tag = 0x010F
    for key, value in metadata.items():
        if key == "prompt":
            exif[0x0110] = f"prompt:{value}"
        else:
            exif[tag] = f"{key}:{value}"
            tag -= 1
    return exif.tobytes()


def write_webp(path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
               audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None) -> None:
    """Animated WebP; a still result (1 frame or identical frames) is re-wrapped as a 1-frame animation."""
    images = _pil_frames(frames, progress)
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=_frame_ms(settings),
                   loop=settings.loop, lossless=settings.quality >= 100, quality=min(settings.quality, 100),
                   method=4, exif=webp_exif(metadata) if metadata else b"")
    total_ms = int(round(_frame_ms(settings) * len(images)))
    Path(path).write_bytes(as_animation(buffer.getvalue(), total_ms, settings.loop))
    if progress is not None:
        progress(len(images) + 1, len(images) + 1)


def png_info(metadata: Mapping[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)  # tEXt: the 1.27 frontend cannot read iTXt
    return info


def write_png(path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
              audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None) -> None:
    """PNG for one frame, APNG (still named .png, which is what the frontend routes) for more."""
    images = _pil_frames(frames, progress)
    extra = {} if len(images) == 1 else dict(save_all=True, append_images=images[1:], duration=_frame_ms(settings),
                                              loop=settings.loop, default_image=False, disposal=0, blend=0)
    images[0].save(str(path), format="PNG", pnginfo=png_info(metadata), compress_level=4, **extra)
    if progress is not None:
        progress(len(images) + 1, len(images) + 1)


def gif_durations(count: int, fps: float) -> list[int]:
    """Per-frame delays in ms on GIF's 10 ms grid, rounded cumulatively so the clip keeps its length
    (a fixed 120 ms would turn 8 fps into 8.33); GIF players treat delays under 20 ms as 100 ms."""
    centiseconds = 100.0 / fps
    ticks = [round(centiseconds * (i + 1)) - round(centiseconds * i) for i in range(count)]
    return [10 * max(2, tick) for tick in ticks]


def write_gif(path: Path, frames: np.ndarray, settings: VideoSettings, metadata: Mapping[str, str],
              audio: Optional[AudioTrack] = None, progress: Optional[ProgressFn] = None) -> None:
    """GIF (no metadata: no frontend reads any from a GIF; the caller writes the sidecar PNG).

    `loop` counts plays like WebP/APNG; GIF's NETSCAPE field counts repeats after the first play.
    """
    images = _pil_frames(frames, progress)
    repeat = {} if settings.loop == 1 else {"loop": 0 if settings.loop == 0 else settings.loop - 1}
    images[0].save(str(path), format="GIF", save_all=True, append_images=images[1:],
                   duration=gif_durations(len(images), settings.fps), disposal=2, optimize=False, **repeat)
    if progress is not None:
        progress(len(images) + 1, len(images) + 1)


@dataclass(frozen=True)
class OutputFormat:
    id: str
    suffix: str
    mime: str
    writer: Callable[..., None]
    restores: bool  # does the frontend read the workflow from this file itself?
    audio_codec: Optional[str]
    pix_fmts: tuple[str, ...]
    crf_max: Optional[int]
    read_window: Optional[int] = None  # bytes the frontend reads; metadata must fit


FORMATS: MappingProxyType[str, OutputFormat] = MappingProxyType({
    "mp4": OutputFormat("mp4", ".mp4", "video/mp4", write_mp4, True, "aac",
                        ("yuv420p", "yuv444p", "yuv420p10le"), 51),
    "webm": OutputFormat("webm", ".webm", "video/webm", write_webm, True, "libopus", ("yuv420p", "yuv444p"), 63,
                         read_window=2 * 1024 * 1024),
    "webp": OutputFormat("webp", ".webp", "image/webp", write_webp, True, None, (), None),
    "png": OutputFormat("png", ".png", "image/png", write_png, True, None, (), None),
    "gif": OutputFormat("gif", ".gif", "image/gif", write_gif, False, None, (), None),
})
