"""Wan 2.1 T2V sampling presets and video rules, with the strict / fill policy of the Lightning variants.

A frozen table keyed by stable ids (workflows store the id). Sources:
- base: Wan-Video/Wan2.1 generate.py (_validate_args: T2V sample_steps 50, sample_guide_scale 5.0,
  sample_shift 5.0, sample_solver 'unipc', choices unipc / dpm++); wan/configs/shared_config.py
  (sample_fps 16, sample_neg_prompt); frames 4n+1 (generate.py --frame_num), sizes multiples of 16
  (VAE stride 8 x patch 2).
- lightx2v: ModelTC/LightX2V configs/distill/wan_t2v_distill_lora_4step_cfg.json (4 steps
  [1000, 750, 500, 250] through shift 5 = sigma 1, 0.9375, 0.8333, 0.625; enable_cfg false: "otherwise
  the video may become completely blurred"); 6 and 8 steps at shift 5 from the LightX2V maintainer
  (ModelTC/LightX2V-Wan2.2-Lightning#3: the 8-step shift-5 schedule contains the 4 trained timesteps).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Optional

from ..core.errors import InvalidSettingError, SettingsMismatchError

log = logging.getLogger(__name__)

WAN_REPO = "Wan-Video/Wan2.1 generate.py (T2V: 50 steps, guide scale 5, shift 5, unipc)"
LIGHTX2V = "ModelTC/LightX2V configs/distill/wan_t2v_distill_lora_4step_cfg.json (4 steps, shift 5, cfg off)"
LIGHTX2V_MORE_STEPS = "ModelTC/LightX2V-Wan2.2-Lightning#3 (maintainer: shift-5 schedules keep the trained timesteps)"
POLICIES = ("strict", "fill")
CUSTOM = "custom"  # no preset: every setting as given
FPS = 16
DEFAULT_FRAMES = 81
SIZE_STEP = 16  # VAE stride 8 x patch 2
# Wan 2.1 14B's supported sizes (wan/configs/__init__.py SUPPORTED_SIZES) and the seed workflow's sizes, offered as
# presets (width x height); any multiple of 16 is valid
RESOLUTIONS = ("832x480", "480x832", "1280x720", "720x1280", "640x480", "768x416", "384x384", "384x208")
# wan/configs/shared_config.py sample_neg_prompt (Wan's default when the negative prompt is empty)
DEFAULT_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                    "杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass(frozen=True)
class WanPreset:
    id: str
    label: str
    distilled: bool
    steps: int
    allowed_steps: Optional[tuple[int, ...]]  # None: any step count
    sampler: str  # a name in core.sampler_table.SAMPLERS and core.schedules.FLOW_SCHEDULES
    allowed_samplers: tuple[str, ...]
    cfg: float
    cfg_max: float  # distilled: 1 (the LoRA distilled CFG away)
    shift: float
    allowed_shifts: Optional[tuple[float, ...]]  # None: any shift
    source: str


def _lightx2v(steps: int, samplers: tuple[str, ...], source: str) -> WanPreset:
    return WanPreset(id=f"lightx2v_{steps}step", label=f"lightx2v distilled {steps}-step (CFG 1)", distilled=True,
                     steps=steps, allowed_steps=(steps,), sampler=samplers[0], allowed_samplers=samplers, cfg=1.0,
                     cfg_max=1.0, shift=5.0, allowed_shifts=(5.0,), source=source)


PRESETS: MappingProxyType[str, WanPreset] = MappingProxyType({p.id: p for p in (
    WanPreset(id="wan21_t2v_base", label="Wan 2.1 T2V base (UniPC 50 steps, CFG 5, shift 5)", distilled=False,
              steps=50, allowed_steps=None, sampler="unipc", allowed_samplers=("unipc", "dpm++", "euler"), cfg=5.0,
              cfg_max=math.inf, shift=5.0, allowed_shifts=None, source=WAN_REPO),
    _lightx2v(4, ("euler",), LIGHTX2V),
    _lightx2v(6, ("unipc", "dpm++", "euler"), LIGHTX2V_MORE_STEPS),
    _lightx2v(8, ("unipc", "dpm++", "euler"), LIGHTX2V_MORE_STEPS),
)})


@dataclass(frozen=True)
class WanSettings:
    steps: int
    cfg: float
    shift: float
    sampler: str


@dataclass(frozen=True)
class CheckedWanSettings:
    settings: WanSettings
    notes: tuple[str, ...]


def get_preset(preset_id: str) -> Optional[WanPreset]:
    """The preset, or None for 'custom'."""
    if preset_id == CUSTOM:
        return None
    if preset_id not in PRESETS:
        raise InvalidSettingError(f"Unknown Wan preset {preset_id!r}; choose one of {', '.join(PRESETS)} or "
                                  f"{CUSTOM!r}.")
    return PRESETS[preset_id]


def preset_for_stack(preset_id: str, *, distill_lora: Optional[str], steps: int, policy: str) -> tuple[str, tuple]:
    """The preset to check against when a step/CFG distill LoRA is (or is not) in the LoRA stack.

    With a distill LoRA the base preset is wrong (50 steps and CFG 5 on a distilled model: "the video may
    become completely blurred", LightX2V): strict refuses it, fill switches to the lightx2v preset with the
    asked steps (4, 6 or 8; else 8). A lightx2v preset without one is only noted."""
    if preset_id == CUSTOM:
        return preset_id, ()
    preset = get_preset(preset_id)
    if distill_lora and not preset.distilled:
        chosen = f"lightx2v_{steps}step" if f"lightx2v_{steps}step" in PRESETS else "lightx2v_8step"
        if policy == "strict":
            raise SettingsMismatchError(
                f"The LoRA stack has the step/CFG distill LoRA {distill_lora}, but the preset is {preset.label}: "
                f"with a distilled model 50 steps and CFG > 1 make a burnt or completely blurred video (LightX2V). "
                f"Set preset to {chosen} (or lightx2v_4step/6step/8step: CFG 1, shift 5), or the policy to 'fill'."
            )
        return chosen, (f"preset {preset_id} -> {chosen} (policy 'fill': {distill_lora} is a distill LoRA)",)
    if preset.distilled and not distill_lora:
        return preset_id, (f"warning: {preset.label} is for the lightx2v distill LoRA, and none is in the LoRA "
                           "stack; the base model needs about 50 steps and CFG 5",)
    return preset_id, ()


def _violations(preset: WanPreset, asked: WanSettings) -> list[tuple[str, object, str]]:
    found = []
    if preset.allowed_steps is not None and asked.steps not in preset.allowed_steps:
        found.append(("steps", preset.steps, f"{preset.label} runs {preset.steps} steps, got steps={asked.steps}"
                      + (" (50 steps is the base model's count, not the distilled one's)" if asked.steps >= 20 else "")
                      + f": set steps to {preset.steps}."))
    if asked.sampler not in preset.allowed_samplers:
        found.append(("sampler", preset.sampler, f"{preset.label} is run with {' / '.join(preset.allowed_samplers)}, "
                      f"got sampler={asked.sampler!r}: set sampler to {preset.sampler!r}."))
    if asked.cfg > preset.cfg_max:
        found.append(("cfg", preset.cfg, f"{preset.label} was distilled to run without CFG, got cfg={asked.cfg}: with "
                      "CFG the video may become completely blurred (LightX2V's words). Set cfg to 1 and use NAG for "
                      "the negative prompt."))
    if preset.allowed_shifts is not None and asked.shift not in preset.allowed_shifts:
        found.append(("shift", preset.shift, f"{preset.label} was trained at shift {preset.shift}, got "
                      f"shift={asked.shift}: set shift to {preset.shift}."))
    return found


def check_wan_settings(preset: Optional[WanPreset], asked: WanSettings, policy: str = "strict") -> CheckedWanSettings:
    """strict: a setting the preset was not made for is an error; fill: the preset's value is used, with a note."""
    _check_ranges(asked)
    if policy not in POLICIES:
        raise InvalidSettingError(f"Unknown settings policy {policy!r}; choose 'strict' or 'fill'.")
    if preset is None:
        return CheckedWanSettings(settings=asked, notes=())
    violations = _violations(preset, asked)
    if violations and policy == "strict":
        raise SettingsMismatchError(" ".join(why for _, _, why in violations) + " Or set the policy to 'fill' to use "
                                    f"the preset's settings, or the preset to 'custom'. (Source: {preset.source}.)")
    settings = replace(asked, **{name: value for name, value, _ in violations})
    notes = [f"{name} {getattr(asked, name)} -> {value} (policy 'fill', {preset.label})" for name, value, _ in violations]
    if not preset.distilled and settings.steps < 20:
        notes.append(f"warning: {settings.steps} steps is few for the base model (official: 50); without a distill "
                     "LoRA expect a blurry, unfinished video.")
    for note in notes:
        log.log(logging.WARNING if note.startswith("warning") else logging.INFO, "%s", note)
    return CheckedWanSettings(settings=settings, notes=tuple(notes))


def _check_ranges(asked: WanSettings) -> None:
    from ..core.sampler_table import SAMPLERS

    if asked.steps < 1:
        raise InvalidSettingError(f"steps={asked.steps}: use at least 1 (Wan base: 50; lightx2v: 4-8).")
    if not (math.isfinite(asked.cfg) and asked.cfg >= 1.0):
        raise InvalidSettingError(f"cfg={asked.cfg}: use a finite number of at least 1 (Wan base: 5; distilled: 1).")
    if not (math.isfinite(asked.shift) and asked.shift > 0):
        raise InvalidSettingError(f"shift={asked.shift}: use a positive number (Wan 2.1 T2V: 5).")
    if asked.sampler not in SAMPLERS:
        raise InvalidSettingError(f"sampler={asked.sampler!r}: choose one of {', '.join(SAMPLERS)}.")


def check_video_size(*, frames: int, width: int, height: int) -> None:
    """frames 4n+1, width and height multiples of 16; errors name the nearest valid values."""
    if frames < 1 or (frames - 1) % 4:
        lower = max(1, (frames - 1) // 4 * 4 + 1)
        raise InvalidSettingError(f"frames={frames}: Wan makes 4n+1 frames (the VAE packs 4 frames per latent after "
                                  f"the first); use {lower} or {lower + 4} ({DEFAULT_FRAMES} = 5 s at {FPS} fps).")
    for name, value in (("width", width), ("height", height)):
        if value < SIZE_STEP or value % SIZE_STEP:
            nearest = max(SIZE_STEP, round(value / SIZE_STEP) * SIZE_STEP)
            raise InvalidSettingError(f"{name}={value}: Wan needs multiples of {SIZE_STEP} (VAE stride 8 x patch 2); "
                                      f"the nearest is {nearest} (480p: 832x480).")


def parse_resolution(value: str) -> tuple[int, int]:
    """'832x480' -> (832, 480)."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise InvalidSettingError(f"resolution {value!r}: write it as WIDTHxHEIGHT, e.g. 832x480.") from None
    return width, height
