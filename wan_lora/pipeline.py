"""Wan 2.1 text-to-video sampling over the shared flow-matching denoiser.

The transformer is loaded once (`load_wan_transformer`) as a one-component model handle; prompts
arrive already encoded (umt5, [1, 512, text_dim], zero past the tokens); `sample_wan` returns the
latents in Wan's normalised space, which the VAE module decodes. CFG exactly 1 is one forward per
step; NAG, when on, guides the positive rows' cross-attention with the negative prompt.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.denoisers import Denoiser, flow_prediction, initial_latent, uses_negative
from ..core.devices import resolve_device
from ..core.errors import IncompatibleModelsError, InvalidSettingError
from ..core.guards import require_finite
from ..core.model_handle import LocalMemory, MemoryPolicy, ModelHandle
from ..core.sampler_table import SAMPLERS
from ..core.sampling import StepCallback, seeded_noise
from ..core.schedules import FLOW_SCHEDULES
from . import presets as P
from .conditioning import WanContext, join_contexts, wan_forward
from .lora_apply import apply_lora_stack
from .loras import WanLora, read_wan_lora
from .nag import NagSettings, nag_applied
from .transformer import WanTransformerLayout, inspect_wan_transformer, transformer_component

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
Placement = tuple[torch.device, torch.device, torch.dtype]
LATENT_CHANNELS = 16
VAE_TIME_STRIDE, VAE_SPACE_STRIDE = 4, 8
TEXT_TOKENS = 512  # Wan's text_len


@dataclass(frozen=True, repr=False)
class WanModel:
    name: str
    layout: WanTransformerLayout
    handle: ModelHandle  # one component, "transformer"
    device: torch.device
    dtype: torch.dtype
    notes: tuple[str, ...] = ()
    loras: tuple["LoraEntry", ...] = ()  # applied in this order when sampling (the base weights stay as loaded)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.handle["transformer"].module

    @property
    def distill_lora(self) -> Optional[str]:
        return next((e.lora.name for e in self.loras if e.strength and e.lora.report.distill), None)

    def __repr__(self) -> str:
        # ComfyUI prints node inputs in its error reports: one readable line
        loras = "".join(f" + {e.lora.name}@{e.strength:g}" for e in self.loras)
        return (f"WanModel({self.name}{loras}, {self.layout.size}, {self.layout.storage}, {self.device.type} "
                f"{str(self.dtype).removeprefix('torch.')})")


@dataclass(frozen=True)
class LoraEntry:
    lora: WanLora
    strength: float
    trigger: Optional[str] = None  # prepended to the prompt when missing (the file's own, or typed by the user)


def with_lora(model: WanModel, path: str | Path, *, strength: float, trigger: str = "") -> WanModel:
    """The model with one more LoRA in its stack (the loaded weights are shared, nothing is copied)."""
    if not math.isfinite(strength):
        raise InvalidSettingError(f"strength={strength}: use a finite number (1.0 = as trained, 0 = off).")
    lora = read_wan_lora(path, layout=model.layout, model_name=model.name)
    entry = LoraEntry(lora=lora, strength=float(strength), trigger=trigger.strip() or lora.report.trigger)
    return replace(model, loras=(*model.loras, entry))


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (Wan's param_dtype; fp16 where the card has no bf16), fp16 on Apple's MPS, fp32 on the CPU."""
    if device.type == "mps":
        return torch.float16
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_wan_transformer(path: str | Path, *, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                         placement: Optional[Placement] = None) -> WanModel:
    """Read the file's layout, build the transformer on meta and adopt its weights onto the CPU (memory-mapped;
    fp8 stays fp8). The memory policy moves it to its compute device when sampling starts."""
    path = Path(path)
    layout = inspect_wan_transformer(path)
    torch_device = resolve_device(device)
    load, offload, its_dtype = placement or (torch_device, torch.device("cpu"), dtype or default_dtype(torch_device))
    component = transformer_component(layout, load_device=torch.device(load), offload_device=torch.device(offload),
                                      dtype=its_dtype)
    component.materialize(torch.device("cpu"))
    notes = []
    if component.load_device.type == "cpu":
        notes.append("computing on the CPU: this works, but a 14B video takes hours; a CUDA GPU takes minutes")
    return WanModel(name=path.name, layout=layout, handle=ModelHandle({"transformer": component}),
                    device=component.load_device, dtype=its_dtype, notes=tuple(notes))


