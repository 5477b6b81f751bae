"""Loaders against tiny files in the exact key layouts of the real ones, and every bad-input error."""
from __future__ import annotations

import pickle

import pytest
import torch

from flipbook_pack.core import checkpoints
from flipbook_pack.core.errors import (CorruptFileError, IncompatibleModelsError, ModelFileNotFoundError,
                                       UnsafeFileError, UnsupportedCheckpointError)
from flipbook_pack.lightning import motion_module as MM
from flipbook_pack.lightning import sd15_checkpoint as S
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.pipeline import load_lightning

# keys copied from real files' listings (SD1.5 v1-5-pruned, AnimateDiff-Lightning _comfyui / _diffusers)
REAL_SD15_KEYS = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]
REAL_ORIGINAL_MOTION_KEYS = [
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.norms.1.weight",
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.bias",
    "up_blocks.3.motion_modules.2.temporal_transformer.proj_out.weight",
    "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight",
]


def test_tiny_checkpoint_has_the_real_key_layout(tiny_models):
    header = checkpoints.read_safetensors_header(tiny_models[1]["ckpt"])
    assert set(REAL_SD15_KEYS) <= set(header)
    assert len(header["first_stage_model.decoder.mid.attn_1.q.weight"]["shape"]) == 4  # 1x1 conv, as in LDM
    assert {k.split(".")[0] for k in header if k != "__metadata__"} == {"model", "first_stage_model", "cond_stage_model"}


def test_ldm_layout_round_trips_through_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    state = T.tiny_sd15_state_dict()
    original = S.infer_original_config(state)
    config = create_unet_diffusers_config_from_ldm(original, state)
    assert config["block_out_channels"] == [32, 64, 64, 64] and config["cross_attention_dim"] == 32
    converted = convert_ldm_unet_checkpoint(state, config)
    assert set(converted) == set(UNet2DConditionModel(**config).state_dict())


def test_real_sd15_config_is_recovered_from_real_shapes():
    """With SD1.5's real shapes (meta tensors, no memory) the inferred config is v1-inference's."""
    shapes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)}
    for i, c in enumerate([320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280]):
        if i == 0:
            continue
        if i in (3, 6, 9):
            shapes[f"input_blocks.{i}.0.op.weight"] = (c, c, 3, 3)
        else:
            shapes[f"input_blocks.{i}.0.out_layers.3.weight"] = (c, c, 3, 3)
            if i < 9:
                shapes[f"input_blocks.{i}.1.proj_in.weight"] = (c, c, 1, 1)
                shapes[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"] = (c, 768)
    state = {S.UNET_PREFIX + k: torch.empty(v, device="meta") for k, v in shapes.items()}
    vae = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
           "decoder.conv_out.weight": (3, 128, 3, 3)}
    for i, c in enumerate([128, 256, 512, 512]):
        for j in range(2):
            vae[f"encoder.down.{i}.block.{j}.conv1.weight"] = (c, c, 3, 3)
    state.update({S.VAE_PREFIX + k: torch.empty(v, device="meta") for k, v in vae.items()})
    params = S.infer_original_config(state)["model"]["params"]
    unet = params["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"]) == (320, [1, 2, 4, 4], 2)
    assert (unet["attention_resolutions"], unet["context_dim"]) == ([1, 2, 4], 768)
    dd = params["first_stage_config"]["params"]["ddconfig"]
    assert (dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]) == (128, [1, 2, 4, 4], 2, 4)


def test_sd15_checkpoint_loads(tiny_models):
    parts = S.load_sd15_checkpoint(tiny_models[1]["ckpt"])
    assert list(parts.unet.config.block_out_channels) == [32, 64, 64, 64]
    assert parts.scaling_factor == 0.18215 and parts.text_encoder.config.num_hidden_layers == 2


@pytest.mark.parametrize("family,prefix", [("sdxl", "conditioner.embedders.1.model."), ("sd2", "cond_stage_model.model.")])
def test_other_base_families_are_refused(tmp_path, family, prefix):
    path = T.write_safetensors({prefix + "ln_final.weight": torch.ones(4),
                                "model.diffusion_model.out.2.weight": torch.ones(4)}, tmp_path / f"{family}.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=family.upper()):
        S.load_sd15_checkpoint(path)


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
    assert info.channels == (32, 64, 64, 64) and info.layers_per_block == 2


def test_version_rules_follow_pe_length_and_mid_block():
    state = T.tiny_motion_state_dict()
    no_mid = {k: v for k, v in state.items() if not k.startswith("mid_block.")}
    assert MM.inspect_motion_module(no_mid).version == "v3"
    short = {k: (v[:, :24] if k.endswith(".pe") else v) for k, v in no_mid.items()}
    info = MM.inspect_motion_module(short)
    assert (info.version, info.max_frames) == ("v1", 24)
    sdxl = MM.inspect_motion_module(T.tiny_motion_state_dict(family="sdxl"))
    assert (sdxl.family, sdxl.version, sdxl.channels) == ("sdxl", "v1", (32, 64, 64))  # ADE: v3 is SD1.5 only


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


def test_sdxl_motion_module_with_sd15_checkpoint_is_refused(tiny_models):
    _, files = tiny_models
    with pytest.raises(IncompatibleModelsError, match=r"SDXL motion module.*SD1.5"):
        load_lightning(files["ckpt"], files["sdxl"], device="cpu")


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
    with pytest.raises(UnsafeFileError, match="never runs code"):
        checkpoints.load_state_dict(evil)
    plain = tmp_path / "mm_plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, plain)
    assert torch.equal(checkpoints.load_state_dict(plain)["a"], torch.ones(2))


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="not found"):
        checkpoints.load_state_dict(tmp_path / "nope.safetensors")


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
