"""AnimateDiff-Lightning nodes: a loader and a sampler. Thin adapters over lightning.pipeline."""
from __future__ import annotations

from ..lightning import variants as V
from . import _comfy
from .specs import NodeResult, NodeSpec, Param, number_problem, option

MODEL_TYPE = "FLIPBOOK_LIGHTNING"
CATEGORY = "Flipbook/AnimateDiff Lightning (motion)"


NO_CHECKPOINT = "none"  # ckpt_name when MODEL, CLIP and VAE all come from other nodes


def _load(ckpt_name, motion_model, variant, policy, model=None, clip=None, vae=None, check_variant=None) -> NodeResult:
    """The loader node; `check_variant` (not an input) lets the tier loader refuse a module before the load."""
    from ..lightning.pipeline import load_lightning

    host = _comfy.host_parts(model=model, clip=clip, vae=vae)
    checkpoint = None if ckpt_name == NO_CHECKPOINT else _comfy.model_path("checkpoints", ckpt_name)
    loaded = load_lightning(
        checkpoint, _comfy.model_path(_comfy.ANIMATEDIFF_FOLDER, motion_model),
        variant_id=variant, policy=policy, device=_comfy.torch_device(), tokenizer_dir=_comfy.clip_tokenizer_dir(),
        dtype=_comfy.compute_dtype(), placements=_comfy.component_placements(), host=host, check_variant=check_variant,
    )
    # the model's own notes appear on the sampler; here only where its networks came from
    notes = [f"{' + '.join(host.given)} from the connected nodes"] if host.given else []
    if model is not None and clip is None:
        notes.append(f"warning: MODEL is connected but CLIP is not: the prompt is encoded by {ckpt_name}'s text "
                     "encoder, without the CLIP half of any LoRA on the MODEL. Connect the CLIP from the same loaders.")
    if clip is not None and model is None:
        notes.append(f"warning: CLIP is connected but MODEL is not: the UNet is {ckpt_name}'s, without the MODEL "
                     "half of any LoRA on the CLIP. Connect the MODEL from the same loaders.")
    return NodeResult((loaded,), {"flipbook_notes": notes} if notes else None)


def _init_latents(model, init_images, latent, *, frames: int, width: int, height: int):
    """The input of a video-to-video / image-to-animation run in the UNet's latent space, or None. Its frame count
    and size are checked before anything is encoded (a long video through the VAE first would waste minutes)."""
    from ..core.errors import InvalidSettingError
    from ..lightning.pipeline import encode_frames

    if init_images is not None and latent is not None:
        raise InvalidSettingError("Both init_images and latent are connected: connect one of them.")
    if latent is not None:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if samples is None or samples.ndim != 4:
            raise InvalidSettingError(f"The latent is not an SD1.5 LATENT of frames ([frames, 4, h, w]), got "
                                      f"{None if samples is None else tuple(samples.shape)}.")
        return samples.float() * model.scaling_factor  # ComfyUI's LATENT holds the VAE's own latents
    if init_images is None:
        return None
    count, image_height, image_width = init_images.shape[0], init_images.shape[1], init_images.shape[2]
    if count not in (1, frames) or (image_height, image_width) != (height, width) or init_images.shape[-1] not in (3, 4):
        limit = model.motion.max_frames
        how = (f"set frames to {count}" if count <= limit else
               f"cut the video to at most {limit} frames (Load Video's frame_cap)")
        raise InvalidSettingError(
            f"init_images are {count} frames of {image_width}x{image_height}, the sampler is set to {frames} frames of "
            f"{width}x{height}: {how} (or give 1 image for image-to-animation) and set width/height to the "
            "images' size (Load Video resizes to a multiple of 8).")
    return encode_frames(model, init_images[..., :3], memory=_comfy.memory_for(model.handle))  # RGBA: drop alpha


def _context(conditioning, name: str):
    """The text embeddings of a ComfyUI CONDITIONING ([[tensor, options]]), or None. Entries or options Flipbook
    does not apply (Combine's second entry, a ControlNet, an area or mask) are refused, never dropped silently."""
    import torch

    from ..core.errors import InvalidSettingError

    if conditioning is None:
        return None
    if not (isinstance(conditioning, list) and conditioning and isinstance(conditioning[0], (list, tuple))
            and isinstance(conditioning[0][0], torch.Tensor)):
        raise InvalidSettingError(f"{name} is not a CONDITIONING (got {type(conditioning).__name__}); connect "
                                  "CLIPTextEncode.")
    unused = sorted(set(conditioning[0][1]) & {"control", "area", "mask", "strength", "start_percent",
                                               "end_percent", "gligen"})
    if len(conditioning) > 1 or unused:
        raise InvalidSettingError(
            f"{name} has {len(conditioning)} entries{' and ' + ', '.join(unused) if unused else ''}; the Flipbook "
            "sampler applies one prompt's embeddings (no ControlNet, area or mask conditioning yet). Use "
            "Conditioning (Concat) instead of Combine, and leave ControlNet out.")
    return conditioning[0][0]


