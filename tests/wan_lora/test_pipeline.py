"""wan_lora/pipeline.py: sampling the tiny Wan transformer loaded through the real loader. Matches diffusers'
WanPipeline on the same weights and noise; CFG 1 is one forward per step; presets and video rules refuse bad
settings with typed errors before any model run."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core.errors import IncompatibleModelsError, InvalidSettingError, SettingsMismatchError
from flipbook_pack.wan_lora import pipeline as W
from flipbook_pack.wan_lora import tiny_transformer as T
from flipbook_pack.wan_lora.nag import NagSettings


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = T.write_tiny_wan(tmp_path_factory.mktemp("wan") / "wan2.1_t2v_tiny_fp32.safetensors", storage="fp32")
    return W.load_wan_transformer(path, device="cpu")


def _text(seed, tokens=6, width=32):
    context = torch.zeros(1, 512, width)
    context[:, :tokens] = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))
    return context


def _request(**overrides):
    base = dict(positive=_text(1), negative=_text(2), seed=3, frames=5, width=32, height=32, steps=4, cfg=5.0,
                shift=5.0, sampler="unipc", preset="custom")
    return W.WanSampleRequest(**{**base, **overrides})


def test_equals_diffusers_wan_pipeline_on_the_same_weights(model, monkeypatch):
    """Same weights, embeddings and noise as diffusers' WanPipeline (CFG 5, UniPC, shift 5). Flipbook follows
    ComfyUI where the two differ (t = 1000 sigma as a float, start = sigma_max * noise); with diffusers'
    conventions patched in (integer t, its sigmas, start = noise) the latents agree to float precision."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from flipbook_pack.core import denoisers

    def scheduler():
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                       solver_order=2, solver_type="bh2", lower_order_final=True,
                                       final_sigmas_type="zero")

    request = _request()
    start = W.seeded_noise(W.latent_shape(frames=5, width=32, height=32), 3)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model.transformer,
                       scheduler=scheduler())
    theirs = pipe(prompt_embeds=request.positive, negative_prompt_embeds=request.negative, guidance_scale=5.0,
                  num_inference_steps=4, num_frames=5, height=32, width=32, latents=start.clone(),
                  output_type="latent").frames.float()
    reference = scheduler()
    reference.set_timesteps(4)
    integer_t = denoisers.Parameterization(name="flow", input_scale=lambda s: 1.0,
                                           timestep=lambda s: (s * 1000).to(torch.int64).float(),
                                           initial_scale=lambda s: 1.0)
    monkeypatch.setattr(W, "flow_prediction", lambda: integer_t)
    monkeypatch.setattr(W, "FLOW_SCHEDULES", {"unipc": lambda steps, shift: reference.sigmas.float()})
    ours = W.sample_wan(model, request)
    torch.testing.assert_close(ours.latents, theirs, atol=2e-5, rtol=1e-4)
    assert (ours.denoiser_calls, ours.model_forwards) == (4, 4)  # the CFG branches share one batch


def test_cfg_one_is_one_forward_per_step_and_never_builds_the_negative(model):
    result = W.sample_wan(model, _request(cfg=1.0, negative=torch.full((1, 512, 32), float("nan"))))
    assert (result.denoiser_calls, result.model_forwards) == (4, 4)
    assert torch.isfinite(result.latents).all()


def test_nag_at_cfg_one_guides_every_step_at_one_forward_each(model):
    plain = W.sample_wan(model, _request(cfg=1.0))
    nag = W.sample_wan(model, _request(cfg=1.0, nag=NagSettings()))
    assert (nag.model_forwards, nag.nag_calls) == (4, 4)
    assert (nag.latents - plain.latents).abs().max() > 1e-3
    off = W.sample_wan(model, _request(cfg=1.0, nag=NagSettings(), negative_is_empty=True))
    assert torch.equal(off.latents, plain.latents) and "NAG is off" in " ".join(off.notes)


def test_same_seed_same_latents(model):
    first, again = W.sample_wan(model, _request()), W.sample_wan(model, _request())
    assert torch.equal(first.latents, again.latents)
    assert not torch.equal(first.latents, W.sample_wan(model, _request(seed=4)).latents)


def test_distilled_schedule_and_dpmpp_run(model):
    result = W.sample_wan(model, _request(preset="lightx2v_4step", steps=4, cfg=1.0, sampler="euler"))
    torch.testing.assert_close(result.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]))
    assert torch.isfinite(W.sample_wan(model, _request(sampler="dpm++")).latents).all()


@pytest.mark.parametrize("overrides, error, words", [
    (dict(frames=80), InvalidSettingError, "use 77 or 81"),
    (dict(width=850), InvalidSettingError, "nearest is 848"),
    (dict(height=8), InvalidSettingError, "multiples of 16"),
    (dict(positive=_text(1, width=48)), IncompatibleModelsError, "umt5"),
    (dict(preset="lightx2v_4step", sampler="euler", cfg=5.0), SettingsMismatchError, "completely blurred"),
    (dict(preset="lightx2v_4step", sampler="euler", cfg=1.0, steps=50), SettingsMismatchError, "base model"),
    (dict(preset="lightx2v_4step", sampler="unipc", cfg=1.0), SettingsMismatchError, "euler"),
    (dict(cfg=float("nan")), InvalidSettingError, "finite"),
    (dict(shift=0.0), InvalidSettingError, "positive"),
    (dict(sampler="heun"), InvalidSettingError, "unipc"),
    (dict(preset="wan22"), InvalidSettingError, "wan21_t2v_base"),
])
def test_bad_settings_are_refused_before_sampling(model, monkeypatch, overrides, error, words):
    monkeypatch.setattr(W, "SAMPLERS", {})  # any sampling attempt would raise KeyError instead
    with pytest.raises(error, match=words):
        W.sample_wan(model, _request(**overrides))


def test_fill_policy_uses_the_preset_and_says_so(model):
    result = W.sample_wan(model, _request(preset="lightx2v_4step", policy="fill", sampler="unipc", cfg=4.0, steps=8))
    assert (result.settings.steps, result.settings.cfg, result.settings.sampler) == (4, 1.0, "euler")
    assert any("policy 'fill'" in note for note in result.notes)


def test_trigger_phrases_are_added_once_and_only_when_missing():
    import types

    def entry(name, trigger, strength=1.0):
        return types.SimpleNamespace(lora=types.SimpleNamespace(name=name), trigger=trigger, strength=strength)

    model = types.SimpleNamespace(loras=(entry("a.safetensors", "Studio Ghibli style."),
                                         entry("b.safetensors", "Studio Ghibli style."), entry("c", "pixel art", 0.0)))
    prompt, notes = W.prompt_with_triggers("a girl on a hill", model)
    assert prompt == "Studio Ghibli style. a girl on a hill" and len(notes) == 1
    assert W.prompt_with_triggers("studio ghibli style, a girl", model) == ("studio ghibli style, a girl", ())
