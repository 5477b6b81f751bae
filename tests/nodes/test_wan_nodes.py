"""nodes/wan_nodes.py and the Wan workflow: every bundled workflow is frontend-shaped; the Wan workflow runs
headless on the demo's tiny models (17 frames, 64 px) with a fixed seed giving the same frames each run; every
widget is settable; bad settings fail when queued, in one line, writing nothing; LATENT is ComfyUI's Wan layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS, cli
from flipbook_pack.core.media.readers import read_mp4_metadata
from flipbook_pack.nodes import _comfy
from flipbook_pack.nodes.headless import workflow_to_prompt

ROOT = Path(__file__).resolve().parent.parent.parent
WAN_WORKFLOW = json.loads((ROOT / "workflows" / "wan21_t2v_14b.json").read_text())
TINY = ["--set", "FlipbookWanSampler.resolution=custom (width x height below)", "--set", "FlipbookWanSampler.width=64",
        "--set", "FlipbookWanSampler.height=64", "--set", "FlipbookWanSampler.frames=17"]


def test_wan_workflow_holds_the_official_base_settings():
    prompt = workflow_to_prompt(WAN_WORKFLOW, NODE_CLASS_MAPPINGS)
    sampler = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanSampler")
    assert (sampler["preset"], sampler["sampler"], sampler["steps"], sampler["cfg"], sampler["shift"]) == (
        "wan21_t2v_base", "unipc", 50, 5.0, 5.0)
    assert (sampler["frames"], sampler["resolution"], sampler["nag_scale"]) == (81, "832x480", 1.0)
    encode = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanTextEncode")
    assert encode["negative"].startswith("色调艳丽") and "Ghibli" not in encode["positive"]
    loader = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanModelLoader")
    assert loader["model_name"] == "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"
    save = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookSaveVideo")
    assert save["fps"][1] == 1  # the decoder's 16 fps output feeds the save


@pytest.fixture(scope="module")
def wan_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("wan_models")
    cli.write_wan_demo_models(models, WAN_WORKFLOW)
    return models


def _run(models, out, *extra):
    return cli.main(["run", "wan21_t2v_14b.json", "--models", str(models), "--output-dir", str(out), *TINY, *extra])


def _frames(video):
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate)


def test_cli_demo_wan_writes_a_17_frame_16_fps_mp4_with_its_workflow(tmp_path, capsys):
    assert cli.main(["demo", "wan", "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out")]) == 0
    video = Path(capsys.readouterr().out.strip())
    for folder, name in (("diffusion_models", "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"),
                         ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("vae", "wan_2.1_vae.safetensors")):
        assert (tmp_path / "models" / folder / name).is_file()
    frames, fps = _frames(video)
    assert (len(frames), fps, frames[0].shape) == (17, 16.0, (64, 64, 3))
    found = read_mp4_metadata(video)
    assert found["workflow"]["nodes"][0]["type"] == "FlipbookWanModelLoader"
    assert next(v for v in found["prompt"].values() if v["class_type"] == "FlipbookWanSampler")["inputs"]["frames"] == 17


def test_fixed_seed_gives_the_same_frames_and_every_widget_is_settable(wan_models, tmp_path, capsys):
    # lossless APNG: the bytes are the frames (x264 encodes the first video of a process slightly differently
    # from later ones, so MP4 bytes are not a fair check of the generation)
    runs = []
    for folder in ("a", "b"):
        assert _run(wan_models, tmp_path / folder, "--set", "FlipbookWanSampler.steps=6",
                    "--set", "FlipbookSaveVideo.format=png") == 0
        runs.append(Path(capsys.readouterr().out.strip()).read_bytes())
    assert runs[0] == runs[1]
    settings = ["FlipbookWanSampler.sampler=dpm++", "FlipbookWanSampler.steps=5", "FlipbookWanSampler.cfg=1.0",
                "FlipbookWanSampler.nag_scale=11", "FlipbookWanSampler.nag_sigma_end=0.5", "FlipbookWanSampler.seed=7",
                "FlipbookWanTextEncode.positive=a (red:1.2) kite over the sea", "FlipbookSaveVideo.format=webp"]
    assert _run(wan_models, tmp_path / "c", *[a for s in settings for a in ("--set", s)]) == 0
    other = Path(capsys.readouterr().out.strip())
    assert other.suffix == ".webp" and other.is_file()


@pytest.mark.parametrize("override, match", [
    ("FlipbookWanSampler.frames=16", "frames=16: Wan makes 4n+1 frames"),
    ("FlipbookWanSampler.width=72", "nearest is 64"),
    ("FlipbookWanSampler.cfg=nan", "cfg=nan"),
    ("FlipbookWanSampler.nag_tau=inf", "nag_tau=inf"),
    ("FlipbookWanSampler.resolution=800x600x2", "resolution='800x600x2' is not one of"),
    ("FlipbookWanSampler.preset=lightx2v_4step", "lightx2v distilled 4-step"),
])
def test_bad_settings_are_one_line_and_write_nothing(wan_models, tmp_path, capsys, override, match):
    out = tmp_path / "out"
    assert _run(wan_models, out, "--set", override) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() or not any(out.rglob("*"))


def test_wrong_files_in_the_loaders_are_refused_by_name(wan_models, tmp_path, capsys):
    from flipbook_pack.wan_lora.tiny_vae import write_tiny_wan_vae

    write_tiny_wan_vae(wan_models / "vae" / "wan2.2_vae.safetensors", kind="wan22")
    assert _run(wan_models, tmp_path / "out", "--set", "FlipbookWanVAELoader.vae_name=wan2.2_vae.safetensors") == 2
    err = capsys.readouterr().err
    assert "wan2.2_vae.safetensors" in err and "wan_2.1_vae.safetensors" in err and err.count("\n") == 1


def test_latent_is_comfyuis_wan_layout_and_decodes_through_our_node(wan_models):
    from flipbook_pack.wan_lora.pipeline import from_comfy_latent, to_comfy_latent
    from flipbook_pack.wan_lora.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    _comfy.use_headless(_comfy.HeadlessHost(models_dir=wan_models, output_dir=wan_models / "out"))
    try:
        def run(node_id, **inputs):  # V1 execute: the outputs, or {"ui": notes, "result": outputs}
            out = NODE_CLASS_MAPPINGS[node_id]().execute(**inputs)
            return out["result"] if isinstance(out, dict) else out

        (model,) = run("FlipbookWanModelLoader", model_name="wan2.1_t2v_14B_fp8_e4m3fn.safetensors")
        (encoder,) = run("FlipbookWanTextEncoderLoader", text_encoder_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors")
        (vae,) = run("FlipbookWanVAELoader", vae_name="wan_2.1_vae.safetensors")
        positive, negative = run("FlipbookWanTextEncode", text_encoder=encoder, positive="a kite", negative="")
        assert negative[0][1]["flipbook_empty_negative"] and positive[0][0].shape == (1, 512, 32)
        sampled = NODE_CLASS_MAPPINGS["FlipbookWanSampler"]().execute(
            wan_model=model, positive=positive, negative=negative, seed=1, preset="custom", policy="strict", steps=3,
            cfg=1.0, shift=5.0, sampler="unipc", resolution="custom (width x height below)", width=32, height=48,
            frames=9, nag_scale=11.0, nag_tau=2.5, nag_alpha=0.25, nag_sigma_end=0.0)
        (latent,) = sampled["result"]
        assert "NAG is off: the negative prompt is empty" in sampled["ui"]["flipbook_notes"]
        samples = latent["samples"]
        assert samples.shape == (1, 16, 3, 6, 4)  # [B, C, (F-1)/4+1, H/8, W/8] as EmptyHunyuanLatentVideo makes
        # ComfyUI's LATENT holds the VAE's own space: (x - mean) / std is what the model samples (latent_formats.Wan21)
        mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(from_comfy_latent(samples), (samples - mean) / std)
        torch.testing.assert_close(to_comfy_latent(from_comfy_latent(samples)), samples)
        frames, fps = run("FlipbookWanDecode", vae=vae, latent=latent)
        assert frames.shape == (9, 48, 32, 3) and fps == 16.0
    finally:
        _comfy.use_headless(None)


class Interrupted(Exception):
    pass


@pytest.fixture()
def fake_comfy(monkeypatch):
    """ComfyUI's progress bar, interrupt, previewer and device answers, recorded."""
    import sys
    import types

    state = {"updates": [], "interrupt_after": None, "previews": 0}
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state["updates"].append((value, total, preview))

    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")

    def check():
        if state["interrupt_after"] is not None and len(state["updates"]) >= state["interrupt_after"]:
            raise Interrupted()

    management.throw_exception_if_processing_interrupted = check
    management.get_torch_device = lambda: torch.device("cpu")
    management.unet_dtype = lambda device=None, supported_dtypes=(): supported_dtypes[0]
    management.should_use_bf16 = lambda device=None: True
    management.unet_offload_device = lambda: torch.device("cpu")
    management.text_encoder_device = lambda: torch.device("cpu")
    management.text_encoder_offload_device = lambda: torch.device("cpu")
    management.vae_device = lambda: torch.device("cpu")
    management.vae_offload_device = lambda: torch.device("cpu")
    management.vae_dtype = lambda device=None, allowed=(): allowed[-1]
    formats = types.ModuleType("comfy.latent_formats")
    formats.Wan21 = lambda: "wan21-format"
    formats.SD15 = lambda: "sd15-format"
    previews = types.ModuleType("latent_preview")

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            assert x0.shape[1] in (4, 16)
            state["previews"] += 1
            state.setdefault("preview_shapes", []).append(tuple(x0.shape))
            return ("JPEG", "image", 512)

    previews.get_previewer = lambda device, latent_format: (Previewer() if latent_format in ("wan21-format",
                                                                                           "sd15-format") else None)
    for name, module in {"comfy": types.ModuleType("comfy"), "comfy.utils": utils,
                         "comfy.model_management": management, "comfy.latent_formats": formats,
                         "latent_preview": previews}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def test_inside_comfyui_steps_report_progress_with_previews_and_cancel(fake_comfy, wan_models):
    from flipbook_pack.wan_lora import pipeline as W

    placements = _comfy.wan_placements()
    assert placements["transformer"][2] == torch.bfloat16 and placements["text_encoder"][2] == torch.float32
    assert placements["vae"][2] == torch.float32  # (a CPU: ComfyUI's VAE dtype choice is honoured)
    model = W.load_wan_transformer(wan_models / "diffusion_models" / "wan2.1_t2v_14B_fp8_e4m3fn.safetensors",
                                   device="cpu", dtype=torch.float32)
    context = torch.zeros(1, 512, 32)
    request = W.WanSampleRequest(positive=context, negative=context, frames=5, width=32, height=32, steps=4,
                                 cfg=1.0, sampler="euler", preset="custom")
    W.sample_wan(model, request, callback=_comfy.step_reporter(4))
    assert [u[:2] for u in fake_comfy["updates"]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert fake_comfy["previews"] == 4 and fake_comfy["updates"][0][2] == ("JPEG", "image", 512)
    fake_comfy["updates"].clear()
    fake_comfy["interrupt_after"] = 2
    with pytest.raises(Interrupted):
        W.sample_wan(model, request, callback=_comfy.step_reporter(4))
    assert len(fake_comfy["updates"]) == 2


def test_decode_refuses_latents_that_are_not_wan_21_video(wan_models):
    from flipbook_pack.core.errors import InvalidSettingError

    _comfy.use_headless(_comfy.HeadlessHost(models_dir=wan_models, output_dir=wan_models / "out"))
    try:
        (vae,) = NODE_CLASS_MAPPINGS["FlipbookWanVAELoader"]().execute(vae_name="wan_2.1_vae.safetensors")
        for shape in ((1, 48, 3, 4, 4), (1, 4, 8, 8)):
            with pytest.raises(InvalidSettingError, match="Wan 2.1 video latent"):
                NODE_CLASS_MAPPINGS["FlipbookWanDecode"]().execute(vae=vae, latent={"samples": torch.zeros(shape)})
    finally:
        _comfy.use_headless(None)


LORA_WORKFLOW = json.loads((ROOT / "workflows" / "wan21_t2v_14b_style_lora_lightx2v.json").read_text())


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("wan_lora_models")
    cli.write_wan_demo_models(models, LORA_WORKFLOW)
    return models


def _run_lora(models, out, *extra):
    return cli.main(["run", "wan21_t2v_14b_style_lora_lightx2v.json", "--models", str(models), "--output-dir",
                     str(out), *TINY, *extra])


def test_lora_workflow_holds_the_seed_settings():
    prompt = workflow_to_prompt(LORA_WORKFLOW, NODE_CLASS_MAPPINGS)
    loras = [v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanLoraLoader"]
    assert [(lo["lora_name"], lo["strength"]) for lo in loras] == [
        ("wan21_studio_ghibli_style.safetensors", 1.0),
        ("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors", 0.9)]
    sampler = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanSampler")
    assert (sampler["preset"], sampler["steps"], sampler["cfg"], sampler["sampler"], sampler["resolution"],
            sampler["frames"], sampler["nag_scale"], sampler["nag_tau"], sampler["nag_alpha"]) == (
        "lightx2v_8step", 8, 1.0, "unipc", "640x480", 81, 11.0, 2.5, 0.25)
    encode = next(v["inputs"] for v in prompt.values() if v["class_type"] == "FlipbookWanTextEncode")
    assert encode["positive"].startswith("Studio Ghibli style. Woman with blonde hair")
    assert encode["negative"].startswith("色调艳丽") and encode["negative"].endswith("CGI, bad quality")


def test_lora_workflow_runs_headless_and_reports_every_lora(lora_models, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        assert _run_lora(lora_models, tmp_path / "out") == 0
    video = Path(capsys.readouterr().out.strip())
    frames, fps = _frames(video)
    assert (len(frames), fps) == (17, 16.0)
    notes = caplog.text
    assert "musubi-tuner / kohya (lora_unet_), applied 20 lora; 0 unmatched" in notes
    assert "applied 25 lora, 12 diff, 29 diff_b, 3 diff_m; 0 unmatched" in notes


@pytest.mark.parametrize("override, match", [
    ("FlipbookWanSampler.preset=wan21_t2v_base", "step/CFG distill LoRA"),
    ("FlipbookWanSampler.cfg=5.0", "completely blurred"),
    ("FlipbookWanSampler.steps=50", "base model's count"),
])
def test_distill_lora_settings_are_enforced(lora_models, tmp_path, capsys, override, match):
    assert _run_lora(lora_models, tmp_path / "out", "--set", override) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_fill_policy_switches_a_distill_stack_to_its_preset(lora_models, tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert _run_lora(lora_models, tmp_path / "out", "--set", "FlipbookWanSampler.preset=wan21_t2v_base",
                         "--set", "FlipbookWanSampler.policy=fill") == 0
    assert "preset wan21_t2v_base -> lightx2v_8step (policy 'fill'" in caplog.text


def test_triggers_swaps_and_prompt_expansion_through_the_nodes(lora_models):
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=lora_models, output_dir=lora_models / "out"))
    try:
        def run(node_id, **inputs):
            out = NODE_CLASS_MAPPINGS[node_id]().execute(**inputs)
            return out if not isinstance(out, dict) else (out["result"], out["ui"])

        (base,), _ = run("FlipbookWanModelLoader", model_name="wan2.1_t2v_14B_fp8_e4m3fn.safetensors")
        (styled,), ui = run("FlipbookWanLoraLoader", wan_model=base, lora_name="wan21_studio_ghibli_style.safetensors",
                            strength=1.0, trigger="")
        assert "trigger phrase: 'Studio Ghibli style.' (from the file)" in ui["flipbook_notes"]
        (encoder,) = run("FlipbookWanTextEncoderLoader", text_encoder_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors")
        (positive, _), ui = run("FlipbookWanTextEncode", text_encoder=encoder, positive="a girl on a hill",
                                negative="", add_triggers=True, wan_model=styled)
        assert ui["flipbook_notes"] == ["added the trigger of wan21_studio_ghibli_style.safetensors to the prompt: "
                                        "'Studio Ghibli style.'"]
        from flipbook_pack.wan_lora.pipeline import encode_wan_prompt

        expected = encode_wan_prompt(encoder, "Studio Ghibli style. a girl on a hill").embeds
        assert torch.equal(positive[0][0], expected)
        out = NODE_CLASS_MAPPINGS["FlipbookWanTextEncode"]().execute(
            text_encoder=encoder, positive="studio ghibli style, a girl", negative="", add_triggers=True,
            wan_model=styled)
        assert not (isinstance(out, dict) and out["ui"] and any("added" in n for n in out["ui"]["flipbook_notes"]))
        # swapping strengths re-patches the loaded transformer; the base is never read again
        component = base.handle["transformer"]
        reads = component.reads
        sampler_inputs = dict(positive=positive, negative=positive, seed=1, preset="custom", policy="strict", steps=2,
                              cfg=1.0, shift=5.0, sampler="euler", resolution="custom (width x height below)",
                              width=32, height=32, frames=5, nag_scale=1.0, nag_tau=2.5, nag_alpha=0.25,
                              nag_sigma_end=0.0)
        sample = NODE_CLASS_MAPPINGS["FlipbookWanSampler"]()
        first = sample.execute(wan_model=styled, **sampler_inputs)["result"][0]["samples"]
        (half,), _ = run("FlipbookWanLoraLoader", wan_model=base, lora_name="wan21_studio_ghibli_style.safetensors",
                         strength=0.5, trigger="")
        sample.execute(wan_model=half, **sampler_inputs)
        assert torch.equal(sample.execute(wan_model=styled, **sampler_inputs)["result"][0]["samples"], first)
        assert component.reads == reads
        (text,) = NODE_CLASS_MAPPINGS["FlipbookWanPromptExpansion"]().execute(
            idea="a cat on a train", trigger="Studio Ghibli style.", style_hint="")
        assert 'Begin with exactly "Studio Ghibli style."' in text and text.endswith("Idea: a cat on a train")
    finally:
        _comfy.use_headless(None)


def test_lightning_sampler_sends_latent_previews_inside_comfyui(fake_comfy, lightning_model):
    from flipbook_pack.lightning import pipeline as P

    progress = _comfy.progress_reporter(4, latent_format="SD15")
    P.generate(lightning_model, P.GenerationRequest(prompt="a fox", frames=4, width=64, height=64, steps=4),
               progress=progress, preview=progress.preview)
    assert fake_comfy["previews"] == 4
    assert [u[2] for u in fake_comfy["updates"] if u[2] is not None] == [("JPEG", "image", 512)] * 4


def test_lightning_node_previews_one_latent_per_frame(fake_comfy, lightning_model):
    """As ComfyUI's own samplers pass AnimateDiff latents ([frames, 4, h, w]): TAESD previews need 4-D."""
    NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]().execute(
        model=lightning_model, prompt="a fox", negative="", seed=1, frames=4, width=64, height=64, steps=4, cfg=1.0,
        scheduler="trailing", motion_scale=1.0)
    assert fake_comfy["preview_shapes"] == [(4, 4, 8, 8)] * 4
