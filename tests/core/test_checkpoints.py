"""core/checkpoints.py: safetensors header checks, truncated files, code-free pickles, missing files,
unknown suffixes."""
from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flipbook_pack.core import checkpoints
from flipbook_pack.core.errors import (CorruptFileError, ModelFileNotFoundError, UnsafeFileError,
                                       UnsupportedCheckpointError, VideoWriteError)
from flipbook_pack.core.media.readers import read_workflow
from flipbook_pack.core.media.save import VideoSettings, save_video
from flipbook_pack.nodes import _comfy


def test_truncated_safetensors(tiny_models, tmp_path):
    data = tiny_models[1]["original"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut short"):
        checkpoints.load_state_dict(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        checkpoints.load_state_dict(garbage)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CorruptFileError):
        checkpoints.load_state_dict(tmp_path / "tiny.safetensors")


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


def test_pickles_with_code_are_refused_and_plain_tensor_pickles_load(tmp_path):
    evil = tmp_path / "mm_evil.ckpt"
    evil.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(UnsafeFileError, match="would run code when loaded") as info:
        checkpoints.load_state_dict(evil)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message  # one clean line
    assert ".safetensors" in message
    plain = tmp_path / "mm_plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, plain)
    assert torch.equal(checkpoints.load_state_dict(plain)["a"], torch.ones(2))


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="not found"):
        checkpoints.load_state_dict(tmp_path / "nope.safetensors")


def test_unknown_suffixes_and_headless_paths_outside_the_folders(tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(UnsupportedCheckpointError, match=r"not \.pkl"):
        checkpoints.load_state_dict(tmp_path / "model.pkl")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path / "models", output_dir=tmp_path))
    try:
        with pytest.raises(ModelFileNotFoundError, match="outside"):
            _comfy.model_path("checkpoints", "../../secret.safetensors")
        with pytest.raises(ModelFileNotFoundError, match="outside"):
            _comfy.input_path("../secret.safetensors")
    finally:
        _comfy.use_headless(None)
    with pytest.raises(VideoWriteError):
        save_video(torch.rand(1, 8, 8, 3), tmp_path, "../up", "mp4", VideoSettings(), {})
    assert read_workflow(tmp_path / "nothing.gif") == {}


def test_a_file_replaced_after_loading_is_not_read_again(tmp_path):
    import os

    from flipbook_pack.core.errors import ModelFileChangedError
    from flipbook_pack.core.tiny_weights import write_safetensors

    path = write_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    seen = checkpoints.file_fingerprint(path)
    assert checkpoints.load_state_dict(path, expect=seen)["w"].tolist() == [1.0, 1.0]
    write_safetensors({"w": torch.zeros(3)}, path)
    os.utime(path, ns=(seen[1] + 10**9, seen[1] + 10**9))
    with pytest.raises(ModelFileChangedError, match="m.safetensors changed on disk.*Run the loader node again"):
        checkpoints.load_state_dict(path, expect=seen)


def test_shared_reads_unpickle_a_ckpt_once(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "b": torch.zeros(1)}}, path)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(1), real(*a, **k))[1])
    with checkpoints.shared_reads():
        first = checkpoints.load_state_dict(path)
        first.pop("a")  # callers get their own dict
        assert set(checkpoints.load_state_dict(path)) == {"a", "b"}
    checkpoints.load_state_dict(path)
    assert len(loads) == 2


def _safetensors_bytes(header) -> bytes:
    import json
    import struct

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(16)


@pytest.mark.parametrize("header,match", [
    ([1, 2, 3], "header is a JSON list, not an object"),
    ("text", "header is a JSON str"),
    ({"w": [1]}, "'w' has no known dtype"),
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 4]}}, "no known dtype"),
    ({"w": {"dtype": "F16", "shape": "2", "data_offsets": [0, 4]}}, "malformed shape"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [4]}}, "malformed data_offsets"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}, "out of order"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 400]}}, "cut short"),
    ({"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, "needs a different size"),
    ({"__metadata__": {"a": 1}}, "__metadata__ is not a map of text to text"),
])
def test_malformed_headers_are_typed_errors(tmp_path, header, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header))
    with pytest.raises(CorruptFileError, match=match):
        checkpoints.read_safetensors_header(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), header=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12))
def test_any_bytes_give_a_header_or_a_typed_error(tmp_path, data, header):
    for content in (data, _safetensors_bytes(header)):
        path = tmp_path / "any.safetensors"
        path.write_bytes(content)
        try:
            found = checkpoints.read_safetensors_header(path)
        except CorruptFileError:
            continue
        assert isinstance(found, dict)
