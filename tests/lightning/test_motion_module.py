"""lightning/motion_module.py: AnimateDiff motion modules in both real layouts (tiny_models' files), detection,
versions, refused layouts, and positional encodings."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import UnsupportedCheckpointError
from flipbook_pack.lightning import motion_module as MM
from flipbook_pack.lightning import tiny_models as T

# keys copied from a real file's listing (AnimateDiff-Lightning _comfyui)
REAL_ORIGINAL_MOTION_KEYS = [
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.1.weight",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.bias",
    "up_blocks.3.motion_modules.2.temporal_transformer.proj_out.weight",
    "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight",
]


def test_motion_layouts_have_the_real_tensor_counts_and_keys():
    original = T.tiny_motion_state_dict(layout="original")
    diffusers = T.tiny_motion_state_dict(layout="diffusers")
    assert len(original) == 588 and len(diffusers) == 567  # = the published Lightning files
    assert set(REAL_ORIGINAL_MOTION_KEYS) <= set(original)
    assert "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe" in diffusers
    assert len(T.tiny_motion_state_dict(layout="original", family="sdxl")) == 420  # = mm_sdxl_v10_beta


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_motion_module_detection(layout):
    info = MM.inspect_motion_module(T.tiny_motion_state_dict(layout=layout))
    assert (info.layout, info.family, info.version, info.max_frames) == (layout, "sd15", "v2", 32)
    assert info.channels == (32, 64, 128, 128) and info.layers_per_block == 2


def test_version_rules_follow_pe_length_and_mid_block():
    state = T.tiny_motion_state_dict()
    no_mid = {k: v for k, v in state.items() if not k.startswith("mid_block.")}
    assert MM.inspect_motion_module(no_mid).version == "v3"
    short = {k: (v[:, :24] if k.endswith(".pe") else v) for k, v in no_mid.items()}
    info = MM.inspect_motion_module(short)
    assert (info.version, info.max_frames) == ("v1", 24)
    sdxl = MM.inspect_motion_module(T.tiny_motion_state_dict(family="sdxl"))
    assert (sdxl.family, sdxl.version, sdxl.channels) == ("sdxl", "v1", (32, 64, 128))  # ADE: v3 is SD1.5 only


def test_both_layouts_load_to_identical_weights():
    a = MM.build_motion_adapter(T.tiny_motion_state_dict(layout="original"),
                                MM.inspect_motion_module(T.tiny_motion_state_dict(layout="original")), torch.float32)
    d_state = T.tiny_motion_state_dict(layout="diffusers")
    d = MM.build_motion_adapter(d_state, MM.inspect_motion_module(d_state), torch.float32)
    for (ka, va), (kd, vd) in zip(sorted(a.state_dict().items()), sorted(d.state_dict().items())):
        assert ka == kd and torch.equal(va, vd)


@pytest.mark.parametrize("state,match", [
    ({"down_blocks.0.temporal_attentions.0.weight": torch.ones(1)}, "HotShot"),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.ones(1)}, "AnimateLCM"),
    ({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, "not an AnimateDiff motion module"),
])
def test_unknown_motion_layouts_are_refused(state, match):
    with pytest.raises(UnsupportedCheckpointError, match=match):
        MM.inspect_motion_module(state)


def test_pe_buffers_are_carried_over_or_computed_identically():
    diffusers_state = T.tiny_motion_state_dict(layout="diffusers")
    pe = diffusers_state["down_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe"]
    torch.testing.assert_close(MM.sinusoidal_positions(32, pe.shape[-1]), pe)
    original = T.tiny_motion_state_dict(layout="original")
    info = MM.inspect_motion_module(original)
    without_pe = {k: v for k, v in original.items() if not k.endswith("pos_encoder.pe")}
    a = MM.motion_weights(original, info)
    b = MM.motion_weights(without_pe, info)
    assert set(a) == set(b) == set(diffusers_state)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_motion_files_hotshot_pe_and_diffusers_without_pe():
    with pytest.raises(UnsupportedCheckpointError, match="HotShot"):
        MM.inspect_motion_module({"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
                                  "attention_blocks.0.pos_encoder.positional_encoding": torch.ones(1)})
    state = {k: v for k, v in T.tiny_motion_state_dict(layout="diffusers").items() if not k.endswith(".pe")}
    info = MM.inspect_motion_module(state)
    assert (info.layout, info.version, info.max_frames) == ("diffusers", "v2", 32)
    assert len(MM.motion_weights(state, info)) == 567
