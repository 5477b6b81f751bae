"""wan_lora/vae.py: the Wan 2.1 VAE file (tiny_vae's, in the key names of ComfyUI's wan_2.1_vae.safetensors),
its config inference, refused files, and decoding checked against diffusers' own AutoencoderKLWan."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from flipbook_pack.core import checkpoints
from flipbook_pack.core.errors import (CorruptFileError, InvalidSettingError, ModelFileChangedError,
                                       NonFiniteResultError, UnsupportedCheckpointError)
from flipbook_pack.core.tiny_weights import write_safetensors
from flipbook_pack.wan_lora import tiny_vae as T
from flipbook_pack.wan_lora import vae as V

CPU = torch.device("cpu")
TINY_DIM = 8
RESIDUAL = ("residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma",
            "residual.6.weight", "residual.6.bias")
BIASED = ("weight", "bias")


def _reference_wan21_keys() -> set[str]:
    """The keys of wan_2.1_vae.safetensors as the reference notes (wan-lora-nag.md 2.5) list them, written
    out from that text, not from our converter."""
    keys = {f"{p}.{leaf}" for p in ("conv1", "conv2", "encoder.conv1", "decoder.conv1") for leaf in BIASED}
    for part in ("encoder", "decoder"):
        keys |= {f"{part}.middle.{i}.{r}" for i in (0, 2) for r in RESIDUAL}
        keys |= {f"{part}.middle.1.norm.gamma"} | {f"{part}.middle.1.{m}.{b}" for m in ("to_qkv", "proj") for b in BIASED}
        keys |= {f"{part}.head.0.gamma"} | {f"{part}.head.2.{b}" for b in BIASED}
    down = "encoder.downsamples"
    keys |= {f"{down}.{i}.{r}" for i in (0, 1, 3, 4, 6, 7, 9, 10) for r in RESIDUAL}
    keys |= {f"{down}.{i}.shortcut.{b}" for i in (3, 6) for b in BIASED}
    keys |= {f"{down}.{i}.resample.1.{b}" for i in (2, 5, 8) for b in BIASED}
    keys |= {f"{down}.{i}.time_conv.{b}" for i in (5, 8) for b in BIASED}
    up = "decoder.upsamples"
    keys |= {f"{up}.{i}.{r}" for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14) for r in RESIDUAL}
    keys |= {f"{up}.4.shortcut.{b}" for b in BIASED}
    keys |= {f"{up}.{i}.resample.1.{b}" for i in (3, 7, 11) for b in BIASED}
    keys |= {f"{up}.{i}.time_conv.{b}" for i in (3, 7) for b in BIASED}
    return keys


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return T.write_tiny_wan_vae(tmp_path_factory.mktemp("vae") / "wan_2.1_vae.safetensors", base_dim=TINY_DIM)


@pytest.fixture(scope="module")
def our_vae(tiny_file):
    component = V.vae_component(V.inspect_wan_vae(tiny_file), load_device=CPU, offload_device=CPU,
                                dtype=torch.float32)
    assert component.name == "vae" and not component.resident  # built on the meta device
    component.materialize()
    return component.module


@pytest.fixture(scope="module")
def diffusers_vae(tiny_file):
    """diffusers' AutoencoderKLWan built on its own (defaults = Wan 2.1 but the width), strictly loaded."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = AutoencoderKLWan(base_dim=TINY_DIM).eval()
    model.load_state_dict(convert_wan_vae_to_diffusers(load_file(str(tiny_file))), strict=True)
    return model


