"""core/media/readers.py: the frontend's reading rules (MP4 window, strict JSON) on saved files."""
from __future__ import annotations

import json

import torch

from flipbook_pack.core.media.readers import read_mp4_metadata, read_png_metadata, read_workflow
from flipbook_pack.core.media.metadata import build_metadata, encode_value
from flipbook_pack.core.media.save import VideoSettings, save_video

PROMPT = {"1": {"class_type": "X", "inputs": {"text": "{a} and {{b}", "inf": float("inf")}}}


def _frames(n=4, h=16, w=16, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _expected(value):
    return json.loads(encode_value(value))


def test_mp4_reader_follows_the_64mib_window_rule(tmp_path):
    saved = save_video(_frames(), tmp_path, "clip", "mp4", VideoSettings(), build_metadata(PROMPT, None))
    assert read_mp4_metadata(saved.path)["prompt"] == _expected(PROMPT)


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
