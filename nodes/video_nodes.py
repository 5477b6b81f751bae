"""Video nodes: save (every format restores its workflow, or says so and writes a sidecar), frames to
ComfyUI's native VIDEO, and load a video file into frames."""
from __future__ import annotations

from ..core.media.metadata import build_metadata
from ..core.media.temp_files import install_signal_cleanup
from ..core.media.writers import FORMATS as OUTPUT_FORMATS
from . import _comfy
from .specs import NodeResult, NodeSpec, Param, number_problem

# ComfyUI imports node packs on its main thread but runs nodes on a worker thread, where signal
# handlers cannot be installed: install now, so SIGTERM does not leave a save's .partial files behind.
install_signal_cleanup()

FORMAT_HELP = ("mp4: H.264, plays everywhere. webm: VP9. webp: animated WebP. png: APNG (a PNG for 1 frame). "
               "gif: cannot carry a workflow, so a .png sidecar with the first frame is written next to it. "
               "mp4/webm/webp/png restore the workflow when dropped onto ComfyUI.")


def _audio_track(audio):
    """ComfyUI AUDIO {'waveform': [B, C, T], 'sample_rate'} -> core AudioTrack (first batch item).

    The save checks the samples and the rate; only the batch dimension is ComfyUI's, so it is checked here.
    """
    from ..core.errors import InvalidSettingError
    from ..core.media.save import AudioTrack

    if audio is None:
        return None
    waveform = audio.get("waveform") if isinstance(audio, dict) else None
    shape = list(getattr(waveform, "shape", ()))
    if waveform is None or len(shape) != 3 or shape[0] < 1:
        got = f"a waveform of shape {shape}" if waveform is not None else f"{type(audio).__name__} without 'waveform'"
        raise InvalidSettingError(f"AUDIO has {got}, but ComfyUI's AUDIO waveform is [batch, channels, samples]; "
                                  "fix the node that made it (a [channels, samples] waveform needs .unsqueeze(0)).")
    return AudioTrack(samples=waveform[0].float().cpu().numpy(), sample_rate=audio.get("sample_rate"))


def _frames_of(images, video, fps, audio):
    """Frames, fps and audio from IMAGE (+AUDIO) or from a native VIDEO (its own rate and sound)."""
    from ..core.errors import InvalidSettingError

    if video is not None:
        parts = video.get_components()
        return parts.images, float(parts.frame_rate), audio if audio is not None else parts.audio
    if images is None:
        raise InvalidSettingError("Connect frames to 'images' (IMAGE) or a video to 'video' (VIDEO).")
    return images, fps, audio


def _save(filename_prefix, fps, format, crf, pix_fmt, loop, pingpong, quality, images=None, audio=None, video=None,
          prompt=None, extra_pnginfo=None) -> NodeResult:
    from ..core.media.save import VideoSettings, save_video

    images, fps, audio = _frames_of(images, video, fps, audio)
    settings = VideoSettings(fps=fps, crf=crf, pix_fmt=pix_fmt, loop=loop, pingpong=pingpong, quality=quality)
    metadata = build_metadata(prompt, extra_pnginfo, disabled=_comfy.metadata_disabled())
    saved = save_video(images, output_dir=_comfy.output_dir(), filename_prefix=filename_prefix, format_id=format,
                       settings=settings, metadata=metadata, audio=_audio_track(audio),
                       progress=_comfy.progress_reporter(int(images.shape[0])))
    entry = {"filename": saved.path.name, "subfolder": saved.subfolder, "type": "output",
             "format": OUTPUT_FORMATS[format].mime}
    ui = {"images": [entry], "animated": (True,)}
    if saved.notes:
        ui["flipbook_notes"] = list(saved.notes)
    return NodeResult((), ui)


FORMATS = tuple(OUTPUT_FORMATS)
PIX_FMTS = tuple(dict.fromkeys(p for fmt in OUTPUT_FORMATS.values() for p in fmt.pix_fmts))
CRF_RANGE = (0, max(fmt.crf_max or 0 for fmt in OUTPUT_FORMATS.values()))


FPS_RANGE = (0.1, 240.0)


