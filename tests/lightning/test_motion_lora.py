"""lightning/motion_lora.py: guoyww-layout and diffusers-layout camera motion LoRAs on the tiny Lightning model equal
a motion module merged by hand (W += strength * up @ down); swapping back is bit for bit; a v2 LoRA on a v3 module
and an image LoRA are typed errors."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.motion_lora import with_motion_lora

REQUEST = P.GenerationRequest(prompt="a fox", seed=3, frames=4, width=64, height=64, steps=4)


def _write(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["guoyww", "diffusers"])
def test_motion_lora_equals_a_hand_merged_motion_module(tiny_models, lightning_model, tmp_path, layout):
    from safetensors.torch import load_file

    _, files = tiny_models
    motion = {k: v.float() for k, v in load_file(str(files["original"])).items()}  # the values the model holds
    tensors, plain = T.tiny_motion_lora(motion, layout=layout)
    lora_path = _write(tensors, tmp_path / "v2_lora_ZoomIn.safetensors")
    patched = with_motion_lora(lightning_model, lora_path, strength=0.75)
    assert patched.motion_loras[0][0].summary().endswith(f"applied {len(plain)} lora pairs; 0 unmatched")
    ours = P.generate(patched, REQUEST).frames
    merged = {k: (v + 0.75 * plain[k][0] @ plain[k][1]) if k in plain else v for k, v in motion.items()}
    merged_path = T.write_safetensors(merged, tmp_path / "animatediff_lightning_4step_comfyui.safetensors",
                                      dtype=torch.float32)
    reference = P.load_lightning(files["ckpt"], merged_path, device="cpu")
    torch.testing.assert_close(ours, P.generate(reference, REQUEST).frames, atol=2e-5, rtol=1e-4)
    base = P.generate(lightning_model, REQUEST).frames
    assert (ours - base).abs().max() > 1e-4
    assert torch.equal(P.generate(lightning_model, REQUEST).frames, base)  # the stack-less model: back bit for bit
    off = with_motion_lora(lightning_model, lora_path, strength=0.0)
    assert torch.equal(P.generate(off, REQUEST).frames, base)


def test_v2_lora_on_a_v3_module_and_an_image_lora_are_refused(tiny_models, tmp_path):
    _, files = tiny_models
    motion = T.tiny_motion_state_dict(layout="original")
    tensors, _ = T.tiny_motion_lora(motion)
    lora_path = _write(tensors, tmp_path / "v2_lora_PanLeft.safetensors")
    v3 = {k: v for k, v in motion.items() if not k.startswith("mid_block.")}
    v3_path = T.write_safetensors(v3, tmp_path / "v3_sd15_mm.safetensors")
    model = P.load_lightning(files["ckpt"], v3_path, device="cpu")
    assert model.motion.version == "v3"
    with pytest.raises(IncompatibleModelsError, match="mid-block keys have nothing to apply to.*v3"):
        with_motion_lora(model, lora_path, strength=0.75)
    image_lora = _write({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
                        tmp_path / "style.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="not an AnimateDiff motion LoRA"):
        with_motion_lora(model, image_lora, strength=0.75)


def test_motion_lora_node_headless(tiny_models, lightning_model, tmp_path):
    from flipbook_pack import NODE_CLASS_MAPPINGS
    from flipbook_pack.nodes import _comfy

    root, _ = tiny_models
    tensors, plain = T.tiny_motion_lora(T.tiny_motion_state_dict(layout="original"))
    (root / "animatediff_motion_lora").mkdir(exist_ok=True)
    _write(tensors, root / "animatediff_motion_lora" / "v2_lora_ZoomIn.safetensors")
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=root, output_dir=tmp_path))
    try:
        node = NODE_CLASS_MAPPINGS["FlipbookMotionLoraLoader"]
        assert "v2_lora_ZoomIn.safetensors" in node.INPUT_TYPES()["required"]["lora_name"][0]
        out = node().execute(model=lightning_model, lora_name="v2_lora_ZoomIn.safetensors", strength=0.75)
        (patched,), notes = out["result"], out["ui"]["flipbook_notes"]
        assert notes == [f"v2_lora_ZoomIn.safetensors: motion LoRA, applied {len(plain)} lora pairs; 0 unmatched"]
        assert patched.motion_loras[0][1] == 0.75 and lightning_model.motion_loras == ()
    finally:
        _comfy.use_headless(None)
