"""Text-to-animation with an SD1.5 checkpoint + AnimateDiff(-Lightning) motion module.

Load once (`load_lightning`), then `generate` any number of times. Sampling is the core Euler
function over an epsilon-prediction denoiser; the variant table decides steps, CFG and schedule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.checkpoints import load_state_dict
from ..core.devices import compute_dtype, resolve_device
from ..core.errors import IncompatibleModelsError, InvalidSettingError, SettingsMismatchError, UnsupportedCheckpointError
from ..core.sampling import classifier_free_guidance, initial_latent, sample_euler, seeded_noise
from ..core.schedules import discrete_sigmas, sigma_to_timestep, sigmas_for_steps
from ..core.vae import decode_latents
from . import variants as V
from .motion_module import MotionModuleInfo, MotionScale, adapter_config, inspect_motion_module, motion_weights
from .sd15_checkpoint import load_sd15_checkpoint
from .prompt import embedding_names, encode_weighted, match_lengths
from .text import load_tokenizer

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
MOTION_SCALE_RANGE = (0.5, 1.5)


@dataclass(frozen=True, repr=False)
class LightningModel:
    checkpoint_name: str
    motion_name: str
    unet: torch.nn.Module  # diffusers UNetMotionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scaling_factor: float
    motion: MotionModuleInfo
    variant: V.Variant
    policy: str
    model_sigmas: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    motion_scale: MotionScale
    notes: tuple[str, ...] = ()  # what loading noticed (e.g. variant vs file name), shown on the node

    def __repr__(self) -> str:
        # ComfyUI prints node inputs in its error reports: keep it to one readable line
        return (f"LightningModel({self.checkpoint_name} + {self.motion_name}, {self.variant.id}, "
                f"policy={self.policy}, {self.device.type} {str(self.dtype).removeprefix('torch.')})")


# byte sizes of ByteDance's published Lightning files (reference animatediff-lightning.md §1.1)
LIGHTNING_FILE_SIZES = (908_929_664, 907_702_248)


def resolve_variant(variant_id: str, motion_file: str, info: MotionModuleInfo,
                    file_size: int = 0) -> tuple[V.Variant, tuple[str, ...]]:
    """Explicit id wins; 'auto' reads the Lightning step count from the file name, else the module version.

    A renamed Lightning file would look like a plain v2 module (same architecture) and lose its step
    lock, so 'auto' refuses a file of a published Lightning size whose name has no step count.
    """
    named = V.variant_from_filename(motion_file)
    notes: tuple[str, ...] = ()
    if variant_id != V.AUTO:
        variant = V.get_variant(variant_id)
        if named is not None and named.id != variant.id:
            notes = (f"{motion_file} is named as {named.label}, but the variant {variant.label} was chosen; "
                     "check that this is intended.",)
    elif named is None and file_size in LIGHTNING_FILE_SIZES:
        raise SettingsMismatchError(
            f"{motion_file} has the size of an AnimateDiff-Lightning file but no step count in its name. Choose its "
            "variant (lightning_1step/2step/4step/8step) on the loader, or restore the original file name."
        )
    else:
        variant = named or V.VARIANTS.get(f"animatediff_{info.version}")
    if variant is None:
        raise UnsupportedCheckpointError(f"No preset for an AnimateDiff {info.version} motion module ({motion_file}).")
    if info.version not in variant.versions:
        raise SettingsMismatchError(
            f"Variant {variant.label} is for AnimateDiff {'/'.join(variant.versions)} motion modules, but "
            f"{motion_file} is a {info.version} module. Choose the variant 'auto' or 'animatediff_{info.version}'."
        )
    return variant, notes


def load_lightning(
    checkpoint_path: str | Path,
    motion_path: str | Path,
    variant_id: str = V.AUTO,
    policy: str = "strict",
    device: Optional[str] = None,
    tokenizer_dir: Optional[str | Path] = None,
    dtype: Optional[torch.dtype] = None,
) -> LightningModel:
    """Load checkpoint + motion module, checking they fit together before the big load."""
    if policy not in V.POLICIES:
        raise InvalidSettingError(f"Unknown policy {policy!r}; choose one of {V.POLICIES}.")
    motion_path, checkpoint_path = Path(motion_path), Path(checkpoint_path)
    motion_state = load_state_dict(motion_path)
    info = inspect_motion_module(motion_state, motion_path.name)
    if info.family != "sd15":
        raise IncompatibleModelsError(
            f"{motion_path.name} is an {info.family.upper()} motion module, but {checkpoint_path.name} is loaded as "
            "an SD1.5 checkpoint (AnimateDiff-Lightning is SD1.5 only). Pick an SD1.5 motion module "
            "(e.g. animatediff_lightning_4step_comfyui.safetensors)."
        )
    if info.version == "v1":
        raise UnsupportedCheckpointError(
            f"{motion_path.name} is an AnimateDiff v1 module, which needs cross-frame GroupNorm (not supported yet). "
            "Use mm_sd_v15_v2, v3_sd15_mm or an AnimateDiff-Lightning module."
        )
    variant, notes = resolve_variant(variant_id, motion_path.name, info, motion_path.stat().st_size)
    torch_device = resolve_device(device)
    dtype = dtype or compute_dtype(torch_device)
    motion = motion_weights(motion_state, info, dtype, torch_device)
    del motion_state
    parts = load_sd15_checkpoint(checkpoint_path, dtype, torch_device)
    unet = _motion_unet(parts.unet, info, motion, checkpoint_path.name, motion_path.name)
    return LightningModel(
        checkpoint_name=checkpoint_path.name, motion_name=motion_path.name, unet=unet, vae=parts.vae, text_encoder=parts.text_encoder,
        tokenizer=load_tokenizer(tokenizer_dir), scaling_factor=parts.scaling_factor, motion=info,
        variant=variant, policy=policy,
        model_sigmas=discrete_sigmas(variant.beta_schedule, variant.beta_start, variant.beta_end),
        device=torch_device, dtype=dtype, motion_scale=MotionScale(unet), notes=notes,
    )


def _motion_unet(unet2d, info: MotionModuleInfo, motion: dict[str, torch.Tensor], checkpoint_name: str,
                 motion_name: str):
    """diffusers UNetMotionModel adopting the loaded UNet's and motion module's tensors (no copies)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    widths = tuple(unet2d.config.block_out_channels)
    if widths != info.channels or unet2d.config.layers_per_block != info.layers_per_block:
        raise IncompatibleModelsError(
            f"{motion_name} was made for UNet widths {info.channels} with {info.layers_per_block} layers per block, "
            f"but {checkpoint_name} has {widths} with {unet2d.config.layers_per_block}. Use a motion module made "
            "for this base model family."
        )
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet2d.config)
        unet = UNetMotionModel.from_unet2d(twin, MotionAdapter(**adapter_config(info)), load_weights=False)
    unet.load_state_dict({**unet2d.state_dict(), **motion}, strict=True, assign=True)
    return unet.eval()


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative: str = ""
    seed: int = 0
    frames: int = 16
    width: int = 512
    height: int = 512
    steps: int = 4
    cfg: float = 1.0
    scheduler: str = "trailing"
    motion_scale: float = 1.0