def _sample(model, prompt, negative, seed, frames, width, height, steps, cfg, scheduler, motion_scale,
            denoise=1.0, init_images=None, latent=None, positive_cond=None, negative_cond=None, context_schedule="off",
            context_length=16, context_overlap=4, context_fuse="pyramid", freenoise=False) -> NodeResult:
    import dataclasses

    from ..lightning.pipeline import GenerationRequest, generate, validate_request

    request = GenerationRequest(prompt=prompt, negative=negative, seed=seed, frames=frames, width=width, height=height,
                                steps=steps, cfg=cfg, scheduler=scheduler, motion_scale=motion_scale,
                                init_latents=None, denoise=denoise,
                                positive_context=_context(positive_cond, "positive_cond"),
                                negative_context=_context(negative_cond, "negative_cond"),
                                context_schedule=context_schedule, context_length=context_length,
                                context_overlap=context_overlap, context_fuse=context_fuse, freenoise=freenoise)
    # settings first, then the (long) encode; a quality tier may run other steps than the widget's
    checked = validate_request(model, dataclasses.replace(request, denoise=1.0))
    progress = _comfy.progress_reporter(checked.settings.steps, latent_format="SD15")
    request = dataclasses.replace(request, init_latents=_init_latents(model, init_images, latent, frames=frames,
                                                                      width=width, height=height))
    # previews as ComfyUI's own samplers send them for AnimateDiff: one latent per frame ([F, 4, h, w]; TAESD
    # previews need 4-D latents)
    result = generate(model, request, progress=progress, memory=_comfy.memory_for(model.handle),
                      preview=lambda step, of, x, denoised: progress.preview(step, of, x, denoised[0].transpose(0, 1)))
    notes = [*model.notes, *result.notes]
    if positive_cond is not None and prompt.strip():
        notes.append("the prompt text was not used: positive_cond (CONDITIONING) replaces it")
    # ComfyUI's LATENT for SD1.5 holds the VAE's own latents (latent_formats.SD15: scale 0.18215 on the way in),
    # one per frame as AnimateDiff-Evolved batches them: core VAE Decode, upscalers and hires passes take it
    latent = {"samples": result.latents / model.scaling_factor}
    return NodeResult((result.frames, latent), {"flipbook_notes": notes} if notes else None)


def _check_sample(cls, prompt=None, negative=None, cfg=None, motion_scale=None, denoise=None, steps=None):
    """When queued, before any node runs: NaN/inf numbers (they pass every min/max comparison) and prompt
    weights such as (fox:nan). ComfyUI skips its own type/range checks for inputs a validator names, so
    they are repeated here. Values arriving through links are checked at run time instead."""
    from ..core.errors import InvalidSettingError
    from ..core.prompt import parse_weights

    problems = [problem for name, value in (("cfg", cfg), ("motion_scale", motion_scale), ("denoise", denoise),
                                            ("steps", steps))
                if (problem := number_problem(name, value, option(SAMPLER, name, "min"), option(SAMPLER, name, "max")))]
    if not problems and isinstance(denoise, (int, float)) and isinstance(steps, int) and int(denoise * steps + 1e-9) < 1:
        problems.append(f"denoise={denoise} of {steps} steps runs no step (floor({denoise} x {steps}) = 0): use at "
                        f"least {1 / steps:.3g}")
    for name, text in (("prompt", prompt), ("negative", negative)):
        if text is not None and not isinstance(text, str):
            problems.append(f"{name} must be text, got {type(text).__name__}")
        elif text:
            try:
                parse_weights(text)
            except InvalidSettingError as exc:
                problems.append(f"{name}: {exc}")
    return True if not problems else "; ".join(problems)


