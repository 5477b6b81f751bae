"""Wan 2.1 text-to-video nodes: loaders for the transformer, umt5 and VAE (ComfyUI's own folders), a text
encoder, a sampler with NAG and a decoder. Thin adapters over wan_lora.pipeline; prompts travel as native
CONDITIONING and latents as a native LATENT in ComfyUI's Wan layout, so core nodes interoperate."""
from __future__ import annotations

from ..core.errors import InvalidSettingError
from ..wan_lora import presets as P
from . import _comfy
from .specs import NodeResult, NodeSpec, Param, number_problem, option

MODEL_TYPE, TEXT_ENCODER_TYPE, VAE_TYPE = "FLIPBOOK_WAN_MODEL", "FLIPBOOK_WAN_TEXT_ENCODER", "FLIPBOOK_WAN_VAE"
CATEGORY = "Flipbook/Wan"
CUSTOM_SIZE = "custom (width x height below)"
SIZE_STEP = P.SIZE_STEP
EMPTY_NEGATIVE = "flipbook_empty_negative"  # CONDITIONING option: the negative prompt was empty (NAG off)


def _placement(kind: str):
    placements = _comfy.wan_placements()
    return placements[kind] if placements else None


def _load_model(model_name) -> NodeResult:
    from ..wan_lora.pipeline import load_wan_transformer

    model = load_wan_transformer(_comfy.model_path("diffusion_models", model_name), device=_comfy.torch_device(),
                                 placement=_placement("transformer"))
    return NodeResult((model,), {"flipbook_notes": list(model.notes)} if model.notes else None)


def _load_text_encoder(text_encoder_name) -> NodeResult:
    from ..wan_lora.pipeline import load_wan_text_encoder

    return NodeResult((load_wan_text_encoder(_comfy.model_path("text_encoders", text_encoder_name),
                                             device=_comfy.torch_device(), placement=_placement("text_encoder")),))


def _load_vae(vae_name) -> NodeResult:
    from ..wan_lora.pipeline import load_wan_vae

    return NodeResult((load_wan_vae(_comfy.model_path("vae", vae_name), device=_comfy.torch_device(),
                                    placement=_placement("vae")),))


def _encode(text_encoder, positive, negative, add_triggers=True, wan_model=None) -> NodeResult:
    from ..wan_lora.pipeline import encode_wan_prompt, prompt_with_triggers

    memory = _comfy.memory_for(text_encoder.handle)
    positive, trigger_notes = prompt_with_triggers(positive, wan_model) if add_triggers else (positive, ())
    encoded = [encode_wan_prompt(text_encoder, text, memory=memory) for text in (positive, negative)]
    notes = [*trigger_notes, *(note for e in encoded for note in e.notes)]
    conditionings = tuple([[e.embeds, {"flipbook_tokens": e.tokens}]] for e in encoded)
    if not negative.strip():
        conditionings[1][0][1][EMPTY_NEGATIVE] = True
    return NodeResult(conditionings, {"flipbook_notes": notes} if notes else None)


def _embeddings(conditioning, name: str):
    """The umt5 embeddings of a CONDITIONING (ours or core CLIPTextEncode's with a Wan CLIP)."""
    import torch

    if not (isinstance(conditioning, list) and conditioning and isinstance(conditioning[0][0], torch.Tensor)):
        raise InvalidSettingError(f"{name} is not a CONDITIONING from a text encoder (got {type(conditioning)}); "
                                  "connect Flipbook Wan Text Encode or CLIPTextEncode with a Wan umt5 CLIP.")
    return conditioning[0][0], bool(conditioning[0][1].get(EMPTY_NEGATIVE, False)), len(conditioning) > 1


