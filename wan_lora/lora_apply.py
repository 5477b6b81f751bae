"""Applying a stack of Wan LoRAs to the loaded transformer, and swapping it without reloading the base.

Two ways, chosen per tensor:
- LoRA pairs on Linear weights (the bulk: every block's q, k, v, o, ffn) stay beside the weight as one
  pair of factors per layer (all LoRAs concatenated along the rank, strength and alpha/rank folded in)
  and are added to the weight at each forward, in float32: W' = W * scale + U @ D. The base weights are
  never written, so an fp8 model keeps its fp8 weights (requantizing a merged fp8 weight would round most
  of a LoRA's small delta away: bench/wan_lora.py measures it), a swap replaces only the factors, and
  swapping back gives the original output bit for bit. The cost is one (out x rank) @ (rank x in) product
  per layer per step: 0.2% of a 14B forward at 480p (bench/RESULTS.md).
- Everything else (norms, biases, modulation, head, patch embedding: lightx2v's diff / diff_b / diff_m,
  all small) is merged in place in float32 on the weights' device, with the original values kept on the
  CPU to restore them exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..core.model_handle import Component
from .loras import Patch, WanLora
from .transformer import diffusers_names

log = logging.getLogger(__name__)
STATE_ATTR = "_flipbook_lora_state"
FACTOR_BUFFERS = ("lora_up", "lora_down")


class PatchedLinear:
    """Mixed into a Linear's own class (plain, StoredLinear fp8, or a host's cast-on-forward Linear, whose
    behaviour is kept): while the layer carries LoRA factors, U @ D is added to its weight at each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = getattr(self, "lora_up", None)
        if up is None:
            return super().forward(x)
        weight = self.weight.to(device=x.device, dtype=torch.float32, non_blocking=True)
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            weight = weight * scale.to(device=x.device, dtype=torch.float32)
        down = self.lora_down.to(device=x.device, dtype=torch.float32, non_blocking=True)
        weight = torch.addmm(weight, up.to(device=x.device, dtype=torch.float32, non_blocking=True), down)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype, non_blocking=True)
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(base: type) -> type:
    if base not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[base] = type(f"Patched{base.__name__}", (PatchedLinear, base), {})
    return _PATCHED_CLASSES[base]


@dataclass
class LoraState:
    """What is applied to one transformer: the stack's identity, the layers carrying factors, the originals
    of the tensors changed in place, and the component read it applies to (a re-read starts clean)."""

    key: tuple
    reads: int
    factor_layers: list[torch.nn.Module] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # diffusers name -> original (CPU)


def stack_key(stack: Sequence[tuple[WanLora, float]]) -> tuple:
    return tuple((lora.path, lora.fingerprint, float(strength)) for lora, strength in stack)


def clear_patches(module: torch.nn.Module) -> None:
    """After the weights were read from the file again: no factors, nothing to restore (`Component.finish`)."""
    for layer in module.modules():
        for name in FACTOR_BUFFERS:
            if name in layer._buffers:
                layer._buffers[name] = None
    setattr(module, STATE_ATTR, None)


def apply_lora_stack(component: Component, stack: Sequence[tuple[WanLora, float]]) -> LoraState:
    """Make the transformer carry exactly `stack` (strength per LoRA; an empty stack restores the base)."""
    module = component.module
    key = stack_key(stack)
    state: Optional[LoraState] = getattr(module, STATE_ATTR, None)
    if state is not None and state.reads == component.reads and state.key == key:
        return state
    if state is not None and state.reads == component.reads:
        _restore(module, state)
    state = LoraState(key=key, reads=component.reads)
    pairs, diffs = _by_target(stack)
    names = diffusers_names(sorted({*pairs, *diffs}))
    with torch.no_grad():
        for target, entries in pairs.items():
            _attach_factors(module, names[target], entries, state)
        for target, entries in diffs.items():
            _merge_in_place(module, names[target], entries, state)
    setattr(module, STATE_ATTR, state)
    log.info("LoRA stack applied: %d layers with factors, %d tensors merged", len(state.factor_layers),
             len(state.originals))
    return state


def _by_target(stack: Sequence[tuple[WanLora, float]]):
    """Linear-weight LoRA pairs (kept as factors) and every other patch (merged in place), by target."""
    pairs: dict[str, list[tuple[Patch, float]]] = {}
    diffs: dict[str, list[tuple[Patch, float]]] = {}
    for lora, strength in stack:
        for patch in lora.patches:
            linear_pair = patch.kind == "lora" and patch.up.ndim == 2 and patch.down.ndim == 2
            (pairs if linear_pair else diffs).setdefault(patch.target, []).append((patch, float(strength)))
    return pairs, diffs


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def _attach_factors(module: torch.nn.Module, name: str, entries: list[tuple[Patch, float]],
                    state: LoraState) -> None:
    layer, _ = _owner(module, name)
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"{name} is not a Linear layer")
    device = layer.weight.device
    dtype = torch.float32 if layer.weight.dtype not in (torch.float16, torch.bfloat16) else layer.weight.dtype
    # strength * alpha / rank folded into `up` in float32, then stored in the layer's compute precision
    up = torch.cat([p.up.to(device, torch.float32) * (s * p.factor) for p, s in entries], dim=1)
    down = torch.cat([p.down.to(device, torch.float32) for p, _ in entries], dim=0)
    if not isinstance(layer, PatchedLinear):
        layer.__class__ = _patched_class(type(layer))
    layer.register_buffer("lora_up", up.to(dtype), persistent=False)
    layer.register_buffer("lora_down", down.to(dtype), persistent=False)
    state.factor_layers.append(layer)


def _merge_in_place(module: torch.nn.Module, name: str, entries: list[tuple[Patch, float]],
                    state: LoraState) -> None:
    owner, leaf = _owner(module, name)
    tensor = getattr(owner, leaf)
    state.originals[name] = tensor.detach().to("cpu", copy=True)
    value = tensor.detach().float()
    for patch, strength in entries:
        if patch.kind == "set":
            value = patch.delta.to(value.device, torch.float32).reshape(value.shape).clone()
        elif patch.kind == "lora":  # a LoRA pair on a conv weight: the product has the weight's shape
            delta = patch.up.flatten(1).to(value.device, torch.float32) @ patch.down.flatten(1).to(
                value.device, torch.float32)
            value += strength * patch.factor * delta.reshape(value.shape)
        else:
            value += strength * patch.factor * patch.delta.to(value.device, torch.float32).reshape(value.shape)
    tensor.data.copy_(value.to(tensor.dtype))


def _restore(module: torch.nn.Module, state: LoraState) -> None:
    with torch.no_grad():
        for layer in state.factor_layers:
            layer._buffers["lora_up"] = None
            layer._buffers["lora_down"] = None
        for name, original in state.originals.items():
            owner, leaf = _owner(module, name)
            getattr(owner, leaf).data.copy_(original)
    setattr(module, STATE_ATTR, None)
