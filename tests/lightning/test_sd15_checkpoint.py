"""lightning/sd15_checkpoint.py: SD1.5 checkpoints in the real LDM key layout (tiny_models' checkpoint), config
inference, and refused families and variants."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flipbook_pack.core import checkpoints
from flipbook_pack.core.errors import UnsupportedCheckpointError
from flipbook_pack.lightning import sd15_checkpoint as S
from flipbook_pack.lightning import tiny_models as T

# keys copied from a real file's listing (SD1.5 v1-5-pruned)
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


def _real_ldm_keys() -> set[str]:
    text = (Path(__file__).resolve().parent.parent / "data" / "sd15_ldm_keys.txt").read_text()
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def test_tiny_checkpoint_has_every_unet_and_vae_key_of_a_real_file(tiny_models):
    """The key list comes from ComfyUI's own LDM modules at SD1.5 sizes (tests/data/sd15_ldm_keys.txt)."""
    header = checkpoints.read_safetensors_header(tiny_models[1]["ckpt"])
    real = _real_ldm_keys()
    assert len(real) == 686 + 248
    ours = {k for k in header if k.startswith(("model.", "first_stage_model."))}
    assert ours == real  # e.g. input_blocks.7.0.skip_connection, decoder.up.N.block.2
    assert set(REAL_SD15_KEYS) <= set(header)
    assert len(header["first_stage_model.decoder.mid.attn_1.q.weight"]["shape"]) == 4  # 1x1 conv, as in LDM
    assert {k.split(".")[0] for k in header if k != "__metadata__"} == {"model", "first_stage_model", "cond_stage_model"}


def test_ldm_layout_round_trips_through_diffusers_converter():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    state = T.tiny_sd15_state_dict()
    original = S.infer_original_config(state)
    config = create_unet_diffusers_config_from_ldm(original, state)
    assert config["block_out_channels"] == [32, 64, 128, 128] and config["cross_attention_dim"] == 32
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
    assert list(parts.unet.config.block_out_channels) == [32, 64, 128, 128]
    assert parts.scaling_factor == 0.18215 and parts.text_encoder.config.num_hidden_layers == 2


@pytest.mark.parametrize("family,prefix", [("sdxl", "conditioner.embedders.1.model."), ("sd2", "cond_stage_model.model.")])
def test_other_base_families_are_refused(tmp_path, family, prefix):
    path = T.write_safetensors({prefix + "ln_final.weight": torch.ones(4),
                                "model.diffusion_model.out.2.weight": torch.ones(4)}, tmp_path / f"{family}.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=family.upper()):
        S.load_sd15_checkpoint(path)


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


@pytest.mark.parametrize("change,match", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith(S.VAE_PREFIX)}, "has no baked-in VAE"),
    (lambda s: {k: v for k, v in s.items() if k != S.UNET_PREFIX + "out.2.weight"}, "lacks tensors every SD1.5"),
    (lambda s: {**s, **{k: torch.randn(v.shape[0], 48) for k, v in s.items()
                        if k.startswith(S.UNET_PREFIX) and k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}},
     "expects 48-wide text embeddings, but its text encoder gives 32"),
])
def test_broken_checkpoints_are_typed_errors_at_load(tmp_path, change, match):
    path = T.write_safetensors(change(T.tiny_sd15_state_dict()), tmp_path / "broken.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=match):
        S.inspect_sd15_checkpoint(path)
