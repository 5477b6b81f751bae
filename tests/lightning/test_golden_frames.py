"""The frames of fixed-seed runs equal those recorded before the shared model layer (commit 8274e8b).

tests/data/lightning_golden.safetensors holds the frames, average-pooled 4x4, of two runs on tiny
models written with the seeds below: CFG 1 with a weighted prompt, and CFG 1.5 with a negative
and motion scale 1.2. Any change to loading, prompt encoding, the denoiser, the sampler or the
decode shows here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import tiny_models as T

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "lightning_golden.safetensors"
CASES = {
    "cfg1": P.GenerationRequest(prompt="a (fox:1.3) running in snow", frames=8, width=64, height=64, seed=5),
    "cfg1p5": P.GenerationRequest(prompt="a fox running in snow", negative="blurry", frames=8, width=64, height=64,
                                  seed=6, cfg=1.5, motion_scale=1.2),
}


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    sizes = T.TinySizes(unet_channels=(32, 64, 128, 128), vae_channels=(32, 32, 64, 64), vae_layers=1)  # the sizes the frames were recorded with
    ckpt = T.write_safetensors(T.tiny_sd15_state_dict(sizes), folder / "golden_sd15.safetensors")
    motion = T.write_safetensors(T.tiny_motion_state_dict(sizes),
                                 folder / "animatediff_lightning_4step_comfyui.safetensors")
    return P.load_lightning(ckpt, motion, device="cpu")


@pytest.mark.parametrize("case", sorted(CASES))
def test_frames_equal_the_recorded_ones(golden_model, case):
    from safetensors.torch import load_file

    frames = P.generate(golden_model, CASES[case]).frames
    pooled = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2), 4)
    torch.testing.assert_close(pooled, load_file(str(GOLDEN))[case], atol=1e-5, rtol=0)