def _latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_tiny_file_has_exactly_the_real_files_keys_and_shape_kinds(tiny_file):
    header = checkpoints.read_safetensors_header(tiny_file)
    keys = set(header) - {"__metadata__"}
    assert keys == _reference_wan21_keys() and len(keys) == 194
    shape = {k: header[k]["shape"] for k in keys}
    assert shape["conv1.weight"] == [32, 32, 1, 1, 1] and shape["conv2.weight"] == [16, 16, 1, 1, 1]
    assert shape["encoder.downsamples.0.residual.0.gamma"] == [TINY_DIM, 1, 1, 1]  # [C,1,1,1]
    assert len(shape["encoder.middle.1.norm.gamma"]) == 3 and len(shape["encoder.downsamples.2.resample.1.weight"]) == 4
    assert shape["encoder.downsamples.5.time_conv.weight"][2:] == [3, 1, 1]
    c = 4 * TINY_DIM  # decoder upsample3d: resample.1 C -> C/2, time_conv C -> 2C
    assert shape["decoder.upsamples.3.resample.1.weight"][:2] == [c // 2, c]
    assert shape["decoder.upsamples.3.time_conv.weight"][:2] == [2 * c, c]


def test_tiny_file_converts_strictly_with_diffusers_converter(tiny_file, diffusers_vae):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = load_file(str(tiny_file))
    converted = convert_wan_vae_to_diffusers(original)
    assert len(converted) == len(original) and set(converted) == set(diffusers_vae.state_dict())


def test_real_config_is_recovered_from_real_shapes():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        real = T.diffusers_to_wan_names(AutoencoderKLWan().state_dict())  # diffusers defaults: the real sizes
    assert set(real) == _reference_wan21_keys()
    # widths the reference lists for the real file
    assert real["encoder.conv1.weight"].shape[:2] == (96, 3) and real["encoder.head.2.weight"].shape[:2] == (32, 384)
    assert real["encoder.downsamples.3.shortcut.weight"].shape[:2] == (192, 96)
    assert real["encoder.downsamples.6.shortcut.weight"].shape[:2] == (384, 192)
    assert real["decoder.conv1.weight"].shape[:2] == (384, 16) and real["decoder.head.2.weight"].shape[:2] == (3, 96)
    assert real["decoder.upsamples.4.shortcut.weight"].shape[:2] == (384, 192)
    config = V.infer_wan_vae_config(real)
    assert {k: config[k] for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")} == {
        "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
        "temperal_downsample": [False, True, True]}
    V._require_every_tensor_fits("wan_2.1_vae.safetensors", real, config)


def test_latent_statistics_are_wans():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # diffusers' defaults are Wan 2.1's (its docs); an independent copy of the table
        config = AutoencoderKLWan().config
    assert list(V.WAN21_LATENTS_MEAN) == config.latents_mean and list(V.WAN21_LATENTS_STD) == config.latents_std
    assert len(V.WAN21_LATENTS_MEAN) == 16 and V.WAN21_LATENTS_MEAN[7] == 1.5508 and V.WAN21_LATENTS_STD[8] == 3.2687


def test_decode_equals_diffusers_wan_pipeline_decode(our_vae, diffusers_vae):
    latents = _latents(1, 16, 5, 4, 4)  # 5 latent frames at 32x32 px
    frames = V.decode_wan_latents(our_vae, latents)
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == torch.float32 and frames.device == CPU
    assert 0 <= float(frames.min()) and float(frames.max()) <= 1
    # WanPipeline: latents / latents_std + latents_mean with latents_std = 1 / std, then vae.decode, then (x+1)/2
    mean = torch.tensor(diffusers_vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(diffusers_vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = diffusers_vae.decode(latents / inverse_std + mean).sample  # [1, 3, 17, 32, 32] in -1..1
    expected = ((video[0] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
    assert float((frames - expected).abs().max()) <= 1e-5
    assert float((frames - 0.5).abs().lt(0.5).float().mean()) > 0.9  # compared values, not clamped ones


def test_a_batch_is_decoded_video_by_video_into_one_image_batch(our_vae):
    latents = _latents(2, 16, 2, 4, 4, seed=1)
    frames = V.decode_wan_latents(our_vae, latents)
    assert frames.shape == (10, 32, 32, 3)
    torch.testing.assert_close(frames[5:], V.decode_wan_latents(our_vae, latents[1:]), rtol=0, atol=1e-6)


def test_progress_once_per_latent_frame_and_raising_from_it_cancels(our_vae):
    seen = []
    V.decode_wan_latents(our_vae, _latents(1, 16, 5, 4, 4), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

    class Cancelled(Exception):
        pass

    def cancel_at_two(done, total):
        seen.append(done)
        if done == 2:
            raise Cancelled

    seen.clear()
    with pytest.raises(Cancelled):
        V.decode_wan_latents(our_vae, _latents(1, 16, 5, 4, 4), progress=cancel_at_two)
    assert seen == [1, 2]  # the decoder stopped at the second latent frame
    assert not our_vae.decoder._forward_hooks and all(f is None for f in our_vae._feat_map)  # cleaned up


def test_nan_latents_are_an_error_naming_the_sampler_and_nothing_is_decoded(our_vae):
    latents = _latents(1, 16, 2, 4, 4)
    latents[0, 3, 1, 2, 2] = float("nan")
    calls = []
    with pytest.raises(NonFiniteResultError, match="latents given to the Wan VAE contain 1 NaN.*sampler diverged"):
        V.decode_wan_latents(our_vae, latents, progress=lambda d, n: calls.append(d))
    assert calls == []


def test_inf_from_the_decoder_is_caught_before_diffusers_clamps_it(our_vae):
    vae = copy.deepcopy(our_vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("inf"))
        assert torch.isfinite(vae.decode(torch.zeros(1, 16, 1, 4, 4)).sample).all()  # the clamp hides it: white
    with pytest.raises(NonFiniteResultError, match="before clamping.*NaN/inf weights in wan_2.1_vae.safetensors"):
        V.decode_wan_latents(vae, torch.zeros(1, 16, 2, 4, 4), source="wan_2.1_vae.safetensors")


def test_a_float16_overflow_is_decoded_again_in_float32(our_vae, caplog):
    half = copy.deepcopy(our_vae).half()
    latents = torch.full((1, 16, 2, 4, 4), 3e4)  # x = z * std + mean exceeds float16's range
    with caplog.at_level(logging.WARNING):
        frames = V.decode_wan_latents(half, latents)
    assert "again in float32" in caplog.text and torch.isfinite(frames).all()
    assert next(half.parameters()).dtype == torch.float16  # restored
    torch.testing.assert_close(frames, V.decode_wan_latents(copy.deepcopy(half).float(), latents))


def test_tiled_decode_counts_tile_frames_and_keeps_the_vaes_setting(our_vae):
    vae = copy.deepcopy(our_vae)
    vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48,
                      tile_sample_stride_width=48)
    latents, seen = _latents(1, 16, 2, 12, 12), []
    tiled = V.decode_wan_latents(vae, latents, progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (8, 8) and len(seen) == 8 and vae.use_tiling  # 2 frames x 2x2 tiles
    untiled = V.decode_wan_latents(vae, latents, tiled=False)
    assert tiled.shape == untiled.shape == (5, 96, 96, 3) and vae.use_tiling
    assert float((tiled - untiled).abs().mean()) < 0.02  # blended tiles, not the same numbers


def test_latents_of_another_shape_are_refused(our_vae):
    with pytest.raises(InvalidSettingError, match=r"\[batch, 16, frames.*got \[1, 4, 8, 8\]"):
        V.decode_wan_latents(our_vae, torch.zeros(1, 4, 8, 8))


def _refused(path, error=UnsupportedCheckpointError):
    with pytest.raises(error) as info:
        V.inspect_wan_vae(path)
    message = str(info.value)
    assert path.name in message
    return message


def test_other_vaes_and_files_are_refused_with_what_they_are(tmp_path):
    wan22 = _refused(T.write_tiny_wan_vae(tmp_path / "wan2.2_vae.safetensors", kind="wan22"))
    assert "Wan 2.2 TI2V-5B" in wan22 and "wan_2.1_vae.safetensors" in wan22 and V.VAE_URL in wan22
    sd = _refused(T.write_tiny_wan_vae(tmp_path / "sdxl_vae.safetensors", kind="sd"))
    assert "an image VAE, Wan 2.1 needs its video VAE" in sd and "models/vae" in sd and V.VAE_URL in sd
    full = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}
    ckpt = _refused(write_safetensors(full, tmp_path / "v1-5.safetensors"))
    assert "an image VAE, Wan 2.1 needs its video VAE" in ckpt
    other = _refused(write_safetensors({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors"))
    assert "not a Wan 2.1 VAE" in other and V.VAE_URL in other
    dit = _refused(write_safetensors({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "wan14b.safetensors"))
    assert "Wan diffusion model" in dit and "models/diffusion_models" in dit


def test_a_wan_vae_in_diffusers_names_is_refused_not_taken_for_an_image_vae(tmp_path, tiny_file):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = convert_wan_vae_to_diffusers(load_file(str(tiny_file)))
    assert "decoder.conv_in.weight" in state  # as an image VAE has
    message = _refused(write_safetensors(state, tmp_path / "diffusion_pytorch_model.safetensors"))
    assert "diffusers' names" in message and V.VAE_URL in message


def test_damaged_or_resized_wan_vaes_are_refused(tmp_path, tiny_file):
    state = load_file(str(tiny_file))
    pruned = {k: v for k, v in state.items() if k != "decoder.upsamples.7.time_conv.weight"}
    assert "1 tensors missing" in _refused(write_safetensors(pruned, tmp_path / "pruned.safetensors"))
    narrow = dict(state, **{"conv2.weight": torch.zeros(8, 8, 1, 1, 1)})
    assert "8 latent channels" in _refused(write_safetensors(narrow, tmp_path / "z8.safetensors"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[:-1000])
    assert "cut short" in _refused(truncated, CorruptFileError)


def test_weights_read_again_must_come_from_the_same_file(tmp_path):
    path = T.write_tiny_wan_vae(tmp_path / "wan_2.1_vae.safetensors", seed=3)
    component = V.vae_component(V.inspect_wan_vae(path), load_device=CPU, offload_device=CPU, dtype=None)
    component.materialize()
    assert next(component.module.parameters()).dtype == torch.float16  # dtype None keeps the file's
    component.release()
    os.utime(path, ns=(0, 0))
    with pytest.raises(ModelFileChangedError, match="wan_2.1_vae.safetensors changed on disk"):
        component.restore(CPU)


def test_working_memory_estimate_grows_with_area_not_with_latent_frames():
    short = V.decode_working_bytes((1, 16, 2, 60, 104), dtype=torch.bfloat16)
    long = V.decode_working_bytes((1, 16, 21, 60, 104), dtype=torch.bfloat16)
    video = 19 * 4 * 480 * 832 * 3 * 2  # only the 76 extra output frames
    assert long - short == video and 4e9 < short < 6e9
    assert V.decode_working_bytes((1, 16, 2, 60, 104), dtype=torch.float32) == 2 * short
