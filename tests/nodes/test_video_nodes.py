"""nodes/video_nodes.py: Save/Load Video nodes, their validation and re-run checks, native VIDEO interop,
and `flipbook demo --format` for every format."""
from __future__ import annotations

import json
import os
import types
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS, cli
from flipbook_pack.core.errors import InvalidSettingError, ModelFileNotFoundError
from flipbook_pack.core.media.readers import read_workflow
from flipbook_pack.core.media.save import VideoSettings, save_video
from flipbook_pack.core.media.load_video import load_video
from flipbook_pack.nodes import _comfy
from flipbook_pack.nodes.video_nodes import SAVE_VIDEO

ROOT = Path(__file__).resolve().parent.parent.parent


def _gradient(frames=6, h=24, w=40):
    y = torch.linspace(0, 1, h)[None, :, None, None].expand(frames, h, w, 1)
    x = torch.linspace(0, 1, w)[None, None, :, None].expand(frames, h, w, 1)
    t = torch.linspace(0, 1, frames)[:, None, None, None].expand(frames, h, w, 1)
    return torch.cat([x, y, t], dim=-1).contiguous()


@pytest.fixture()
def host(tmp_path):
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path / "models", output_dir=tmp_path / "out",
                                            input_dir=tmp_path / "in"))
    yield tmp_path
    _comfy.use_headless(None)


def test_load_video_round_trips_frames_colour_and_fps(tmp_path):
    frames = _gradient()
    saved = save_video(frames, tmp_path, "src", "mp4", VideoSettings(fps=12, crf=0, pix_fmt="yuv444p"), {})
    loaded = load_video(saved.path)
    assert loaded.frames.shape == (6, 24, 40, 3) and loaded.fps == pytest.approx(12)
    assert float((loaded.frames - frames).abs().mean()) < 0.01  # BT.709 in, BT.709 out: no colour shift


def test_load_video_cuts_and_resizes(tmp_path):
    saved = save_video(_gradient(frames=10, h=30, w=44), tmp_path, "src", "webm", VideoSettings(fps=10), {})
    loaded = load_video(saved.path, frame_cap=3, skip_first=2, every_nth=2, size_multiple=16)
    assert loaded.frames.shape == (3, 32, 48, 3) and loaded.fps == pytest.approx(5) and loaded.source_frames == 7


def test_load_video_errors(tmp_path):
    with pytest.raises(ModelFileNotFoundError):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InvalidSettingError, match="could not be decoded"):
        load_video(tmp_path / "bad.mp4")
    saved = save_video(_gradient(frames=2), tmp_path, "s", "mp4", VideoSettings(), {})
    with pytest.raises(InvalidSettingError, match="no frames left"):
        load_video(saved.path, skip_first=5)


def test_load_video_node_lists_the_input_folder(host):
    (host / "in").mkdir()
    save_video(_gradient(), host / "in", "clip", "mp4", VideoSettings(fps=8), {})
    (host / "in" / "notes.txt").write_text("x")
    node = NODE_CLASS_MAPPINGS["FlipbookLoadVideo"]
    spec = node.INPUT_TYPES()["required"]["video"]
    assert spec[0] == ["clip_00001_.mp4"] and spec[1]["video_upload"] is True
    frames, fps, count = node().execute(video="clip_00001_.mp4", frame_cap=4, skip_first=0, every_nth=1,
                                        size_multiple="8")
    assert frames.shape == (4, 24, 40, 3) and fps == pytest.approx(8) and count == 4


class _FakeVideo:
    def __init__(self, images, rate, audio=None):
        self._parts = types.SimpleNamespace(images=images, frame_rate=Fraction(rate), audio=audio)

    def get_components(self):
        return self._parts


