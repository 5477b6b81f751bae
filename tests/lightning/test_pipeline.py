"""lightning/pipeline.py: end-to-end sampling on tiny models: variant enforcement, CFG skipping, limits,
parity with diffusers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flipbook_pack.core.errors import IncompatibleModelsError, InvalidSettingError, SettingsMismatchError
from flipbook_pack.lightning import motion_module as MM
from flipbook_pack.lightning import pipeline as P
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.pipeline import load_lightning

SMALL = dict(prompt="a fox running in snow", frames=8, width=64, height=64)


def _request(**kw):
    return P.GenerationRequest(**{**SMALL, **kw})


def test_four_step_variant_at_cfg_1_calls_the_denoiser_exactly_four_times(lightning_model):
    assert lightning_model.variant.id == "lightning_4step"
    progress = []
    result = P.generate(lightning_model, _request(), progress=lambda d, n: progress.append((d, n)))
    assert result.denoiser_calls == 4
    assert result.frames.shape == (8, 64, 64, 3) and result.frames.dtype == torch.float32
    assert 0 <= float(result.frames.min()) and float(result.frames.max()) <= 1
    assert progress[-1][0] == progress[-1][1] and len(progress) >= 4


def test_cfg_1_never_evaluates_the_negative_branch(lightning_model, monkeypatch):
    encoded = []
    real = P.encode_weighted
    monkeypatch.setattr(P, "encode_weighted", lambda tok, te, text, dev: (encoded.append(text), real(tok, te, text, dev))[1])
    P.generate(lightning_model, _request(negative="ugly"))
    assert encoded == ["a fox running in snow"]
    encoded.clear()
    result = P.generate(lightning_model, _request(negative="ugly", cfg=1.5))
    assert sorted(encoded) == ["a fox running in snow", "ugly"] and result.denoiser_calls == 4


def test_same_seed_same_video_and_seed_matters(lightning_model):
    a = P.generate(lightning_model, _request(seed=7)).frames
    torch.testing.assert_close(a, P.generate(lightning_model, _request(seed=7)).frames)
    assert not torch.equal(a, P.generate(lightning_model, _request(seed=8)).frames)


def test_motion_scale_changes_temporal_attention_only_during_the_call(lightning_model):
    base = P.generate(lightning_model, _request(seed=3)).frames
    scaled = P.generate(lightning_model, _request(seed=3, motion_scale=1.2)).frames
    assert not torch.allclose(base, scaled)
    assert not any(layer._forward_hooks for layer in P.motion_attention_key_projections(lightning_model.unet))
    torch.testing.assert_close(P.generate(lightning_model, _request(seed=3)).frames, base)


@pytest.mark.parametrize("change,error,match", [
    (dict(steps=8), SettingsMismatchError, r"steps=4, got steps=8"),
    (dict(scheduler="leading"), SettingsMismatchError, "trailing"),
    (dict(frames=33), InvalidSettingError, r"at most 32 frames"),
    (dict(width=60), InvalidSettingError, "multiple of 8"),
    (dict(motion_scale=3.0), InvalidSettingError, "motion_scale"),
])
def test_bad_requests_fail_before_sampling(lightning_model, monkeypatch, change, error, match):
    monkeypatch.setattr(P, "SAMPLERS", {"euler": lambda *a, **k: pytest.fail("sampled despite a bad request")})
    with pytest.raises(error, match=match):
        P.generate(lightning_model, _request(**change))


def test_fill_policy_uses_variant_settings_and_reports(lightning_model):
    model = dataclasses.replace(lightning_model, policy="fill")
    result = P.generate(model, _request(steps=25, scheduler="leading"))
    assert result.settings.steps == 4 and result.denoiser_calls == 4 and len(result.notes) == 2


def test_explicit_variant_overrides_the_file_name(tiny_models):
    _, files = tiny_models
    model = P.load_lightning(files["ckpt"], files["original"], variant_id="lightning_8step", device="cpu")
    assert model.variant.id == "lightning_8step"
    with pytest.raises(SettingsMismatchError, match="v3"):
        P.load_lightning(files["ckpt"], files["original"], variant_id="animatediff_v3", device="cpu")


def test_diffusers_layout_gives_the_same_video(tiny_models, lightning_model):
    _, files = tiny_models
    other = P.load_lightning(files["ckpt"], files["diffusers"], device="cpu")
    torch.testing.assert_close(P.generate(other, _request()).frames, P.generate(lightning_model, _request()).frames)


def _diffusers_pipeline(files, beta_end=0.012):
    """diffusers' AnimateDiffPipeline built by diffusers and transformers themselves from the same files:
    normal construction + load_state_dict(strict) of diffusers' LDM conversion, the motion adapter from
    the `_diffusers` layout file, the card's scheduler (nothing of Flipbook's loader on this side)."""
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, EulerDiscreteScheduler, MotionAdapter,
                           UNet2DConditionModel)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from flipbook_pack.lightning import sd15_checkpoint as S
    from flipbook_pack.lightning.text import load_tokenizer

    layout = S.inspect_sd15_checkpoint(files["ckpt"])
    state = {k: v.float() for k, v in load_file(str(files["ckpt"])).items()}
    unet = UNet2DConditionModel(**layout.unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, layout.unet_config))
    vae = AutoencoderKL(**layout.vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, layout.vae_config))
    text = CLIPTextModel(CLIPTextConfig(**layout.text_config))
    prefix = "cond_stage_model.transformer."
    clip = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    nested = any(k.startswith("text_model.") for k in text.state_dict())
    text.load_state_dict({(k if nested else k.removeprefix("text_model.")): v for k, v in clip.items()}, strict=False)
    motion = {k: v.float() for k, v in load_file(str(files["diffusers"])).items()}
    adapter = MotionAdapter(block_out_channels=layout.unet_config["block_out_channels"], motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                            use_motion_mid_block=True)
    adapter.load_state_dict(motion)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="linear",
                                       timestep_spacing="trailing")
    pipe = AnimateDiffPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=load_tokenizer(),
                               unet=unet.eval(), motion_adapter=adapter.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore")
def test_matches_diffusers_animatediff_pipeline_from_the_same_start(tiny_models, lightning_model):
    """Same files, same x_T: our Euler loop equals diffusers' pipeline to float precision, and is
    sensitive enough that a beta_end of 0.01201 instead of 0.012 fails the comparison."""
    _, files = tiny_models
    request = _request(seed=11)
    noise = P.seeded_noise((1, 4, request.frames, 8, 8), request.seed)
    sigmas, _ = P.sigmas_for_steps(lightning_model.model_sigmas, "trailing", 4)
    x_start = P.initial_latent(noise, sigmas[0], P.epsilon_prediction(lightning_model.model_sigmas))

    def theirs(beta_end):
        pipe = _diffusers_pipeline(files, beta_end)
        # diffusers multiplies the given latents by init_noise_sigma (sigma_max for trailing spacing)
        latents = x_start / pipe.scheduler.init_noise_sigma
        return pipe(prompt=request.prompt, num_frames=request.frames, height=64, width=64, num_inference_steps=4,
                    guidance_scale=1.0, latents=latents, output_type="pt").frames[0].float()

    ours = P.generate(lightning_model, request).frames.permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, theirs(0.012), atol=1e-5, rtol=0)
    assert float((ours - theirs(0.01201)).abs().max()) > 1e-5


def test_model_repr_is_one_short_line(lightning_model):
    text = repr(lightning_model)
    assert text == ("LightningModel(tiny_sd15.safetensors + animatediff_lightning_4step_comfyui.safetensors, "
                    "lightning_4step, policy=strict, cpu float32)")


def test_the_prompt_changes_the_video(lightning_model):
    fox = P.generate(lightning_model, _request(prompt="a fox running in snow", seed=4)).frames
    city = P.generate(lightning_model, _request(prompt="a neon city street at night", seed=4)).frames
    assert float((fox - city).abs().mean()) > 1e-3


def test_sdxl_motion_module_with_sd15_checkpoint_is_refused(tiny_models):
    _, files = tiny_models
    with pytest.raises(IncompatibleModelsError, match=r"SDXL motion module.*SD1.5"):
        load_lightning(files["ckpt"], files["sdxl"], device="cpu")


def test_renamed_lightning_file_needs_an_explicit_variant():
    info = MM.inspect_motion_module(T.tiny_motion_state_dict())
    with pytest.raises(SettingsMismatchError, match="size of an AnimateDiff-Lightning file"):
        P.resolve_variant("auto", "my_motion.safetensors", info, file_size=908_929_664)
    variant, notes = P.resolve_variant("lightning_8step", "animatediff_lightning_4step_comfyui.safetensors", info)
    assert variant.id == "lightning_8step" and "named as AnimateDiff-Lightning 4-step" in notes[0]
    assert P.resolve_variant("auto", "mm_sd_v15_v2.safetensors", info, file_size=1234)[0].id == "animatediff_v2"


def test_timesteps_reach_the_unet_as_float32(lightning_model):
    seen = []
    handle = lightning_model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].dtype))
    try:
        P.generate(lightning_model, P.GenerationRequest(prompt="a", frames=2, width=64, height=64))
    finally:
        handle.remove()
    assert seen == [torch.float32] * 4


def test_prompts_of_very_different_lengths_run_apart_and_give_the_padded_result(lightning_model, monkeypatch):
    """5 chunks against 1 is past ComfyUI's padding bound: the branches run apart (two forwards a step)
    and the video equals the one from padding both to a common length."""
    long_prompt = "fox " * 330  # 330 tokens: 5 chunks of 75
    request = _request(prompt=long_prompt, negative="blurry", cfg=1.5, seed=2)
    apart = P.generate(lightning_model, request)
    monkeypatch.setattr(P, "join_contexts", lambda cs: torch.cat(P.match_lengths(cs)))
    padded = P.generate(lightning_model, request)
    torch.testing.assert_close(apart.frames, padded.frames, atol=1e-5, rtol=0)
    assert apart.denoiser_calls == padded.denoiser_calls == 4
    assert (apart.model_forwards, padded.model_forwards) == (8, 4)


def test_a_nan_prompt_weight_is_refused_before_anything_runs(lightning_model, monkeypatch):
    monkeypatch.setattr(P, "encode_weighted", lambda *a, **k: pytest.fail("encoded despite a bad prompt"))
    with pytest.raises(InvalidSettingError, match=r"Prompt weight \(fox:nan\) is nan"):
        P.generate(lightning_model, _request(prompt="a (fox:nan) running"))


def test_nan_weights_in_a_checkpoint_give_a_typed_error_not_black_frames(tiny_models, tmp_path):
    from flipbook_pack.core.errors import NonFiniteResultError
    from flipbook_pack.lightning import tiny_models as T

    _, files = tiny_models
    state = T.tiny_sd15_state_dict()
    state["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("nan")
    broken = T.write_safetensors(state, tmp_path / "broken.safetensors")
    model = P.load_lightning(broken, files["original"], device="cpu")
    with pytest.raises(NonFiniteResultError, match=r"sampled latents contain \d+ NaN/infinite values.*broken"
                                                    r"\.safetensors"):
        P.generate(model, _request())


def test_a_lightning_name_with_an_unknown_step_count_is_refused(tiny_models, tmp_path):
    import shutil

    _, files = tiny_models
    renamed = shutil.copy(files["original"], tmp_path / "animatediff_lightning_3step_comfyui.safetensors")
    with pytest.raises(SettingsMismatchError, match=r"3-step file, but no such variant exists \(known: lightning_1step"):
        P.load_lightning(files["ckpt"], renamed, device="cpu")


def test_a_nan_cfg_that_skipped_the_queue_check_is_refused_before_sampling(lightning_model, monkeypatch):
    monkeypatch.setattr(P, "SAMPLERS", {"euler": lambda *a, **k: pytest.fail("sampled with cfg NaN")})
    with pytest.raises(InvalidSettingError, match="cfg=nan: use a finite number"):
        P.generate(lightning_model, _request(cfg=float("nan")))


def test_comfyuis_scheduler_names_are_the_trailing_spacing(lightning_model):
    """sgm_uniform / simple (what the Lightning card tells ComfyUI users to pick) run the trained timesteps."""
    request = dict(prompt="a fox", seed=2, frames=4, width=64, height=64, steps=4)
    trailing = P.generate(lightning_model, P.GenerationRequest(**request, scheduler="trailing")).frames
    for name in ("sgm_uniform", "simple"):
        assert torch.equal(P.generate(lightning_model, P.GenerationRequest(**request, scheduler=name)).frames,
                           trailing)


def test_latents_decode_to_the_frames_through_diffusers_vae(lightning_model):
    """The sampler's LATENT (ComfyUI's SD1.5 layout: the VAE's own latents, one per frame) is what the VAE
    decodes into the IMAGE frames."""
    result = P.generate(lightning_model, P.GenerationRequest(prompt="a fox", seed=2, frames=4, width=64, height=64,
                                                             steps=4))
    comfy_latent = result.latents / lightning_model.scaling_factor
    assert comfy_latent.shape == (4, 4, 8, 8)
    with torch.no_grad():
        decoded = lightning_model.vae.decode(comfy_latent).sample
    torch.testing.assert_close(((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), result.frames, atol=1e-5,
                               rtol=1e-5)


def _timesteps_seen(model, request):
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1].reshape(-1)[0])))
    try:
        result = P.generate(model, request)
    finally:
        hook.remove()
    return seen, result


def test_video_to_video_runs_the_tail_of_the_trained_timesteps(lightning_model):
    base = dict(prompt="a fox", seed=2, frames=4, width=64, height=64, steps=4)
    source = P.generate(lightning_model, P.GenerationRequest(**base))
    init = P.encode_frames(lightning_model, source.frames)
    assert init.shape == (4, 4, 8, 8)
    for denoise, expected in ((0.5, [499, 249]), (0.3, [249]), (0.75, [749, 499, 249]), (1.0, [999, 749, 499, 249])):
        seen, result = _timesteps_seen(lightning_model, P.GenerationRequest(**base, init_latents=init, denoise=denoise))
        assert [round(t) for t in seen] == expected and result.denoiser_calls == len(expected)
        assert f"ran timesteps {', '.join(map(str, expected))} of the trained 999, 749, 499, 249" in " ".join(
            result.notes)
    # one image: image-to-animation (the image's latent on every frame, noised)
    seen, result = _timesteps_seen(lightning_model, P.GenerationRequest(**base, init_latents=init[:1], denoise=0.5))
    assert result.frames.shape == (4, 64, 64, 3)


def test_partial_denoise_starts_from_the_noised_input():
    from flipbook_pack.core import denoisers, schedules

    init, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    eps = denoisers.epsilon_prediction(schedules.discrete_sigmas("linear", 0.00085, 0.012))
    torch.testing.assert_close(denoisers.initial_latent(noise, torch.tensor(2.0), eps, init=init), init + 2.0 * noise)
    flow = denoisers.flow_prediction()
    torch.testing.assert_close(denoisers.initial_latent(noise, torch.tensor(0.4), flow, init=init),
                               0.6 * init + 0.4 * noise)


@pytest.mark.parametrize("overrides, words", [
    (dict(denoise=0.5), "needs input frames"),
    (dict(denoise=0.1, init_latents=torch.zeros(4, 4, 8, 8)), "runs no step"),
    (dict(denoise=0.0, init_latents=torch.zeros(4, 4, 8, 8)), "above 0"),
    (dict(denoise=1.5, init_latents=torch.zeros(4, 4, 8, 8)), "at most 1"),
    (dict(init_latents=torch.zeros(3, 4, 8, 8)), "set frames to 3"),
    (dict(init_latents=torch.zeros(4, 4, 16, 8)), "the size to 64x128"),
])
def test_bad_video_to_video_inputs_are_typed_errors(lightning_model, overrides, words):
    request = P.GenerationRequest(prompt="a fox", frames=4, width=64, height=64, steps=4, **overrides)
    with pytest.raises(InvalidSettingError, match=words):
        P.generate(lightning_model, request)


def test_context_windows_make_clips_longer_than_the_pe(lightning_model):
    from flipbook_pack.core.context_windows import uniform_standard

    seen = []
    hook = lightning_model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[2]))
    try:
        request = P.GenerationRequest(prompt="a fox", seed=2, frames=40, width=64, height=64, steps=4,
                                      context_schedule="standard", context_length=16, context_overlap=4)
        result = P.generate(lightning_model, request)
    finally:
        hook.remove()
    assert result.frames.shape == (40, 64, 64, 3) and torch.isfinite(result.frames).all()
    assert seen == [16] * sum(len(uniform_standard(40, 16, 4, step)) for step in range(4))
    short = dict(prompt="a fox", seed=2, frames=8, width=64, height=64, steps=4)
    torch.testing.assert_close(P.generate(lightning_model, P.GenerationRequest(**short, context_schedule="looped")).frames,
                               P.generate(lightning_model, P.GenerationRequest(**short)).frames, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidSettingError, match="turn on context windows"):
        P.generate(lightning_model, P.GenerationRequest(prompt="a fox", frames=40, width=64, height=64, steps=4))
    with pytest.raises(InvalidSettingError, match="context_length=40"):
        P.generate(lightning_model, dataclasses.replace(request, context_length=40))


def test_freenoise_changes_only_the_noise_of_later_windows(lightning_model):
    request = P.GenerationRequest(prompt="a fox", seed=2, frames=36, width=64, height=64, steps=2, scheduler="trailing",
                                  context_schedule="standard")
    lightning_model_2 = dataclasses.replace(lightning_model, variant=P.V.VARIANTS["lightning_2step"])  # 2 steps: faster
    plain = P.generate(lightning_model_2, request).frames
    shuffled = P.generate(lightning_model_2, dataclasses.replace(request, freenoise=True)).frames
    assert shuffled.shape == plain.shape and (shuffled - plain).abs().max() > 1e-4