@dataclass(frozen=True)
class WanSampleRequest:
    positive: torch.Tensor  # [1, 512, text_dim] umt5 embeddings
    negative: torch.Tensor  # the negative prompt's embeddings (CFG > 1 and NAG)
    negative_is_empty: bool = False
    seed: int = 0
    frames: int = P.DEFAULT_FRAMES
    width: int = 832
    height: int = 480
    steps: int = 50
    cfg: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    preset: str = "wan21_t2v_base"
    policy: str = "strict"
    nag: NagSettings = field(default_factory=lambda: NagSettings(scale=1.0))


@dataclass(frozen=True)
class WanSampleResult:
    latents: torch.Tensor  # [1, 16, F', h, w] float32 on the CPU, Wan's normalised latent space
    settings: P.WanSettings
    sigmas: torch.Tensor
    notes: tuple[str, ...]
    denoiser_calls: int
    model_forwards: int
    nag_calls: int = 0


def latent_shape(*, frames: int, width: int, height: int) -> tuple[int, int, int, int, int]:
    return (1, LATENT_CHANNELS, (frames - 1) // VAE_TIME_STRIDE + 1, height // VAE_SPACE_STRIDE,
            width // VAE_SPACE_STRIDE)


def transformer_working_bytes(shape: tuple[int, ...], *, dim: int, dtype: torch.dtype, guided: bool) -> int:
    """Activation memory of one pass, by ComfyUI's estimate for Wan 2.1 (comfy/model_base.py memory_required:
    area * dtype size * 0.01 * memory_usage_factor MiB; supported_models.py WAN21_T2V factor = dim / 2222)."""
    area = (2 if guided else 1) * math.prod(shape[2:])
    return int(area * torch.empty(0, dtype=dtype).element_size() * 0.01 * (dim / 2222) * 2**20)


def check_request(model: WanModel, request: WanSampleRequest) -> P.CheckedWanSettings:
    """Every check that needs no model run: preset and policy, video size, text width, NAG."""
    preset_id, stack_notes = P.preset_for_stack(request.preset, distill_lora=model.distill_lora, steps=request.steps,
                                                policy=request.policy)
    checked = P.check_wan_settings(
        P.get_preset(preset_id),
        P.WanSettings(steps=request.steps, cfg=request.cfg, shift=request.shift, sampler=request.sampler),
        request.policy)
    P.check_video_size(frames=request.frames, width=request.width, height=request.height)
    for name, embeddings in (("positive", request.positive), ("negative", request.negative)):
        if embeddings.ndim != 3 or embeddings.shape[-1] != model.layout.text_dim:
            raise IncompatibleModelsError(
                f"The {name} prompt was encoded {tuple(embeddings.shape)[-1:]} wide, but {model.name} reads "
                f"{model.layout.text_dim}-wide umt5-xxl embeddings. Encode the prompt with umt5_xxl "
                "(models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors) for a Wan 2.1 model."
            )
    notes = [*stack_notes, *checked.notes]
    if request.nag.enabled and request.negative_is_empty:
        notes.append("NAG is off: the negative prompt is empty")
    return P.CheckedWanSettings(settings=checked.settings, notes=tuple(notes))


def _padded(embeddings: torch.Tensor) -> torch.Tensor:
    """Wan pads every prompt's embeddings with zeros to 512 tokens (native CONDITIONING may be shorter or longer)."""
    tokens = embeddings.shape[1]
    if tokens >= TEXT_TOKENS:
        return embeddings[:, :TEXT_TOKENS]
    return torch.nn.functional.pad(embeddings, (0, 0, 0, TEXT_TOKENS - tokens))


def sample_wan(model: WanModel, request: WanSampleRequest, *, progress: Optional[ProgressFn] = None,
               memory: Optional[MemoryPolicy] = None, callback: Optional[StepCallback] = None) -> WanSampleResult:
    """Noise -> latents for one video. `progress(done, total)` runs after each step and may raise to cancel;
    `callback(step, total, x, denoised)` sees each step's x0 estimate (latent previews)."""
    checked = check_request(model, request)
    settings = checked.settings
    nag_on = request.nag.enabled and not request.negative_is_empty
    sigmas = FLOW_SCHEDULES[settings.sampler](settings.steps, settings.shift)
    shape = latent_shape(frames=request.frames, width=request.width, height=request.height)
    x = initial_latent(seeded_noise(shape, request.seed), sigmas[0], flow_prediction()).to(model.device)
    memory = memory or LocalMemory(model.handle)
    memory.prepare([model.handle["transformer"]], transformer_working_bytes(
        shape, dim=model.layout.config["num_attention_heads"] * 128, dtype=model.dtype,
        guided=uses_negative(settings.cfg)))
    # on the device the weights now live on; the same stack as last run costs nothing
    apply_lora_stack(model.handle["transformer"], [(e.lora, e.strength) for e in model.loras])
    nag = (nag_applied(model.transformer, negative_embeddings=_padded(request.negative), settings=request.nag)
           if nag_on else nullcontext())
    with nag as nag_state:
        denoiser = Denoiser(
            forward=wan_forward(model.transformer, nag_state), parameterization=flow_prediction(),
            positive=WanContext.of(_padded(request.positive), nag=nag_on),
            negative=lambda: WanContext.of(_padded(request.negative), nag=False), cfg=settings.cfg,
            join=join_contexts, model_dtype=model.dtype, progress=progress, expected_calls=settings.steps)
        latents = SAMPLERS[settings.sampler](denoiser, x, sigmas, callback)
    require_finite(latents, what="sampled latents", likely_causes=(
        f"NaN/inf weights in {model.name} (download it again), or an fp16 overflow (use bf16: ComfyUI's "
        "--bf16-unet)"))
    return WanSampleResult(latents=latents.float().cpu(), settings=settings, sigmas=sigmas, notes=checked.notes,
                           denoiser_calls=denoiser.calls, model_forwards=denoiser.forwards,
                           nag_calls=nag_state.calls_with_nag if nag_state is not None else 0)


@dataclass(frozen=True, repr=False)
class WanTextEncoder:
    name: str
    layout: object  # text_encoder.UMT5Layout
    handle: ModelHandle  # one component, "text_encoder"
    tokenizer: object  # text_encoder.UMT5Tokenizer (from the file's own spiece_model)

    def __repr__(self) -> str:
        return f"WanTextEncoder({self.name}, {self.layout.storage})"


@dataclass(frozen=True, repr=False)
class WanVAE:
    name: str
    layout: object  # vae.WanVAELayout
    handle: ModelHandle  # one component, "vae"

    def __repr__(self) -> str:
        return f"WanVAE({self.name})"


def _placed(placement: Optional[Placement], device: Optional[str], dtype: Optional[torch.dtype]) -> dict:
    torch_device = resolve_device(device)
    load, offload, its_dtype = placement or (torch_device, torch.device("cpu"), dtype or default_dtype(torch_device))
    return dict(load_device=torch.device(load), offload_device=torch.device(offload), dtype=its_dtype)


def load_wan_text_encoder(path: str | Path, *, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                          placement: Optional[Placement] = None) -> WanTextEncoder:
    """umt5-xxl from ComfyUI's text_encoders file, with the sentencepiece tokenizer embedded in it."""
    from .text_encoder import inspect_umt5, load_tokenizer, text_encoder_component

    path = Path(path)
    layout = inspect_umt5(path)
    component = text_encoder_component(layout, **_placed(placement, device, dtype))
    component.materialize(torch.device("cpu"))
    return WanTextEncoder(name=path.name, layout=layout, handle=ModelHandle({"text_encoder": component}),
                          tokenizer=load_tokenizer(layout))


def encode_wan_prompt(encoder: WanTextEncoder, text: str, *, memory: Optional[MemoryPolicy] = None):
    """[1, 512, 4096] umt5 embeddings (zero past the tokens; text_encoder.PromptEmbedding)."""
    from .text_encoder import encode_prompt

    component = encoder.handle["text_encoder"]
    (memory or LocalMemory(encoder.handle)).prepare([component])
    return encode_prompt(component.module, encoder.tokenizer, text, device=component.load_device)


def load_wan_vae(path: str | Path, *, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 placement: Optional[Placement] = None) -> WanVAE:
    """The Wan 2.1 video VAE (vae/wan_2.1_vae.safetensors). fp32 by default off CUDA (diffusers recommends fp32)."""
    from .vae import inspect_wan_vae, vae_component

    path = Path(path)
    layout = inspect_wan_vae(path)
    component = vae_component(layout, **_placed(placement, device, dtype))
    component.materialize(torch.device("cpu"))
    return WanVAE(name=path.name, layout=layout, handle=ModelHandle({"vae": component}))


def decode_wan(vae: WanVAE, latents: torch.Tensor, *, progress: Optional[ProgressFn] = None,
               memory: Optional[MemoryPolicy] = None) -> torch.Tensor:
    """Normalised Wan latents [B, 16, F', h, w] -> IMAGE frames [B*F, H, W, 3] in 0..1."""
    from .vae import decode_wan_latents, decode_working_bytes

    component = vae.handle["vae"]
    (memory or LocalMemory(vae.handle)).prepare(
        [component], decode_working_bytes(tuple(latents.shape), dtype=component.dtype or torch.float32))
    return decode_wan_latents(component.module, latents, progress=progress, source=vae.name)


def _latent_stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    shape = (1, -1, 1, 1, 1)
    return (torch.tensor(WAN21_LATENTS_MEAN, dtype=torch.float32).view(shape).to(like.device),
            torch.tensor(WAN21_LATENTS_STD, dtype=torch.float32).view(shape).to(like.device))


def to_comfy_latent(latents: torch.Tensor) -> torch.Tensor:
    """Wan's normalised latents -> the VAE's own latent space, which ComfyUI's LATENT holds for Wan
    (comfy/latent_formats.py Wan21: process_in = (x - mean) / std on the way into the model, process_out back)."""
    mean, std = _latent_stats(latents)
    return latents.float() * std + mean


def from_comfy_latent(samples: torch.Tensor) -> torch.Tensor:
    mean, std = _latent_stats(samples)
    return (samples.float() - mean) / std


def prompt_with_triggers(prompt: str, model: Optional[WanModel]) -> tuple[str, tuple[str, ...]]:
    """The prompt with each style LoRA's trigger phrase in front when it is missing ("Studio Ghibli style.":
    the LoRA was trained on captions that all start with it), and a note per phrase added."""
    if model is None:
        return prompt, ()
    notes, missing = [], []
    for entry in model.loras:
        trigger = entry.trigger
        seen = " ".join([*missing, prompt]).lower()  # two LoRAs with one trigger (or one chained twice): added once
        if not trigger or not entry.strength or trigger.lower().rstrip(" .,") in seen:
            continue
        missing.append(trigger)
        notes.append(f"added the trigger of {entry.lora.name} to the prompt: {trigger!r}")
    return (" ".join([*missing, prompt]).strip() if missing else prompt), tuple(notes)
