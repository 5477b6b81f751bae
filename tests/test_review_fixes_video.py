"""Regressions for the video review: rotation, 10-bit with image formats, sidecars without hard links,
audio layout/interleave/rates, GIF timing and loops, strict readers, cancel points (tests/test_video.py), validation."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS
from flipbook_pack.core.media import files as video_files
from flipbook_pack.core.errors import InvalidSettingError
from flipbook_pack.core.media.readers import read_png_metadata, read_workflow
from flipbook_pack.core.media.metadata import build_metadata
from flipbook_pack.core.media.save import AudioTrack, VideoSettings, save_video
from flipbook_pack.core.media.load_video import load_video
from flipbook_pack.core.media.writers import gif_durations


def _rotated_mp4(tmp_path):
    frames = torch.zeros(2, 32, 64, 3)
    frames[:, :, :32, 0] = 1  # left half red
    frames[:, :16, :, 2] = 1  # top half blue
    saved = save_video(frames, tmp_path, "r", "mp4", VideoSettings(crf=1), {})
    data = bytearray(saved.path.read_bytes())
    tkhd = data.index(b"tkhd")
    matrix = tkhd + 8 + (32 if data[tkhd + 4] == 1 else 20) + 16
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)  # 90 degrees
    path = tmp_path / "phone.mp4"
    path.write_bytes(bytes(data))
    return path


def test_load_video_applies_the_display_rotation_like_ffmpeg(tmp_path):
    image = load_video(_rotated_mp4(tmp_path), frame_cap=1).frames[0]
    assert image.shape == (64, 32, 3)  # portrait, as players show it
    corners = [tuple(image[y, x].round().tolist()) for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1))]
    assert corners == [(1, 0, 0), (1, 0, 1), (0, 0, 0), (0, 0, 1)]  # = ffmpeg's autorotate (checked once)


@pytest.mark.parametrize("fmt", ["png", "webp", "gif"])
def test_ten_bit_setting_is_ignored_by_image_formats(tmp_path, fmt):
    saved = save_video(torch.rand(2, 8, 8, 3), tmp_path, "x", fmt, VideoSettings(pix_fmt="yuv420p10le"), {})
    assert saved.path.stat().st_size > 0


def test_sidecar_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(video_files.os, "link", no_links)
    saved = save_video(torch.rand(2, 8, 8, 3), tmp_path, "g", "gif", VideoSettings(), build_metadata({"1": {}}, None))
    assert saved.path.exists() and read_workflow(saved.sidecar) == {"prompt": {"1": {}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g_00001_.gif", "g_00001_.png"]


def test_surround_audio_is_downmixed_and_interleaved_and_high_rates_resampled(tmp_path):
    import av

    rate, seconds = 192000, 4
    centre = np.zeros((6, rate * seconds), np.float32)
    centre[2] = 0.5 * np.sin(np.linspace(0, 880 * np.pi * seconds, rate * seconds))  # 5.1: dialogue in centre
    saved = save_video(torch.rand(8 * seconds, 16, 16, 3), tmp_path, "a", "mp4", VideoSettings(fps=8), {},
                       audio=AudioTrack(centre, rate))
    with av.open(str(saved.path)) as container:
        audio = container.streams.audio[0]
        assert audio.rate == 48000 and audio.channels == 2
        peak = max(float(np.abs(f.to_ndarray()).max()) for f in container.decode(audio))
        assert peak > 0.1  # the centre channel is heard
    with av.open(str(saved.path)) as container:
        order = [(p.stream.type, float(p.pts * p.time_base)) for p in container.demux() if p.pts is not None]
    first_audio = next(i for i, (kind, _) in enumerate(order) if kind == "audio")
    assert order[first_audio - 1][1] < 1.0  # audio starts near the start, not after all video


def test_gif_frame_times_keep_the_clip_length():
    eight = gif_durations(8, 8.0)
    assert sum(eight) == 1000 and set(eight) == {120, 130}  # 8 fps = 1 s per 8 frames, not 960 ms
    assert sum(gif_durations(24, 23.976)) == pytest.approx(1001, abs=10)
    assert set(gif_durations(4, 240.0)) == {20}  # GIF's floor: under 20 ms players fall back to 100 ms


def test_loop_counts_plays_in_every_format(tmp_path):
    from PIL import Image

    once = save_video(torch.rand(3, 8, 8, 3), tmp_path, "once", "gif", VideoSettings(loop=1), {})
    with Image.open(once.path) as gif:
        assert "loop" not in gif.info  # no NETSCAPE block: plays once
    apng = save_video(torch.rand(3, 8, 8, 3), tmp_path, "ap", "png", VideoSettings(loop=2), {})
    with Image.open(apng.path) as png:
        assert png.info["loop"] == 2


def test_readers_refuse_nan_like_frontend_1_27(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("workflow", '{"a": [NaN, Infinity]}')
    Image.new("RGB", (4, 4)).save(tmp_path / "bad.png", pnginfo=info)
    assert read_png_metadata(tmp_path / "bad.png") == {}
    good = save_video(torch.rand(1, 4, 4, 3), tmp_path, "ok", "png", VideoSettings(),
                      build_metadata(None, {"workflow": {"a": [float("nan")]}}))
    assert read_workflow(good.path) == {"workflow": {"a": [None]}}


def test_browser_unfriendly_mp4_settings_are_noted(tmp_path):
    notes = save_video(torch.rand(2, 8, 8, 3), tmp_path, "n", "mp4", VideoSettings(pix_fmt="yuv444p"), {}).notes
    assert "browsers cannot play" in notes[0]
    assert save_video(torch.rand(2, 8, 8, 3), tmp_path, "n", "mp4", VideoSettings(), {}).notes == ()


def test_validator_repeats_comfyuis_own_list_and_range_checks():
    check = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"].VALIDATE_INPUTS
    assert "crf" in check(format="gif", crf=99, pix_fmt="yuv420p")
    assert "pix_fmt" in check(format="gif", crf=10, pix_fmt="bogus")
    assert "format" in check(format="avi", crf=10, pix_fmt="yuv420p")


def test_load_video_reruns_when_the_file_changes(tmp_path):
    from flipbook_pack.nodes import _comfy

    node = NODE_CLASS_MAPPINGS["FlipbookLoadVideo"]
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path, output_dir=tmp_path, input_dir=tmp_path))
    try:
        saved = save_video(torch.rand(2, 8, 8, 3), tmp_path, "in", "mp4", VideoSettings(), {})
        first = node.IS_CHANGED(video=saved.path.name)
        os.utime(saved.path, (first + 10, first + 10))
        assert node.IS_CHANGED(video=saved.path.name) != first
        assert node.IS_CHANGED(video="missing.mp4") != node.IS_CHANGED(video="missing.mp4")  # NaN: always re-run
    finally:
        _comfy.use_headless(None)


def test_load_video_refuses_clips_that_cannot_fit_in_memory(tmp_path, monkeypatch):
    saved = save_video(torch.rand(4, 16, 16, 3), tmp_path, "m", "mp4", VideoSettings(), {})
    monkeypatch.setattr(os, "sysconf", lambda name: 1024 if name == "SC_PHYS_PAGES" else 4)
    with pytest.raises(InvalidSettingError, match="frame_cap"):
        load_video(saved.path)
