"""fp8 weights as ComfyUI's files store them, and the one layer that computes with them.

Three storages exist for the same model (Comfy-Org/Wan_2.1_ComfyUI_repackaged, Kijai's WanVideo_comfy):
- plain fp8 (`*_fp8_e4m3fn`, `*_fp8_e5m2`): the weight is the value, cast to the compute dtype;
- fp8_scaled, first generation (ComfyUI comfy/ops.py scaled_fp8_ops; comfy/model_detection.py): a
  `scaled_fp8` marker tensor and, per quantized Linear, a float32 `<layer>.scale_weight` (and
  `<layer>.scale_input`); the real weight is W_fp8 * scale_weight;
- fp8_scaled, mixed-precision generation (ComfyUI comfy/utils.py convert_old_quants, Oct 2025):
  `<layer>.weight_scale` (and `.input_scale`) with a uint8 JSON `<layer>.comfy_quant` tensor
  {"format": "float8_e4m3fn", ...}, or the same per layer in the header's `_quantization_metadata`.
Scales are about 1e-3: a loader that drops them computes with weights ~1000x too large (saturated
video; leejet/stable-diffusion.cpp#1898). The input scales only serve fp8 matmuls
(torch._scaled_mm), which Flipbook does not use: weights are cast to bf16/fp16 per layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .errors import UnsupportedCheckpointError
from .model_handle import FP8_DTYPES

SCALE_MARKER = "scaled_fp8"
WEIGHT_SCALES = (".scale_weight", ".weight_scale")  # first generation, mixed-precision generation
INPUT_SCALES = (".scale_input", ".input_scale")
QUANT_INFO_SUFFIX = ".comfy_quant"
HEADER_QUANT_KEY = "_quantization_metadata"
# comfy_quant formats that are fp8 with one scale per tensor, and the torch dtype each is stored in
FP8_FORMATS = MappingProxyType({"float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
                                "float8_e5m2": getattr(torch, "float8_e5m2", None)})
STORAGE_NAMES = MappingProxyType({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                                  **{dtype: name.replace("float8", "fp8") for name, dtype in FP8_FORMATS.items()}})


@dataclass(frozen=True)
class Fp8Weights:
    """A file's tensors split into plain tensors and per-layer weight scales (layer name -> float32 scale)."""

    tensors: dict[str, torch.Tensor]  # everything but the quantization tensors
    scales: dict[str, torch.Tensor]  # layer -> float32 scale, () or (rows, 1)
    scaled: bool  # a scaled file (marker, scales or quantization metadata), even if no scale was found


def is_quantization_key(name: str) -> bool:
    return name == SCALE_MARKER or name.endswith(
        (*WEIGHT_SCALES, *INPUT_SCALES, QUANT_INFO_SUFFIX, "." + SCALE_MARKER))


def split_fp8_scales(state: Mapping[str, torch.Tensor], *, metadata: Optional[Mapping[str, str]],
                     file_name: str, hint: str = "") -> Fp8Weights:
    """Separate the quantization tensors from the weights and check every scaled layer is fp8 with a scale.

    Scales come back as float32, shaped () for one per tensor or (rows, 1) for one per output row. Refused
    (typed errors naming the layer; `hint` says what to download): an fp8 weight of a scaled file without
    its scale, a scale that fits no weight, a format other than fp8 (e.g. nvfp4, int8 blocks)."""
    formats = _layer_formats(state, metadata, file_name, hint)
    tensors = {k: v for k, v in state.items() if not is_quantization_key(k)}
    scales = {}
    for name, tensor in state.items():
        suffix = next((s for s in WEIGHT_SCALES if name.endswith(s)), None)
        if suffix is not None:
            layer = name[: -len(suffix)]
            scales[layer] = _shaped_scale(tensor, tensors.get(layer + ".weight"), name, file_name, hint)
    scaled = bool(scales or formats) or any(k == SCALE_MARKER or k.endswith("." + SCALE_MARKER) for k in state)
    unscaled = sorted(k[: -len(".weight")] for k, v in tensors.items()
                      if scaled and v.dtype in FP8_DTYPES and k.endswith(".weight") and k[: -len(".weight")] not in scales)
    if unscaled:
        raise UnsupportedCheckpointError(
            f"{file_name} is an fp8_scaled file, but layer '{unscaled[0]}' (and {len(unscaled) - 1} more) has no "
            f"'{WEIGHT_SCALES[0]}'/'{WEIGHT_SCALES[1]}' tensor: without its scale a weight is about 1000x off and "
            "the video is noise. The file is incomplete or was converted by a tool that dropped the scales. " + hint
        )
    return Fp8Weights(tensors=tensors, scales=scales, scaled=scaled)


