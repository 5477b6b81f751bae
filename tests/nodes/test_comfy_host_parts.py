"""nodes/_comfy.py host_parts with the real ComfyUI: MODEL / CLIP / VAE from comfy.sd's own checkpoint loader (and
its LoRA loader) into the Flipbook Lightning loader.

Runs where ComfyUI is importable (`COMFYUI_DIR=/tmp/comfyui /tmp/comfyui-venv/bin/python -m pytest
tests/nodes/test_comfy_host_parts.py`); skipped in CI, which has no ComfyUI. The checkpoint is the smallest one
ComfyUI's model detection accepts (tiny_models.COMFY_READABLE_SIZES: 320-wide UNet, real-size CLIP and VAE).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if COMFYUI_DIR and COMFYUI_DIR not in sys.path:
    sys.path.insert(0, COMFYUI_DIR)
try:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # this machine has no GPU; --cpu is how the harness starts ComfyUI too
    import comfy.model_management as management
    import comfy.sd
    import comfy.utils
except ImportError:
    pytest.skip("ComfyUI is not importable (set COMFYUI_DIR to a checkout)", allow_module_level=True)

from flipbook_pack.core.errors import IncompatibleModelsError  # noqa: E402
from flipbook_pack.lightning import pipeline as P  # noqa: E402
from flipbook_pack.lightning import tiny_models as T  # noqa: E402
from flipbook_pack.lightning.sd15_lora import with_sd15_lora  # noqa: E402
from flipbook_pack.nodes import _comfy  # noqa: E402

REQUEST = P.GenerationRequest(prompt="a fox running in snow", frames=8, width=64, height=64, seed=3)


@pytest.fixture(scope="module")
def readable(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_readable")
    ckpt = T.write_safetensors(T.tiny_sd15_state_dict(T.COMFY_READABLE_SIZES), root / "checkpoints" / "sd15.safetensors")
    motion = T.write_safetensors(T.tiny_motion_state_dict(T.COMFY_READABLE_SIZES),
                                 root / "animatediff_models" / "animatediff_lightning_4step_comfyui.safetensors")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    _comfy.use_headless(None)
    yield dict(ckpt=ckpt, motion=motion, model=model, clip=clip, vae=vae, root=root)
    management.unload_all_models()


def _load(files, **parts):
    host = _comfy.host_parts(**parts)
    return P.load_lightning(None if len(host.given) == 3 else files["ckpt"], files["motion"], device="cpu",
                            dtype=torch.float32, host=host)


def test_comfyui_model_and_vae_give_the_file_weights_frames(readable):
    from_file = P.load_lightning(readable["ckpt"], readable["motion"], device="cpu", dtype=torch.float32)
    hosted = _load(readable, model=readable["model"], vae=readable["vae"])
    torch.testing.assert_close(P.generate(hosted, REQUEST).frames, P.generate(from_file, REQUEST).frames,
                               rtol=0, atol=0)


def test_comfyui_clip_encodes_the_prompt_like_the_checkpoints_encoder(readable):
    from_file = P.load_lightning(readable["ckpt"], readable["motion"], device="cpu", dtype=torch.float32)
    hosted = _load(readable, model=readable["model"], clip=readable["clip"], vae=readable["vae"])
    assert hosted.text_encoder is None
    # ComfyUI computes CLIP with its own attention and fp16-stored weights: close, not bit-equal
    torch.testing.assert_close(P.generate(hosted, REQUEST).frames, P.generate(from_file, REQUEST).frames,
                               rtol=0, atol=2e-2)


def test_core_lora_loader_patches_reach_the_flipbook_unet(readable):
    """comfy.sd.load_lora_for_models (LoraLoader) on MODEL gives what Flipbook's own LoRA node gives."""
    plain = P.load_lightning(readable["ckpt"], readable["motion"], device="cpu", dtype=torch.float32)
    tensors, _ = T.tiny_kohya_lora(plain.unet, plain.text_encoder, seed=31)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    path = T.write_safetensors(unet_only, readable["root"] / "loras" / "style.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched_model, _ = comfy.sd.load_lora_for_models(readable["model"], readable["clip"], lora, 0.8, 0.8)
    hosted = _load(readable, model=patched_model)
    ours = with_sd15_lora(plain, path, strength=0.8)
    frames = P.generate(hosted, REQUEST).frames
    torch.testing.assert_close(frames, P.generate(ours, REQUEST).frames, rtol=0, atol=1e-4)
    assert (frames - P.generate(plain, REQUEST).frames).abs().max() > 1e-3
    # ComfyUI's own model is left as it was (the patched weights are copies)
    assert not readable["model"].model.current_weight_patches_uuid


def test_sampling_patches_on_the_model_are_refused(readable):
    patched = readable["model"].clone()
    patched.set_model_unet_function_wrapper(lambda apply, args: apply(args["input"], args["timestep"], **args["c"]))
    with pytest.raises(IncompatibleModelsError, match="model_function_wrapper"):
        _comfy.host_parts(model=patched)
    cached = readable["model"].clone()  # core EasyCache keeps its state in transformer_options
    cached.model_options["transformer_options"]["easycache"] = object()
    with pytest.raises(IncompatibleModelsError, match="easycache"):
        _comfy.host_parts(model=cached)
    wrapped = readable["model"].clone()
    wrapped.add_wrapper_with_key("outer_sample", "some_pack", lambda executor, *a, **k: executor(*a, **k))
    with pytest.raises(IncompatibleModelsError, match="wrappers"):
        _comfy.host_parts(model=wrapped)


def test_the_loader_warns_when_a_lora_chain_is_half_connected(readable):
    from flipbook_pack.nodes import lightning_nodes

    _comfy.use_headless(_comfy.HeadlessHost(models_dir=readable["root"], output_dir=readable["root"] / "out"))
    try:
        result = lightning_nodes._load("sd15.safetensors", "animatediff_lightning_4step_comfyui.safetensors", "auto",
                                       "strict", model=readable["model"])
    finally:
        _comfy.use_headless(None)
    notes = result.ui["flipbook_notes"]
    assert notes[0] == "MODEL from the connected nodes"
    assert "MODEL is connected but CLIP is not" in notes[1]


def test_a_non_sd15_vae_is_refused(readable):
    class NotSD15:
        latent_channels = 16
        patcher = readable["vae"].patcher

    with pytest.raises(IncompatibleModelsError, match="not an SD1.x VAE"):
        _comfy.host_parts(vae=NotSD15())


def test_a_non_sd15_clip_is_refused_at_load(readable):
    class SDXLClipModel:
        pass

    class OtherClip:
        cond_stage_model = SDXLClipModel()

        def tokenize(self, text):
            return text

        def encode_from_tokens(self, tokens):
            return tokens

    assert type(readable["clip"].cond_stage_model).__name__ == "SD1ClipModel"  # what Load Checkpoint gives SD1.5
    with pytest.raises(IncompatibleModelsError, match="SDXLClipModel"):
        _comfy.host_parts(clip=OtherClip())
