"""Text-to-animation with an SD1.5 checkpoint + AnimateDiff(-Lightning) motion module.

Load once (`load_lightning`), then `generate` any number of times. Sampling is the core Euler
function over an epsilon-prediction denoiser; the variant table decides steps, CFG and schedule.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict, shared_reads
from ..core.context_windows import freenoise, windowed
from ..core.denoisers import Denoiser, epsilon_prediction, initial_latent, uses_negative
from ..core.devices import compute_dtype, resolve_device
from ..core.errors import IncompatibleModelsError, InvalidSettingError, SettingsMismatchError, UnsupportedCheckpointError
from ..core.guards import require_finite
from ..core.model_handle import Component, LocalMemory, MemoryPolicy, ModelHandle
from ..core.prompt import embedding_names, encode_weighted, join_contexts, match_lengths  # noqa: F401
from ..core.sampler_table import SAMPLERS
from ..core.sampling import StepCallback, seeded_noise
from ..core.schedules import canonical_spacing, discrete_sigmas, schedule_tail, sigmas_for_steps
from ..core.vae import decode_latents
from . import variants as V
from .motion_module import (MotionModuleInfo, adapter_config, inspect_motion_module, motion_attention_key_projections,  # noqa: F401
                            motion_scale, motion_weights)
from .inputs import check_contexts, check_host_context, check_init, encode_frames  # noqa: F401  (encode_frames: for the nodes)
from .motion_lora import apply_motion_loras
from .host_parts import HostParts, combined_layout
from .tiers import checked_tier_settings
from .sd15_checkpoint import inspect_sd15_checkpoint, text_encoder_component, unet_weights, vae_component
from .sd15_lora import apply_sd15_loras, stack_note
from .text import load_tokenizer

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
MOTION_SCALE_RANGE = (0.5, 1.5)
DECODE_CHUNK = 8  # frames per VAE decode call


@dataclass(frozen=True, repr=False)
class LightningModel:
    checkpoint_name: str
    motion_name: str
    handle: ModelHandle  # components "text_encoder", "unet" (diffusers UNetMotionModel), "vae"
    tokenizer: object
    scaling_factor: float
    motion: MotionModuleInfo
    variant: V.Variant
    policy: str
    model_sigmas: torch.Tensor
    device: torch.device  # where the UNet computes (the sampling loop's device)
    dtype: torch.dtype  # the UNet's dtype
    notes: tuple[str, ...] = ()  # what loading noticed (e.g. variant vs file name), shown on the node
    # the host's text encoder (ComfyUI's CLIP): prompt -> [1, tokens, 768]; None: the checkpoint's, in the handle
    encode_text: Optional[Callable[[str], torch.Tensor]] = None
    motion_loras: tuple = ()  # (MotionLora, strength), applied when sampling; the loaded weights are shared
    loras: tuple = ()  # (SD15Lora, strength): image LoRAs on the UNet and text encoder, likewise
    tier: Optional[tuple[str, V.SamplingSettings]] = None  # (tier id, its settings): replaces the sampler's widgets

    @property
    def unet(self) -> torch.nn.Module:
        return self.handle["unet"].module

    @property
    def vae(self) -> torch.nn.Module:
        return self.handle["vae"].module

    @property
    def text_encoder(self) -> Optional[torch.nn.Module]:
        return None if self.encode_text is not None else self.handle["text_encoder"].module

    def __repr__(self) -> str:
        # ComfyUI prints node inputs in its error reports: keep it to one readable line
        return (f"LightningModel({self.checkpoint_name} + {self.motion_name}, {self.variant.id}, "
                f"policy={self.policy}, {self.device.type} {str(self.dtype).removeprefix('torch.')})")


# byte sizes of ByteDance's published Lightning files (huggingface.co/ByteDance/AnimateDiff-Lightning file listing:
# *_comfyui 908,929,664 bytes, *_diffusers 907,702,248 bytes)
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
    elif named is None and (stated := V.lightning_steps_in_name(motion_file)) is not None:
        raise SettingsMismatchError(
            f"{motion_file} is named like an AnimateDiff-Lightning {stated}-step "
            f"file, but no such variant exists (known: {', '.join(V.VARIANTS)}). Choose the variant on the loader, "
            "or use the file's original name (animatediff_lightning_{1,2,4,8}step_comfyui.safetensors)."
        )
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


Placement = tuple[torch.device, torch.device, torch.dtype]  # (compute device, offload device, dtype) of a component


def load_lightning(
    checkpoint_path: Optional[str | Path],
    motion_path: str | Path,
    *,
    variant_id: str = V.AUTO,
    policy: str = "strict",
    device: Optional[str] = None,
    tokenizer_dir: Optional[str | Path] = None,
    dtype: Optional[torch.dtype] = None,
    placements: Optional[Mapping[str, Placement]] = None,
    host: Optional[HostParts] = None,
    check_variant: Optional[Callable[[V.Variant], None]] = None,
) -> LightningModel:
    """Load checkpoint + motion module, checking they fit together before the big load.

    Weights are read (memory-mapped) onto the CPU; the memory policy (ComfyUI's inside ComfyUI) moves
    them to each component's compute device when a stage needs them. `placements` maps component names
    ("text_encoder", "unet", "vae") to (compute device, offload device, dtype), as ComfyUI decides
    them; by default all compute on `device` in `dtype` and wait on the CPU. `host`: networks the host hands over
    (ComfyUI's MODEL / VAE with their patches, its CLIP) in place of the checkpoint's. `check_variant` may refuse
    the resolved variant before any weight is read (a quality tier's kind of module).
    """
    if policy not in V.POLICIES:
        raise InvalidSettingError(f"Unknown policy {policy!r}; choose one of {V.POLICIES}.")
    motion_path = Path(motion_path)
    checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
    with shared_reads():  # each file is read (a .ckpt unpickled) once for every check and network
        # no checkpoint: the host's parts, or the error naming what to connect
        layout = (inspect_sd15_checkpoint(checkpoint_path) if checkpoint_path is not None and not (host and host.given)
                  else combined_layout(checkpoint_path, host or HostParts()))
        info = _check_motion_module(motion_path, layout.name)
        variant, notes = resolve_variant(variant_id, motion_path.name, info, motion_path.stat().st_size)
        if check_variant is not None:
            check_variant(variant)
        torch_device = resolve_device(device)
        dtype = dtype or compute_dtype(torch_device)
        _check_widths(layout, info, layout.name, motion_path.name)

        def place(name: str) -> dict:
            load, offload, its_dtype = (placements or {}).get(name, (torch_device, torch.device("cpu"), dtype))
            return dict(load_device=torch.device(load), offload_device=torch.device(offload), dtype=its_dtype)

        unet_place = place("unet")
        encode_text = host.encode_text if host is not None else None
        components = (*([] if encode_text else [text_encoder_component(layout, **place("text_encoder"))]),
                      _motion_unet_component(layout, motion_path, info, **unet_place),
                      vae_component(layout, **place("vae")))
        for component in components:
            # onto the CPU: the memory policy (or ComfyUI, after making room) moves them to their device
            component.materialize(torch.device("cpu"))
    if host is not None and len(host.given) == 3 and checkpoint_path is not None:
        notes = (*notes, f"{checkpoint_path.name} was not read: MODEL, CLIP and VAE are connected")
    return LightningModel(
        checkpoint_name=layout.name, motion_name=motion_path.name, encode_text=encode_text,
        handle=ModelHandle({c.name: c for c in components}),
        tokenizer=None if encode_text else load_tokenizer(tokenizer_dir),
        scaling_factor=layout.scaling_factor, motion=info, variant=variant, policy=policy,
        model_sigmas=discrete_sigmas(variant.beta_schedule, variant.beta_start, variant.beta_end),
        device=unet_place["load_device"], dtype=unet_place["dtype"], notes=notes,
    )


def _check_motion_module(motion_path: Path, checkpoint_name: str) -> MotionModuleInfo:
    info = inspect_motion_module(load_state_dict(motion_path), motion_path.name)
    if info.family != "sd15":
        raise IncompatibleModelsError(
            f"{motion_path.name} is an {info.family.upper()} motion module, but {checkpoint_name} is loaded as "
            "an SD1.5 checkpoint (AnimateDiff-Lightning is SD1.5 only). Pick an SD1.5 motion module "
            "(e.g. animatediff_lightning_4step_comfyui.safetensors)."
        )
    if info.version == "v1":
        raise UnsupportedCheckpointError(
            f"{motion_path.name} is an AnimateDiff v1 module, which needs cross-frame GroupNorm (not supported yet). "
            "Use mm_sd_v15_v2, v3_sd15_mm or an AnimateDiff-Lightning module."
        )
    return info


def _check_widths(layout, info: MotionModuleInfo, checkpoint_name: str, motion_name: str) -> None:
    widths = tuple(layout.unet_config["block_out_channels"])
    layers = layout.unet_config["layers_per_block"]
    if widths != info.channels or layers != info.layers_per_block:
        raise IncompatibleModelsError(
            f"{motion_name} was made for UNet widths {info.channels} with {info.layers_per_block} layers per block, "
            f"but {checkpoint_name} has {widths} with {layers}. Use a motion module made for this base model family."
        )


def _motion_unet_component(layout, motion_path: Path, info: MotionModuleInfo, **placement) -> Component:
    """diffusers UNetMotionModel whose weights are the checkpoint's UNet plus the motion module's."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.device("meta"):
        twin = UNet2DConditionModel(**layout.unet_config)
        unet = UNetMotionModel.from_unet2d(twin, MotionAdapter(**adapter_config(info)), load_weights=False).eval()

    motion_file = file_fingerprint(motion_path)

    def weights() -> dict[str, torch.Tensor]:
        return {**unet_weights(layout), **motion_weights(load_state_dict(motion_path, expect=motion_file), info)}

    from .motion_lora import clear_motion_loras

    return Component(name="unet", module=unet, weights=weights, finish=clear_motion_loras, **placement)


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
    init_latents: Optional[torch.Tensor] = None  # [F or 1, 4, h, w] in the UNet's latent space (video-to-video)
    denoise: float = 1.0  # with init_latents: run the last floor(denoise * steps) of the trained steps
    context_schedule: str = "off"  # "standard" / "looped": context windows (core/context_windows.py) for long clips
    context_length: int = 16
    context_overlap: int = 4
    context_fuse: str = "pyramid"
    freenoise: bool = False  # with context windows: windows start from shuffled copies of the same noise
    positive_context: Optional[torch.Tensor] = None  # [1, tokens, 768] from ComfyUI's CLIPTextEncode: replaces prompt
    negative_context: Optional[torch.Tensor] = None  # likewise for negative


@dataclass(frozen=True)
class GenerationResult:
    frames: torch.Tensor  # [F, H, W, 3] float32 0..1
    settings: V.SamplingSettings
    notes: tuple[str, ...]
    denoiser_calls: int
    model_forwards: int = 0  # UNet passes (2 per step when the CFG branches cannot share a batch)
    latents: Optional[torch.Tensor] = None  # [F, 4, h, w] in the UNet's (scaled) latent space, on the CPU


def validate_request(model: LightningModel, request: GenerationRequest) -> V.CheckedSettings:
    """Every check that needs no model run: variant settings, frame limit, size, motion scale."""
    if not math.isfinite(request.cfg):  # NaN passes every comparison below (a linked value, an API prompt)
        raise InvalidSettingError(f"cfg={request.cfg}: use a finite number (1.0 for Lightning).")
    requested = V.SamplingSettings(request.steps, request.cfg, canonical_spacing(request.scheduler))
    checked = (V.check_settings(model.variant, requested, model.policy) if model.tier is None
               else checked_tier_settings(model.variant, *model.tier))
    windows = request.context_schedule != "off"
    if windows and not 1 <= request.context_length <= model.motion.max_frames:
        raise InvalidSettingError(
            f"context_length={request.context_length}, but this motion module's positional encoding covers at most "
            f"{model.motion.max_frames} frames: use 1-{model.motion.max_frames} ({model.variant.frames} is what it "
            "was trained on).")
    if request.frames < 1 or (not windows and request.frames > model.motion.max_frames):
        raise InvalidSettingError(
            f"frames={request.frames}, but this motion module's positional encoding covers at most "
            f"{model.motion.max_frames} frames ({model.variant.frames} is what it was trained on). Use 1-"
            f"{model.motion.max_frames} frames, or turn on context windows (context_schedule standard or looped) "
            "for longer clips.")
    for name, value in (("width", request.width), ("height", request.height)):
        if value < 64 or value % 8:
            raise InvalidSettingError(f"{name}={value}: must be a multiple of 8 and at least 64 "
                                      f"({model.variant.resolution} is native).")
    check_init(request)
    check_contexts(model, request)
    low, high = MOTION_SCALE_RANGE
    if not low <= request.motion_scale <= high:
        raise InvalidSettingError(f"motion_scale={request.motion_scale}: use {low}-{high} (1.0 = as trained).")
    texts = [request.prompt] + ([request.negative] if uses_negative(checked.settings.cfg) else [])
    skipped = [] if model.encode_text else [name for text in texts for name in embedding_names(text)]
    if skipped:
        note = (f"textual-inversion embeddings are not supported yet and were left out of the prompt: "
                f"{', '.join(skipped)}")
        log.warning("%s", note)
        checked = V.CheckedSettings(checked.settings, (*checked.notes, note))
    return checked


def unet_working_bytes(frames: int, height: int, width: int, dtype: torch.dtype, guided: bool) -> int:
    """Activation memory of one UNet pass, by ComfyUI's estimate for SD1.5 with PyTorch attention
    (comfy/model_base.py BaseModel.memory_required: area * dtype size * 0.01 * memory_usage_factor MiB,
    area = batch * h * w; supported_models.py SD15 memory_usage_factor 1.0)."""
    area = frames * (2 if guided else 1) * (height // 8) * (width // 8)
    return int(area * torch.empty(0, dtype=dtype).element_size() * 0.01 * 1.0 * 2**20)


def vae_working_bytes(frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Memory of decoding `frames` latents at once, by ComfyUI's estimate for the SD1.x VAE
    (comfy/sd.py VAE.memory_used_decode: 2178 * h * w * 64 * dtype size per latent, h and w in latent pixels)."""
    return int(frames * 2178 * (height // 8) * (width // 8) * 64 * torch.empty(0, dtype=dtype).element_size())


def generate(model: LightningModel, request: GenerationRequest, progress: Optional[ProgressFn] = None,
             memory: Optional[MemoryPolicy] = None, preview: Optional[StepCallback] = None) -> GenerationResult:
    """Text to frames. `memory` puts components on the compute device before each stage (default:
    the headless policy); `progress(done, total)` counts steps then decoded chunks and may raise to cancel."""
    checked = validate_request(model, request)
    settings = checked.settings
    memory = memory or LocalMemory(model.handle)
    sigmas, timesteps = sigmas_for_steps(model.model_sigmas, settings.scheduler, settings.steps)
    notes = list(checked.notes)
    if request.init_latents is not None:
        sigmas_run, timesteps_run = schedule_tail(sigmas[:-1], timesteps, request.denoise)
        sigmas = torch.cat([sigmas_run, sigmas[-1:]])
        notes.append(f"denoise {request.denoise:g}: ran timesteps {', '.join(map(str, timesteps_run))} of the "
                     f"trained {', '.join(map(str, timesteps))} ({model.variant.label})")
    steps_run = len(sigmas) - 1
    decode_chunks = -(-request.frames // DECODE_CHUNK)
    total = steps_run + decode_chunks
    if model.encode_text is None:  # else the host's CLIP encodes (and manages its own memory)
        memory.prepare([model.handle["text_encoder"]])
        apply_sd15_loras(model.handle["text_encoder"], model.loras)  # before the prompt is encoded
    if (note := stack_note(model.loras)) is not None:
        notes.append(note)
    denoiser = _make_denoiser(model, request, settings, progress=(lambda done, _n: progress(done, total))
                              if progress else None, expected_calls=steps_run)
    noise = seeded_noise((1, 4, request.frames, request.height // 8, request.width // 8), request.seed)
    if request.freenoise and request.context_schedule != "off":
        noise = freenoise(noise, length=request.context_length, overlap=request.context_overlap, seed=request.seed)
    init = None if request.init_latents is None else request.init_latents.expand(
        request.frames, -1, -1, -1).permute(1, 0, 2, 3).unsqueeze(0)  # [1, 4, F, h, w]; one image: every frame
    x = initial_latent(noise, sigmas[0], denoiser.parameterization, init=init).to(model.device)
    per_pass = request.frames if request.context_schedule == "off" else min(request.frames, request.context_length)
    memory.prepare([model.handle["unet"]], unet_working_bytes(per_pass, request.height, request.width, model.dtype,
                                                              denoiser.guided))
    apply_motion_loras(model.handle["unet"], model.motion_loras)  # on the device the weights now live on
    apply_sd15_loras(model.handle["unet"], model.loras)
    with motion_scale(model.unet, request.motion_scale):
        latents = SAMPLERS[model.variant.sampler](denoiser, x, sigmas, preview)
    require_finite(latents, what="sampled latents", likely_causes=(
        f"NaN/inf weights in {model.checkpoint_name} or {model.motion_name} (download the file again), or a "
        f"{str(model.dtype).removeprefix('torch.')} overflow in the UNet (try ComfyUI's --force-fp32)"))
    frames_latents = latents[0].permute(1, 0, 2, 3)  # [F, C, h, w]
    vae = model.handle["vae"]
    memory.prepare([vae], vae_working_bytes(min(request.frames, DECODE_CHUNK), request.height, request.width,
                                            vae.dtype or model.dtype))
    decode_cb = (lambda done, _n: progress(steps_run + -(-done // DECODE_CHUNK), total)) if progress else None
    frames = decode_latents(model.vae, frames_latents, model.scaling_factor, chunk=DECODE_CHUNK, progress=decode_cb,
                            device=vae.load_device, source=f"the VAE of {model.checkpoint_name}")
    return GenerationResult(frames=frames, settings=settings, notes=tuple(notes), denoiser_calls=denoiser.calls,
                            model_forwards=denoiser.forwards, latents=frames_latents.float().cpu())


def _make_denoiser(model: LightningModel, request: GenerationRequest, settings: V.SamplingSettings,
                   progress: Optional[ProgressFn], expected_calls: int) -> Denoiser:
    """The motion UNet as an epsilon-prediction denoiser; frames ride in the batch, so each prompt's
    context is repeated per frame (diffusers UNetMotionModel takes [batch * frames, tokens, dim])."""
    frames = request.frames

    def encode(text: str, given: Optional[torch.Tensor] = None) -> torch.Tensor:
        if given is not None:
            context = given
        elif model.encode_text is not None:
            context = check_host_context(model, model.encode_text(text))
        else:
            context = encode_weighted(model.tokenizer, model.text_encoder, text,
                                      model.handle["text_encoder"].load_device)
        return context.to(model.device, model.dtype).repeat_interleave(frames, 0)

    def forward(model_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return model.unet(model_input, timestep, encoder_hidden_states=context).sample

    made: list[Denoiser] = []  # the window schedule shifts with the step: the denoiser's own count
    if request.context_schedule != "off":
        forward = windowed(forward, frames=frames, length=request.context_length, overlap=request.context_overlap,
                           schedule=request.context_schedule, fuse=request.context_fuse,
                           step_of=lambda: made[0].calls)
    made.append(Denoiser(
        forward=forward, parameterization=epsilon_prediction(model.model_sigmas),
        positive=encode(request.prompt, request.positive_context),
        negative=lambda: encode(request.negative, request.negative_context), cfg=settings.cfg, join=join_contexts,
        model_dtype=model.dtype, progress=progress, expected_calls=expected_calls,
    ))
    return made[0]
