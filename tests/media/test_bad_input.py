"""Bad input to Save Video and Load Video: each gets a typed error whose one-line message names what was
received and the rule, and a refused save leaves the output folder exactly as it was (no file, no .partial)."""
from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch

from flipbook_pack.core.errors import (FilenamePrefixError, InvalidSettingError, NonFiniteResultError,
                                       VideoWriteError)
from flipbook_pack.core.media import files as video_files
from flipbook_pack.core.media.load_video import load_video
from flipbook_pack.core.media.save import FORMATS, AudioTrack, VideoSettings, save_video


@pytest.fixture()
def out(tmp_path):
    """An output folder with a user's file and a fresh temp file of another save in it, to prove nothing moves."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    (folder / ".other.abcd1234.partial.mp4").write_bytes(b"someone else's save in progress")
    return folder


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def refused(folder, error, call):
    """Run `call`, expect `error`; the folder is untouched and the message is one line."""
    before = snapshot(folder)
    with pytest.raises(error) as caught:
        call()
    assert snapshot(folder) == before
    message = str(caught.value)
    assert "\n" not in message and message
    return message


def _frames(n=4):
    return torch.rand(n, 16, 16, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
@pytest.mark.parametrize("where,value,expect", [
    ("all", float("nan"), "4 of 4 frames (frame 0, 1, 2, 3)"),
    (2, float("nan"), "1 of 4 frames (frame 2)"),
    (1, float("inf"), "1 of 4 frames (frame 1)"),
    (3, float("-inf"), "1 of 4 frames (frame 3)"),
])
def test_nan_or_inf_frames_are_refused(out, fmt, where, value, expect):
    frames = _frames()
    if where == "all":
        frames[:] = value
    else:
        frames[where, 5, 7, 1] = value
    message = refused(out, NonFiniteResultError,
                      lambda: save_video(frames, out, "clip", fmt, VideoSettings(), {}))
    assert expect in message and "NaN/infinite" in message and "finite values 0..1" in message


def test_nan_in_half_precision_and_in_a_subfolder_is_refused_before_the_folder_is_made(out):
    frames = _frames().half()
    frames[0, 0, 0, 0] = float("nan")
    refused(out, NonFiniteResultError, lambda: save_video(frames, out, "sub/clip", "webm", VideoSettings(), {}))
    assert not (out / "sub").exists()


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), float("-inf"), 0, 0.0, -8.0, 240.5])
def test_fps_that_is_not_finite_or_not_positive_is_refused(out, fps):
    message = refused(out, InvalidSettingError,
                      lambda: save_video(_frames(), out, "clip", "mp4", VideoSettings(fps=fps), {}))
    assert message.startswith(f"fps={fps!r}: ") and "finite number above 0 and at most 240" in message


LONG = "x" * (video_files.max_name_bytes() + 1)


@pytest.mark.parametrize("prefix,rule", [
    ("../escape", "contains '..'"),
    ("a/../../b", "contains '..'"),
    ("/abs/clip", "is an absolute path"),
    ("\\\\server\\share\\clip", "is an absolute path"),
    ("C:/clip", "is an absolute path"),
    ("bad\x00name", "contains a NUL byte"),
    (LONG, f"is {len(LONG)} bytes, but at most {len(LONG) - 1} fit"),
    ("d" * 256 + "/clip", "over the 255-byte limit"),
    ("é" * (video_files.max_name_bytes() // 2 + 1), "bytes, but at most"),  # two bytes each in UTF-8
])
def test_bad_prefixes_are_refused_by_the_prefix_rule(out, prefix, rule):
    message = refused(out, FilenamePrefixError, lambda: save_video(_frames(), out, prefix, "gif", VideoSettings(), {}))
    assert message.startswith("filename_prefix ") and rule in message
    assert repr(prefix)[:20] in message  # names the prefix (cut short when long)
    assert "Check the output folder" not in message and "Cannot write" not in message
    with pytest.raises(FilenamePrefixError) as again:
        video_files.check_filename_prefix(prefix)
    assert str(again.value) == message  # the validator's rule is the save's rule
    assert isinstance(again.value, VideoWriteError) and isinstance(again.value, InvalidSettingError)


@pytest.mark.parametrize("fmt", ["webm", "gif"])
def test_the_longest_accepted_prefix_saves_with_its_sidecar_and_temp_files(tmp_path, fmt):
    base = "n" * video_files.max_name_bytes()
    assert max(len(name) for name in video_files._names_for(base)) == video_files.NAME_MAX
    assert all(len(spec.suffix) <= len(video_files.LONGEST_SUFFIX) for spec in FORMATS.values())
    saved = save_video(_frames(2), tmp_path, f"sub/{base}", fmt, VideoSettings(), {"prompt": "{}"})
    assert saved.path.name == f"{base}_00001_.{fmt}"
    assert sorted(p.name for p in saved.path.parent.iterdir()) == sorted(
        [saved.path.name] + ([saved.sidecar.name] if saved.sidecar else []))


@pytest.mark.parametrize("audio,rule", [
    (AudioTrack(np.zeros((2, 8000), np.float32), 0), "sample_rate=0: it must be a whole number"),
    (AudioTrack(np.zeros((2, 8000), np.float32), -44100), "sample_rate=-44100"),
    (AudioTrack(np.zeros((2, 8000), np.float32), float("nan")), "sample_rate=nan"),
    (AudioTrack(np.zeros((2, 8000), np.float32), 44100.5), "sample_rate=44100.5"),
    (AudioTrack(np.zeros((2, 0), np.float32), 44100), "Audio has no samples"),
    (AudioTrack(np.zeros((0, 8000), np.float32), 44100), "Audio has no samples"),
    (AudioTrack(np.zeros(8000, np.float32), 44100), "must be [channels, samples]"),
])
def test_audio_the_encoder_cannot_take_is_refused(out, audio, rule):
    message = refused(out, InvalidSettingError,
                      lambda: save_video(_frames(8), out, "clip", "mp4", VideoSettings(), {}, audio=audio))
    assert rule in message


def test_a_whole_number_float_sample_rate_still_saves(tmp_path):
    audio = AudioTrack(np.zeros((1, 8000), np.float32), 8000.0)
    saved = save_video(_frames(8), tmp_path, "clip", "mp4", VideoSettings(), {}, audio=audio)
    with av.open(str(saved.path)) as container:
        assert len(container.streams.audio) == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(frame_cap=-1), "frame_cap=-1 must be 0 (all frames) or more."),
    (dict(skip_first=-3), "skip_first=-3 must be 0 or more."),
    (dict(every_nth=0), "every_nth=0 must be 1 (every frame) or more."),
    (dict(size_multiple=12), "size_multiple=12 must be one of 1, 8, 16, 32, 64."),
    (dict(every_nth=0, size_multiple=3), "every_nth=0 must be 1 (every frame) or more; size_multiple=3 must be"),
])
def test_load_video_names_only_the_wrong_value(tmp_path, kwargs, message):
    saved = save_video(_frames(2), tmp_path, "clip", "mp4", VideoSettings(), {})
    with pytest.raises(InvalidSettingError) as caught:
        load_video(saved.path, **kwargs)
    assert str(caught.value).startswith(message)
    named = {"frame_cap", "skip_first", "every_nth", "size_multiple"} - set(kwargs)
    assert not any(name in str(caught.value) for name in named)  # the right values are not lectured about


def _audio_stream(container, codec):
    stream = container.add_stream(codec, rate=48000, layout="mono")
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 48000), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 48000, 0
    resampler = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=48000,
                                  frame_size=stream.codec_context.frame_size)
    for chunk in [*resampler.resample(frame), *resampler.resample(None), None]:
        container.mux(stream.encode(chunk))


def _audio_only_mp4(path):
    with av.open(str(path), "w") as container:
        _audio_stream(container, "aac")
    return path


def _empty_video_webm(path):
    """A video stream with no frames (next to a short audio track)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9", rate=8)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        _audio_stream(container, "libopus")
        container.mux(video.encode())
    return path


