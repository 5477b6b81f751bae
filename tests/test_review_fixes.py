"""Regressions for defects found in review: odd real-world files, permissions, names, notes."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from flipbook_pack.core import checkpoints
from flipbook_pack.core.errors import (ModelFileNotFoundError, SettingsMismatchError, UnsupportedCheckpointError,
                                       VideoWriteError)
from flipbook_pack.core.media.readers import read_workflow
from flipbook_pack.core.media.metadata import build_metadata
from flipbook_pack.core.media.save import VideoSettings, save_video
from flipbook_pack.lightning import motion_module as MM
from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import sd15_checkpoint as S
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning import variants as V
from flipbook_pack.nodes import _comfy


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


def test_clip_keys_without_the_text_model_level_load(tmp_path):
    state = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in T.tiny_sd15_state_dict().items()}
    parts = S.load_sd15_checkpoint(T.write_safetensors(state, tmp_path / "old_layout.safetensors"))
    assert parts.text_encoder.config.num_hidden_layers == 2


def test_inpainting_checkpoints_are_refused_at_load(tmp_path):
    state = T.tiny_sd15_state_dict()
    key = S.UNET_PREFIX + "input_blocks.0.0.weight"
    state[key] = torch.randn(state[key].shape[0], 9, 3, 3)
    with pytest.raises(UnsupportedCheckpointError, match="inpainting"):
        S.load_sd15_checkpoint(T.write_safetensors(state, tmp_path / "inpaint.safetensors"))


def test_renamed_lightning_file_needs_an_explicit_variant():
    info = MM.inspect_motion_module(T.tiny_motion_state_dict())
    with pytest.raises(SettingsMismatchError, match="size of an AnimateDiff-Lightning file"):
        P.resolve_variant("auto", "my_motion.safetensors", info, file_size=908_929_664)
    variant, notes = P.resolve_variant("lightning_8step", "animatediff_lightning_4step_comfyui.safetensors", info)
    assert variant.id == "lightning_8step" and "named as AnimateDiff-Lightning 4-step" in notes[0]
    assert P.resolve_variant("auto", "mm_sd_v15_v2.safetensors", info, file_size=1234)[0].id == "animatediff_v2"


def test_steps_message_names_modules_that_exist():
    with pytest.raises(SettingsMismatchError, match="pick the Lightning module for 1, 2, 4 or 8 steps"):
        V.check_settings(V.VARIANTS["lightning_4step"], V.SamplingSettings(6, 1.0, "trailing"))
    with pytest.raises(SettingsMismatchError, match="pick the AnimateDiff-Lightning 8-step motion module"):
        V.check_settings(V.VARIANTS["lightning_4step"], V.SamplingSettings(8, 1.0, "trailing"))


def test_fill_notes_reach_the_node_ui(tiny_models, tmp_path):
    from flipbook_pack.nodes.lightning_nodes import LOADER, SAMPLER

    root, _ = tiny_models
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=root, output_dir=tmp_path))
    try:
        (model,) = LOADER.run(ckpt_name="tiny_sd15.safetensors", variant="auto", policy="fill",
                              motion_model="animatediff_lightning_4step_comfyui.safetensors").outputs
        result = SAMPLER.run(model=model, prompt="a", negative="", seed=0, frames=2, width=64, height=64, steps=9,
                             cfg=1.0, scheduler="trailing", motion_scale=1.0)
    finally:
        _comfy.use_headless(None)
    assert result.ui["flipbook_notes"] == ["steps 9 -> 4 (policy 'fill', AnimateDiff-Lightning 4-step)"]


def test_timesteps_reach_the_unet_as_float32(lightning_model):
    seen = []
    handle = lightning_model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].dtype))
    try:
        P.generate(lightning_model, P.GenerationRequest(prompt="a", frames=2, width=64, height=64))
    finally:
        handle.remove()
    assert seen == [torch.float32] * 4


def test_motion_files_hotshot_pe_and_diffusers_without_pe():
    with pytest.raises(UnsupportedCheckpointError, match="HotShot"):
        MM.inspect_motion_module({"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
                                  "attention_blocks.0.pos_encoder.positional_encoding": torch.ones(1)})
    state = {k: v for k, v in T.tiny_motion_state_dict(layout="diffusers").items() if not k.endswith(".pe")}
    info = MM.inspect_motion_module(state)
    assert (info.layout, info.version, info.max_frames) == ("diffusers", "v2", 32)
    assert len(MM.motion_weights(state, info)) == 567


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