def test_save_node_takes_a_native_video_with_its_own_rate_and_sound(host):
    rate = 16000
    audio = {"waveform": torch.zeros(1, 1, rate * 2), "sample_rate": rate}
    out = SAVE_VIDEO.run(filename_prefix="native", fps=99.0, format="mp4", crf=19, pix_fmt="yuv420p", loop=0,
                         pingpong=False, quality=90, video=_FakeVideo(_gradient(frames=8), 16, audio),
                         prompt={"1": {"class_type": "X", "inputs": {}}})
    import av

    path = host / "out" / out.ui["images"][0]["filename"]
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == 16 and len(container.streams.audio) == 1
    assert read_workflow(path)["prompt"] == {"1": {"class_type": "X", "inputs": {}}}
    with pytest.raises(InvalidSettingError, match="Connect frames"):
        SAVE_VIDEO.run(filename_prefix="x", fps=8.0, format="mp4", crf=19, pix_fmt="yuv420p", loop=0,
                       pingpong=False, quality=90)


def test_frames_to_video_uses_comfyuis_own_video_class(monkeypatch):
    from flipbook_pack.nodes.video_nodes import FRAMES_TO_VIDEO

    class VideoFromComponents:
        def __init__(self, components):
            self.components = components

    api = types.SimpleNamespace(Types=types.SimpleNamespace(VideoComponents=lambda **kw: types.SimpleNamespace(**kw)),
                                InputImpl=types.SimpleNamespace(VideoFromComponents=VideoFromComponents))
    monkeypatch.setattr(_comfy, "v3_api", lambda: api)
    (video,) = FRAMES_TO_VIDEO.run(images=_gradient(), fps=12.5).outputs
    assert isinstance(video, VideoFromComponents) and video.components.frame_rate == Fraction(25, 2)
    assert _comfy.has_video_api()


@pytest.mark.parametrize("fmt", ["webm", "webp", "png", "gif"])
def test_demo_writes_every_format(tmp_path, capsys, fmt):
    assert cli.main(["demo", "lightning", "--format", fmt, "--models-dir", str(tmp_path / "m"),
                     "--output-dir", str(tmp_path / "out")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.suffix == f".{fmt}"
    restored = read_workflow(path.with_suffix(".png") if fmt == "gif" else path)
    workflow = json.loads((ROOT / "workflows" / "lightning_4step_t2v.json").read_text())
    assert restored["workflow"]["nodes"] == workflow["nodes"]
    assert restored["prompt"]["3"]["inputs"]["format"] == fmt


def test_save_settings_are_validated_when_queued():
    import inspect

    node = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"]
    assert node.VALIDATE_INPUTS(format="mp4", crf=19, pix_fmt="yuv420p") is True
    assert "0-51" in node.VALIDATE_INPUTS(format="mp4", crf=60, pix_fmt="yuv420p")
    assert "pix_fmt" in node.VALIDATE_INPUTS(format="webm", crf=30, pix_fmt="yuv420p10le")
    assert node.VALIDATE_INPUTS(format="mp4", crf=None, pix_fmt="yuv420p") is True  # linked: checked at run
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    assert spec.varkw is None and {"format", "crf", "pix_fmt"} <= set(spec.args)  # keeps ComfyUI's min/max checks


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


def _save_args(**change):
    args = dict(filename_prefix="clip", fps=8.0, format="mp4", crf=19, pix_fmt="yuv420p", loop=0, pingpong=False,
                quality=90)
    return {**args, **change}


@pytest.mark.parametrize("prefix,rule", [
    ("../escape", "contains '..'"),
    ("/abs/clip", "is an absolute path"),
    ("bad\x00name", "contains a NUL byte"),
    ("y" * 215, "is 215 bytes, but at most 214 fit"),  # the temp '.NAME.<owner>.partial.webm' would pass 255
    ("sub/" + "z" * 300, "shorten the part after the last '/'"),
])
def test_filename_prefix_is_refused_when_queued_naming_the_prefix_and_the_rule(host, prefix, rule):
    check = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"].VALIDATE_INPUTS
    message = check(filename_prefix=prefix, fps=8.0, format="mp4", crf=19, pix_fmt="yuv420p")
    assert isinstance(message, str) and message.startswith(f"filename_prefix {repr(prefix)[:30]}") and rule in message
    assert "\n" not in message and "output folder." not in message and "Cannot write" not in message
    assert not (host / "out").exists()
    with pytest.raises(InvalidSettingError) as caught:  # the run itself applies the same rule
        SAVE_VIDEO.run(**_save_args(filename_prefix=prefix), images=_gradient(frames=2))
    assert str(caught.value) == message and not (host / "out").exists()


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 0.05, 240.5, "8", True])
def test_fps_is_checked_when_queued_with_comfyuis_range_repeated(fps):
    message = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"].VALIDATE_INPUTS(filename_prefix="ok", fps=fps)
    assert isinstance(message, str) and message.startswith(f"fps={fps!r}") and "\n" not in message