def _streamless(path, fmt):
    """A container header with a video stream declared and nothing written: ffmpeg keeps no stream (mp4), or
    the file ends before the first packet (webm)."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264" if fmt == "mp4" else "libvpx-vp9", rate=8)
    video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
    container.start_encoding()
    container.close()
    return path


@pytest.mark.parametrize("make,expect", [
    (lambda d: _audio_only_mp4(d / "song.mp4"), "song.mp4 has no video stream, only audio;"),
    (lambda d: _empty_video_webm(d / "empty.webm"), "empty.webm has a video stream with no frames in it"),
    (lambda d: _streamless(d / "bare.mp4", "mp4"), "bare.mp4 has no video frames (no streams at all)"),
    (lambda d: _streamless(d / "bare.webm", "webm"), "bare.webm has no video frames (it ends before the first one)"),
    (lambda d: (d / "zero.mp4").write_bytes(b"") or d / "zero.mp4", "zero.mp4 is empty (0 bytes)"),
])
def test_audio_only_and_zero_frame_files_say_so(tmp_path, make, expect):
    path = make(tmp_path)
    with pytest.raises(InvalidSettingError) as caught:
        load_video(path)
    assert str(caught.value).startswith(expect) and "index out of range" not in str(caught.value)


def test_output_folder_symlink_escape_is_a_prefix_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
    with pytest.raises(FilenamePrefixError, match="through a symbolic link"):
        save_video(_frames(), tmp_path / "out", "link/clip", "mp4", VideoSettings(), {})
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_nan_only_in_the_dropped_alpha_channel_still_saves(tmp_path):
    frames = torch.rand(2, 8, 8, 4)
    frames[..., 3] = float("nan")
    assert save_video(frames, tmp_path, "rgba", "png", VideoSettings(), {}).path.exists()


def test_a_linked_crf_that_is_not_a_whole_number_is_a_typed_error(tmp_path):
    from flipbook_pack.core.errors import InvalidSettingError
    from flipbook_pack.core.media.save import check_format_settings

    with pytest.raises(InvalidSettingError, match="crf='abc' is not a whole number"):
        check_format_settings("mp4", "abc", "yuv420p")
    assert not any(tmp_path.iterdir())
