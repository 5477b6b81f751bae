"""core/media/save.py and writers: every output format; the frontend's own reading rules recover exactly what went in;
failures leave nothing."""
from __future__ import annotations

import dataclasses
import json
import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flipbook_pack.core.media import files as video_files
from flipbook_pack.core.media import save
from flipbook_pack.core.errors import InvalidSettingError, VideoWriteError
from flipbook_pack.core.media.readers import read_webp_metadata, read_workflow
from flipbook_pack.core.media.metadata import build_metadata, encode_value
from flipbook_pack.core.media.save import AudioTrack, VideoSettings, save_video
from flipbook_pack.core.media.writers import gif_durations

WAN_NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止"
WORKFLOW = {"nodes": [{"id": 1, "widgets_values": [WAN_NEGATIVE, "open { only", 'say "hi" }}', float("nan"), 1.5,
                                                   "back\\slash\nnew line", "emoji 🎞️"]}], "links": [], "version": 0.4}
PROMPT = {"1": {"class_type": "X", "inputs": {"text": "{a} and {{b}", "inf": float("inf")}}}
RESTORING = ("mp4", "webm", "webp", "png")


def _frames(n=4, h=16, w=16, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _expected(value):
    return json.loads(encode_value(value))


@pytest.mark.parametrize("fmt", RESTORING)
def test_each_format_restores_workflow_and_prompt(tmp_path, fmt):
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW})
    saved = save_video(_frames(), tmp_path, "sub/clip", fmt, VideoSettings(fps=8), meta)
    assert saved.path == tmp_path / "sub" / f"clip_00001_.{fmt}" and saved.sidecar is None and not saved.notes
    found = read_workflow(saved.path)
    assert found == {"workflow": _expected(WORKFLOW), "prompt": _expected(PROMPT)}
    data = saved.path.read_bytes()
    assert b"\xa9cmt" not in data and b"COMMENT" not in data and b"comment" not in data.lower()


def test_mp4_puts_moov_first(tmp_path):
    saved = save_video(_frames(), tmp_path, "clip", "mp4", VideoSettings(), build_metadata(PROMPT, None))
    data = saved.path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")


def test_gif_cannot_restore_so_a_sidecar_png_does(tmp_path):
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW})
    saved = save_video(_frames(), tmp_path, "clip", "gif", VideoSettings(loop=3), meta)
    assert saved.path.name == "clip_00001_.gif" and read_workflow(saved.path) == {}
    assert saved.sidecar == tmp_path / "clip_00001_.png" and "sidecar" in saved.notes[0]
    assert read_workflow(saved.sidecar) == {"workflow": _expected(WORKFLOW), "prompt": _expected(PROMPT)}
    from PIL import Image

    with Image.open(saved.path) as gif:
        assert gif.n_frames == 4 and gif.info["loop"] == 2  # NETSCAPE counts repeats: 3 plays = 2 repeats
    again = save_video(_frames(), tmp_path, "clip", "png", VideoSettings(), meta)
    assert again.path.name == "clip_00002_.png"  # one counter for all formats: no clash with the sidecar


def test_megabyte_workflow_restores_in_every_format(tmp_path):
    big = {"nodes": [{"id": i, "widgets_values": ["a{b}" * 10 + "z" * 600]} for i in range(1500)]}
    meta = build_metadata(PROMPT, {"workflow": big})
    assert 1_000_000 < len(meta["workflow"]) < 1_500_000
    for fmt in RESTORING:
        saved = save_video(_frames(2), tmp_path, fmt, fmt, VideoSettings(), meta)
        assert read_workflow(saved.path)["workflow"] == big, fmt


def test_webm_over_the_2mib_window_gets_a_sidecar_and_a_plain_note(tmp_path):
    huge = {"nodes": [{"id": i, "widgets_values": ["y" * 1000]} for i in range(2500)]}
    saved = save_video(_frames(2), tmp_path, "w", "webm", VideoSettings(), build_metadata(None, {"workflow": huge}))
    assert "too big" in saved.notes[0] and read_workflow(saved.sidecar)["workflow"] == huge


