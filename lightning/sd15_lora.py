"""SD1.5 image LoRAs (style, character) on the Lightning path's UNet and CLIP text encoder, without ComfyUI.

Format (lightning-breadth.md section 2.1): kohya / A1111 `lora_unet_<diffusers module path, dots as _>` and
`lora_te_text_model_encoder_layers_N_{self_attn_q_proj|...|mlp_fc1|mlp_fc2}`, `.lora_down.weight` [r, in(, kh, kw)],
`.lora_up.weight` [out, r(, 1, 1)], `.alpha`; LoCon adds the resnets' convs under the same names. Names are matched
against every real module's underscored name (never split on `_`). The delta is strength * alpha / rank * up @ down
(ComfyUI LoRAAdapter, diffusers network_alphas). Every delta is merged into its weight in float32
(core/lora_factors.merge_delta: sampling costs nothing extra, as with ComfyUI's own LoRA patches), the originals kept
on the CPU for a swap. Every key is applied or the file is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict
from ..core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from ..core.lora_factors import StackState, begin_stack, forget_stack, merge_delta
from ..core.model_handle import Component
from .ldm_names import ldm_module_names

PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
STATE_ATTR = "_flipbook_sd15_lora_state"
STACK_WARN_ABOVE = 1.2  # summed strengths above this tend to burn the image (common LoRA guidance)


@dataclass(frozen=True, repr=False)
class SD15Lora:
    name: str
    path: Path
    fingerprint: tuple[int, int]
    pairs: dict = field(default_factory=dict)  # (component, module name) -> (up, down, alpha / rank)

    def summary(self) -> str:
        unet = sum(c == "unet" for c, _ in self.pairs)
        return (f"{self.name}: kohya LoRA, applied {unet} UNet and {len(self.pairs) - unet} text-encoder pairs; "
                "0 unmatched")

    def __repr__(self) -> str:
        return f"SD15Lora({self.name}, {len(self.pairs)} pairs)"


def _underscored(module: torch.nn.Module, strip: str = "") -> dict[str, str]:
    names = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            names[name.replace(".", "_")] = name
            if strip and not name.startswith(strip):  # kohya writes `text_model_...` whatever the model's nesting
                names[(strip + name).replace(".", "_")] = name
    return names


def _refuse_other_bases(name: str, keys: list[str], model_name: str) -> None:
    if any(k.startswith(("lora_te1_", "lora_te2_", "conditioner.")) for k in keys):
        raise IncompatibleModelsError(f"{name} is an SDXL LoRA (lora_te1_/lora_te2_ keys), but {model_name} is SD1.5. "
                                      "Use a LoRA trained for SD1.5.")
    if any(k.startswith(("diffusion_model.blocks.", "lora_unet_blocks_", "transformer.blocks.")) for k in keys):
        raise IncompatibleModelsError(f"{name} is a Wan LoRA, but {model_name} is SD1.5: connect it to the Wan LoRA "
                                      "loader.")
    lycoris = next((k for k in keys if ".hada_" in k or ".lokr_" in k), None)
    if lycoris:
        raise UnsupportedCheckpointError(f"{name} is a LyCORIS LoHa/LoKr file ({lycoris}); Flipbook applies LoRA and "
                                         "LoCon. Use a LoRA export of it.")


LDM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
DIFFUSERS_BLOCKS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")


def _unet_names(unet: torch.nn.Module, keys: list[str], file_name: str) -> dict[str, str]:
    """Underscored module names -> the UNet's modules: diffusers names (kohya's SD1.5 LoRAs), or the LDM UNet's
    (`lora_unet_input_blocks_4_1_proj_in`, LoCon's `..._0_in_layers_2`) through the SD1.x block table
    (ldm_names.py). diffusers' own mapper is not used: it matches `input_blocks_1` inside `input_blocks_10`."""
    names = _underscored(unet)
    if any(k.startswith(LDM_BLOCKS) for k in keys):
        if any(k.startswith(DIFFUSERS_BLOCKS) for k in keys):
            raise UnsupportedCheckpointError(f"{file_name} mixes LDM and diffusers UNet names; it is not clear which "
                                             "to apply (diffusers would drop the LDM ones). Re-export the LoRA.")
        names.update({ldm.replace(".", "_"): name for ldm, name in ldm_module_names(unet).items()})
    return names


def _effective_down(state: dict, stem: str) -> torch.Tensor:
    """`lora_down`, or with a LyCORIS CP/Tucker `lora_mid` [r, r, kh, kw] the down factor it stands for
    (ComfyUI weight_adapter/lora.py: down^T @ mid, reshaped to [r, in, kh, kw])."""
    down, mid = state[stem + ".lora_down.weight"], state.get(stem + ".lora_mid.weight")
    if mid is None:
        return down
    return torch.einsum("ashw,si->aihw", mid.float(), down.flatten(1).float())


def read_sd15_lora(path: str | Path, *, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module],
                   model_name: str) -> SD15Lora:
    """`text_encoder` None: the prompt is encoded by the host's CLIP, which this node cannot patch."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    state = load_state_dict(path)
    keys = sorted(state)
    _refuse_other_bases(path.name, keys, model_name)
    if text_encoder is None and any(k.startswith("lora_te_") for k in keys):
        raise IncompatibleModelsError(
            f"{path.name} also patches the text encoder, but the prompt is encoded by the CLIP input (ComfyUI's), "
            "which this node cannot reach. Apply the LoRA with core LoraLoader before the Flipbook loader (it "
            "patches MODEL and CLIP), or disconnect CLIP from the loader.")
    lookups = {"unet": _unet_names(unet, keys, path.name),
               "text_encoder": {} if text_encoder is None else _underscored(text_encoder, strip="text_model.")}
    modules = {"unet": unet, "text_encoder": text_encoder}
    pairs, unmatched, matched = {}, [], set()
    for key in keys:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        prefix = next((p for p in PREFIXES if stem.startswith(p)), None)
        target = lookups[PREFIXES[prefix]].get(stem[len(prefix):]) if prefix else None
        up = state.get(stem + ".lora_up.weight")
        if target is None or up is None:
            unmatched.append(key)
            continue
        component = PREFIXES[prefix]
        if (component, target) in pairs:
            raise UnsupportedCheckpointError(f"{path.name} patches {target} twice (under two names, e.g. {stem}); "
                                             "it is not clear which to apply. Re-export the LoRA.")
        down, weight = _effective_down(state, stem), modules[component].get_submodule(target).weight
        if (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]):
            raise IncompatibleModelsError(
                f"{path.name} does not fit {model_name}: {stem} is {up.shape[0]}x{down.shape[1]}, the model's "
                f"{target} is {tuple(weight.shape[:2])} (an SD2 LoRA is 1024 wide). Use a LoRA trained for SD1.5.")
        alpha = state.get(stem + ".alpha")
        rank = state[key].shape[0]  # alpha / rank of the down factor, as ComfyUI (before a lora_mid)
        factor = 1.0 if alpha is None else float(alpha.float().reshape(-1)[0]) / rank
        pairs[(component, target)] = (up, down, factor)
        matched.add(stem)
    accounted = {stem + suffix for stem in matched
                 for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha")}
    leftovers = [k for k in keys if k not in accounted and k not in unmatched]
    if unmatched or leftovers:
        examples = (unmatched + leftovers)[:3]
        raise UnsupportedCheckpointError(
            f"{path.name} has {len(set(unmatched + leftovers))} keys that match nothing in {model_name} (e.g. "
            f"{examples}). Flipbook applies every key or refuses the file.")
    if not pairs:
        raise UnsupportedCheckpointError(f"{path.name} has no LoRA pairs (.lora_down/.lora_up weights).")
    return SD15Lora(name=path.name, path=path, fingerprint=fingerprint, pairs=pairs)


def apply_sd15_loras(component: Component, stack: Sequence[tuple[SD15Lora, float]]) -> None:
    """The component ("unet" or "text_encoder") carries exactly this stack's pairs for it."""
    module, name = component.module, component.name
    state = begin_stack(module, reads=component.reads, stack=stack, attr=STATE_ATTR)
    if state is None:
        return
    by_target: dict[str, list] = {}
    for lora, strength in stack:
        for (part, target), pair in lora.pairs.items():
            if part == name and strength:
                by_target.setdefault(target, []).append((pair, float(strength)))
    try:
        with torch.no_grad():
            for target, entries in by_target.items():
                _apply_one(module, target, entries, state)
    except BaseException:
        state.undo(module, STATE_ATTR)
        raise


