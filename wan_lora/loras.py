"""Reading a Wan LoRA against the loaded transformer: patches for every key, and a match report.

Every key ends up in exactly one place: a patch (counted by kind: LoRA pairs, diff, diff_b, diff_m, set,
LoRA biases), expected-unmatched (the image keys of an I2V LoRA on T2V, named as such) or unmatched. An
unmatched key of a known format is an error, as is a LoRA for another base model (1.3B vs 14B, I2V
beyond its image keys, Wan 2.2, SD), whose message names both models.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict, read_safetensors_header
from ..core.errors import IncompatibleModelsError, UnsupportedCheckpointError
from . import lora_formats as F
from .transformer import WanTransformerLayout, diffusers_names

log = logging.getLogger(__name__)
# width -> the model it belongs to (wan/configs; Wan 2.2 TI2V-5B: 3072)
BASES = {5120: "Wan 2.1 14B", 1536: "Wan 2.1 1.3B", 3072: "Wan 2.2 TI2V-5B"}
DISTILL_NAME = re.compile(r"lightx2v|distill|causvid|accvid|lightning|fastwan", re.IGNORECASE)
TRIGGER_KEYS = ("modelspec.trigger_phrase", "trigger_phrase", "ss_trigger_phrase")  # SAI model spec, kohya tools
COUNTED = ("lora", "diff", "diff_b", "diff_m", "set", "lora_bias")


@dataclass(frozen=True)
class Patch:
    target: str  # original Wan tensor name: "blocks.0.self_attn.q.weight", "blocks.0.modulation", ...
    kind: str  # "lora" (up @ down), "diff" (added), "set" (replaces)
    counted: str  # the report's kind: one of COUNTED
    factor: float = 1.0  # alpha / rank for LoRA pairs and their biases
    up: Optional[torch.Tensor] = None  # [out, rank]
    down: Optional[torch.Tensor] = None  # [rank, in]
    delta: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LoraReport:
    file: str
    format: str
    applied: Mapping[str, int]  # counted kind -> keys' patches
    expected_unmatched: tuple[str, ...]
    trigger: Optional[str] = None
    distill: bool = False

    def summary(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.applied.items() if n)
        extra = (f"; {len(self.expected_unmatched)} image-conditioning keys of an I2V LoRA left out (expected on "
                 "T2V)" if self.expected_unmatched else "")
        return f"{self.file}: {self.format}, applied {counts or 'nothing'}{extra}; 0 unmatched"


@dataclass(frozen=True, repr=False)
class WanLora:
    name: str
    path: Path
    fingerprint: tuple[int, int]
    patches: tuple[Patch, ...] = field(default=())
    report: Optional[LoraReport] = None

    def __repr__(self) -> str:
        return f"WanLora({self.name}, {len(self.patches)} patches)"


def read_wan_lora(path: str | Path, *, layout: WanTransformerLayout, model_name: str) -> WanLora:
    """Every key of the LoRA file placed against the model; typed errors for anything that does not fit."""
    path = Path(path)
    fingerprint = file_fingerprint(path)
    state = load_state_dict(path)
    keys = sorted(state)
    fmt = F.detect_format(keys)
    if fmt is None:
        raise IncompatibleModelsError(_not_wan_message(path.name, keys, model_name))
    translators = F.module_translators(sorted(layout.shapes), diffusers_names)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, expected = [], []
    for key in keys:
        parsed = F.parse_key(key, fmt, translators)
        if parsed.part in ("dora", "loha", "lokr"):
            kind = {"dora": "DoRA", "loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}[parsed.part]
            raise UnsupportedCheckpointError(f"{path.name} is a {kind} file ({key}); Flipbook applies LoRA pairs "
                                             "and diffs. Use a plain LoRA export of it (e.g. extract a LoRA from the "
                                             "merged model).")
        if F.is_image_key(parsed.module) or F.is_image_key(key):
            expected.append(key)
        elif not parsed.known or parsed.part == "?":
            unknown.append(key)
        else:
            slot = groups.setdefault(parsed.module, {})
            if parsed.part in slot:
                raise UnsupportedCheckpointError(
                    f"{path.name} has two keys for the {parsed.part} of {parsed.module} (one of them {key}); it "
                    "is not clear which one to apply. Re-export the LoRA.")
            slot[parsed.part] = state[key]
            if parsed.tensor:
                slot["_tensor"] = torch.ones(())
    _adapter_alpha(path, fmt, groups)
    patches = [p for module, parts in groups.items() for p in _patches(module, parts, path.name)]
    _check_fit(path.name, model_name, layout, patches, unknown, fmt)
    counts = {kind: sum(p.counted == kind for p in patches) for kind in COUNTED}
    report = LoraReport(file=path.name, format=fmt.label, applied=counts, expected_unmatched=tuple(expected),
                        trigger=_trigger(path), distill=_is_distill(path.name, patches))
    log.info("%s", report.summary())
    return WanLora(name=path.name, path=path, fingerprint=fingerprint, patches=tuple(patches), report=report)


def _patches(module: str, parts: Mapping[str, torch.Tensor], file_name: str) -> list[Patch]:
    out = []
    if ("up" in parts) != ("down" in parts) or ("alpha" in parts and "up" not in parts):
        present = sorted(parts)
        raise UnsupportedCheckpointError(f"{file_name}: the LoRA pair of {module} is incomplete (has {present}); "
                                         "the file is damaged or truncated. Download it again.")
    factor = 1.0
    if "up" in parts:
        up, down = parts["up"], parts["down"]
        factor = F.lora_scale(parts.get("alpha"), down.shape[0])
        out.append(Patch(target=module + ".weight", kind="lora", counted="lora", factor=factor, up=up, down=down))
    if "up_bias" in parts:
        out.append(Patch(target=module + ".bias", kind="diff", counted="lora_bias", factor=factor,
                         delta=parts["up_bias"]))
    for part in ("diff", "diff_b", "diff_m", "set"):
        if part in parts:
            target = module if "_tensor" in parts else F.diff_target(module, part)
            out.append(Patch(target=target, kind="set" if part == "set" else "diff", counted=part,
                             delta=parts[part]))
    return out


def _adapter_alpha(path: Path, fmt: F.LoraFormat, groups: dict) -> None:
    """diffusers/peft files keep lora_alpha in the header (`lora_adapter_metadata`, diffusers' save_lora_adapter)
    instead of `.alpha` keys; diffusers scales by it, so Flipbook does too."""
    import json

    if fmt.id not in ("diffusers", "peft", "bare", "diffsynth") or path.suffix != ".safetensors":
        return
    raw = (read_safetensors_header(path).get("__metadata__") or {}).get("lora_adapter_metadata")
    try:
        alpha = json.loads(raw).get("lora_alpha") if raw else None
    except ValueError:
        alpha = None
    if alpha is None:
        return
    for parts in groups.values():
        if "up" in parts and "alpha" not in parts:
            parts["alpha"] = torch.tensor(float(alpha))


def _width(patches: list[Patch]) -> Optional[int]:
    """The model width the LoRA was made for, from any attention or modulation tensor of a block."""
    for patch in patches:
        attention = re.search(r"blocks\.\d+\.(self|cross)_attn\.[qkvo]\.weight$", patch.target)
        if attention and patch.up is not None:
            return patch.up.shape[0] if not patch.target.endswith("o.weight") else patch.down.shape[1]
        if patch.target.endswith("modulation") and patch.delta is not None:
            return patch.delta.shape[-1]
    return None


def _base_name(width: Optional[int]) -> str:
    return BASES.get(width, f"a {width}-wide model") if width else "another model"


def _check_fit(name: str, model_name: str, layout: WanTransformerLayout, patches: list[Patch], unknown: list[str],
               fmt: F.LoraFormat) -> None:
    model_width = layout.shapes["head.modulation"][-1]
    misfits = [p.target for p in patches if p.target in layout.shapes and _shape(p) != layout.shapes[p.target]]
    missing = [p.target for p in patches if p.target not in layout.shapes]
    lora_width = _width(patches)
    if misfits or (lora_width and lora_width != model_width) or re.search(r"wan[\W_]?2[\W_]?2", name.lower()):
        what = _base_name(lora_width) if lora_width != model_width else "another variant (I2V or Wan 2.2)"
        if re.search(r"wan[\W_]?2[\W_]?2", name.lower()) and lora_width == model_width:
            what = "Wan 2.2 (by its name)"
        example = (misfits or missing or [""])[0]
        raise IncompatibleModelsError(
            f"{name} is a LoRA for {what}, but {model_name} is {_base_name(model_width)} ({layout.size}): "
            f"{len(misfits)} tensors do not fit (e.g. {example}). Use a LoRA trained for {_base_name(model_width)} "
            "T2V."
        )
    if missing or unknown:
        examples = (unknown + missing)[:3]
        raise UnsupportedCheckpointError(
            f"{name} ({fmt.label}) has {len(unknown) + len(missing)} keys that match nothing in {model_name} (e.g. "
            f"{examples}). Flipbook applies every key or refuses the file, so nothing is silently left out. Is "
            "it a Wan 2.1 T2V LoRA?"
        )


def _shape(patch: Patch) -> tuple[int, ...]:
    if patch.kind == "lora":
        return (patch.up.shape[0], patch.down.shape[1], *tuple(patch.down.shape[2:]))
    return tuple(patch.delta.shape)


def _not_wan_message(name: str, keys: list[str], model_name: str) -> str:
    if any(F.SD_LORA.match(k) for k in keys):
        return (f"{name} is a Stable Diffusion LoRA (UNet/text-encoder keys such as {keys[0]}), but {model_name} is "
                "a Wan 2.1 model. Use a Wan 2.1 T2V LoRA; SD LoRAs belong on the Lightning path.")
    return (f"{name} is not a Wan LoRA in a format Flipbook knows (keys such as {keys[:2]}); known: "
            f"{', '.join(f.label for f in F.FORMATS.values())}. If it is a Wan LoRA, convert it with musubi-tuner's "
            "convert_lora.py or load it once in ComfyUI to see its format, and report it to Flipbook.")


def _trigger(path: Path) -> Optional[str]:
    metadata = read_safetensors_header(path).get("__metadata__", {}) if path.suffix == ".safetensors" else {}
    return next((metadata[k].strip() for k in TRIGGER_KEYS if metadata.get(k, "").strip()), None)


def _is_distill(name: str, patches: list[Patch]) -> bool:
    """lightx2v-style step/CFG distill LoRAs: by name, or by their keys (modulation diffs plus a LoRA on the
    time projection, which style LoRAs never train: musubi excludes time_projection)."""
    targets = {p.target for p in patches}
    by_keys = any(t.endswith("modulation") for t in targets) and "time_projection.1.weight" in targets
    return bool(DISTILL_NAME.search(name)) or by_keys
