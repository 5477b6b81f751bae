"""MP4 output: the frontend's reader recovers exactly what went in; failures leave nothing behind."""
from __future__ import annotations

import json
import os

import pytest
import torch

from flipbook_pack.core.errors import InvalidSettingError, VideoWriteError
from flipbook_pack.core.media_readers import read_mp4_metadata
from flipbook_pack.core.metadata import build_metadata, encode_value
from flipbook_pack.core.video import VideoSettings, save_mp4

WAN_NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止"
WORKFLOW = {"nodes": [{"id": 1, "widgets_values": [WAN_NEGATIVE, "open { only", 'say "hi" }}', float("nan"), 1.5]}],
            "links": [], "version": 0.4}
PROMPT = {"1": {"class_type": "X", "inputs": {"text": "{a} and {{b}", "inf": float("inf")}}}


def _frames(n=4, h=16, w=16):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_encoding_is_ascii_single_json_null_for_nonfinite_and_no_raw_braces_in_strings():
    text = encode_value(WORKFLOW)
    assert text.isascii() and "NaN" not in text
    decoded = json.loads(text)
    assert decoded["nodes"][0]["widgets_values"] == [WAN_NEGATIVE, "open { only", 'say "hi" }}', None, 1.5]
    body = text.replace("\\u007b", "").replace("\\u007d", "")
    assert body.count("{") == body.count("}")  # brace counting finds the true end of the JSON


def test_metadata_keys_and_disable_flag():
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW, "extra": [1]})
    assert set(meta) == {"workflow", "extra", "prompt"}
    assert build_metadata(PROMPT, None) == {"prompt": encode_value(PROMPT)}
    assert build_metadata(PROMPT, {"workflow": WORKFLOW}, disabled=True) == {}


def test_mp4_round_trips_workflow_and_prompt_via_the_frontend_rules(tmp_path):
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW})
    saved = save_mp4(_frames(), tmp_path, "sub/clip", VideoSettings(fps=8), meta)
    assert saved.path == tmp_path / "sub" / "clip_00001_.mp4" and saved.subfolder == "sub"
    found = read_mp4_metadata(saved.path)
    assert found["workflow"] == json.loads(encode_value(WORKFLOW))
    assert found["prompt"]["1"]["inputs"] == {"text": "{a} and {{b}", "inf": None}
    data = saved.path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: restorable at any size
    assert b"\xa9cmt" not in data and b"comment" not in data.lower()


def test_frames_fps_and_even_padding(tmp_path):
    import av

    saved = save_mp4(_frames(n=16, h=17, w=31), tmp_path, "odd", VideoSettings(fps=12.5), {})
    with av.open(str(saved.path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (32, 18)
        assert sum(1 for _ in container.decode(stream)) == 16
        assert float(stream.average_rate) == pytest.approx(12.5)


def test_names_are_unique_and_never_overwrite(tmp_path):
    first = save_mp4(_frames(1), tmp_path, "clip", VideoSettings(), {})
    second = save_mp4(_frames(1), tmp_path, "clip", VideoSettings(), {})
    assert (first.path.name, second.path.name) == ("clip_00001_.mp4", "clip_00002_.mp4")


def test_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    from flipbook_pack.core import video

    def boom(path, *a, **k):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(video, "encode_mp4", boom)
    with pytest.raises(VideoWriteError, match="disk full"):
        save_mp4(_frames(), tmp_path, "clip", VideoSettings(), {})
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(VideoWriteError, match="Cannot write"):
            save_mp4(_frames(), tmp_path, "clip", VideoSettings(), {})
    finally:
        tmp_path.chmod(0o700)


def test_output_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "sub").write_text("not a folder")
    with pytest.raises(VideoWriteError, match="Cannot write"):
        save_mp4(_frames(), tmp_path, "sub/clip", VideoSettings(), {})


@pytest.mark.parametrize("prefix", ["../escape", "/abs/clip", "a/../../b"])
def test_prefix_cannot_leave_the_output_folder(tmp_path, prefix):
    with pytest.raises(VideoWriteError):
        save_mp4(_frames(), tmp_path / "out", prefix, VideoSettings(), {})


def test_bad_frames_and_fps_write_nothing(tmp_path):
    with pytest.raises(InvalidSettingError):
        save_mp4(torch.rand(4, 16, 16), tmp_path, "clip", VideoSettings(), {})
    with pytest.raises(InvalidSettingError, match="fps"):
        save_mp4(_frames(), tmp_path, "clip", VideoSettings(fps=0), {})
    assert list(tmp_path.rglob("*.mp4")) == [] and not any(p.is_file() for p in tmp_path.rglob("*"))