@dataclass(frozen=True)
class GenerationResult:
    frames: torch.Tensor  # [F, H, W, 3] float32 0..1
    settings: V.SamplingSettings
    notes: tuple[str, ...]
    denoiser_calls: int


def validate_request(model: LightningModel, request: GenerationRequest) -> V.CheckedSettings:
    """Every check that needs no model run: variant settings, frame limit, size, motion scale."""
    checked = V.check_settings(
        model.variant, V.SamplingSettings(request.steps, request.cfg, request.scheduler), model.policy
    )
    if not 1 <= request.frames <= model.motion.max_frames:
        raise InvalidSettingError(
            f"frames={request.frames}, but this motion module's positional encoding covers at most "
            f"{model.motion.max_frames} frames (16 is what it was trained on). Use 1-{model.motion.max_frames} "
            "frames; longer videos need context windows, which Flipbook does not have yet."
        )
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 64 or value % 8:
            raise InvalidSettingError(f"{name}={value}: must be a multiple of 8 and at least 64 (512 is native).")
    low, high = MOTION_SCALE_RANGE
    if not low <= request.motion_scale <= high:
        raise InvalidSettingError(f"motion_scale={request.motion_scale}: use {low}-{high} (1.0 = as trained).")
    texts = [request.prompt] + ([request.negative] if abs(checked.settings.cfg - 1.0) > 1e-9 else [])
    skipped = [name for text in texts for name in embedding_names(text)]
    if skipped:
        note = (f"textual-inversion embeddings are not supported yet and were left out of the prompt: "
                f"{', '.join(skipped)}")
        log.warning("%s", note)
        checked = V.CheckedSettings(checked.settings, (*checked.notes, note))
    return checked


