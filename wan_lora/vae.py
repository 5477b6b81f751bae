"""The Wan 2.1 video VAE from ComfyUI's `models/vae/wan_2.1_vae.safetensors` -> diffusers AutoencoderKLWan.

The file keeps the original Wan names (`wan/modules/vae.py`, the same as ComfyUI's `comfy/ldm/wan/vae.py`:
`conv1`, `encoder.downsamples.N.residual.K`, `decoder.upsamples.N`, ...). The architecture is read from the
tensor shapes, the key renaming is diffusers' own `convert_wan_vae_to_diffusers`, and the network is built
on the meta device from a dict, so nothing reaches a hub. Every converted name and shape is compared with
the network's own before any weight is loaded: a file the converter only half understands is refused
instead of leaving layers random. `decode_wan_latents` turns the transformer's normalized latents into
ComfyUI IMAGE frames, one latent frame at a time (Wan's causal decode), checking NaN/inf before the clamp.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict
from ..core.errors import InvalidSettingError, NonFiniteResultError, UnsupportedCheckpointError
from ..core.guards import require_finite
from ..core.model_handle import Component

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

VAE_FILE = "wan_2.1_vae.safetensors"
VAE_URL = ("https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/"
           "wan_2.1_vae.safetensors")
_FETCH = f"Download {VAE_FILE} from {VAE_URL} into ComfyUI's models/vae folder and select it."

LATENT_CHANNELS = 16
# Per-channel statistics of Wan 2.1's latent space: Wan `wan/modules/vae.py::WanVAE` (mean, std), the same
# values as ComfyUI `comfy/latent_formats.py::Wan21` and diffusers' AutoencoderKLWan config defaults.
# The transformer samples z = (mu - mean) / std, so decoding starts from mu = z * std + mean.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
TIME_STRIDE, SPACE_STRIDE = 4, 8  # Wan configs' vae_stride (4, 8, 8)

# Tensors that tell other files apart (ComfyUI `comfy/sd.py::VAE.__init__` uses the first two the same way)
WAN_VAE_KEY = "decoder.middle.0.residual.0.gamma"
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # Wan 2.2's nested up blocks
DIFFUSERS_WAN_VAE_KEY = "decoder.mid_block.resnets.0.norm1.gamma"
IMAGE_VAE_KEYS = ("decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight")
WAN_DIT_KEYS = ("blocks.0.self_attn.q.weight", "model.diffusion_model.blocks.0.self_attn.q.weight")


@dataclass(frozen=True)
class WanVAELayout:
    """What the file's tensors say about its architecture, read before any weight is loaded."""

    path: Path
    fingerprint: tuple[int, int]  # size and mtime when inspected: re-reads refuse a changed file
    config: dict[str, Any]  # diffusers AutoencoderKLWan config (with the latent mean/std above)


