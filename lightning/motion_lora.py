"""AnimateDiff motion LoRAs (guoyww's v2 camera LoRAs: ZoomIn, PanLeft, TiltUp, Rolling...) on the motion module.

Keys (lightning-breadth.md section 2.5): `{down_blocks.i|up_blocks.i|mid_block}.motion_modules.j.temporal_transformer.
transformer_blocks.0.attention_blocks.{0,1}.processor.{to_q|to_k|to_v|to_out}_lora.{down|up}.weight`, no alpha; the
delta is strength * up @ down, unscaled (guoyww load_diffusers_lora, AnimateDiff-Evolved load_motion_lora_as_patches).
diffusers' converted files (`unet.` prefix, attn1/attn2 names) read the same way. The deltas are merged into the
weights in float32 (core/lora_factors.merge_delta: sampling costs nothing extra), the originals kept on the CPU, so a
swap restores the module bit for bit and strength 0 is the module as loaded.
Every key is applied or the file is refused: a v2 LoRA's mid-block keys on a v3 module (which has no mid block) are
named, not skipped as AnimateDiff-Evolved does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict
from ..core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from ..core.lora_factors import begin_stack, forget_stack, merge_delta
from ..core.model_handle import Component

DEFAULT_STRENGTH = 0.75  # the AnimateDiff-Lightning card: 0.7-0.8 "to avoid watermark"
STATE_ATTR = "_flipbook_motion_lora_state"


@dataclass(frozen=True, repr=False)
class MotionLora:
    name: str
    path: Path
    fingerprint: tuple[int, int]
    pairs: dict = field(default_factory=dict)  # UNetMotionModel weight name -> (up [out, r], down [r, in])

    def summary(self) -> str:
        return f"{self.name}: motion LoRA, applied {len(self.pairs)} lora pairs; 0 unmatched"

    def __repr__(self) -> str:
        return f"MotionLora({self.name}, {len(self.pairs)} pairs)"


def _target(key: str) -> Optional[str]:
    """The weight a `down` key patches, in the file's own naming (None for anything else)."""
    if not key.endswith("_lora.down.weight"):
        return None
    name = key.removeprefix("unet.").replace("processor.", "").replace("_lora.down.weight", ".weight")
    return name.replace(".to_out.weight", ".to_out.0.weight")


def read_motion_lora(path: str | Path, *, unet: torch.nn.Module, version: str, model_name: str) -> MotionLora:
    """The LoRA's pairs under the UNet's own names, every key accounted for."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    path = Path(path)
    fingerprint = file_fingerprint(path)
    state = load_state_dict(path)
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    if not any("motion_modules" in k for k in state):
        raise UnsupportedCheckpointError(
            f"{path.name} has no motion-module keys ('motion_modules'), so it is not an AnimateDiff motion LoRA. An "
            "image LoRA belongs on the checkpoint; motion LoRAs are files like v2_lora_ZoomIn.ckpt.")
    originals = {_target(k): k for k in state if _target(k)}
    renamed = dict(zip(originals, convert_animatediff_checkpoint_to_diffusers(dict.fromkeys(originals))))
    weights = dict(unet.state_dict(keep_vars=True))
    pairs, unmatched = {}, []
    for target, key in originals.items():
        name = renamed[target]
        up = state.get(key.replace(".down.weight", ".up.weight"))
        if name not in weights or up is None:
            unmatched.append(key)
            continue
        down = state[key]
        if (up.shape[0], down.shape[1]) != tuple(weights[name].shape):
            raise IncompatibleModelsError(
                f"{path.name} was made for another motion module: {key} is {tuple(up.shape[:1] + down.shape[1:])}, "
                f"{model_name}'s {name} is {tuple(weights[name].shape)}. Use a motion LoRA for SD1.5 AnimateDiff v2.")
        pairs[name] = (up, down)
    leftovers = [k for k in state if not (k.endswith("_lora.down.weight") or k.endswith("_lora.up.weight"))]
    if unmatched or leftovers:
        mid = [k for k in unmatched if "mid_block" in k]
        why = (f"its {len(mid)} mid-block keys have nothing to apply to: {model_name} is an AnimateDiff {version} "
               "module, which has no mid block (camera motion LoRAs are for v2 and Lightning modules)"
               if mid and version != "v2" else f"{len(unmatched) + len(leftovers)} keys match nothing "
               f"(e.g. {(unmatched + leftovers)[:2]})")
        raise IncompatibleModelsError(f"{path.name}: {why}. Flipbook applies every key or refuses the file.")
    return MotionLora(name=path.name, path=path, fingerprint=fingerprint, pairs=pairs)


def apply_motion_loras(component: Component, stack: Sequence[tuple[MotionLora, float]]) -> None:
    """The UNet carries exactly `stack` (0 strength is off, empty restores the module as loaded)."""
    module = component.module
    state = begin_stack(module, reads=component.reads, stack=stack, attr=STATE_ATTR)
    if state is None:
        return
    by_name: dict[str, list] = {}
    for lora, strength in stack:
        for name, pair in lora.pairs.items():
            if strength:
                by_name.setdefault(name, []).append((pair, float(strength)))
    try:
        with torch.no_grad():
            for name, entries in by_name.items():
                weight = module.get_parameter(name)
                device = weight.device
                delta = sum((u.to(device, torch.float32) * s) @ d.to(device, torch.float32) for (u, d), s in entries)
                merge_delta(state, name, weight, delta)
    except BaseException:
        state.undo(module, STATE_ATTR)
        raise


def clear_motion_loras(unet: torch.nn.Module) -> None:
    """Weights read from the files again (`Component.finish`): LoRA factors of an earlier read are gone (motion
    LoRAs and image LoRAs alike)."""
    from .sd15_lora import STATE_ATTR as IMAGE_LORA_STATE

    forget_stack(unet, IMAGE_LORA_STATE)
    forget_stack(unet, STATE_ATTR)


def with_motion_lora(model, path: str | Path, *, strength: float):
    """The LightningModel with one more motion LoRA (camera motion) in its stack; nothing is copied."""
    import dataclasses
    import math

    from ..core.errors import InvalidSettingError

    if not math.isfinite(strength):
        raise InvalidSettingError(f"strength={strength}: use a finite number (0.7-0.8 for Lightning).")
    lora = read_motion_lora(path, unet=model.unet, version=model.motion.version, model_name=model.motion_name)
    return dataclasses.replace(model, motion_loras=(*model.motion_loras, (lora, float(strength))))
