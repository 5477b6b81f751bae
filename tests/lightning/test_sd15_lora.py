"""lightning/sd15_lora.py: a kohya SD1.5 LoRA (and LoCon) on the tiny Lightning model gives the frames of the same
model with the deltas added to its weights by hand; strengths stack; swaps restore the base bit for bit; LoRAs for
other bases are typed errors naming both."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.sd15_lora import with_sd15_lora

REQUEST = P.GenerationRequest(prompt="a fox", seed=3, frames=4, width=64, height=64, steps=4)


def _write(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("locon", [False, True])
def test_kohya_lora_equals_weights_merged_by_hand(tiny_models, lightning_model, tmp_path, locon):
    _, files = tiny_models
    tensors, deltas = T.tiny_kohya_lora(lightning_model.unet, lightning_model.text_encoder, locon=locon)
    lora_path = _write(tensors, tmp_path / "style.safetensors")
    patched = with_sd15_lora(lightning_model, lora_path, strength=0.8)
    lora = patched.loras[0][0]
    assert len(lora.pairs) == len(deltas) and "0 unmatched" in lora.summary()
    ours = P.generate(patched, REQUEST).frames
    reference = P.load_lightning(files["ckpt"], files["original"], device="cpu")
    with torch.no_grad():
        for (network, name), delta in deltas.items():
            module = reference.unet if network == "unet" else reference.text_encoder
            module.get_submodule(name).weight.add_(0.8 * delta)
    torch.testing.assert_close(ours, P.generate(reference, REQUEST).frames, atol=2e-5, rtol=1e-4)
    base = P.generate(lightning_model, REQUEST).frames
    assert (ours - base).abs().max() > 1e-3
    assert torch.equal(P.generate(lightning_model, REQUEST).frames, base)  # swapped back: bit for bit
    twice = with_sd15_lora(patched, lora_path, strength=0.6)
    result = P.generate(twice, REQUEST)
    assert any("add up to 1.4" in note for note in result.notes)


def test_other_bases_and_unknown_keys_are_refused(lightning_model, tmp_path):
    cases = {
        "sdxl.safetensors": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 4)},
                             IncompatibleModelsError, "SDXL LoRA"),
        "wan.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 4)},
                            IncompatibleModelsError, "Wan LoRA"),
        "unknown.safetensors": ({"lora_unet_input_blocks_1_0_in_layers_9.lora_down.weight": torch.zeros(4, 32, 3, 3),
                                 "lora_unet_input_blocks_1_0_in_layers_9.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                                UnsupportedCheckpointError, "match nothing"),
        "twice.safetensors": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
                               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
                               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
                               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                              UnsupportedCheckpointError, "mixes LDM and diffusers"),
        "loha.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)},
                             UnsupportedCheckpointError, "LoHa"),
    }
    for name, (tensors, error, words) in cases.items():
        with pytest.raises(error, match=words):
            with_sd15_lora(lightning_model, _write(tensors, tmp_path / name), strength=1.0)
    wide = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
            torch.zeros(4, 1024),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(IncompatibleModelsError, match="SD2 LoRA is 1024 wide"):
        with_sd15_lora(lightning_model, _write(wide, tmp_path / "sd2.safetensors"), strength=1.0)


def test_lora_node_headless(tiny_models, lightning_model, tmp_path):
    from flipbook_pack import NODE_CLASS_MAPPINGS
    from flipbook_pack.nodes import _comfy

    root, _ = tiny_models
    tensors, deltas = T.tiny_kohya_lora(lightning_model.unet, lightning_model.text_encoder)
    (root / "loras").mkdir(exist_ok=True)
    _write(tensors, root / "loras" / "toon_style.safetensors")
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=root, output_dir=tmp_path))
    try:
        out = NODE_CLASS_MAPPINGS["FlipbookLightningLoraLoader"]().execute(model=lightning_model,
                                                                           lora_name="toon_style.safetensors",
                                                                           strength=0.8)
        (patched,), notes = out["result"], out["ui"]["flipbook_notes"]
        assert patched.loras[0][1] == 0.8 and lightning_model.loras == ()
        unet = sum(network == "unet" for network, _ in deltas)
        assert notes == [f"toon_style.safetensors: kohya LoRA, applied {unet} UNet and {len(deltas) - unet} "
                         "text-encoder pairs; 0 unmatched"]
    finally:
        _comfy.use_headless(None)


# lightning-breadth.md 2.1: LDM attention blocks -> diffusers (SD1.5: 2 layers per block)
LDM_ATTENTIONS = {"input_blocks_1_1": "down_blocks_0_attentions_0", "input_blocks_2_1": "down_blocks_0_attentions_1",
                  "input_blocks_4_1": "down_blocks_1_attentions_0", "input_blocks_5_1": "down_blocks_1_attentions_1",
                  "input_blocks_7_1": "down_blocks_2_attentions_0", "input_blocks_8_1": "down_blocks_2_attentions_1",
                  "middle_block_1": "mid_block_attentions_0",
                  **{f"output_blocks_{3 + i}_1": f"up_blocks_{1 + i // 3}_attentions_{i % 3}" for i in range(9)}}


def test_ldm_named_lora_equals_the_diffusers_named_one(lightning_model, tmp_path):
    tensors, _ = T.tiny_kohya_lora(lightning_model.unet, lightning_model.text_encoder)
    ldm = {}
    for key, value in tensors.items():
        for ldm_name, diffusers_name in LDM_ATTENTIONS.items():
            key = key.replace("lora_unet_" + diffusers_name + "_", "lora_unet_" + ldm_name + "_")
        ldm[key] = value
    assert sum(k.startswith("lora_unet_input_blocks_") for k in ldm) > 0
    diffusers_named = with_sd15_lora(lightning_model, _write(tensors, tmp_path / "d.safetensors"), strength=0.8)
    ldm_named = with_sd15_lora(lightning_model, _write(ldm, tmp_path / "ldm.safetensors"), strength=0.8)
    assert set(ldm_named.loras[0][0].pairs) == set(diffusers_named.loras[0][0].pairs)
    assert torch.equal(P.generate(ldm_named, REQUEST).frames, P.generate(diffusers_named, REQUEST).frames)


def test_ldm_module_names_are_those_of_a_real_sd15_file(lightning_model):
    """Every LDM name the reader accepts is a module of a real SD1.5 file (the key list of ComfyUI's own LDM UNet at
    SD1.5 sizes, tests/data/sd15_ldm_keys.txt): the block table is checked against an independent source."""
    from pathlib import Path

    from flipbook_pack.lightning.ldm_names import ldm_module_names

    text = (Path(__file__).resolve().parent.parent / "data" / "sd15_ldm_keys.txt").read_text()
    real = {line[len("model.diffusion_model."):-len(".weight")] for line in text.splitlines()
            if line.startswith("model.diffusion_model.") and line.endswith(".weight")}
    names = ldm_module_names(lightning_model.unet)
    assert set(names) <= real and len(names) > 200
    assert names["input_blocks.10.0.in_layers.2"] == "down_blocks.3.resnets.0.conv1"  # where diffusers' mapper breaks
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"


def test_ldm_named_locon_equals_the_diffusers_named_one(lightning_model, tmp_path):
    from flipbook_pack.lightning.ldm_names import ldm_module_names

    tensors, _ = T.tiny_kohya_lora(lightning_model.unet, lightning_model.text_encoder, locon=True)
    to_ldm = {d.replace(".", "_"): ldm.replace(".", "_") for ldm, d in ldm_module_names(lightning_model.unet).items()}
    ldm = {}
    for key, value in tensors.items():
        stem, dot, suffix = key.partition(".")
        body = stem[len("lora_unet_"):]
        ldm[("lora_unet_" + to_ldm[body] if stem.startswith("lora_unet_") else stem) + dot + suffix] = value
    assert any("_in_layers_2." in k for k in ldm) and any(k.startswith("lora_unet_input_blocks_10_") for k in ldm)
    diffusers_named = with_sd15_lora(lightning_model, _write(tensors, tmp_path / "d.safetensors"), strength=0.8)
    ldm_named = with_sd15_lora(lightning_model, _write(ldm, tmp_path / "ldm.safetensors"), strength=0.8)
    assert set(ldm_named.loras[0][0].pairs) == set(diffusers_named.loras[0][0].pairs)
    assert torch.equal(P.generate(ldm_named, REQUEST).frames, P.generate(diffusers_named, REQUEST).frames)


def test_lycoris_cp_locon_lora_mid_equals_the_tucker_formula(lightning_model, tmp_path):
    """LyCORIS LoCon with `lora_mid` (CP/Tucker): dW[o,i,h,w] = strength * alpha / r * sum up[o,a] mid[a,s,h,w]
    down[s,i] (the decomposition's definition; ComfyUI weight_adapter/lora.py computes the same)."""
    from flipbook_pack.lightning.sd15_lora import apply_sd15_loras

    target = "down_blocks.1.resnets.0.conv1"
    weight = lightning_model.unet.get_submodule(target).weight
    out_ch, in_ch = weight.shape[:2]
    g = torch.Generator().manual_seed(5)
    up, mid, down = (torch.randn(out_ch, 4, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g),
                     torch.randn(4, in_ch, 1, 1, generator=g))
    stem = "lora_unet_" + target.replace(".", "_")
    path = _write({stem + ".lora_up.weight": up, stem + ".lora_mid.weight": mid, stem + ".lora_down.weight": down,
                   stem + ".alpha": torch.tensor(2.0)}, tmp_path / "cp.safetensors")
    apply_sd15_loras(lightning_model.handle["unet"], ())  # the shared model as loaded (other tests leave stacks)
    before = weight.detach().clone()
    patched = with_sd15_lora(lightning_model, path, strength=0.5)
    apply_sd15_loras(lightning_model.handle["unet"], patched.loras)
    try:
        expected = 0.5 * (2.0 / 4) * torch.einsum("oa,ashw,si->oihw", up.flatten(1), mid, down.flatten(1))
        torch.testing.assert_close(weight.detach() - before, expected, atol=1e-5, rtol=1e-4)
    finally:
        apply_sd15_loras(lightning_model.handle["unet"], ())
    assert torch.equal(weight.detach(), before)
