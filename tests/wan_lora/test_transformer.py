"""wan_lora/transformer.py: Wan 2.1 T2V files in every storage and prefix load through the real loader and
give the denoiser output of diffusers' own WanTransformer3DModel holding the file's real (dequantized)
weights; fp8 weights stay fp8; bad files are refused with typed errors."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import CorruptFileError, UnsupportedCheckpointError
from flipbook_pack.wan_lora import tiny_transformer as T
from flipbook_pack.wan_lora.transformer import inspect_wan_transformer

CPU = torch.device("cpu")




def _reference(state):
    """diffusers' model with these (float32) weights, renamed by diffusers' converter and loaded strictly."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(**T.TinyWanSizes().config()).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(state)), strict=True)
    return model




def test_original_names_are_what_diffusers_converter_maps():
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    names = T.original_key_names(2)
    model = WanTransformer3DModel(**T.TinyWanSizes().config())
    assert set(convert_wan_transformer_to_diffusers(dict.fromkeys(names))) == set(model.state_dict())


@pytest.mark.parametrize("storage", ["fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled",
                                     "fp8_scaled_mixed"])
def test_every_storage_equals_diffusers_with_the_real_weights(tmp_path, storage):
    path = T.write_tiny_wan(tmp_path / f"wan_{storage}.safetensors", storage=storage)
    layout = inspect_wan_transformer(path)
    assert layout.storage == ("fp8_scaled" if storage.startswith("fp8_scaled") else storage)
    assert (layout.config["num_attention_heads"], layout.config["num_layers"], layout.text_dim) == (1, 2, 32)
    component = T.load_on_cpu(path)
    from safetensors.torch import load_file

    real = T.dequantized_state(load_file(str(path)))  # the file's values times their scales, in float32
    torch.testing.assert_close(T.denoised_once(component.module), T.denoised_once(_reference(real)), atol=2e-5, rtol=1e-4)
    fp8_weights = [p for n, p in component.module.named_parameters() if p.dtype in (torch.float8_e4m3fn,
                                                                                    torch.float8_e5m2)]
    # fp8 files: the 10 Linears of each block stay fp8 (q, k, v, o twice; ffn.0, ffn.2), cast per layer at forward
    assert len(fp8_weights) == (10 * 2 if storage.startswith("fp8") else 0)


def test_fp8_is_within_fp8_tolerance_of_the_bf16_file(tmp_path):
    bf16 = T.denoised_once(T.load_on_cpu(T.write_tiny_wan(tmp_path / "bf16.safetensors", storage="bf16")).module)
    for storage in ("fp8_e4m3fn", "fp8_scaled", "fp8_scaled_mixed"):
        fp8 = T.denoised_once(T.load_on_cpu(T.write_tiny_wan(tmp_path / f"{storage}.safetensors", storage=storage)).module)
        relative = (fp8 - bf16).norm() / bf16.norm()
        assert relative < 0.08, (storage, relative)  # e4m3 keeps 3 mantissa bits: ~6% per weight, averaged


def test_prefixed_and_bare_files_give_identical_output(tmp_path):
    bare = T.denoised_once(T.load_on_cpu(T.write_tiny_wan(tmp_path / "bare.safetensors")).module)
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        path = T.write_tiny_wan(tmp_path / f"{prefix}safetensors", prefix=prefix)
        assert inspect_wan_transformer(path).prefix == prefix
        assert torch.equal(T.denoised_once(T.load_on_cpu(path).module), bare)


def test_fp8_storage_takes_half_the_bytes_of_bf16(tmp_path):
    bf16 = T.load_on_cpu(T.write_tiny_wan(tmp_path / "bf16.safetensors", storage="bf16"), dtype=torch.bfloat16)
    fp8 = T.load_on_cpu(T.write_tiny_wan(tmp_path / "fp8.safetensors", storage="fp8_e4m3fn"), dtype=torch.bfloat16)
    from flipbook_pack.core.model_handle import tensor_bytes

    # the blocks are 98% of the 14B model's bytes (the tiny model's RoPE tables and embeddings weigh more)
    ratio = tensor_bytes(fp8.module.blocks) / tensor_bytes(bf16.module.blocks)
    assert ratio < 0.55, ratio


def _rewrite(path, out, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(out))
    return out


def test_scaled_file_without_a_scale_is_refused(tmp_path):
    path = T.write_tiny_wan(tmp_path / "scaled.safetensors", storage="fp8_scaled")
    one = _rewrite(path, tmp_path / "one_missing.safetensors", lambda t: t.pop("blocks.1.ffn.2.scale_weight"))
    with pytest.raises(UnsupportedCheckpointError, match=r"one_missing.*'blocks\.1\.ffn\.2'"):
        inspect_wan_transformer(one)

    def drop_all(tensors):
        for name in [k for k in tensors if k.endswith(".scale_weight")]:
            tensors.pop(name)

    none = _rewrite(path, tmp_path / "marker_only.safetensors", drop_all)
    with pytest.raises(UnsupportedCheckpointError, match="has no '.scale_weight'"):
        inspect_wan_transformer(none)