@pytest.mark.parametrize("count", [1, 3])
def test_still_looking_webp_is_written_as_an_animation_old_frontends_can_read(tmp_path, count):
    frames = torch.full((count, 17, 17, 3), 0.5)  # identical frames: libwebp would write a still image
    saved = save_video(frames, tmp_path, "s", "webp", VideoSettings(quality=100), build_metadata(PROMPT, None))
    assert b"ANMF" in saved.path.read_bytes()
    assert read_webp_metadata(saved.path, legacy_padding_bug=True)["prompt"] == _expected(PROMPT)
    from PIL import Image

    with Image.open(saved.path) as image:
        image.load()
        assert image.size == (17, 17)


def test_one_and_two_hundred_frames_and_odd_sizes(tmp_path):
    import av

    one = save_video(_frames(1, 17, 31), tmp_path, "one", "mp4", VideoSettings(), {})
    many = save_video(_frames(200, 8, 8), tmp_path, "many", "webm", VideoSettings(fps=24), {})
    for saved, frames, size in ((one, 1, (32, 18)), (many, 200, (8, 8))):
        with av.open(str(saved.path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == size
            assert sum(1 for _ in container.decode(stream)) == frames
    png = save_video(_frames(3, 17, 31), tmp_path, "odd", "png", VideoSettings(), {})
    from PIL import Image

    with Image.open(png.path) as image:
        assert image.size == (31, 17) and image.n_frames == 3  # image formats keep the exact size


def test_colours_survive_h264_with_bt709_tags(tmp_path):
    import av

    patches = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    frames = patches.repeat_interleave(16, 0)[None, :, None, :].expand(1, 64, 16, 3).contiguous()
    for pix_fmt in ("yuv420p", "yuv444p", "yuv420p10le"):
        saved = save_video(frames, tmp_path, pix_fmt, "mp4", VideoSettings(crf=0, pix_fmt=pix_fmt), {})
        with av.open(str(saved.path)) as container:
            context = container.streams.video[0].codec_context
            assert (context.colorspace, context.color_primaries, context.color_trc, context.color_range) == (1, 1, 1, 1)
            frame = next(container.decode(video=0))
            rgb = frame.reformat(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG",
                                 dst_color_range="JPEG").to_ndarray()
        for row, colour in zip((8, 24, 40, 56), patches):
            assert np.abs(rgb[row, 8] / 255.0 - colour.numpy()).max() < 0.03, (pix_fmt, colour)


def test_audio_is_muxed_and_the_workflow_still_restores(tmp_path):
    import av

    rate = 44100
    tone = np.sin(np.linspace(0, 2000 * np.pi, rate * 3, dtype=np.float32))[None].repeat(2, 0)
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW})
    for fmt in ("mp4", "webm"):
        saved = save_video(_frames(8), tmp_path, "a", fmt, VideoSettings(fps=8), meta, audio=AudioTrack(tone, rate))
        assert read_workflow(saved.path)["workflow"] == _expected(WORKFLOW)
        with av.open(str(saved.path)) as container:
            audio = container.streams.audio[0]
            samples = sum(f.samples for f in container.decode(audio))
            assert audio.codec_context.name in ("aac", "opus") and 0.9 < samples / audio.rate < 1.2  # cut to 1 s
    note = save_video(_frames(2), tmp_path, "a", "gif", VideoSettings(), {}, audio=AudioTrack(tone, rate)).notes
    assert "no audio" in note[0]


def test_pingpong_and_loop(tmp_path):
    from PIL import Image

    saved = save_video(_frames(5), tmp_path, "pp", "webp", VideoSettings(pingpong=True, loop=2), {})
    with Image.open(saved.path) as image:
        assert image.n_frames == 8 and image.info.get("loop") == 2


def test_names_are_unique_and_never_overwrite(tmp_path):
    first = save_video(_frames(1), tmp_path, "clip", "mp4", VideoSettings(), {})
    second = save_video(_frames(1), tmp_path, "clip", "mp4", VideoSettings(), {})
    assert (first.path.name, second.path.name) == ("clip_00001_.mp4", "clip_00002_.mp4")


def _break_writer(monkeypatch, fmt, error):
    def boom(path, *a, **k):
        path.write_bytes(b"partial")
        raise error

    monkeypatch.setattr(save, "FORMATS", {**save.FORMATS, fmt: dataclasses.replace(save.FORMATS[fmt], writer=boom)})


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, fmt):
    _break_writer(monkeypatch, fmt, OSError(28, "No space left on device"))
    with pytest.raises(VideoWriteError, match="No space left"):
        save_video(_frames(), tmp_path, "clip", fmt, VideoSettings(), build_metadata(PROMPT, None))
    assert list(tmp_path.rglob("*")) == []


