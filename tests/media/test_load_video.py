"""core/media/load_video.py: display rotation and the memory limit when decoding a clip."""
from __future__ import annotations

import os
import struct

import pytest
import torch

from flipbook_pack.core.errors import InvalidSettingError
from flipbook_pack.core.media.save import VideoSettings, save_video
from flipbook_pack.core.media.load_video import load_video


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


def test_load_video_refuses_clips_that_cannot_fit_in_memory(tmp_path, monkeypatch):
    saved = save_video(torch.rand(4, 16, 16, 3), tmp_path, "m", "mp4", VideoSettings(), {})
    monkeypatch.setattr(os, "sysconf", lambda name: 1024 if name == "SC_PHYS_PAGES" else 4)
    with pytest.raises(InvalidSettingError, match="frame_cap"):
        load_video(saved.path)
