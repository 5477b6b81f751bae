"""nodes/_comfy.py hands Flipbook's components to the real ComfyUI model manager (ModelPatcher per
component, load_models_gpu before each stage, unload releases, lowvram cast path).

Runs where ComfyUI is importable: set COMFYUI_DIR to a ComfyUI checkout and use a Python that has its
requirements, e.g. `COMFYUI_DIR=/tmp/comfyui /tmp/comfyui-venv/bin/python -m pytest tests/nodes/test_comfy_memory.py`.
Skipped elsewhere (CI has no ComfyUI: it is not on PyPI).
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
    import comfy.model_patcher
except ImportError:
    pytest.skip("ComfyUI is not importable (set COMFYUI_DIR to a checkout)", allow_module_level=True)

from flipbook_pack.lightning import pipeline as P  # noqa: E402
from flipbook_pack.nodes import _comfy  # noqa: E402

REQUEST = P.GenerationRequest(prompt="a fox running in snow", negative="blurry", frames=8, width=64, height=64,
                              seed=3, cfg=1.5)


@pytest.fixture()
def inside_comfyui():
    _comfy.use_headless(None)
    yield
    management.unload_all_models()


@pytest.fixture()
def managed(tiny_models, inside_comfyui):
    _, files = tiny_models
    model = P.load_lightning(files["ckpt"], files["original"], device=_comfy.torch_device(),
                             dtype=_comfy.compute_dtype(), placements=_comfy.component_placements())
    return model, _comfy.memory_for(model.handle)


def test_placements_come_from_comfyui(inside_comfyui):
    placements = _comfy.component_placements()
    assert set(placements) == {"unet", "text_encoder", "vae"}
    assert placements["unet"][:2] == (management.get_torch_device(), management.unet_offload_device())
    assert placements["text_encoder"][:2] == (management.text_encoder_device(),
                                              management.text_encoder_offload_device())
    assert placements["vae"][:2] == (management.vae_device(), management.vae_offload_device())


def test_each_component_is_a_model_patcher_loaded_before_its_stage(managed, lightning_model, monkeypatch):
    model, memory = managed
    assert memory is _comfy.memory_for(model.handle)  # one set of patchers per loaded model
    assert all(isinstance(p, comfy.model_patcher.ModelPatcher) for p in memory.patchers.values())
    assert {n: p.model_size() for n, p in memory.patchers.items()} == {
        n: c.size_bytes for n, c in model.handle.components.items()}
    requested = []
    real = management.load_models_gpu
    monkeypatch.setattr(management, "load_models_gpu",
                        lambda models, **kw: (requested.append([p.model.network for p in models]), real(models, **kw)))
    frames = P.generate(model, REQUEST, memory=memory).frames
    assert requested == [[model.text_encoder], [model.unet], [model.vae]]
    assert all(p in management.loaded_models() for p in memory.patchers.values())
    # the cast-capable layers and the wrapper change nothing: same frames as the headless run
    torch.testing.assert_close(frames, P.generate(lightning_model, REQUEST).frames)


def test_unload_models_releases_the_weights_and_the_next_run_reads_them_again(managed):
    model, memory = managed
    before = P.generate(model, REQUEST, memory=memory).frames
    management.unload_all_models()  # what POST /free {"unload_models": true} does
    assert not any(c.resident for c in model.handle.components.values())
    assert not any(p in management.loaded_models() for p in memory.patchers.values())
    torch.testing.assert_close(P.generate(model, REQUEST, memory=memory).frames, before)


def test_partial_load_streams_weights_through_comfyuis_cast_path(managed):
    model, memory = managed
    before = P.generate(model, REQUEST, memory=memory).frames
    unet = memory.patchers["unet"]
    unet.detach()  # on the CPU this releases the weights: read them again, as ComfyMemory.prepare does
    model.handle["unet"].materialize()
    unet.partially_load(management.get_torch_device(), extra_memory=1)  # --lowvram with ~no room: stream all
    casting = [m for m in model.unet.modules() if getattr(m, "comfy_cast_weights", False)]
    assert len(casting) > 100 and unet.model.model_lowvram
    torch.testing.assert_close(P.generate(model, REQUEST, memory=_NoLoad()).frames, before)


class _NoLoad:
    """Keeps the partial load in place (load_models_gpu would turn it into a full load on the CPU)."""

    def prepare(self, components, working_bytes=0):
        return None


def test_two_runs_in_a_row_keep_the_weights(managed):
    """load_models_gpu detaches a loaded model (unpatch_all=False) before loading it again: not an unload."""
    model, memory = managed
    first = P.generate(model, REQUEST, memory=memory).frames
    torch.testing.assert_close(P.generate(model, REQUEST, memory=memory).frames, first)
    assert all(c.resident for c in model.handle.components.values())


def test_every_component_streamed_gives_the_same_frames(managed):
    """All three networks (Linear, Conv, norms and CLIP's embeddings) through ComfyUI's cast path."""
    model, memory = managed
    before = P.generate(model, REQUEST, memory=memory).frames
    for name, patcher in memory.patchers.items():
        patcher.detach()
        model.handle[name].materialize()
        patcher.partially_load(management.get_torch_device(), extra_memory=1)
    embeddings = [m for m in model.text_encoder.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(m.comfy_cast_weights for m in embeddings)
    torch.testing.assert_close(P.generate(model, REQUEST, memory=_NoLoad()).frames, before)


@pytest.fixture()
def wan_managed(tmp_path, inside_comfyui):
    from flipbook_pack.wan_lora import pipeline as W
    from flipbook_pack.wan_lora import tiny_transformer as T

    path = T.write_tiny_wan(tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors", storage="fp8_scaled")
    placements = _comfy.wan_placements()
    model = W.load_wan_transformer(path, placement=placements["transformer"])
    headless = W.load_wan_transformer(path, device="cpu", dtype=placements["transformer"][2])
    return model, _comfy.memory_for(model.handle), headless


def _wan_request():
    from flipbook_pack.wan_lora import pipeline as W
    from flipbook_pack.wan_lora.nag import NagSettings

    positive, negative = torch.zeros(1, 512, 32), torch.zeros(1, 512, 32)
    positive[:, :5], negative[:, :9] = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    return W.WanSampleRequest(positive=positive, negative=negative, frames=5, width=32, height=32, steps=3, cfg=1.0,
                              sampler="euler", preset="custom", nag=NagSettings())


def test_wan_fp8_transformer_under_comfyuis_manager_samples_as_headless(wan_managed, monkeypatch):
    """The fp8_scaled transformer as one ModelPatcher: loaded before sampling, unloaded by /free (its weights
    released and read again), fully and partially loaded; the latents equal the headless run's every time."""
    from flipbook_pack.wan_lora import pipeline as W

    model, memory, headless = wan_managed
    request = _wan_request()
    expected = W.sample_wan(headless, request).latents
    requested = []
    real = management.load_models_gpu
    monkeypatch.setattr(management, "load_models_gpu",
                        lambda models, **kw: (requested.append([p.model.network for p in models]), real(models, **kw)))
    torch.testing.assert_close(W.sample_wan(model, request, memory=memory).latents, expected)
    assert requested == [[model.transformer]] and memory.patchers["transformer"] in management.loaded_models()
    management.unload_all_models()
    assert not model.handle["transformer"].resident
    torch.testing.assert_close(W.sample_wan(model, request, memory=memory).latents, expected)
    patcher = memory.patchers["transformer"]
    patcher.detach()
    model.handle["transformer"].materialize()
    patcher.partially_load(management.get_torch_device(), extra_memory=1)
    from flipbook_pack.core.quantized import StoredLinear

    stored = [m for m in model.transformer.modules() if isinstance(m, StoredLinear)]
    assert len(stored) == 20 and all(m.comfy_cast_weights for m in stored)  # fp8 blocks stream, not copied
    torch.testing.assert_close(W.sample_wan(model, request, memory=_NoLoad()).latents, expected)


def test_wan_lora_stack_under_comfyuis_manager_equals_headless(wan_managed, tmp_path):
    """lightx2v-style LoRA (factors on block and embedding Linears, in-place diffs) on the fp8 model that ComfyUI
    manages, swapped and swapped back: the same latents as headless, the base output restored exactly."""
    from flipbook_pack.wan_lora import pipeline as W
    from flipbook_pack.wan_lora.tiny_loras import write_tiny_lora

    model, memory, headless = wan_managed
    lora_path, _ = write_tiny_lora(tmp_path / "lightx2v.safetensors", fmt="lightx2v")
    request = _wan_request()
    base = W.sample_wan(model, request, memory=memory).latents
    patched = W.sample_wan(W.with_lora(model, lora_path, strength=0.9), request, memory=memory).latents
    torch.testing.assert_close(patched, W.sample_wan(W.with_lora(headless, lora_path, strength=0.9), request).latents)
    assert (patched - base).abs().max() > 1e-3
    assert torch.equal(W.sample_wan(model, request, memory=memory).latents, base)
