"""wan_lora/loras.py + lora_apply.py: every LoRA format, read through the real loader against the tiny transformer,
gives the denoiser output of a checkpoint merged by hand from the formula; the match report counts are exact;
swaps restore the base bit for bit; bad LoRAs are typed errors naming both models."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from flipbook_pack.wan_lora import tiny_loras as L
from flipbook_pack.wan_lora import tiny_transformer as T
from flipbook_pack.wan_lora.lora_apply import apply_lora_stack
from flipbook_pack.wan_lora.loras import read_wan_lora
from flipbook_pack.wan_lora.transformer import inspect_wan_transformer

CPU = torch.device("cpu")
EXPECTED = {  # counted kind -> patches, for the tiny model's 2 blocks
    "musubi": {"lora": 20}, "musubi_fun": {"lora": 20}, "comfy": {"lora": 20}, "diffusers": {"lora": 20},
    "diffsynth": {"lora": 20}, "i2v": {"lora": 20},
    # lightx2v: 20 block Linears + 5 embedding/projection LoRAs; diffs of 5 norm weights per block + head.head +
    # patch_embedding; 11 biases per block + 7 outside; 2 block modulations + the head's
    "lightx2v": {"lora": 25, "diff": 12, "diff_b": 29, "diff_m": 3},
}






@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    path = T.write_tiny_wan(folder / "wan2.1_t2v_tiny.safetensors", storage="fp32")
    return path, T.load_on_cpu(path)


def _hand_merged(tmp_path, plain_loras, storage="fp32"):
    from safetensors.torch import save_file

    merged = L.merged_by_hand(plain_loras)
    path = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in merged.items()}, str(path))
    return T.load_on_cpu(path)


@pytest.mark.parametrize("fmt", L.FORMATS)
def test_each_format_equals_a_checkpoint_merged_by_hand(base, tmp_path, fmt):
    path, component = base
    lora_path, plain = L.write_tiny_lora(tmp_path / f"{fmt}.safetensors", fmt=fmt)
    lora = read_wan_lora(lora_path, layout=inspect_wan_transformer(path), model_name=path.name)
    assert {k: v for k, v in lora.report.applied.items() if v} == EXPECTED[fmt]
    assert len(lora.report.expected_unmatched) == (10 if fmt == "i2v" else 0)  # keys: 2 x (k_img, v_img pairs + norm)
    apply_lora_stack(component, [(lora, 0.7)])
    try:
        ours = T.denoised_once(component.module)
    finally:
        apply_lora_stack(component, [])
    reference = T.denoised_once(_hand_merged(tmp_path, [(plain, 0.7)]).module)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (ours - T.denoised_once(component.module)).abs().max() > 1e-3  # the LoRA did something


def test_a_stack_swaps_and_swaps_back_bit_for_bit(base, tmp_path):
    path, component = base
    layout = inspect_wan_transformer(path)
    style_path, style = L.write_tiny_lora(tmp_path / "style.safetensors", fmt="musubi", seed=2)
    distill_path, distill = L.write_tiny_lora(tmp_path / "lightx2v.safetensors", fmt="lightx2v", seed=3)
    style_lora = read_wan_lora(style_path, layout=layout, model_name=path.name)
    distill_lora = read_wan_lora(distill_path, layout=layout, model_name=path.name)
    original = T.denoised_once(component.module)
    apply_lora_stack(component, [(style_lora, 1.0), (distill_lora, 0.9)])
    both = T.denoised_once(component.module)
    torch.testing.assert_close(both, T.denoised_once(_hand_merged(tmp_path, [(style, 1.0), (distill, 0.9)]).module),
                               atol=1e-5, rtol=1e-5)
    apply_lora_stack(component, [(style_lora, 0.5)])  # a strength change re-patches from the kept originals
    half = T.denoised_once(component.module)
    apply_lora_stack(component, [])
    assert torch.equal(T.denoised_once(component.module), original)
    apply_lora_stack(component, [(style_lora, 1.0), (distill_lora, 0.9)])
    assert torch.equal(T.denoised_once(component.module), both)
    apply_lora_stack(component, [(style_lora, 0.5)])
    assert torch.equal(T.denoised_once(component.module), half)
    apply_lora_stack(component, [])
    assert torch.equal(T.denoised_once(component.module), original)
    assert style_lora.report.distill is False and distill_lora.report.distill is True


def test_fp8_base_keeps_its_weights_and_equals_the_dequantized_merge(tmp_path):
    from safetensors.torch import load_file, save_file

    path = T.write_tiny_wan(tmp_path / "wan_fp8_scaled.safetensors", storage="fp8_scaled")
    component = T.load_on_cpu(path)
    weights_before = {n: p.clone() for n, p in component.module.named_parameters()}
    lora_path, plain = L.write_tiny_lora(tmp_path / "style.safetensors", fmt="comfy")
    lora = read_wan_lora(lora_path, layout=inspect_wan_transformer(path), model_name=path.name)
    apply_lora_stack(component, [(lora, 1.0)])
    ours = T.denoised_once(component.module)
    merged = T.dequantized_state(load_file(str(path)))
    for name, patch in plain.items():
        merged[name] = merged[name] + patch[3] * (patch[1] @ patch[2])
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    torch.testing.assert_close(ours, T.denoised_once(T.load_on_cpu(tmp_path / "merged.safetensors").module),
                               atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, weights_before[n]) for n, p in component.module.named_parameters())


def test_trigger_comes_from_the_files_metadata(base, tmp_path):
    path, _ = base
    lora_path, _ = L.write_tiny_lora(tmp_path / "ghibli.safetensors", fmt="musubi", trigger="Studio Ghibli style.")
    lora = read_wan_lora(lora_path, layout=inspect_wan_transformer(path), model_name=path.name)
    assert lora.report.trigger == "Studio Ghibli style."
    assert "musubi" in lora.report.summary() and "20 lora" in lora.report.summary()


def _edited(source, target, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    edit(tensors)
    save_file(tensors, str(target))
    return target


def test_bad_loras_are_typed_errors_naming_both_models(base, tmp_path):
    path, _ = base
    layout = inspect_wan_transformer(path)
    wide, _ = L.write_tiny_lora(tmp_path / "wide.safetensors", fmt="comfy", sizes=T.TinyWanSizes(heads=2))
    with pytest.raises(IncompatibleModelsError, match=r"wide.safetensors is a LoRA for a 256-wide model.*128"):
        read_wan_lora(wide, layout=layout, model_name=path.name)
    comfy, _ = L.write_tiny_lora(tmp_path / "comfy.safetensors", fmt="comfy")
    cases = {
        "unknown_key": (lambda t: t.__setitem__("diffusion_model.blocks.0.mystery.lora_A.weight", torch.zeros(4, 4)),
                        UnsupportedCheckpointError, "match nothing"),
        "half_pair": (lambda t: t.pop("diffusion_model.blocks.1.ffn.2.lora_B.weight"), UnsupportedCheckpointError,
                      "incomplete"),
        "dora": (lambda t: t.__setitem__("diffusion_model.blocks.0.ffn.2.dora_scale", torch.ones(128)),
                 UnsupportedCheckpointError, "DoRA"),
        "i2v_patch": (lambda t: t.__setitem__("diffusion_model.patch_embedding.diff", torch.zeros(128, 36, 1, 2, 2)),
                      IncompatibleModelsError, "do not fit"),
    }
    for name, (edit, error, words) in cases.items():
        with pytest.raises(error, match=words):
            read_wan_lora(_edited(comfy, tmp_path / f"{name}.safetensors", edit), layout=layout, model_name=path.name)
    renamed = _edited(comfy, tmp_path / "wan2.2_t2v_style.safetensors", lambda t: None)
    with pytest.raises(IncompatibleModelsError, match="Wan 2.2"):
        read_wan_lora(renamed, layout=layout, model_name=path.name)
    sd = _edited(comfy, tmp_path / "sd_lora.safetensors", lambda t: [t.clear(), t.update(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)})])
    with pytest.raises(IncompatibleModelsError, match="Stable Diffusion LoRA"):
        read_wan_lora(sd, layout=layout, model_name=path.name)


def _save(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_musubi_i2v_image_keys_are_expected_unmatched(base, tmp_path):
    path, _ = base
    lora_path, _ = L.write_tiny_lora(tmp_path / "musubi.safetensors", fmt="musubi")
    extra = {}
    for i in range(2):
        for name in ("k_img", "v_img"):
            extra[f"lora_unet_blocks_{i}_cross_attn_{name}.lora_down.weight"] = torch.zeros(4, 128)
            extra[f"lora_unet_blocks_{i}_cross_attn_{name}.lora_up.weight"] = torch.zeros(128, 4)
            extra[f"lora_unet_blocks_{i}_cross_attn_{name}.alpha"] = torch.tensor(2.0)
    i2v = _edited(lora_path, tmp_path / "musubi_i2v.safetensors", lambda t: t.update(extra))
    lora = read_wan_lora(i2v, layout=inspect_wan_transformer(path), model_name=path.name)
    assert len(lora.report.expected_unmatched) == 12 and lora.report.applied["lora"] == 20


def test_a_failure_part_way_leaves_the_base_untouched(base, tmp_path, monkeypatch):
    from flipbook_pack.wan_lora import lora_apply

    path, component = base
    original = T.denoised_once(component.module)
    lora_path, _ = L.write_tiny_lora(tmp_path / "lightx2v.safetensors", fmt="lightx2v")
    lora = read_wan_lora(lora_path, layout=inspect_wan_transformer(path), model_name=path.name)
    real, calls = lora_apply._merge_in_place, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 20:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(lora_apply, "_merge_in_place", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        apply_lora_stack(component, [(lora, 1.0)])
    monkeypatch.setattr(lora_apply, "_merge_in_place", real)
    assert torch.equal(T.denoised_once(component.module), original)
    apply_lora_stack(component, [(lora, 1.0)])
    apply_lora_stack(component, [])
    assert torch.equal(T.denoised_once(component.module), original)


def test_diffs_on_fp8_weights_param_diffs_adapter_alpha_and_strength_zero(tmp_path):
    from safetensors.torch import load_file

    path = T.write_tiny_wan(tmp_path / "wan_fp8_scaled.safetensors", storage="fp8_scaled")
    layout = inspect_wan_transformer(path)
    component = T.load_on_cpu(path)
    original = T.denoised_once(component.module)
    generator = torch.Generator().manual_seed(4)
    diff = torch.randn(128, 128, generator=generator) * 0.01
    modulation = torch.randn(1, 6, 128, generator=generator) * 0.01
    lora_path = _save(tmp_path / "diffs.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff": diff,
                                                       "diffusion_model.blocks.1.modulation.diff": modulation})
    lora = read_wan_lora(lora_path, layout=layout, model_name=path.name)
    apply_lora_stack(component, [(lora, 1.0)])
    merged = T.dequantized_state(load_file(str(path)))
    merged["blocks.0.self_attn.q.weight"] = merged["blocks.0.self_attn.q.weight"] + diff
    merged["blocks.1.modulation"] = merged["blocks.1.modulation"] + modulation
    torch.testing.assert_close(T.denoised_once(component.module),
                               T.denoised_once(T.load_on_cpu(_save(tmp_path / "m.safetensors", merged)).module),
                               atol=1e-5, rtol=1e-5)
    setter = _save(tmp_path / "set.safetensors", {"diffusion_model.blocks.0.norm3.set_weight": torch.zeros(128)})
    apply_lora_stack(component, [(read_wan_lora(setter, layout=layout, model_name=path.name), 0.0)])
    assert torch.equal(T.denoised_once(component.module), original)  # strength 0 is off, set_weight included

    diffusers_path, plain = L.write_tiny_lora(tmp_path / "d.safetensors", fmt="diffusers")
    with_alpha = _save(tmp_path / "d_alpha.safetensors", load_file(str(diffusers_path)),
                       metadata={"lora_adapter_metadata": '{"lora_alpha": 8, "r": 4}'})
    lora = read_wan_lora(with_alpha, layout=layout, model_name=path.name)
    assert {p.factor for p in lora.patches} == {2.0}  # lora_alpha / rank, as diffusers scales it


def test_two_spellings_of_one_part_are_refused(base, tmp_path):
    path, _ = base
    lora_path, _ = L.write_tiny_lora(tmp_path / "comfy.safetensors", fmt="comfy")
    twice = _edited(lora_path, tmp_path / "twice.safetensors", lambda t: t.__setitem__(
        "diffusion_model.blocks.0.ffn.2.lora_A.default.weight", t["diffusion_model.blocks.0.ffn.2.lora_A.weight"].clone()))
    with pytest.raises(UnsupportedCheckpointError, match="two keys"):
        read_wan_lora(twice, layout=inspect_wan_transformer(path), model_name=path.name)