def test_good_and_linked_save_inputs_pass_when_queued():
    import inspect

    check = NODE_CLASS_MAPPINGS["FlipbookSaveVideo"].VALIDATE_INPUTS
    assert check(filename_prefix="flipbook/cat", fps=23.976, format="webm", crf=30, pix_fmt="yuv444p") is True
    assert check(filename_prefix="", fps=0.1, format="gif", crf=0, pix_fmt="yuv420p") is True  # "" = "flipbook"
    assert check(filename_prefix=None, fps=None, format="mp4", crf=None, pix_fmt=None) is True  # linked
    assert "crf=60" in check(filename_prefix=None, fps=None, format="mp4", crf=60, pix_fmt="yuv420p")
    both = check(filename_prefix="../x", fps=float("nan"))
    assert "filename_prefix '../x'" in both and "fps=nan" in both and "\n" not in both
    spec = inspect.getfullargspec(check)
    assert {"filename_prefix", "fps", "format", "crf", "pix_fmt"} <= set(spec.args) and spec.varkw is None


def test_bad_prefix_stops_the_workflow_when_queued(host):
    from flipbook_pack.core.errors import WorkflowError
    from flipbook_pack.nodes.headless import validate_prompt

    prompt = {"3": {"class_type": "FlipbookSaveVideo", "inputs": {**_save_args(filename_prefix="../../etc/x"),
                                                                  "images": ["2", 0]}}}
    with pytest.raises(WorkflowError, match=r"filename_prefix '\.\./\.\./etc/x' contains '\.\.'"):
        validate_prompt(prompt, NODE_CLASS_MAPPINGS)
    assert not (host / "out").exists()


@pytest.mark.parametrize("audio,rule", [
    ({"waveform": torch.zeros(2, 16000), "sample_rate": 16000}, "waveform of shape [2, 16000], but ComfyUI's AUDIO"),
    ({"waveform": torch.zeros(1, 2, 16000), "sample_rate": 0}, "sample_rate=0"),
    ({"waveform": torch.zeros(1, 2, 0), "sample_rate": 16000}, "Audio has no samples"),
    ({"waveform": torch.zeros(0, 2, 16000), "sample_rate": 16000}, "waveform of shape [0, 2, 16000]"),
    ({"sample_rate": 16000}, "dict without 'waveform'"),
])
def test_bad_audio_is_a_typed_error_naming_the_problem(host, audio, rule):
    with pytest.raises(InvalidSettingError) as caught:
        SAVE_VIDEO.run(**_save_args(), images=_gradient(frames=8), audio=audio)
    assert rule in str(caught.value) and "\n" not in str(caught.value)
    assert not (host / "out").exists()


def test_nan_frames_from_a_native_video_are_refused(host):
    from flipbook_pack.core.errors import NonFiniteResultError

    frames = _gradient(frames=3)
    frames[1] = float("nan")
    with pytest.raises(NonFiniteResultError, match=r"1 of 3 frames \(frame 1\)"):
        SAVE_VIDEO.run(**_save_args(), video=_FakeVideo(frames, 8))
    endless = types.SimpleNamespace(get_components=lambda: types.SimpleNamespace(
        images=_gradient(frames=3), frame_rate=float("inf"), audio=None))
    with pytest.raises(InvalidSettingError, match="fps=inf"):
        SAVE_VIDEO.run(**_save_args(), video=endless)
    assert not (host / "out").exists()


def test_frames_to_video_checks_its_frame_rate_when_queued():
    from flipbook_pack.nodes.video_nodes import FRAMES_TO_VIDEO

    check = FRAMES_TO_VIDEO.validate
    assert check(None, fps=8.0) is True and check(None) is True
    assert "fps=nan must be a finite number" in check(None, fps=float("nan"))
    assert "is not a number" in check(None, fps="fast")