def inspect_wan_vae(path: str | Path) -> WanVAELayout:
    """Check the file is a Wan 2.1 VAE in Wan's own key names and read its architecture from the shapes."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    state = load_state_dict(path)  # memory-mapped: only names and shapes are read here
    _refuse_other_models(path.name, state)
    z_dim = state["conv2.weight"].shape[0] if "conv2.weight" in state else LATENT_CHANNELS  # absent: below
    if z_dim != LATENT_CHANNELS:
        raise UnsupportedCheckpointError(
            f"{path.name} is a Wan-style VAE with {z_dim} latent channels (conv2.weight), but Wan 2.1 T2V works "
            f"in {LATENT_CHANNELS}. {_FETCH}"
        )
    try:
        config = infer_wan_vae_config(state)
    except (KeyError, ValueError) as exc:
        raise UnsupportedCheckpointError(
            f"{path.name} lacks tensors every Wan 2.1 VAE has (e.g. {exc}); it may be damaged or pruned. {_FETCH}"
        ) from None
    _require_every_tensor_fits(path.name, state, config)
    return WanVAELayout(path=path, fingerprint=fingerprint, config=config)


def _refuse_other_models(name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Name what the file is when it is not the Wan 2.1 VAE (the loaders' most common mix-ups)."""
    conv2 = state.get("conv2.weight")
    if WAN22_VAE_KEY in state or (conv2 is not None and conv2.shape[0] == 48):
        raise UnsupportedCheckpointError(
            f"{name} is the Wan 2.2 VAE (48 latent channels, nested up blocks); it belongs to Wan 2.2 TI2V-5B. "
            f"Wan 2.1 T2V needs the Wan 2.1 VAE: {_FETCH}"
        )
    if any(k.startswith("first_stage_model.") for k in state):
        raise UnsupportedCheckpointError(
            f"{name} is an image model checkpoint (its 'first_stage_model.*' tensors are an SD/SDXL image VAE), "
            f"not a VAE file: an image VAE, Wan 2.1 needs its video VAE. {_FETCH}"
        )
    if DIFFUSERS_WAN_VAE_KEY in state:
        raise UnsupportedCheckpointError(
            f"{name} is a Wan VAE in diffusers' names (from a *-Diffusers repository's vae folder); the loader "
            f"reads the ComfyUI single file in Wan's own names. {_FETCH}"
        )
    if any(k in state for k in IMAGE_VAE_KEYS):
        raise UnsupportedCheckpointError(
            f"{name} is an image VAE (SD/SDXL/Flux layout, e.g. 'decoder.conv_in.weight'): an image VAE, "
            f"Wan 2.1 needs its video VAE. {_FETCH}"
        )
    if any(k in state for k in WAN_DIT_KEYS):
        raise UnsupportedCheckpointError(
            f"{name} is a Wan diffusion model (transformer blocks), not the VAE; it goes in models/diffusion_models. "
            f"{_FETCH}"
        )
    if WAN_VAE_KEY not in state:
        raise UnsupportedCheckpointError(
            f"{name} is not a Wan 2.1 VAE: it has no '{WAN_VAE_KEY}' tensor (the one ComfyUI recognises the "
            f"Wan VAE by). Got {len(state)} tensors, e.g. {sorted(state)[:3]}. {_FETCH}"
        )


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def infer_wan_vae_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers AutoencoderKLWan config from the shapes of a file in Wan's names (Wan 2.1 structure)."""
    base_dim = state["encoder.conv1.weight"].shape[0]
    blocks = _indices(state, r"encoder\.downsamples\.(\d+)\.")
    resamples = _indices(state, r"encoder\.downsamples\.(\d+)\.resample\.1\.weight")
    if not blocks or not resamples:
        raise KeyError("encoder.downsamples.*.resample.1.weight")
    num_res_blocks = resamples[0]  # the residual blocks of the first level come before its downsample
    levels = len(resamples) + 1
    if len(blocks) != levels * num_res_blocks + len(resamples):
        raise ValueError(f"encoder.downsamples.* ({len(blocks)} blocks for {levels} levels)")
    # each level ends with its last residual block, just before its downsample (or at the end)
    level_ends = [r - 1 for r in resamples] + [blocks[-1]]
    dim_mult = [state[f"encoder.downsamples.{i}.residual.6.weight"].shape[0] // base_dim for i in level_ends]
    temporal = [f"encoder.downsamples.{r}.time_conv.weight" in state for r in resamples]
    config: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": state["conv2.weight"].shape[0],
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,  # diffusers' spelling
        "in_channels": state["encoder.conv1.weight"].shape[1],
        "out_channels": state["decoder.head.2.weight"].shape[0],
        "latents_mean": list(WAN21_LATENTS_MEAN),
        "latents_std": list(WAN21_LATENTS_STD),
    }
    decoder_dim = state["decoder.head.2.weight"].shape[1]
    if decoder_dim != base_dim:
        config["decoder_base_dim"] = decoder_dim
    return config


def _build_on_meta(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**config).eval()


def _converted(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(state))


