"""CUDA checks (fp16 sampling, VAE fallback); skipped on machines without a GPU, run on the lent device."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.vae import decode_latents
from flipbook_pack.lightning import pipeline as P

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_fp16_sampling_matches_cpu_fp32(tiny_models, lightning_model):
    _, files = tiny_models
    gpu = P.load_lightning(files["ckpt"], files["original"])
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    request = P.GenerationRequest(prompt="a fox", frames=16, width=64, height=64, seed=5)
    on_gpu = P.generate(gpu, request).frames
    on_cpu = P.generate(lightning_model, request).frames
    assert torch.isfinite(on_gpu).all()
    assert float((on_gpu - on_cpu).abs().mean()) < 0.02  # same seed -> same video across devices


def test_fp16_vae_overflow_is_decoded_again_in_fp32(lightning_model):
    vae = lightning_model.vae.to("cuda", torch.float16)
    latents = torch.full((2, 4, 8, 8), 6e4, device="cuda")  # overflows fp16 inside the decoder
    frames = decode_latents(vae, latents, 1.0)
    assert torch.isfinite(frames).all() and next(vae.parameters()).dtype == torch.float16
    lightning_model.vae.to("cpu", torch.float32)


def test_components_wait_on_the_cpu_and_move_to_the_gpu_when_a_stage_needs_them(tiny_models):
    from flipbook_pack.core.model_handle import LocalMemory

    _, files = tiny_models
    gpu = P.load_lightning(files["ckpt"], files["original"])
    components = gpu.handle.components
    assert all(c.device.type == "cpu" for c in components.values())  # read onto the offload device
    P.generate(gpu, P.GenerationRequest(prompt="a fox", frames=8, width=64, height=64))
    assert all(c.device.type == "cuda" for c in components.values())  # room enough: nothing offloaded
    LocalMemory(gpu.handle, free_bytes=lambda device: 0).prepare([components["vae"]])
    assert components["unet"].device.type == "cpu" and components["vae"].device.type == "cuda"