LOADER = NodeSpec(
    node_id="FlipbookLightningLoader",
    display_name="Flipbook AnimateDiff-Lightning Loader (checkpoint + motion module)",
    category=CATEGORY,
    description="Loads an SD1.5 checkpoint and an AnimateDiff(-Lightning) motion module, detects the motion "
                "module's variant and locks sampling to the steps/CFG/scheduler it was trained for. Optional MODEL, "
                "CLIP and VAE inputs take ComfyUI's own networks instead of the checkpoint's (Load Checkpoint -> "
                "LoraLoader, Load VAE, CLIP Set Last Layer).",
    inputs=(
        Param("ckpt_name", "COMBO", "SD1.5 single-file checkpoint from models/checkpoints (stylized bases work "
              "best); 'none' when MODEL, CLIP and VAE are all connected.",
              choices=lambda: [*_comfy.model_names("checkpoints"), NO_CHECKPOINT]),
        Param("motion_model", "COMBO", "Motion module from models/animatediff_models, e.g. "
              "animatediff_lightning_4step_comfyui.safetensors (either Lightning layout).",
              choices=lambda: _comfy.model_names(_comfy.ANIMATEDIFF_FOLDER)),
        Param("variant", "COMBO", "auto: read the step count from the Lightning file name, else the module "
              "version. Pick one to override.", {"default": V.AUTO}, choices=lambda: [V.AUTO, *V.VARIANTS]),
        Param("policy", "COMBO", "strict: a sampler setting that differs from the variant's is an error. fill: "
              "use the variant's steps/CFG/scheduler instead (reported in the log).", {"default": "strict"},
              choices=lambda: list(V.POLICIES)),
        Param("model", "MODEL", "Optional: an SD1.5 MODEL (e.g. Load Checkpoint -> LoraLoader). Its weights, with "
              "the LoRAs ComfyUI patched in, replace the checkpoint's UNet; the motion module is added to them.",
              optional=True),
        Param("clip", "CLIP", "Optional: an SD1.5 CLIP (e.g. after CLIP Set Last Layer or LoraLoader) that encodes "
              "the prompt as ComfyUI does (embeddings, CLIP skip, weighting).", optional=True),
        Param("vae", "VAE", "Optional: an SD1.x VAE (Load VAE, e.g. vae-ft-mse-840000) instead of the checkpoint's.",
              optional=True),
    ),
    outputs=((MODEL_TYPE, "model"),),
    run=_load,
    output_tooltips=("The SD1.5 checkpoint with its AnimateDiff motion module and the variant's settings, for the "
                     "Flipbook AnimateDiff-Lightning Sampler.",),
)