def _require_every_tensor_fits(name: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Every file tensor lands on exactly one network tensor of its shape, and none is left unset.

    diffusers' converter passes names it does not know through unchanged and would let two names collide,
    so both show up here (as unexpected or missing) rather than as silently random layers."""
    converted = _converted(state)
    expected = {k: tuple(v.shape) for k, v in _build_on_meta(config).state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if tuple(converted[k].shape) != expected[k])
    if len(converted) != len(state) or missing or unexpected or wrong:
        raise UnsupportedCheckpointError(
            f"{name} does not match the Wan 2.1 VAE its shapes describe (base_dim {config['base_dim']}, "
            f"dim_mult {config['dim_mult']}): {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
            f"(e.g. {wrong[:3]}), {len(state) - len(converted)} merged. It may be damaged or another "
            f"model's VAE. {_FETCH}"
        )


def vae_weights(layout: WanVAELayout) -> dict[str, torch.Tensor]:
    """The VAE's tensors under AutoencoderKLWan names (diffusers' converter on the memory-mapped file)."""
    return _converted(load_state_dict(layout.path, expect=layout.fingerprint))


def vae_component(layout: WanVAELayout, *, load_device: torch.device, offload_device: torch.device,
                  dtype: Optional[torch.dtype]) -> Component:
    """The VAE as a Component named "vae": AutoencoderKLWan on the meta device until `materialize`."""
    return Component(name="vae", module=_build_on_meta(layout.config), weights=lambda: vae_weights(layout),
                     load_device=load_device, offload_device=offload_device, dtype=dtype)


def decode_working_bytes(latent_shape: tuple[int, ...], *, dtype: torch.dtype) -> int:
    """Rough memory one untiled decode needs besides the weights (for a MemoryPolicy's `working_bytes`).

    Measured on the CPU at the real width (peak RSS): about 24 kB per output pixel in float32 whatever the
    number of latent frames (the causal cache keeps 2 frames per conv), plus the output video itself; half
    that in 16-bit dtypes is assumed, not measured. 480x832 in bfloat16: about 4.8 GB."""
    batch, _, frames, height, width = latent_shape
    pixels = height * SPACE_STRIDE * width * SPACE_STRIDE
    size = torch.empty((), dtype=dtype).element_size()
    return pixels * 6000 * size + batch * (TIME_STRIDE * (frames - 1) + 1) * pixels * 3 * size


@dataclass
class _DecoderWatch:
    """Forward hook on `vae.decoder`, which AutoencoderKLWan calls once per latent frame (per tile when tiled):
    counts the calls for progress (the callable may raise to cancel) and records NaN/inf in the raw output,
    which `decode` would clamp into white/black pixels before returning. Flags stay on the device."""

    progress: Optional[ProgressFn]
    total: int
    done: int = 0
    bad: Optional[torch.Tensor] = None

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        count = (~torch.isfinite(output)).sum()
        self.bad = count if self.bad is None else self.bad + count
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _decoder_calls(vae: torch.nn.Module, latent_frames: int, height: int, width: int) -> int:
    """How often one video's decode calls the decoder: per latent frame, times the tiles when tiling."""
    ratio = getattr(vae, "spatial_compression_ratio", SPACE_STRIDE)
    min_h, min_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    if not (vae.use_tiling and (width > min_w or height > min_h)):
        return latent_frames
    rows = len(range(0, height, vae.tile_sample_stride_height // ratio))
    cols = len(range(0, width, vae.tile_sample_stride_width // ratio))
    return latent_frames * rows * cols


def _check_latents(vae: torch.nn.Module, latents: torch.Tensor) -> None:
    channels = len(vae.config.latents_mean)
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise InvalidSettingError(
            f"The Wan VAE decodes latents shaped [batch, {channels}, frames, height/8, width/8]; got "
            f"{list(latents.shape)}. Connect the LATENT of a Wan 2.1 sampler (not an image model's)."
        )
    require_finite(latents, what="latents given to the Wan VAE", likely_causes=(
        "the sampler diverged before decoding (the transformer run in float16, a LoRA strength or CFG far too "
        "high, or NaN in the transformer's weights); the VAE was not run"))


def _denormalized(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device).view(shape)
    return latents.float() * std + mean


@torch.no_grad()
def decode_wan_latents(vae: torch.nn.Module, latents: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                       progress: Optional[ProgressFn] = None, tiled: Optional[bool] = None,
                       source: str = "the Wan VAE") -> torch.Tensor:
    """[B, 16, F', h, w] normalized latents -> [B*F, 8h, 8w, 3] float32 frames in 0..1 on the CPU (IMAGE).

    F = 4(F'-1)+1. Each video is decoded causally, one latent frame at a time, so memory does not grow
    with F'. `dtype` (default: the VAE's) is the compute dtype; a video that overflows to NaN/inf in a
    reduced precision is decoded again in float32, and one that stays non-finite is a NonFiniteResultError.
    `progress(done, total)` runs after each latent frame (each tile-frame when tiled) and may raise to
    cancel. `tiled=True` decodes in the VAE's tiles (diffusers' default 256 px with a 192 px stride, seams
    blended), for large frames on small GPUs; None keeps the VAE's own setting, which is off unless
    `enable_tiling` was called, because tiles are slower and not bit-identical to Wan's own decode."""
    _check_latents(vae, latents)
    weight = next(vae.parameters())
    own_dtype, device = weight.dtype, weight.device
    dtype = dtype or own_dtype
    batch, _, frames, height, width = latents.shape
    was_tiling = vae.use_tiling
    vae.use_tiling = was_tiling if tiled is None else tiled
    watch = _DecoderWatch(progress=progress, total=batch * _decoder_calls(vae, frames, height, width))
    handle = vae.decoder.register_forward_hook(watch)
    try:
        videos = [_decode_video(vae, latents[b:b + 1].to(device), dtype=dtype, watch=watch, source=source)
                  for b in range(batch)]
    finally:
        handle.remove()
        vae.clear_cache()  # drops the causal cache's tensors when a progress callback cancelled mid-video
        vae.use_tiling = was_tiling
        _cast(vae, own_dtype)
    return torch.cat(videos)


def _decode_video(vae: torch.nn.Module, latents: torch.Tensor, *, dtype: torch.dtype, watch: _DecoderWatch,
                  source: str) -> torch.Tensor:
    """One video [1, 16, F', h, w] -> [F, H, W, 3] in 0..1 on the CPU, checked before diffusers' clamp."""
    start = watch.done
    sample = _decode_in(vae, latents, dtype=dtype, watch=watch)
    bad = int(watch.bad)
    if bad and dtype != torch.float32:
        log.warning("Wan VAE produced %d NaN/inf values in %s; decoding the video again in float32", bad, dtype)
        watch.done = start  # progress runs over this video's frames again
        sample = _decode_in(vae, latents, dtype=torch.float32, watch=watch)
        bad = int(watch.bad)
    if bad:
        raise NonFiniteResultError(
            f"The decoded frames contain {bad} NaN/infinite values before clamping (of {sample.numel()}), so the "
            f"video would be black or white. Likely causes: NaN/inf weights in {source} (download "
            f"{VAE_FILE} again), or an overflow that decoding again in float32 did not cure."
        )
    frames = sample[0].float().add_(1).div_(2).clamp_(0, 1)  # diffusers already clamped it to [-1, 1]
    return frames.permute(1, 2, 3, 0).to("cpu").contiguous()


def _cast(vae: torch.nn.Module, dtype: torch.dtype) -> None:
    # torch's own `to`: diffusers' ModelMixin.to logs a warning about keep-in-fp32 modules on every cast,
    # and AutoencoderKLWan has none
    if next(vae.parameters()).dtype != dtype:
        torch.nn.Module.to(vae, dtype)


def _decode_in(vae: torch.nn.Module, latents: torch.Tensor, *, dtype: torch.dtype,
               watch: _DecoderWatch) -> torch.Tensor:
    _cast(vae, dtype)
    watch.bad = None
    return vae.decode(_denormalized(vae, latents).to(dtype)).sample