def _sample(wan_model, positive, negative, seed, preset, policy, steps, cfg, shift, sampler, resolution, width,
            height, frames, nag_scale, nag_tau, nag_alpha, nag_sigma_end) -> NodeResult:
    from ..wan_lora.nag import NagSettings
    from ..wan_lora.pipeline import WanSampleRequest, sample_wan, to_comfy_latent

    if resolution != CUSTOM_SIZE:
        width, height = P.parse_resolution(resolution)
    positive_embeds, _, combined = _embeddings(positive, "positive")
    negative_embeds, negative_empty, _ = _embeddings(negative, "negative")
    request = WanSampleRequest(
        positive=positive_embeds, negative=negative_embeds, negative_is_empty=negative_empty, seed=seed,
        frames=frames, width=width, height=height, steps=steps, cfg=cfg, shift=shift, sampler=sampler,
        preset=preset, policy=policy,
        nag=NagSettings(scale=nag_scale, tau=nag_tau, alpha=nag_alpha, sigma_end=nag_sigma_end))
    result = sample_wan(wan_model, request, callback=_comfy.step_reporter(steps),
                        memory=_comfy.memory_for(wan_model.handle))
    notes = list(result.notes)  # the model's own notes are shown on its loader
    if combined:
        notes.append("the positive CONDITIONING has several entries; the first one was used")
    if not request.nag.enabled:
        notes.append("NAG off (nag_scale 1)")
    return NodeResult(({"samples": to_comfy_latent(result.latents)},), {"flipbook_notes": notes})


def _decode(vae, latent) -> NodeResult:
    from ..wan_lora.pipeline import decode_wan, from_comfy_latent

    samples = latent["samples"] if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 5 or samples.shape[1] != 16:
        shape = tuple(samples.shape) if samples is not None else None
        raise InvalidSettingError(f"The latent has shape {shape}; a Wan 2.1 video latent is [batch, 16, frames, h, w] "
                                  "(Wan 2.2's has 48 channels, an image latent 4 dimensions). Connect Flipbook Wan "
                                  "Sampler, or a core node working on Wan 2.1 latents.")
    latents = from_comfy_latent(samples)
    frames = decode_wan(vae, latents, progress=_comfy.progress_reporter(latents.shape[0] * latents.shape[2]),
                        memory=_comfy.memory_for(vae.handle))
    return NodeResult((frames, float(P.FPS)))


def _load_lora(wan_model, lora_name, strength, trigger="") -> NodeResult:
    from ..wan_lora.pipeline import with_lora

    model = with_lora(wan_model, _comfy.model_path("loras", lora_name), strength=strength, trigger=trigger)
    entry = model.loras[-1]
    notes = [entry.lora.report.summary()]
    if entry.trigger:
        notes.append(f"trigger phrase: {entry.trigger!r}" + ("" if trigger.strip() else " (from the file)"))
    if entry.lora.report.distill:
        notes.append("step/CFG distill LoRA: the sampler uses the lightx2v presets (CFG 1, shift 5)")
    return NodeResult((model,), {"flipbook_notes": notes})


# The prompt-writing instructions the Studio Ghibli style LoRA's author gives an LLM (user-guides.md guide 2),
# in Flipbook's words: 80-100 words, start with the trigger, then characters, setting, light, camera motion.
EXPANSION = ("Rewrite the idea below as one prompt for a 5-second text-to-video model. Write 80 to 100 words in one "
             "paragraph of plain English, no lists and no quotes. Begin with exactly \"{trigger}\" and then "
             "describe: the characters (looks, clothes, what they do), the setting and time of day, the light and "
             "colours, and the camera motion (for example a slow pan, a zoom out, a tracking shot). Keep one "
             "continuous shot with a single clear action.{style}\n\nIdea: {idea}")


def _expand(idea, trigger, style_hint) -> NodeResult:
    style = f" Give it {style_hint.strip()}." if style_hint.strip() else ""
    return NodeResult((EXPANSION.format(trigger=trigger.strip(), style=style, idea=idea.strip()),))


