"""nodes/lightning_nodes.py with ComfyUI's native types: the sampler's LATENT feeds it back (video-to-video from a
LATENT equals the same run from the decoded IMAGE's latents), init_images restyle frames on the trained timesteps,
and the node says which timesteps it ran."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS
from flipbook_pack.core.errors import InvalidSettingError
from flipbook_pack.lightning import pipeline as P


def _inputs(model, **overrides):
    base = dict(model=model, prompt="a fox", negative="", seed=1, frames=4, width=64, height=64, steps=4, cfg=1.0,
                scheduler="sgm_uniform", motion_scale=1.0)
    return {**base, **overrides}


def test_latent_and_images_in_restyle_on_the_trained_timesteps(lightning_model):
    sampler = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]()
    frames, latent = sampler.execute(**_inputs(lightning_model))
    out = sampler.execute(**_inputs(lightning_model, seed=2, denoise=0.5, latent=latent))
    (restyled, _), notes = out["result"], out["ui"]["flipbook_notes"]
    assert any("ran timesteps 499, 249 of the trained 999, 749, 499, 249" in n for n in notes)
    # the LATENT path and the IMAGE path start from the same latents: LATENT = VAE latents / scaling factor
    torch.testing.assert_close(latent["samples"] * lightning_model.scaling_factor,
                               P.generate(lightning_model, P.GenerationRequest(prompt="a fox", seed=1, frames=4,
                                                                               width=64, height=64)).latents)
    from_images = sampler.execute(**_inputs(lightning_model, seed=2, denoise=0.5, init_images=frames))["result"][0]
    assert from_images.shape == restyled.shape == (4, 64, 64, 3)
    with pytest.raises(InvalidSettingError, match="connect one of them"):
        sampler.execute(**_inputs(lightning_model, denoise=0.5, init_images=frames, latent=latent))
    with pytest.raises(InvalidSettingError, match="not an SD1.5 LATENT"):
        sampler.execute(**_inputs(lightning_model, denoise=0.5, latent={"samples": torch.zeros(1, 16, 2, 8, 8)}))


def test_conditioning_in_replaces_the_prompt_text(lightning_model):
    from flipbook_pack.core.prompt import encode_weighted

    sampler = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]()
    by_text, _ = sampler.execute(**_inputs(lightning_model, prompt="a red fox", cfg=1.5, negative="blurry"))
    encode = lambda text: encode_weighted(lightning_model.tokenizer, lightning_model.text_encoder, text,  # noqa: E731
                                          torch.device("cpu"))
    out = sampler.execute(**_inputs(lightning_model, prompt="ignored", cfg=1.5, negative="ignored too",
                                    positive_cond=[[encode("a red fox"), {"pooled_output": None}]],
                                    negative_cond=[[encode("blurry"), {}]]))
    assert torch.equal(by_text, out["result"][0])
    assert "the prompt text was not used: positive_cond (CONDITIONING) replaces it" in out["ui"]["flipbook_notes"]
    for bad, words in (([[encode("a"), {}], [encode("b"), {}]], "2 entries"),
                       ([[encode("a"), {"control": object()}]], "control"), ([["x", {}]], "not a CONDITIONING")):
        with pytest.raises(InvalidSettingError, match=words):
            sampler.execute(**_inputs(lightning_model, positive_cond=bad))
    with pytest.raises(InvalidSettingError, match="SDXL's is 2048 wide"):
        sampler.execute(**_inputs(lightning_model, positive_cond=[[torch.zeros(1, 77, 2048), {}]]))


def test_init_images_are_checked_before_encoding_and_rgba_is_accepted(lightning_model, monkeypatch):
    from flipbook_pack.lightning import pipeline as pipeline_module

    sampler = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]()
    encoded = []
    real = pipeline_module.encode_frames
    monkeypatch.setattr(pipeline_module, "encode_frames", lambda *a, **k: (encoded.append(1), real(*a, **k))[1])
    with pytest.raises(InvalidSettingError, match="init_images are 40 frames of 64x64.*cut the video to at most"):
        sampler.execute(**_inputs(lightning_model, denoise=0.5, init_images=torch.rand(40, 64, 64, 3)))
    with pytest.raises(InvalidSettingError, match="64x72"):
        sampler.execute(**_inputs(lightning_model, denoise=0.5, init_images=torch.rand(4, 72, 64, 3)))
    from flipbook_pack.core.errors import SettingsMismatchError

    with pytest.raises(SettingsMismatchError):  # a strict-policy mismatch is reported before any encode
        sampler.execute(**_inputs(lightning_model, steps=8, denoise=0.5, init_images=torch.rand(4, 64, 64, 3)))
    assert not encoded
    frames, _ = sampler.execute(**_inputs(lightning_model, denoise=0.5, init_images=torch.rand(4, 64, 64, 4)))["result"]
    assert frames.shape == (4, 64, 64, 3) and encoded


def test_low_denoise_is_refused_when_queued():
    check = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"].VALIDATE_INPUTS
    assert "runs no step" in check(denoise=0.2, steps=4)
    assert check(denoise=0.25, steps=4) is True
