"""core/vae.py: chunked decode to ComfyUI's IMAGE layout, and the fp16 overflow fallback (shown to run)."""
from __future__ import annotations

import copy
import logging

import torch

from flipbook_pack.core import vae as V


def _half_vae(lightning_model):
    return copy.deepcopy(lightning_model.vae).to(torch.float16)


def test_decode_gives_comfyui_images_in_chunks(lightning_model):
    latents = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    frames = V.decode_latents(lightning_model.vae, latents, 0.18215, chunk=4, progress=lambda d, n: seen.append((d, n)))
    assert frames.shape == (10, 64, 64, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert seen == [(4, 10), (8, 10), (10, 10)] and 0 <= float(frames.min()) and float(frames.max()) <= 1


def test_only_the_overflowing_chunk_is_decoded_again_in_fp32(lightning_model, caplog, monkeypatch):
    half = _half_vae(lightning_model)
    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents[8:] = 6e4  # overflows fp16 inside the decoder, for the second chunk only
    assert not torch.isfinite(half.decode(latents[8:].half()).sample).all()  # the fallback is needed
    calls = []
    real = V._decode_fp32
    monkeypatch.setattr(V, "_decode_fp32", lambda vae, part, dtype: (calls.append(part.shape[0]), real(vae, part, dtype))[1])
    with caplog.at_level(logging.WARNING):
        frames = V.decode_latents(half, latents, 1.0, chunk=8)
    assert calls == [8] and "frames 8-15 again in float32" in caplog.text
    assert torch.isfinite(frames).all() and next(half.parameters()).dtype == torch.float16  # restored
    # the re-decoded chunk is exactly the fp32 decode of the same (fp16-rounded) weights
    reference = V.decode_latents(copy.deepcopy(half).float(), latents[8:], 1.0, chunk=8)
    torch.testing.assert_close(frames[8:], reference)
    assert float((frames[:8] - V.decode_latents(half, latents[:8], 1.0)).abs().max()) == 0  # first chunk untouched


def test_frames_that_stay_infinite_are_an_error_not_white_frames(lightning_model):
    import pytest

    from flipbook_pack.core.errors import NonFiniteResultError

    vae = copy.deepcopy(lightning_model.vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("inf"))  # +inf everywhere: the clamp would make it white
    with pytest.raises(NonFiniteResultError, match="decoded frames contain .* NaN/inf weights in model.safetensors"):
        V.decode_latents(vae, torch.zeros(2, 4, 8, 8), 1.0, source="model.safetensors")
