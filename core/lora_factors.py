"""LoRA factors carried beside a Linear weight and added at each forward (shared by the Wan and Lightning paths).

`set_factors` mixes `PatchedLinear` into a layer's own class (plain, core.quantized.StoredLinear fp8, or a host's
cast-on-forward Linear, whose behaviour is kept) and stores U, D (strength and alpha/rank folded into U) and an
optional dense delta as non-persistent buffers, so they follow the layer between devices and never enter a
state dict; `clear_factors` drops them, after which the layer computes exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class StackState:
    """What a LoRA stack changed in one network: the layers carrying factors and the originals of the tensors
    merged in place (on the CPU), for the component read it applies to (a re-read of the weights starts clean)."""

    key: tuple
    reads: int
    factor_layers: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)  # tensor name -> its value before the stack

    def keep_original(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.originals:
            self.originals[name] = tensor.detach().to("cpu", copy=True)

    def restore(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for layer in self.factor_layers:
                clear_factors(layer)
            for name, original in self.originals.items():
                owner, _, leaf = name.rpartition(".")
                getattr(module.get_submodule(owner) if owner else module, leaf).data.copy_(original)


    def undo(self, module: torch.nn.Module, attr: str) -> None:
        """Restore and detach (after a failure part-way: the module carries no stack)."""
        self.restore(module)
        setattr(module, attr, None)


def merge_delta(state: StackState, name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Add a LoRA delta into a weight in place: summed in float32, rounded once to the weight's dtype, so sampling
    costs nothing extra. The original is kept on the CPU for `restore` (swap back bit for bit)."""
    state.keep_original(name, weight)
    weight.data.copy_((weight.detach().float() + delta.to(weight.device, torch.float32)).to(weight.dtype))


def stack_key(stack) -> tuple:
    """A stack's identity: (file, its fingerprint, strength) per LoRA, in order."""
    return tuple((lora.path, lora.fingerprint, float(strength)) for lora, strength in stack)


def begin_stack(module: torch.nn.Module, *, reads: int, stack, attr: str) -> Optional[StackState]:
    """None when `module` already carries `stack` (nothing to do); else the previous stack undone and a fresh state
    attached before any change, so a failure part-way can be undone with `state.restore`."""
    key = stack_key(stack)
    state: Optional[StackState] = getattr(module, attr, None)
    if state is not None and state.reads == reads:
        if state.key == key:
            return None
        state.restore(module)
    state = StackState(key=key, reads=reads)
    setattr(module, attr, state)
    return state


def forget_stack(module: torch.nn.Module, attr: str) -> None:
    """After the weights were read from the files again: no factors anywhere, nothing to restore."""
    for layer in module.modules():
        clear_factors(layer)
    setattr(module, attr, None)