SAMPLER = NodeSpec(
    node_id="FlipbookLightningSampler",
    display_name="Flipbook AnimateDiff-Lightning Sampler (text to animation)",
    category=CATEGORY,
    description="Text to animation with the loaded AnimateDiff(-Lightning) model, at the steps, CFG and scheduler "
                "its motion module was trained for. Replaces AnimateDiff-Evolved's Load AnimateDiff Model + Apply "
                "AnimateDiff Model + KSampler + VAE Decode chain in one node. Returns IMAGE frames.",
    inputs=(
        Param("model", MODEL_TYPE, "From Flipbook Lightning Loader."),
        Param("prompt", "STRING", "What to animate; name the motion (e.g. 'hair blowing in the wind').",
              {"multiline": True, "default": ""}),
        Param("negative", "STRING", "Only used when cfg > 1 (at cfg 1 the negative pass is skipped).",
              {"multiline": True, "default": ""}),
        Param("seed", "INT", "Noise seed; noise is made on the CPU, so a seed gives the same video on any GPU.",
              {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        Param("frames", "INT", "16 is what AnimateDiff was trained on; above the module's PE length (32 for v2 and "
              "Lightning) turn on context windows.", {"default": 16, "min": 1, "max": 1024}),
        Param("width", "INT", "512 is native for SD1.5.", {"default": 512, "min": 64, "max": 2048, "step": 8}),
        Param("height", "INT", "512 is native for SD1.5.", {"default": 512, "min": 64, "max": 2048, "step": 8}),
        Param("steps", "INT", "Must match the variant (4-step module: 4) unless the loader's policy is 'fill'.",
              {"default": 4, "min": 1, "max": 200}),
        Param("cfg", "FLOAT", "Lightning: 1.0 (fastest, no negative pass); 1.0-2.0 works, above 2 artefacts.",
              {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01}),
        Param("scheduler", "COMBO", "Timestep spacing. Lightning needs trailing; ComfyUI's sgm_uniform and simple "
              "mean the same here.", {"default": "trailing"},
              choices=lambda: ["trailing", "leading", "linspace", "sgm_uniform", "simple"]),
        Param("motion_scale", "FLOAT", "Temporal attention scale: 0.8-0.9 calmer, 1.1-1.2 livelier.",
              {"default": 1.0, "min": 0.5, "max": 1.5, "step": 0.05}),
        Param("denoise", "FLOAT", "With init_images or latent: how much to change them. 0.3-0.5 keeps the video's "
              "layout and motion (video-to-video); 1 = from pure noise. Runs the last floor(denoise x steps) of the "
              "variant's own timesteps (the node says which), never a schedule it was not trained on.",
              {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.05}, optional=True),
        Param("init_images", "IMAGE", "Optional: frames to restyle (Flipbook Load Video, core Load Image...). One "
              "image is repeated over every frame: image-to-animation (8-step variant recommended).",
              optional=True),
        Param("latent", "LATENT", "Optional: a LATENT of frames instead of init_images (e.g. from VAE Encode).",
              optional=True),
        Param("positive_cond", "CONDITIONING", "Optional: the prompt from CLIPTextEncode (embeddings, CLIP skip and "
              "weighting as ComfyUI does them) instead of the prompt text.", optional=True),
        Param("negative_cond", "CONDITIONING", "Optional: the negative from CLIPTextEncode (used when cfg > 1).",
              optional=True),
        Param("context_schedule", "COMBO", "Context windows for long clips: standard (windows inside the clip) or "
              "looped (windows wrap around: a looping video); off = one pass over all frames (at most the PE length).",
              {"default": "off"}, choices=lambda: ["off", "standard", "looped"], optional=True),
        Param("context_length", "INT", "Frames per window: 16, as AnimateDiff was trained.",
              {"default": 16, "min": 1, "max": 32}, optional=True),
        Param("context_overlap", "INT", "Frames shared by neighbouring windows (4 usual; more = smoother, slower).",
              {"default": 4, "min": 0, "max": 31}, optional=True),
        Param("context_fuse", "COMBO", "How overlapping windows are blended: pyramid (centre frames count more) or "
              "flat.", {"default": "pyramid"}, choices=lambda: ["pyramid", "flat"], optional=True),
        Param("freenoise", "BOOLEAN", "With context windows: start every window from shuffled copies of the same noise "
              "(FreeNoise), for one consistent scene over a long clip.", {"default": False}, optional=True),
    ),
    outputs=(("IMAGE", "frames"), ("LATENT", "latent")),
    run=_sample,
    validate=_check_sample,
    output_tooltips=("The animation's frames (ComfyUI IMAGE, one per frame) for Flipbook Save Video or any image "
                     "node.", "The same frames as a ComfyUI LATENT (one latent per frame), for core VAE Decode, "
                     "latent upscalers or a second pass."),
)

def _motion_lora(model, lora_name, strength) -> NodeResult:
    from ..lightning.motion_lora import with_motion_lora

    patched = with_motion_lora(model, _comfy.model_path(_comfy.MOTION_LORA_FOLDER, lora_name), strength=strength)
    lora, _ = patched.motion_loras[-1]
    notes = [lora.summary()]
    if not model.variant.distilled and model.motion.version != "v2":
        notes.append("camera motion LoRAs were trained on AnimateDiff v2 modules")
    return NodeResult((patched,), {"flipbook_notes": notes})


MOTION_LORA = NodeSpec(
    node_id="FlipbookMotionLoraLoader",
    display_name="Flipbook AnimateDiff Motion LoRA (camera: zoom, pan, tilt, roll)",
    category=CATEGORY,
    description="Adds an AnimateDiff v2 camera motion LoRA (v2_lora_ZoomIn, PanLeft, TiltUp, Rolling...) to the "
                "motion module; chain one per LoRA. Every key is applied or the file is refused (a v2 LoRA on a v3 "
                "module is an error, not a silent no-op). Changing it never reloads the checkpoint.",
    inputs=(
        Param("model", MODEL_TYPE, "From Flipbook AnimateDiff-Lightning Loader or another motion LoRA."),
        Param("lora_name", "COMBO", "A motion LoRA from models/animatediff_motion_lora (AnimateDiff-Evolved's folder).",
              choices=lambda: _comfy.model_names(_comfy.MOTION_LORA_FOLDER)),
        Param("strength", "FLOAT", "0.7-0.8 with Lightning (its card); 1.0 with standard AnimateDiff v2.",
              {"default": 0.75, "min": 0.0, "max": 2.0, "step": 0.05}),
    ),
    outputs=((MODEL_TYPE, "model"),),
    run=_motion_lora,
    output_tooltips=("The same model with the motion LoRA in its stack (the loaded weights are shared).",),
)

def _image_lora(model, lora_name, strength) -> NodeResult:
    from ..lightning.sd15_lora import with_sd15_lora

    patched = with_sd15_lora(model, _comfy.model_path("loras", lora_name), strength=strength)
    return NodeResult((patched,), {"flipbook_notes": [patched.loras[-1][0].summary()]})


IMAGE_LORA = NodeSpec(
    node_id="FlipbookLightningLoraLoader",
    display_name="Flipbook AnimateDiff-Lightning LoRA (SD1.5 style / character)",
    category=CATEGORY,
    description="Adds an SD1.5 LoRA (kohya / A1111 format, LoCon included) to the checkpoint's UNet and text encoder; "
                "chain one per LoRA. Every key is applied or the file is refused (SDXL, SD2 and Wan LoRAs are named). "
                "Changing it never reloads the checkpoint. Inside ComfyUI, core LoraLoader on the checkpoint works too.",
    inputs=(
        Param("model", MODEL_TYPE, "From Flipbook AnimateDiff-Lightning Loader or another LoRA node."),
        Param("lora_name", "COMBO", "An SD1.5 LoRA from models/loras.", choices=lambda: _comfy.model_names("loras")),
        Param("strength", "FLOAT", "Usually 0.6-1.0; the sampler warns when the stack adds up to more than 1.2.",
              {"default": 0.8, "min": -4.0, "max": 4.0, "step": 0.05}),
    ),
    outputs=((MODEL_TYPE, "model"),),
    run=_image_lora,
    output_tooltips=("The same model with the LoRA in its stack (the loaded weights are shared).",),
)

def _tier(ckpt_name, tier, explore_motion, develop_motion, final_motion, final_steps, final_cfg, model=None, clip=None,
          vae=None) -> NodeResult:
    import dataclasses

    from ..lightning.tiers import check_tier_module, tier_settings

    settings = tier_settings(tier, final_steps=final_steps, final_cfg=final_cfg)  # before anything is read
    motion = {"explore": explore_motion, "develop": develop_motion, "final": final_motion}[tier]
    result = _load(ckpt_name, motion, V.AUTO, "strict", model=model, clip=clip, vae=vae,
                   check_variant=lambda variant: check_tier_module(tier, variant.id, motion))
    loaded = result.outputs[0]
    notes = [f"tier {tier}: {motion}, {settings.steps} steps, CFG {settings.cfg:g}, {settings.scheduler}",
             *((result.ui or {}).get("flipbook_notes", []))]
    return NodeResult((dataclasses.replace(loaded, tier=(tier, settings)),), {"flipbook_notes": notes})


def _motion_choice(tooltip: str, name: str) -> Param:
    return Param(name, "COMBO", tooltip, choices=lambda: _comfy.model_names(_comfy.ANIMATEDIFF_FOLDER))


TIER = NodeSpec(
    node_id="FlipbookLightningTierLoader",
    display_name="Flipbook AnimateDiff Quality Tier Loader (explore 4-step / develop 8-step / final)",
    category=CATEGORY,
    description="Explore at 4 steps, develop at 8, render the final with standard AnimateDiff (25-40 steps, CFG 7-8): "
                "pick the tier and the same seed and prompt re-render at it in one change. Loads the checkpoint with "
                "the tier's motion module; the sampler then runs the tier's steps, CFG and scheduler (it says so).",
    inputs=(
        LOADER.inputs[0],
        Param("tier", "COMBO", "explore: AnimateDiff-Lightning 4-step (fast previews, many seeds). develop: "
              "Lightning 8-step. final: standard AnimateDiff v2/v3 at final_steps / final_cfg.",
              {"default": "explore"}, choices=lambda: ["explore", "develop", "final"]),
        _motion_choice("The explore tier's module: animatediff_lightning_4step_comfyui.safetensors.", "explore_motion"),
        _motion_choice("The develop tier's module: animatediff_lightning_8step_comfyui.safetensors.", "develop_motion"),
        _motion_choice("The final tier's module: standard AnimateDiff (mm_sd_v15_v2 or v3_sd15_mm).", "final_motion"),
        Param("final_steps", "INT", "Steps of the final tier (standard AnimateDiff: 25-40).",
              {"default": 30, "min": 25, "max": 40}),
        Param("final_cfg", "FLOAT", "CFG of the final tier (standard AnimateDiff: 7-8).",
              {"default": 7.5, "min": 7.0, "max": 8.0, "step": 0.1, "round": 0.01}),
        *LOADER.inputs[4:],
    ),
    outputs=((MODEL_TYPE, "model"),),
    run=_tier,
    output_tooltips=("The checkpoint with the tier's motion module and settings, for the Flipbook AnimateDiff-Lightning "
                     "Sampler.",),
)

SPECS = (LOADER, TIER, IMAGE_LORA, MOTION_LORA, SAMPLER)