def _fps(tooltip: str) -> Param:
    return Param("fps", "FLOAT", tooltip,
                 {"default": 8.0, "min": FPS_RANGE[0], "max": FPS_RANGE[1], "step": 0.1, "round": 0.001})


def _check_save(cls, filename_prefix=None, fps=None, format=None, crf=None, pix_fmt=None):
    """Before the run: a prefix no file can be saved under, or a crf or pix_fmt the chosen format cannot
    take, would otherwise fail only after the (long) generation. ComfyUI skips its own list/range
    checks for inputs a validator names, so they are repeated here. Values arriving through links
    (None here) are checked at run time instead."""
    problems = [_prefix_problem(filename_prefix), _fps_problem(fps), *_format_problems(format, crf, pix_fmt)]
    problems = [problem for problem in problems if problem]
    return " | ".join(problems) if problems else True


def _check_to_video(cls, fps=None):
    """When queued: a NaN/inf or out-of-range frame rate (NaN passes every min/max comparison)."""
    return _fps_problem(fps) or True


def _prefix_problem(filename_prefix):
    from ..core.errors import FilenamePrefixError
    from ..core.media.files import check_filename_prefix

    if filename_prefix is None:
        return None
    try:
        check_filename_prefix(filename_prefix)
    except FilenamePrefixError as exc:
        return str(exc)
    return None


def _fps_problem(fps):
    return number_problem("fps", fps, *FPS_RANGE, hint=" frames per second, e.g. 8, 16 or 23.976.")


def _format_problems(format, crf, pix_fmt) -> list:
    from ..core.errors import InvalidSettingError
    from ..core.media.save import check_format_settings

    problems = []
    if format is not None and format not in FORMATS:
        problems.append(f"format={format!r} is not one of {', '.join(FORMATS)}.")
    if pix_fmt is not None and pix_fmt not in PIX_FMTS:
        problems.append(f"pix_fmt={pix_fmt!r} is not one of {', '.join(PIX_FMTS)}.")
    if crf is not None and (isinstance(crf, bool) or not isinstance(crf, int) or not CRF_RANGE[0] <= crf <= CRF_RANGE[1]):
        problems.append(f"crf={crf!r} must be a whole number from {CRF_RANGE[0]} to {CRF_RANGE[1]}.")
    if problems or None in (format, crf, pix_fmt):
        return problems
    try:
        check_format_settings(format, crf, pix_fmt)
    except InvalidSettingError as exc:
        return [str(exc)]
    return []


def _check_load(cls, video=None):
    """When queued: the file must be a name inside ComfyUI's input folder (V3 combos are not checked)."""
    from ..core.errors import ModelFileNotFoundError

    if video is None:
        return True
    try:
        path = _comfy.input_path(video)
    except ModelFileNotFoundError as exc:
        return str(exc)
    return True if path.is_file() else f"{video!r} is not in ComfyUI's input folder; upload it or pick another."


def _input_mtime(cls, video=None, **_):
    """Re-read the file when it changes on disk under the same name (as core LoadVideo does)."""
    try:
        return _comfy.input_path(video).stat().st_mtime if video else ""
    except OSError:
        return float("nan")  # missing: always re-run, so the run reports it


def _to_video(images, fps, audio=None) -> NodeResult:
    from ..core.errors import InvalidSettingError

    problem = _fps_problem(fps)  # a linked fps skipped the queue-time check
    if problem:
        raise InvalidSettingError(problem)
    return NodeResult((_comfy.video_from_frames(images, fps, audio),))


def _load(video, frame_cap, skip_first, every_nth, size_multiple) -> NodeResult:
    from ..core.media.load_video import load_video

    loaded = load_video(_comfy.input_path(video), frame_cap=frame_cap, skip_first=skip_first, every_nth=every_nth,
                        size_multiple=int(size_multiple), progress=_comfy.progress_reporter(frame_cap or 1))
    return NodeResult((loaded.frames, loaded.fps, int(loaded.frames.shape[0])))


