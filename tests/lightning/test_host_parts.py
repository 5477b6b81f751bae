"""lightning/host_parts.py: the UNet, VAE and CLIP a host hands over (ComfyUI's MODEL / VAE with their patches,
its CLIP) in place of the checkpoint's. The host's tensors are named as ComfyUI names them (LDM names without the
file's prefix); a hand-merged LoRA written to a real checkpoint file is the independent reference."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.checkpoints import load_state_dict
from flipbook_pack.core.errors import IncompatibleModelsError, InvalidSettingError, UnsupportedCheckpointError
from flipbook_pack.core.prompt import encode_weighted
from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.host_parts import HostParts, HostWeights
from flipbook_pack.lightning.sd15_checkpoint import UNET_PREFIX, VAE_PREFIX

REQUEST = P.GenerationRequest(prompt="a fox running in snow", frames=8, width=64, height=64, seed=5)


def _part(state, prefix, change=None):
    """A host network as ComfyUI holds it: the file's tensors under their LDM names without the prefix."""
    stored = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    patched = stored if change is None else {k: change(k, v) for k, v in stored.items()}
    return HostWeights(stored=lambda: stored, patched=lambda: {k: v.clone() for k, v in patched.items()})


def _encoder_of(model):
    return lambda text: encode_weighted(model.tokenizer, model.text_encoder, text, torch.device("cpu"))


def test_unet_from_the_host_gives_the_frames_of_the_same_weights_from_the_file(tiny_models, lightning_model):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    hosted = P.load_lightning(files["ckpt"], files["original"], device="cpu",
                              host=HostParts(unet=_part(state, UNET_PREFIX)))
    assert hosted.checkpoint_name == "tiny_sd15.safetensors with the MODEL input"
    torch.testing.assert_close(P.generate(hosted, REQUEST).frames, P.generate(lightning_model, REQUEST).frames,
                               rtol=0, atol=0)


def test_every_part_from_the_host_needs_no_checkpoint(tiny_models, lightning_model):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    calls = []
    encode = _encoder_of(lightning_model)
    host = HostParts(unet=_part(state, UNET_PREFIX), vae=_part(state, VAE_PREFIX),
                     encode_text=lambda text: (calls.append(text), encode(text))[1])
    hosted = P.load_lightning(None, files["original"], device="cpu", host=host)
    assert "text_encoder" not in hosted.handle.components and hosted.text_encoder is None
    frames = P.generate(hosted, REQUEST).frames
    assert calls == [REQUEST.prompt]  # the host's CLIP encodes the prompt, weighting and all
    torch.testing.assert_close(frames, P.generate(lightning_model, REQUEST).frames, rtol=0, atol=0)


def test_patched_host_weights_equal_a_hand_merged_checkpoint_file(tiny_models, tmp_path):
    """What ComfyUI's LoraLoader gives (weights with a delta added) loads like a file merged by hand."""
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    generator = torch.Generator().manual_seed(3)
    deltas = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in state.items()
              if k.startswith(UNET_PREFIX) and "attn2.to_k" in k}
    # both stored in the file's dtype, as ComfyUI casts a patched weight back to its own dtype
    merged = {k: (v.float() + deltas[k]).to(v.dtype) if k in deltas else v for k, v in state.items()}
    merged_file = T.write_safetensors(merged, tmp_path / "merged.safetensors")
    host = HostParts(unet=_part(state, UNET_PREFIX, change=lambda k, v: (v.float() + deltas.get(UNET_PREFIX + k, 0)).to(v.dtype)))
    hosted = P.load_lightning(files["ckpt"], files["original"], device="cpu", host=host)
    reference = P.load_lightning(merged_file, files["original"], device="cpu")
    plain = P.load_lightning(files["ckpt"], files["original"], device="cpu")
    frames = P.generate(hosted, REQUEST).frames
    torch.testing.assert_close(frames, P.generate(reference, REQUEST).frames, rtol=0, atol=0)
    assert (frames - P.generate(plain, REQUEST).frames).abs().max() > 1e-3  # the patch changes the output


def test_host_weights_are_read_again_after_a_release(tiny_models):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    reads = []
    part = _part(state, UNET_PREFIX)
    host = HostParts(unet=HostWeights(stored=part.stored, patched=lambda: (reads.append(1), part.patched())[1]))
    hosted = P.load_lightning(files["ckpt"], files["original"], device="cpu", host=host)
    first = P.generate(hosted, REQUEST).frames
    hosted.handle["unet"].release()
    torch.testing.assert_close(P.generate(hosted, REQUEST).frames, first, rtol=0, atol=0)
    assert len(reads) == 2


def test_a_checkpoint_without_a_vae_works_with_a_host_vae(tiny_models, tmp_path):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    no_vae = T.write_safetensors({k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)},
                                 tmp_path / "no_vae.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="no baked-in VAE"):
        P.load_lightning(no_vae, files["original"], device="cpu")
    model = P.load_lightning(no_vae, files["original"], device="cpu", host=HostParts(vae=_part(state, VAE_PREFIX)))
    assert P.generate(model, REQUEST).frames.shape == (8, 64, 64, 3)


def test_missing_parts_without_a_checkpoint_are_named(tiny_models):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    with pytest.raises(InvalidSettingError, match=r"no CLIP, VAE connected.*choose ckpt_name"):
        P.load_lightning(None, files["original"], device="cpu", host=HostParts(unet=_part(state, UNET_PREFIX)))
    for nothing in (None, HostParts()):  # ckpt_name 'none' and nothing connected
        with pytest.raises(InvalidSettingError, match=r"no MODEL, CLIP, VAE connected"):
            P.load_lightning(None, files["original"], device="cpu", host=nothing)


def test_an_sdxl_wide_host_clip_is_refused_when_encoding(tiny_models, lightning_model):
    _, files = tiny_models
    host = HostParts(encode_text=lambda text: torch.zeros(1, 77, 2048))
    model = P.load_lightning(files["ckpt"], files["original"], device="cpu", host=host)
    with pytest.raises(InvalidSettingError, match=r"CLIP input's prompt embedding is \(1, 77, 2048\).*SDXL"):
        P.generate(model, REQUEST)


def test_a_lora_with_text_encoder_keys_is_refused_when_the_host_encodes(tiny_models, lightning_model, tmp_path):
    from flipbook_pack.lightning.sd15_lora import with_sd15_lora

    _, files = tiny_models
    tensors, _ = T.tiny_kohya_lora(lightning_model.unet, lightning_model.text_encoder)
    lora = T.write_safetensors(tensors, tmp_path / "style.safetensors")
    model = P.load_lightning(files["ckpt"], files["original"], device="cpu",
                             host=HostParts(encode_text=_encoder_of(lightning_model)))
    with pytest.raises(IncompatibleModelsError, match="core LoraLoader"):
        with_sd15_lora(model, lora, strength=0.8)
    unet_only = T.write_safetensors({k: v for k, v in tensors.items() if k.startswith("lora_unet_")},
                                    tmp_path / "unet_only.safetensors")
    assert with_sd15_lora(model, unet_only, strength=0.8).loras


def test_an_sdxl_file_is_still_refused_for_the_parts_it_gives(tiny_models, tmp_path):
    _, files = tiny_models
    state = load_state_dict(files["ckpt"])
    sdxl = dict(state)
    sdxl["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    path = T.write_safetensors(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="SDXL"):
        P.load_lightning(path, files["original"], device="cpu", host=HostParts(unet=_part(state, UNET_PREFIX)))

