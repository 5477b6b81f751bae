"""AnimateDiff-Lightning nodes: a loader and a sampler. Thin adapters over lightning.pipeline."""
from __future__ import annotations

from ..lightning import variants as V
from . import _comfy

MODEL_TYPE = "FLIPBOOK_LIGHTNING"
CATEGORY = "Flipbook/Lightning"


class FlipbookLightningLoader:
    DESCRIPTION = (
        "Loads an SD1.5 checkpoint and an AnimateDiff(-Lightning) motion module, detects the motion "
        "module's variant and locks sampling to the steps/CFG/scheduler it was trained for."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (_comfy.model_names("checkpoints"), {
                    "tooltip": "SD1.5 single-file checkpoint from models/checkpoints (stylized bases work best)."}),
                "motion_model": (_comfy.model_names(_comfy.ANIMATEDIFF_FOLDER), {
                    "tooltip": "Motion module from models/animatediff_models, e.g. "
                               "animatediff_lightning_4step_comfyui.safetensors (either Lightning layout)."}),
                "variant": ([V.AUTO, *V.VARIANTS], {
                    "default": V.AUTO,
                    "tooltip": "auto: read the step count from the Lightning file name, else the module version. "
                               "Pick one to override."}),
                "policy": (list(V.POLICIES), {
                    "default": "strict",
                    "tooltip": "strict: a sampler setting that differs from the variant's is an error. "
                               "fill: use the variant's steps/CFG/scheduler instead (reported in the log)."}),
            }
        }

    def load(self, ckpt_name, motion_model, variant, policy):
        from ..lightning.pipeline import load_lightning

        model = load_lightning(
            _comfy.model_path("checkpoints", ckpt_name),
            _comfy.model_path(_comfy.ANIMATEDIFF_FOLDER, motion_model),
            variant_id=variant, policy=policy, tokenizer_dir=_comfy.clip_tokenizer_dir(),
        )
        return (model,)


class FlipbookLightningSampler:
    DESCRIPTION = "Text to animation with the loaded Lightning model. Returns IMAGE frames."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Flipbook Lightning Loader."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What to animate; name the motion (e.g. 'hair blowing in the wind')."}),
                "negative": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Only used when cfg > 1 (at cfg 1 the negative pass is skipped)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed; noise is made on the CPU, so a seed gives the same video "
                                            "on any GPU."}),
                "frames": ("INT", {"default": 16, "min": 1, "max": 32,
                                   "tooltip": "16 is what AnimateDiff was trained on; the module's PE caps it."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "512 is native."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "512 is native."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 200,
                                  "tooltip": "Must match the variant (4-step module: 4) unless the loader's policy "
                                             "is 'fill'."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Lightning: 1.0 (fastest, no negative pass); 1.0-2.0 works, above 2 "
                                             "artefacts."}),
                "scheduler": (["trailing", "leading", "linspace"], {
                    "default": "trailing",
                    "tooltip": "Timestep spacing. Lightning needs trailing (ComfyUI: sgm_uniform/simple)."}),
                "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 1.5, "step": 0.05,
                                           "tooltip": "Temporal attention scale: 0.8-0.9 calmer, 1.1-1.2 livelier."}),
            }
        }

    def sample(self, model, prompt, negative, seed, frames, width, height, steps, cfg, scheduler, motion_scale):
        from ..lightning.pipeline import GenerationRequest, generate

        request = GenerationRequest(prompt, negative, seed, frames, width, height, steps, cfg, scheduler, motion_scale)
        result = generate(model, request, progress=_comfy.progress_reporter(steps))
        return (result.frames,)