def _check_sample(cls, steps=None, cfg=None, shift=None, frames=None, width=None, height=None, resolution=None,
                  nag_scale=None, nag_tau=None, nag_alpha=None, nag_sigma_end=None):
    """When queued: NaN/inf and range checks ComfyUI skips for inputs a validator names, and Wan's video rules
    (4n+1 frames, multiples of 16) so a bad size fails before the model loads. Linked values: at run time."""
    numbers = (("steps", steps), ("cfg", cfg), ("shift", shift), ("frames", frames), ("width", width),
               ("height", height), ("nag_scale", nag_scale), ("nag_tau", nag_tau), ("nag_alpha", nag_alpha),
               ("nag_sigma_end", nag_sigma_end))
    problems = [problem for name, value in numbers
                if (problem := number_problem(name, value, option(SAMPLER, name, "min"), option(SAMPLER, name, "max")))]
    if resolution is not None and resolution not in (*P.RESOLUTIONS, CUSTOM_SIZE):
        problems.append(f"resolution {resolution!r} is not one of {', '.join((*P.RESOLUTIONS, CUSTOM_SIZE))}")
    elif not problems and isinstance(frames, int):
        if resolution not in (None, CUSTOM_SIZE):
            width, height = P.parse_resolution(resolution)
        try:
            P.check_video_size(frames=frames, width=width if isinstance(width, int) else SIZE_STEP,
                               height=height if isinstance(height, int) else SIZE_STEP)
        except InvalidSettingError as exc:
            problems.append(str(exc))
    return True if not problems else "; ".join(problems)


_DOWNLOADS = "Comfy-Org/Wan_2.1_ComfyUI_repackaged on Hugging Face"

def _file_loader(node_id: str, display_name: str, description: str, folder: str, input_name: str, tooltip: str,
                 output: tuple[str, str], run) -> NodeSpec:
    """A loader node: one file from one of ComfyUI's model folders."""
    return NodeSpec(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                    inputs=(Param(input_name, "COMBO", tooltip, choices=lambda: _comfy.model_names(folder)),),
                    outputs=(output,), run=run)


MODEL_LOADER = _file_loader(
    "FlipbookWanModelLoader", "Flipbook Wan 2.1 T2V Model Loader",
    "Loads a Wan 2.1 text-to-video transformer (14B or 1.3B) from models/diffusion_models in any precision: bf16, "
    "fp16, fp8_e4m3fn, fp8_e5m2 (kept fp8 in memory) or fp8_scaled (with its scales).",
    "diffusion_models", "model_name",
    f"e.g. wan2.1_t2v_14B_fp8_e4m3fn.safetensors or _fp8_scaled (about 14 GB of VRAM), _bf16 (28 GB); from "
    f"{_DOWNLOADS}. I2V, VACE and Wan 2.2 files are refused by name.",
    (MODEL_TYPE, "wan_model"), _load_model)

TEXT_ENCODER_LOADER = _file_loader(
    "FlipbookWanTextEncoderLoader", "Flipbook Wan umt5 Text Encoder Loader",
    "Loads umt5-xxl from models/text_encoders with the tokenizer embedded in the file; computes in bf16 or fp32 "
    "(never fp16/fp8, where T5 overflows).",
    "text_encoders", "text_encoder_name",
    f"umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors from {_DOWNLOADS} "
    "(split_files/text_encoders). CLIP and Flux/SD3 T5 files are refused.",
    (TEXT_ENCODER_TYPE, "text_encoder"), _load_text_encoder)

VAE_LOADER = _file_loader(
    "FlipbookWanVAELoader", "Flipbook Wan 2.1 VAE Loader",
    "Loads the Wan 2.1 video VAE (wan_2.1_vae.safetensors) from models/vae.",
    "vae", "vae_name",
    f"wan_2.1_vae.safetensors from {_DOWNLOADS} (split_files/vae). The Wan 2.2 VAE and image VAEs are refused.",
    (VAE_TYPE, "vae"), _load_vae)

TEXT_ENCODE = NodeSpec(
    node_id="FlipbookWanTextEncode",
    display_name="Flipbook Wan Text Encode (positive + negative for CFG / NAG)",
    category=CATEGORY,
    description="Encodes the prompt and the negative prompt with umt5 as Wan does (EOS, 512 tokens, zero past the "
                "text). (text:1.2) weights as in ComfyUI. Outputs native CONDITIONING.",
    inputs=(
        Param("text_encoder", TEXT_ENCODER_TYPE, "From Flipbook Wan umt5 Text Encoder Loader."),
        Param("positive", "STRING", "What happens in the video: subject, action, setting, light, camera motion.",
              {"multiline": True, "default": ""}),
        Param("negative", "STRING", "Used by CFG (cfg > 1) and by NAG (nag_scale > 1). Default: Wan's own negative "
              "prompt. Empty: NAG is off.", {"multiline": True, "default": P.DEFAULT_NEGATIVE}),
        Param("add_triggers", "BOOLEAN", "With wan_model connected: put each style LoRA's trigger phrase (e.g. "
              "'Studio Ghibli style.') in front of the prompt when it is missing, and say so on the node.",
              {"default": True}, optional=True),
        Param("wan_model", MODEL_TYPE, "Optional: the model after its LoRA loaders, to read their trigger phrases.",
              optional=True),
    ),
    outputs=(("CONDITIONING", "positive"), ("CONDITIONING", "negative")),
    run=_encode,
)