def _apply_one(module: torch.nn.Module, target: str, entries: list, state: StackState) -> None:
    weight = module.get_submodule(target).weight
    device = weight.device
    delta = sum((u.flatten(1).to(device, torch.float32) * (s * f)) @ d.flatten(1).to(device, torch.float32)
                for (u, d, f), s in entries)
    merge_delta(state, target + ".weight", weight, delta.reshape(weight.shape))


def stack_note(stack: Sequence[tuple[SD15Lora, float]]) -> Optional[str]:
    total = sum(abs(s) for _, s in stack)
    if total > STACK_WARN_ABOVE:
        return (f"warning: the LoRA strengths add up to {total:g} (above {STACK_WARN_ABOVE}); expect burnt colours "
                "or artefacts. Lower some strengths.")
    return None


def clear_sd15_loras(module: torch.nn.Module) -> None:
    """Weights read from the files again: the kept originals of an earlier read are void."""
    forget_stack(module, STATE_ATTR)


def with_sd15_lora(model, path: str | Path, *, strength: float):
    """The LightningModel with one more image LoRA in its stack (the loaded weights are shared)."""
    import dataclasses
    import math

    from ..core.errors import InvalidSettingError

    if not math.isfinite(strength):
        raise InvalidSettingError(f"strength={strength}: use a finite number (about 0.6-1.0 for most LoRAs).")
    lora = read_sd15_lora(path, unet=model.unet, text_encoder=model.text_encoder, model_name=model.checkpoint_name)
    return dataclasses.replace(model, loras=(*model.loras, (lora, float(strength))))
