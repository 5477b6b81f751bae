"""LoRA factors carried beside a Linear weight and added at each forward (shared by the Wan and Lightning paths).

`set_factors` mixes `PatchedLinear` into a layer's own class (plain, core.quantized.StoredLinear fp8, or a host's
cast-on-forward Linear, whose behaviour is kept) and stores U, D (strength and alpha/rank folded into U) and an
optional dense delta as non-persistent buffers, so they follow the layer between devices and never enter a
state dict; `clear_factors` drops them, after which the layer computes exactly as before.
"""
from __future__ import annotations

from typing import Optional

import torch

FACTOR_BUFFERS = ("lora_up", "lora_down", "lora_dense")


class PatchedLinear:
    """Mixed into a Linear's own class (plain, StoredLinear fp8, or a host's cast-on-forward Linear, whose
    behaviour is kept): while the layer carries LoRA factors, U @ D is added to its weight at each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, dense = getattr(self, "lora_up", None), getattr(self, "lora_dense", None)
        if up is None and dense is None:
            return super().forward(x)
        tokens = x.numel() // x.shape[-1]
        if dense is None and tokens * (self.in_features + self.out_features) < self.in_features * self.out_features:
            # few tokens (the time embedding sees one, the text embedding 512): x D^T U^T is cheaper than U @ D
            low_rank = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_down.to(x.device, x.dtype)),
                                                  up.to(x.device, x.dtype))
            return super().forward(x) + low_rank
        # in the compute dtype, as a merge into bf16/fp16 weights would round it (matmuls accumulate in fp32);
        # float32 passes over every weight would cost more memory traffic than the LoRA product itself
        dtype = x.dtype
        weight = self.weight.to(device=x.device, dtype=dtype, non_blocking=True)
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            weight = weight * scale.to(device=x.device, dtype=dtype)
        if up is not None:
            down = self.lora_down.to(device=x.device, dtype=dtype, non_blocking=True)
            weight = torch.addmm(weight, up.to(device=x.device, dtype=dtype, non_blocking=True), down)
        if dense is not None:  # a diff or set_weight on an fp8 weight: added here, never rounded into fp8
            weight = weight + dense.to(device=x.device, dtype=dtype, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=dtype, non_blocking=True)
        return torch.nn.functional.linear(x, weight, bias)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(base: type) -> type:
    if base not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[base] = type(f"Patched{base.__name__}", (PatchedLinear, base), {})
    return _PATCHED_CLASSES[base]


def set_factors(layer: torch.nn.Linear, *, up: Optional[torch.Tensor], down: Optional[torch.Tensor],
                dense: Optional[torch.Tensor], dtype: torch.dtype) -> None:
    """Give `layer` W' = W + up @ down (+ dense) at each forward, the factors stored in `dtype`."""
    if not isinstance(layer, PatchedLinear):
        layer.__class__ = _patched_class(type(layer))
    for name, value in (("lora_up", up), ("lora_down", down), ("lora_dense", dense)):
        layer.register_buffer(name, None if value is None else value.to(dtype), persistent=False)


def clear_factors(layer: torch.nn.Module) -> None:
    for name in FACTOR_BUFFERS:
        if name in layer._buffers:
            layer._buffers[name] = None