SAMPLER = NodeSpec(
    node_id="FlipbookWanSampler",
    display_name="Flipbook Wan 2.1 T2V Sampler (UniPC / DPM++ / Euler, NAG)",
    category=CATEGORY,
    description="Text to video with Wan 2.1: flow matching with shift, CFG (exactly 1 = one model pass per step) "
                "and NAG, which makes the negative prompt work at CFG 1. Presets hold the settings each model was "
                "made for. Outputs a native LATENT (Wan layout) for Flipbook Wan Decode or core VAE Decode.",
    inputs=(
        Param("wan_model", MODEL_TYPE, "From Flipbook Wan 2.1 T2V Model Loader."),
        Param("positive", "CONDITIONING", "From Flipbook Wan Text Encode (or CLIPTextEncode with a Wan umt5 CLIP)."),
        Param("negative", "CONDITIONING", "The negative prompt: CFG uses it when cfg > 1, NAG when nag_scale > 1."),
        Param("seed", "INT", "Noise seed (noise is made on the CPU: the same seed gives the same video on any GPU).",
              {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        Param("preset", "COMBO", "wan21_t2v_base: the official settings (UniPC, 50 steps, CFG 5, shift 5). "
              "lightx2v_*: for the lightx2v distill LoRA (CFG 1, shift 5). custom: no checks.",
              {"default": "wan21_t2v_base"}, choices=lambda: [*P.PRESETS, P.CUSTOM]),
        Param("policy", "COMBO", "strict: a setting the preset was not made for is an error. fill: the preset's "
              "value is used instead, with a note.", {"default": "strict"}, choices=lambda: list(P.POLICIES)),
        Param("steps", "INT", "Base model: 30-50 (official 50). lightx2v: 4, 6 or 8.",
              {"default": 50, "min": 1, "max": 200}),
        Param("cfg", "FLOAT", "Base model: 5. With a distill LoRA: 1 (one pass per step; use NAG for negatives).",
              {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01}),
        Param("shift", "FLOAT", "Flow shift: sigma' = shift*sigma / (1 + (shift-1)*sigma). Wan 2.1 T2V: 5 (ComfyUI's "
              "default 8 also works at 720p).", {"default": 5.0, "min": 0.1, "max": 50.0, "step": 0.1}),
        Param("sampler", "COMBO", "unipc: Wan's default (UniPC bh2). dpm++: Wan's DPM-Solver++ 2M. euler: the "
              "distilled 4-step schedule (lightx2v).", {"default": "unipc"}, choices=lambda: ["unipc", "dpm++", "euler"]),
        Param("resolution", "COMBO", "Width x height. 14B: 832x480 / 480x832 (480p), 1280x720 / 720x1280 (720p). Pick custom to "
              "use the width and height below.", {"default": "832x480"},
              choices=lambda: [*P.RESOLUTIONS, CUSTOM_SIZE]),
        Param("width", "INT", "Used when resolution is custom; a multiple of 16.",
              {"default": 832, "min": 16, "max": 2048, "step": 16}),
        Param("height", "INT", "Used when resolution is custom; a multiple of 16.",
              {"default": 480, "min": 16, "max": 2048, "step": 16}),
        Param("frames", "INT", "4n+1 frames at 16 fps: 81 = 5 s (what Wan 2.1 was trained on), 49 = 3 s.",
              {"default": P.DEFAULT_FRAMES, "min": 1, "max": 1025, "step": 4}),
        Param("nag_scale", "FLOAT", "NAG strength; 1 = off. 11 with a distill LoRA at CFG 1 (kijai's default).",
              {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.25}),
        Param("nag_tau", "FLOAT", "NAG's clamp on how far the guided attention may move (2.5; higher = stronger).",
              {"default": 2.5, "min": 1.0, "max": 10.0, "step": 0.05}),
        Param("nag_alpha", "FLOAT", "NAG's blend of guided and plain attention (0.25; higher = stronger).",
              {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01}),
        Param("nag_sigma_end", "FLOAT", "NAG only while sigma >= this (0 = every step; 0.75 is faster, near-identical "
              "per ComfyUI-NAG).", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    ),
    outputs=(("LATENT", "latent"),),
    run=_sample,
    validate=_check_sample,
)

DECODE = NodeSpec(
    node_id="FlipbookWanDecode",
    display_name="Flipbook Wan VAE Decode (video)",
    category=CATEGORY,
    description="Decodes a Wan 2.1 video LATENT frame by frame (causal, bounded memory) into IMAGE frames, and "
                "gives the frame rate (16 fps) for Flipbook Save Video.",
    inputs=(
        Param("vae", VAE_TYPE, "From Flipbook Wan 2.1 VAE Loader."),
        Param("latent", "LATENT", "From Flipbook Wan Sampler (ComfyUI's Wan latent layout)."),
    ),
    outputs=(("IMAGE", "frames"), ("FLOAT", "fps")),
    run=_decode,
)

LORA_LOADER = NodeSpec(
    node_id="FlipbookWanLoraLoader",
    display_name="Flipbook Wan LoRA Loader (style / lightx2v distill)",
    category=CATEGORY,
    description="Adds a Wan 2.1 LoRA to the model's stack; chain one per LoRA, as with ComfyUI's LoraLoaderModelOnly. "
                "Reads every format (musubi/kohya, ComfyUI/Kijai, lightx2v with diff/diff_b/diff_m, diffusers/peft, "
                "DiffSynth), accounts for every key and reports it here; a LoRA for another model is an error. "
                "Changing a LoRA or a strength re-patches the loaded model; the base is never read again.",
    inputs=(
        Param("wan_model", MODEL_TYPE, "From the Wan model loader or another LoRA loader."),
        Param("lora_name", "COMBO", "A Wan 2.1 T2V LoRA from models/loras (e.g. a style LoRA, or the lightx2v "
              "step/CFG distill LoRA).", choices=lambda: _comfy.model_names("loras")),
        Param("strength", "FLOAT", "1.0 as trained; lightx2v distill: about 0.9; 0 turns it off.",
              {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
        Param("trigger", "STRING", "The LoRA's trigger phrase, if its file does not carry one (style LoRAs: e.g. "
              "'Studio Ghibli style.'). Flipbook Wan Text Encode adds it to the prompt when missing.",
              {"default": ""}),
    ),
    outputs=((MODEL_TYPE, "wan_model"),),
    run=_load_lora,
)

PROMPT_EXPANSION = NodeSpec(
    node_id="FlipbookWanPromptExpansion",
    display_name="Flipbook Wan Prompt Expansion (instructions for your LLM)",
    category=CATEGORY,
    description="Turns a short idea into instructions for an LLM of your choice (80-100 words, starting with the "
                "LoRA's trigger; characters, setting, light, camera motion). Flipbook runs no LLM itself.",
    inputs=(
        Param("idea", "STRING", "A short idea, e.g. 'a girl and her cat watch the rain from a train window'.",
              {"multiline": True, "default": ""}),
        Param("trigger", "STRING", "The style LoRA's trigger phrase the prompt must start with.",
              {"default": "Studio Ghibli style."}),
        Param("style_hint", "STRING", "Optional look to ask for, e.g. 'a warm, nostalgic watercolor look'.",
              {"default": "a warm, nostalgic hand-painted look"}),
    ),
    outputs=(("STRING", "llm_instructions"),),
    run=_expand,
)

SPECS = (MODEL_LOADER, LORA_LOADER, TEXT_ENCODER_LOADER, VAE_LOADER, TEXT_ENCODE, SAMPLER, DECODE, PROMPT_EXPANSION)