def _shaped_scale(scale: torch.Tensor, weight: Optional[torch.Tensor], name: str, file_name: str,
                  hint: str) -> torch.Tensor:
    rows = weight.shape[0] if weight is not None and weight.ndim >= 1 else -1
    if weight is None or not weight.is_floating_point() or scale.numel() not in (1, rows):
        raise UnsupportedCheckpointError(
            f"{file_name}: the scale '{name}' fits no floating-point weight (one value per layer, or one per row, "
            "is required); the file is damaged or in an unknown quantization. " + hint
        )
    return scale.float().reshape(()) if scale.numel() == 1 else scale.float().reshape(-1, 1)


def _layer_formats(state: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]],
                   file_name: str, hint: str) -> dict[str, str]:
    """layer -> quantization format, from `comfy_quant` tensors and the header's `_quantization_metadata`."""
    formats: dict[str, str] = {}
    raw_header = (metadata or {}).get(HEADER_QUANT_KEY)
    try:
        if raw_header:
            for layer, info in json.loads(raw_header).get("layers", {}).items():
                formats[layer] = str(info.get("format"))
        for name, tensor in state.items():
            if name.endswith(QUANT_INFO_SUFFIX):
                info = json.loads(bytes(tensor.to(torch.uint8).flatten().tolist()).decode("utf-8"))
                formats[name[: -len(QUANT_INFO_SUFFIX)]] = str(info.get("format"))
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise UnsupportedCheckpointError(f"{file_name}: its quantization notes are not the JSON ComfyUI writes "
                                         f"({exc}); the file is damaged. " + hint) from None
    unknown = sorted((layer, fmt) for layer, fmt in formats.items() if fmt not in FP8_FORMATS)
    if unknown:
        layer, fmt = unknown[0]
        raise UnsupportedCheckpointError(
            f"{file_name}: layer '{layer}' (and {len(unknown) - 1} more) is quantized as '{fmt}'; Flipbook reads "
            f"per-tensor fp8 ({', '.join(FP8_FORMATS)}), bf16 and fp16 files. " + hint
        )
    return formats


def storage_name(tensors: Mapping[str, torch.Tensor], scaled: bool) -> str:
    """'fp8_scaled', or the dtype most of the weight bytes are stored in ('fp8_e4m3fn', 'bf16', ...)."""
    if scaled:
        return "fp8_scaled"
    bytes_by_dtype: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        bytes_by_dtype[tensor.dtype] = bytes_by_dtype.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    main = max(bytes_by_dtype, key=bytes_by_dtype.get)
    return STORAGE_NAMES.get(main, str(main).removeprefix("torch."))


def device_holds_fp8(device: torch.device) -> bool:
    """Whether tensors can be stored in fp8 on `device` (Apple's MPS cannot: pytorch/pytorch#148420)."""
    try:
        torch.empty(1, dtype=FP8_FORMATS["float8_e4m3fn"], device=device)
    except (TypeError, RuntimeError):
        return False
    return True


def dequantized(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The real values of a stored weight, in float32 (fp8 values are exact in float32); `scale` shaped () or
    (rows, 1)."""
    value = weight.float()
    return value * scale.float() if scale is not None else value


class StoredLinear(torch.nn.Linear):
    """A Linear whose weight stays in its storage dtype (fp8) and is cast, and scaled, at each forward.

    Weights and biases follow the input's device and dtype, so the layer also works while its weights
    wait on another device (a partial load that streams them). `weight_scale` exists only on layers
    of an fp8_scaled file: () or (rows, 1)."""

    weight_scale: Optional[torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=x.device, dtype=x.dtype, non_blocking=True)
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            weight = weight * scale.to(device=x.device, dtype=x.dtype, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype, non_blocking=True)
        return F.linear(x, weight, bias)


def store_linear(layer: torch.nn.Linear, *, scaled: bool, per_row: bool = False) -> None:
    """Turn a Linear (on the meta device, before its weights are adopted) into a StoredLinear; its scale is
    one number, or one per output row (shape (rows, 1), broadcast over the weight)."""
    layer.__class__ = StoredLinear
    if scaled:
        shape = (layer.out_features, 1) if per_row else ()
        layer.register_buffer("weight_scale", torch.empty(shape, device=layer.weight.device, dtype=torch.float32))