class Cancelled(Exception):
    pass


def cancel_at(step):
    """A progress callback that cancels at `step`, as ComfyUI's progress hook does on Cancel."""
    def progress(done, total):
        if done == step:
            raise Cancelled()

    return progress


@pytest.mark.parametrize("fmt,frames,step", [("mp4", 8, 3), ("webp", 6, 2), ("png", 6, 2), ("gif", 6, 2)])
def test_cancel_mid_encode_leaves_nothing(tmp_path, fmt, frames, step):
    with pytest.raises(Cancelled):
        save_video(_frames(frames), tmp_path, "clip", fmt, VideoSettings(), {}, progress=cancel_at(step))
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(VideoWriteError, match="Cannot write"):
            save_video(_frames(), tmp_path, "clip", "mp4", VideoSettings(), {})
    finally:
        tmp_path.chmod(0o700)


def test_output_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "sub").write_text("not a folder")
    with pytest.raises(VideoWriteError, match="Cannot write"):
        save_video(_frames(), tmp_path, "sub/clip", "mp4", VideoSettings(), {})


@pytest.mark.parametrize("prefix", ["../escape", "/abs/clip", "a/../../b"])
def test_prefix_cannot_leave_the_output_folder(tmp_path, prefix):
    with pytest.raises(VideoWriteError):
        save_video(_frames(), tmp_path / "out", prefix, "mp4", VideoSettings(), {})


@pytest.mark.parametrize("fmt,change,match", [
    ("mp4", dict(fps=0), "fps"), ("mp4", dict(crf=60), "crf"), ("webm", dict(pix_fmt="yuv420p10le"), "pix_fmt"),
    ("webp", dict(quality=101), "quality"), ("avi", {}, "Unknown format"),
])
def test_bad_settings_write_nothing(tmp_path, fmt, change, match):
    with pytest.raises(InvalidSettingError, match=match):
        save_video(_frames(), tmp_path, "clip", fmt, VideoSettings(**change), {})
    with pytest.raises(InvalidSettingError):
        save_video(torch.rand(4, 16, 16), tmp_path, "clip", "mp4", VideoSettings(), {})
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=True, allow_infinity=True) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=20)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workflow=st.dictionaries(_text, _json, max_size=5), prompt=st.dictionaries(_text, _json, max_size=3))
def test_random_workflows_round_trip_through_every_format(tmp_path, workflow, prompt):
    meta = build_metadata(prompt, {"workflow": workflow})
    frames = _frames(2, 8, 8)
    for fmt in (*RESTORING, "gif"):
        saved = save_video(frames, tmp_path, f"h/{fmt}", fmt, VideoSettings(), meta)
        found = read_workflow(saved.sidecar or saved.path)
        assert found == {"workflow": _expected(workflow), "prompt": _expected(prompt)}, fmt


def test_outputs_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        saved = save_video(torch.rand(2, 8, 8, 3), tmp_path, "p", "gif", VideoSettings(),
                           build_metadata({"1": {}}, None))
    finally:
        os.umask(old)
    for path in (saved.path, saved.sidecar):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_sidecar_never_overwrites_and_prefixes_may_contain_glob_characters(tmp_path):
    (tmp_path / "c[1]_00001_.png").write_bytes(b"mine")
    saved = save_video(torch.rand(1, 8, 8, 3), tmp_path, "c[1]", "gif", VideoSettings(), build_metadata({"1": {}}, None))
    assert saved.path.name == "c[1]_00002_.gif" and (tmp_path / "c[1]_00001_.png").read_bytes() == b"mine"
    (tmp_path / "c[1]_00003_.png").write_bytes(b"also mine")
    first = save_video(torch.rand(1, 8, 8, 3), tmp_path, "c[1]", "mp4", VideoSettings(), {})
    assert first.path.name == "c[1]_00004_.mp4"


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


def test_browser_unfriendly_mp4_settings_are_noted(tmp_path):
    notes = save_video(torch.rand(2, 8, 8, 3), tmp_path, "n", "mp4", VideoSettings(pix_fmt="yuv444p"), {}).notes
    assert "browsers cannot play" in notes[0]
    assert save_video(torch.rand(2, 8, 8, 3), tmp_path, "n", "mp4", VideoSettings(), {}).notes == ()
