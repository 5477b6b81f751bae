"""Applying a stack of Wan LoRAs to the loaded transformer, and swapping it without reloading the base.

Two ways, chosen per tensor:
- LoRA pairs on Linear weights (the bulk: every block's q, k, v, o, ffn) stay beside the weight as one
  pair of factors per layer (all LoRAs concatenated along the rank, strength and alpha/rank folded in)
  and are added to the weight at each forward, in the compute dtype: W' = W * scale + U @ D. The base weights are
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
from typing import Sequence

import torch

from ..core.lora_factors import StackState, begin_stack, forget_stack, set_factors
from ..core.model_handle import FP8_DTYPES, Component, tensor_bytes
from .loras import Patch, WanLora
from .transformer import diffusers_names

log = logging.getLogger(__name__)
STATE_ATTR = "_flipbook_lora_state"


def clear_patches(module: torch.nn.Module) -> None:
    """After the weights were read from the file again: no factors, nothing to restore (`Component.finish`)."""
    forget_stack(module, STATE_ATTR)


def apply_lora_stack(component: Component, stack: Sequence[tuple[WanLora, float]]) -> None:
    """Make the transformer carry exactly `stack` (strength per LoRA; 0 is off; an empty stack restores the base).
    All or nothing: if applying fails (e.g. out of memory), the base is restored before the error goes on."""
    module = component.module
    state = begin_stack(module, reads=component.reads, stack=stack, attr=STATE_ATTR)
    if state is None:
        return
    compute = component.dtype or torch.float32
    try:
        forward_terms, in_place = _by_target(module, [(lora, s) for lora, s in stack if s != 0])
        names = diffusers_names(sorted({*forward_terms, *in_place}))
        with torch.no_grad():
            for target, entries in forward_terms.items():
                _attach(module, names[target], entries, state, compute)
            for target, entries in in_place.items():
                _merge_in_place(module, names[target], entries, state)
    except BaseException:
        state.undo(module, STATE_ATTR)
        raise
    component.size_bytes = tensor_bytes(module)  # the factors are the component's memory too
    log.info("LoRA stack applied: %d layers with factors, %d tensors merged", len(state.factor_layers),
             len(state.originals))


def _by_target(module: torch.nn.Module, stack: Sequence[tuple[WanLora, float]]):
    """Patches added at forward (LoRA pairs on Linear weights; any patch of an fp8 weight, which cannot take a
    small change) and patches merged in place (norms, biases, modulation, small weights), by target."""
    forward_terms: dict[str, list[tuple[Patch, float]]] = {}
    in_place: dict[str, list[tuple[Patch, float]]] = {}
    fp8 = {name for name, p in module.named_parameters() if p.dtype in FP8_DTYPES}
    renamed = diffusers_names(sorted({p.target for lora, _ in stack for p in lora.patches}))
    fp8_targets = {original for original, name in renamed.items() if name in fp8}
    for lora, strength in stack:
        for patch in lora.patches:
            linear_pair = patch.kind == "lora" and patch.up.ndim == 2 and patch.down.ndim == 2
            at_forward = linear_pair or patch.target in fp8_targets
            (forward_terms if at_forward else in_place).setdefault(patch.target, []).append((patch, float(strength)))
    return forward_terms, in_place


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def _attach(module: torch.nn.Module, name: str, entries: list[tuple[Patch, float]], state: StackState,
            compute: torch.dtype) -> None:
    layer, _ = _owner(module, name)
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"{name} is not a Linear layer")
    device = layer.weight.device
    # stored in the compute precision (an fp8 layer's factors are not kept in float32: 1.7 GB at rank 96 on 14B)
    dtype = layer.weight.dtype if layer.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else compute
    state.factor_layers.append(layer)
    pairs = [(p, s) for p, s in entries if p.kind == "lora"]
    up = down = delta = None
    if pairs:  # strength * alpha / rank folded into `up` in float32
        up = torch.cat([p.up.to(device, torch.float32) * (s * p.factor) for p, s in pairs], dim=1)
        down = torch.cat([p.down.to(device, torch.float32) for p, _ in pairs], dim=0)
    dense = [(p, s) for p, s in entries if p.kind != "lora"]
    if dense:
        real = layer.weight.to(torch.float32) * getattr(layer, "weight_scale", torch.ones((), device=device))
        delta = torch.zeros_like(real)
        for patch, strength in dense:
            value = patch.delta.to(device, torch.float32).reshape(real.shape)
            delta = (value - real) if patch.kind == "set" else delta + strength * patch.factor * value
    set_factors(layer, up=up, down=down, dense=delta, dtype=dtype)


def _merge_in_place(module: torch.nn.Module, name: str, entries: list[tuple[Patch, float]],
                    state: StackState) -> None:
    owner, leaf = _owner(module, name)
    tensor = getattr(owner, leaf)
    state.keep_original(name, tensor)
    value = tensor.detach().float()
    for patch, strength in entries:
        if patch.kind == "set":  # replaces the weight, whatever the strength (ComfyUI's set_weight)
            value = patch.delta.to(value.device, torch.float32).reshape(value.shape).clone()
        elif patch.kind == "lora":  # a LoRA pair on a conv weight: the product has the weight's shape
            delta = patch.up.flatten(1).to(value.device, torch.float32) @ patch.down.flatten(1).to(
                value.device, torch.float32)
            value += strength * patch.factor * delta.reshape(value.shape)
        else:
            value += strength * patch.factor * patch.delta.to(value.device, torch.float32).reshape(value.shape)
    tensor.data.copy_(value.to(tensor.dtype))