def generate(model: LightningModel, request: GenerationRequest, progress: Optional[ProgressFn] = None) -> GenerationResult:
    checked = validate_request(model, request)
    settings = checked.settings
    sigmas, _ = sigmas_for_steps(model.model_sigmas, settings.scheduler, settings.steps)
    decode_chunks = -(-request.frames // 8)
    total = settings.steps + decode_chunks
    calls = [0]
    denoiser = _make_denoiser(model, request, settings.cfg, calls)
    noise = seeded_noise((1, 4, request.frames, request.height // 8, request.width // 8), request.seed)
    x = initial_latent(noise, sigmas[0]).to(model.device)
    model.motion_scale.value = request.motion_scale
    try:
        step_cb = (lambda i, n, _x, _d: progress(i, total)) if progress else None
        # sigmas stay 0-dim CPU tensors: arithmetic with them never makes the GPU wait for the CPU
        latents = sample_euler(denoiser, x, sigmas, callback=step_cb)
    finally:
        model.motion_scale.value = 1.0
    frames_latents = latents[0].permute(1, 0, 2, 3)  # [F, C, h, w]
    decode_cb = (lambda done, _n: progress(settings.steps + -(-done // 8), total)) if progress else None
    frames = decode_latents(model.vae, frames_latents, model.scaling_factor, chunk=8, progress=decode_cb)
    return GenerationResult(frames=frames, settings=settings, notes=checked.notes, denoiser_calls=calls[0])


def _make_denoiser(model: LightningModel, request: GenerationRequest, cfg: float, calls: list[int]):
    """Epsilon-prediction UNet as D(x, sigma) in k-diffusion form; CFG 1 skips the negative pass."""
    frames = request.frames
    use_cfg = abs(cfg - 1.0) > 1e-9
    texts = [request.negative, request.prompt] if use_cfg else [request.prompt]
    encoded = match_lengths([encode_weighted(model.tokenizer, model.text_encoder, t, model.device) for t in texts])
    context = torch.cat([c.repeat_interleave(frames, dim=0) for c in encoded])

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        c_in = float((sigma**2 + 1) ** -0.5)
        # float32: MPS and DirectML have no float64
        t = sigma_to_timestep(sigma.reshape(1), model.model_sigmas).to(model.device, torch.float32, non_blocking=True)
        batch = torch.cat([x, x]) if use_cfg else x
        eps = model.unet((batch * c_in).to(model.dtype), t, encoder_hidden_states=context).sample.float()
        if use_cfg:
            uncond, cond_eps = eps.chunk(2)
            eps = classifier_free_guidance(uncond, cond_eps, cfg)
        return x - eps * sigma

    return denoise