SAVE_VIDEO = NodeSpec(
    node_id="FlipbookSaveVideo",
    display_name="Flipbook Save Video",
    category="Flipbook/Video",
    description="Saves frames as MP4, WebM, animated WebP, PNG/APNG or GIF with the workflow and prompt embedded "
                "the way ComfyUI's frontend reads them: drop the file onto ComfyUI to get the workflow back.",
    inputs=(
        Param("images", "IMAGE", "Frames from any node (ComfyUI IMAGE batch).", optional=True),
        Param("filename_prefix", "STRING", "Sub-folder/name inside ComfyUI's output folder; a counter keeps every "
              "save unique.", {"default": "flipbook/video"}),
        _fps("Frames per second (AnimateDiff clips: 8, Wan: 16; 23.976 works). A VIDEO input keeps its own."),
        Param("format", "COMBO", FORMAT_HELP, {"default": "mp4"}, choices=lambda: list(FORMATS)),
        Param("crf", "INT", "MP4/WebM quality: lower is better and bigger (H.264 0-51, VP9 0-63; 17-23 typical).",
              {"default": 19, "min": CRF_RANGE[0], "max": CRF_RANGE[1]}),
        Param("pix_fmt", "COMBO", "MP4/WebM pixel format: yuv420p plays everywhere (browsers too); yuv444p keeps "
              "full colour detail and yuv420p10le (MP4) has 10-bit gradients, but browsers cannot play those. "
              "Colours are BT.709, limited range, tagged.", {"default": "yuv420p"}, choices=lambda: list(PIX_FMTS)),
        Param("loop", "INT", "How many times a GIF/WebP/APNG plays; 0 = forever.",
              {"default": 0, "min": 0, "max": 65535}),
        Param("pingpong", "BOOLEAN", "Play forward then backward (seamless loop).", {"default": False}),
        Param("quality", "INT", "WebP quality 0-100; 100 = lossless.", {"default": 90, "min": 0, "max": 100}),
        Param("audio", "AUDIO", "Optional sound for MP4 (AAC) or WebM (Opus), cut to the video's length.",
              optional=True),
        Param("video", "VIDEO", "Optional native ComfyUI VIDEO instead of images (uses its frame rate and sound).",
              optional=True),
    ),
    outputs=(),
    run=_save,
    hidden=("prompt", "extra_pnginfo"),
    output_node=True,
    validate=_check_save,
)

FRAMES_TO_VIDEO = NodeSpec(
    node_id="FlipbookFramesToVideo",
    display_name="Flipbook Frames to Video",
    category="Flipbook/Video",
    description="Wraps IMAGE frames (and optional AUDIO) as ComfyUI's native VIDEO, for core video nodes.",
    inputs=(
        Param("images", "IMAGE", "Frames from any node."),
        _fps("Frames per second."),
        Param("audio", "AUDIO", "Optional sound.", optional=True),
    ),
    outputs=(("VIDEO", "video"),),
    run=_to_video,
    needs_video_api=True,
    validate=_check_to_video,
)

LOAD_VIDEO = NodeSpec(
    node_id="FlipbookLoadVideo",
    display_name="Flipbook Load Video",
    category="Flipbook/Video",
    description="Loads a video from ComfyUI's input folder as IMAGE frames (for video-to-video).",
    inputs=(
        Param("video", "COMBO", "A video in ComfyUI's input folder (or upload one).", {"video_upload": True},
              choices=lambda: _comfy.input_files()),
        Param("frame_cap", "INT", "Stop after this many frames; 0 = all.", {"default": 16, "min": 0, "max": 10000}),
        Param("skip_first", "INT", "Frames to skip at the start.", {"default": 0, "min": 0, "max": 100000}),
        Param("every_nth", "INT", "Keep every n-th frame (2 halves the frame rate).",
              {"default": 1, "min": 1, "max": 100}),
        Param("size_multiple", "COMBO", "Resize so width and height are multiples of this (8 for SD1.5, 16 for "
              "Wan); 1 keeps the size.", {"default": "8"}, choices=lambda: ["1", "8", "16", "32", "64"]),
    ),
    outputs=(("IMAGE", "frames"), ("FLOAT", "fps"), ("INT", "frame_count")),
    run=_load,
    validate=_check_load,
    fingerprint=_input_mtime,
)

SPECS = (SAVE_VIDEO, FRAMES_TO_VIDEO, LOAD_VIDEO)
