"""The motion-module variants Flipbook knows, and the settings each was trained for.

A frozen table, keyed by stable ids (workflows store the id; labels are derived). Sources:
- Lightning: model card https://huggingface.co/ByteDance/AnimateDiff-Lightning ("Diffusers
  Usage": EulerDiscreteScheduler, timestep_spacing="trailing", beta_schedule="linear",
  guidance_scale=1.0, num_inference_steps = the checkpoint's steps; "using 3 inference steps on
  the 2-step model produces great results"; 16-frame 512px videos). Distilled from AnimateDiff
  SD1.5 v2, so SD1.5 only.
- Standard v2/v3: guoyww/AnimateDiff configs/inference/inference-v2.yaml / -v3.yaml (DDIM,
  beta_schedule "linear" 0.00085 -> 0.012, steps_offset 1) and its prompt configs (25 steps,
  guidance 7.5). DDIM with eta 0 is the Euler step in sigma space, see core.sampling.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Optional

from ..core.errors import InvalidSettingError, SettingsMismatchError

log = logging.getLogger(__name__)

LIGHTNING_CARD = "https://huggingface.co/ByteDance/AnimateDiff-Lightning (model card, Diffusers Usage)"
ANIMATEDIFF_REPO = "https://github.com/guoyww/AnimateDiff configs/inference/inference-v2.yaml, -v3.yaml"

POLICIES = ("strict", "fill")


@dataclass(frozen=True)
class Variant:
    id: str
    label: str
    distilled: bool
    steps: int  # the trained / recommended step count
    allowed_steps: Optional[tuple[int, ...]]  # None: any step count is fine
    sampler: str  # a name in core.sampler_table.SAMPLERS
    spacing: str  # timestep spacing id in core.schedules.TIMESTEP_SPACINGS
    allowed_spacings: tuple[str, ...]
    beta_schedule: str  # diffusers name; ComfyUI calls it "sqrt_linear"
    beta_start: float
    beta_end: float
    cfg: float  # default
    cfg_min: float
    cfg_warn_above: float
    versions: tuple[str, ...]  # motion-module versions this preset fits
    frames: int = 16  # trained clip length (named in the frame-limit error)
    resolution: int = 512  # trained size (named in the size error)
    source: str = ""  # where the values come from (named in every mismatch error)


def _lightning(steps: int, allowed: tuple[int, ...], note: str = "") -> Variant:
    return Variant(
        id=f"lightning_{steps}step",
        label=f"AnimateDiff-Lightning {steps}-step{note}",
        distilled=True,
        steps=steps,
        allowed_steps=allowed,
        sampler="euler",
        spacing="trailing",
        allowed_spacings=("trailing",),
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        cfg=1.0,
        cfg_min=1.0,
        cfg_warn_above=2.0,  # card: "certain base models produce better results with CFG"; >2 artefacts
        versions=("v2",),
        source=LIGHTNING_CARD,
    )


def _standard(version: str) -> Variant:
    return Variant(
        id=f"animatediff_{version}",
        label=f"AnimateDiff {version} (standard, not distilled)",
        distilled=False,
        steps=25,
        allowed_steps=None,
        sampler="euler",
        spacing="leading",
        allowed_spacings=("leading", "linspace", "trailing"),
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        cfg=7.5,
        cfg_min=1.0,
        cfg_warn_above=12.0,
        versions=(version,),
        source=ANIMATEDIFF_REPO,
    )


VARIANTS: MappingProxyType[str, Variant] = MappingProxyType(
    {
        v.id: v
        for v in (
            _lightning(1, (1,), " (research only)"),
            _lightning(2, (2, 3)),
            _lightning(4, (4,)),
            _lightning(8, (8,)),
            _standard("v2"),
            _standard("v3"),
        )
    }
)

AUTO = "auto"
_LIGHTNING_NAME = re.compile(r"lightning.*?(\d+)\s*-?_?step", re.IGNORECASE)


def get_variant(variant_id: str) -> Variant:
    if variant_id not in VARIANTS:
        raise InvalidSettingError(
            f"Unknown motion variant {variant_id!r}. Choose one of: {', '.join(VARIANTS)} (or 'auto')."
        )
    return VARIANTS[variant_id]


def lightning_steps_in_name(file_name: str) -> Optional[int]:
    """The step count a Lightning-style name states (animatediff_lightning_4step_*.safetensors -> 4)."""
    match = _LIGHTNING_NAME.search(file_name)
    return int(match.group(1)) if match else None


def variant_from_filename(file_name: str) -> Optional[Variant]:
    """Lightning files carry their step count in the name; None when the name states none or an unknown one."""
    steps = lightning_steps_in_name(file_name)
    return None if steps is None else VARIANTS.get(f"lightning_{steps}step")


@dataclass(frozen=True)
class SamplingSettings:
    steps: int
    cfg: float
    scheduler: str  # timestep spacing id


@dataclass(frozen=True)
class CheckedSettings:
    settings: SamplingSettings
    notes: tuple[str, ...]  # what was filled in or warned about, shown to the user


def _violations(variant: Variant, requested: SamplingSettings) -> list[tuple[str, object, str]]:
    """(field, the variant's value, why) for every setting the variant was not trained for."""
    found = []
    if requested.steps < 1 or (variant.allowed_steps is not None and requested.steps not in variant.allowed_steps):
        other = VARIANTS.get(f"lightning_{requested.steps}step")
        alternative = (f"pick the {other.label} motion module" if other is not None and other.distilled else
                       "pick the Lightning module for 1, 2, 4 or 8 steps")
        found.append(("steps", variant.steps,
                      f"{variant.label} was trained for steps={_allowed(variant.allowed_steps, variant.steps)}, got "
                      f"steps={requested.steps}: set steps to {variant.steps} or {alternative}."))
    if requested.scheduler not in variant.allowed_spacings:
        found.append(("scheduler", variant.spacing,
                      f"{variant.label} needs the {variant.spacing!r} scheduler (ComfyUI: sgm_uniform/simple), got "
                      f"{requested.scheduler!r}: set scheduler to {variant.spacing!r}."))
    if requested.cfg < variant.cfg_min:
        found.append(("cfg", variant.cfg,
                      f"{variant.label} needs cfg >= {variant.cfg_min} (default {variant.cfg}), got "
                      f"cfg={requested.cfg}: set cfg to {variant.cfg}."))
    return found


def check_settings(variant: Variant, requested: SamplingSettings, policy: str = "strict") -> CheckedSettings:
    """Validate steps/CFG/scheduler against the variant. strict: raise on mismatch; fill: take the variant's."""
    if policy not in POLICIES:
        raise InvalidSettingError(f"Unknown settings policy {policy!r}; choose 'strict' or 'fill'.")
    violations = _violations(variant, requested)
    if violations and policy == "strict":
        raise SettingsMismatchError(
            " ".join(why for _, _, why in violations) + " Or set the loader's policy to 'fill' to use the variant's "
            f"settings. (Trained settings: {variant.source}.)"
        )
    settings = replace(requested, **{field: value for field, value, _ in violations})
    notes = [f"{field} {getattr(requested, field)} -> {value} (policy 'fill', {variant.label})"
             for field, value, _ in violations]
    if settings.cfg > variant.cfg_warn_above:
        notes.append(
            f"warning: cfg {settings.cfg} is above {variant.cfg_warn_above}, the useful maximum for "
            f"{variant.label}; expect over-sharpening, artefacts and colour shifts. Try {variant.cfg}."
        )
    for note in notes:
        log.log(logging.WARNING if note.startswith("warning") else logging.INFO, "%s", note)
    return CheckedSettings(settings=settings, notes=tuple(notes))


def _allowed(allowed: Optional[tuple[int, ...]], default: int) -> str:
    if allowed is None:
        return str(default)
    return " or ".join(str(s) for s in allowed)