def test_unknown_quantization_format_is_refused(tmp_path):
    import json

    path = T.write_tiny_wan(tmp_path / "mixed.safetensors", storage="fp8_scaled_mixed")
    nvfp4 = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    out = _rewrite(path, tmp_path / "nvfp4.safetensors", lambda t: t.__setitem__("blocks.0.ffn.0.comfy_quant", nvfp4))
    with pytest.raises(UnsupportedCheckpointError, match="nvfp4"):
        inspect_wan_transformer(out)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.__setitem__("img_emb.proj.0.weight", torch.ones(4)), "I2V"),
    (lambda t: t.update({"img_emb.proj.0.weight": torch.ones(4), "img_emb.emb_pos": torch.ones(4)}), "FLF2V"),
    (lambda t: t.__setitem__("vace_blocks.0.before_proj.weight", torch.ones(4)), "VACE"),
    (lambda t: t.__setitem__("patch_embedding.weight", torch.ones(128, 36, 1, 2, 2)), "Wan 2.2 I2V"),
    (lambda t: t.__setitem__("patch_embedding.weight", torch.ones(128, 32, 1, 2, 2)), "control/inpaint"),
    (lambda t: t.pop("head.modulation"), "not a Wan transformer"),
])
def test_other_wan_models_are_refused_by_name(tmp_path, edit, words):
    out = _rewrite(T.write_tiny_wan(tmp_path / "base.safetensors"), tmp_path / "other.safetensors", edit)
    with pytest.raises(UnsupportedCheckpointError, match=words) as info:
        inspect_wan_transformer(out)
    assert "other.safetensors" in str(info.value) and "wan2.1_t2v_14B" in str(info.value)


def test_wan22_5b_and_a_wan22_name_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"patch_embedding.weight": torch.zeros(3072, 48, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 3072),
               "blocks.0.cross_attn.k.weight": torch.zeros(1, 1)}, str(tmp_path / "ti2v.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match="TI2V-5B"):
        inspect_wan_transformer(tmp_path / "ti2v.safetensors")
    named = T.write_tiny_wan(tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="Wan 2.2 A14B"):
        inspect_wan_transformer(named)


def test_sd_checkpoint_and_truncated_file_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match="SD1.5"):
        inspect_wan_transformer(tmp_path / "sd15.safetensors")
    path = T.write_tiny_wan(tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        inspect_wan_transformer(path)


def test_per_row_scales_are_applied_at_load(tmp_path):
    """A scaled file with one scale per output row (accepted by ComfyUI's mixed-precision loader): the weights stay
    fp8 with a (rows, 1) scale and equal the real weights."""
    from safetensors.torch import load_file, save_file

    state = T.tiny_wan_state()
    tensors = {}
    for name, tensor in state.items():
        if name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().amax(dim=1).clamp_min(1e-8) / 448.0
            tensors[name] = (tensor / scale[:, None]).to(torch.float8_e4m3fn)
            tensors[name[: -len(".weight")] + ".scale_weight"] = scale
        else:
            tensors[name] = tensor.to(torch.bfloat16)
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "rows.safetensors"))
    layout = inspect_wan_transformer(tmp_path / "rows.safetensors")
    assert layout.storage == "fp8_scaled" and layout.row_scaled == layout.fp8_linears and len(layout.fp8_linears) == 20
    real = {}
    for name, tensor in load_file(str(tmp_path / "rows.safetensors")).items():
        if name == "scaled_fp8" or name.endswith(".scale_weight"):
            continue
        scale = tensors.get(name[: -len(".weight")] + ".scale_weight")
        real[name] = tensor.float() * (scale[:, None] if scale is not None else 1.0)
    loaded = T.load_on_cpu(tmp_path / "rows.safetensors").module
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(T.denoised_once(loaded), T.denoised_once(_reference(real)), atol=2e-5, rtol=1e-4)


def test_devices_without_fp8_get_dequantized_weights(tmp_path, monkeypatch):
    """Apple's MPS stores no fp8: the weights are dequantized to the compute dtype when read."""
    from flipbook_pack.wan_lora import transformer as W

    path = T.write_tiny_wan(tmp_path / "fp8.safetensors", storage="fp8_scaled")
    monkeypatch.setattr(W, "device_holds_fp8", lambda device: False)
    component = T.load_on_cpu(path, dtype=torch.float16)
    assert {p.dtype for p in component.module.blocks.parameters()} == {torch.float16}
