"""Quality tiers: explore at 4 steps, develop at 8, render finals with standard AnimateDiff (user-guides.md, guide 1:
"batch many 4-step variations, pick, re-render the chosen ones at 8 steps or with standard AnimateDiff (tier 1
explore / tier 2 develop / tier 3 final)"). A tier names the motion-module variant and the settings it samples with;
the same seed and prompt re-render at another tier by changing the tier alone.

Sources: the Lightning rows follow the variant table (ByteDance model card: the checkpoint's own step count, CFG 1,
trailing); the final tier is guoyww's standard inference (configs/inference/inference-v2.yaml / -v3.yaml: DDIM with
steps_offset 1 = leading spacing; prompt configs 25 steps, guidance 7.5), 25-40 steps and CFG 7-8 as the guide gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from ..core.errors import InvalidSettingError
from .variants import CheckedSettings, SamplingSettings, Variant, check_settings

FINAL_STEPS = (25, 40)
FINAL_CFG = (7.0, 8.0)


@dataclass(frozen=True)
class Tier:
    id: str
    label: str
    variants: tuple[str, ...]  # the motion-module variants this tier runs (the module's version picks among them)
    settings: Optional[SamplingSettings]  # None: the final tier's steps and CFG come from the node


TIERS: MappingProxyType[str, Tier] = MappingProxyType({t.id: t for t in (
    Tier("explore", "explore (AnimateDiff-Lightning 4-step)", ("lightning_4step",), SamplingSettings(4, 1.0, "trailing")),
    Tier("develop", "develop (AnimateDiff-Lightning 8-step)", ("lightning_8step",), SamplingSettings(8, 1.0, "trailing")),
    Tier("final", "final (standard AnimateDiff v2/v3)", ("animatediff_v2", "animatediff_v3"), None),
)})


def tier_settings(tier_id: str, *, final_steps: int, final_cfg: float) -> SamplingSettings:
    """What a tier samples with; the final tier's steps and CFG stay inside the range standard AnimateDiff is run at."""
    tier = TIERS.get(tier_id)
    if tier is None:
        raise InvalidSettingError(f"Unknown tier {tier_id!r}; choose one of {', '.join(TIERS)}.")
    if tier.settings is not None:
        return tier.settings
    (low_steps, high_steps), (low_cfg, high_cfg) = FINAL_STEPS, FINAL_CFG
    if not (low_steps <= final_steps <= high_steps and low_cfg <= final_cfg <= high_cfg):
        raise InvalidSettingError(
            f"final_steps={final_steps}, final_cfg={final_cfg}: the final tier renders with standard AnimateDiff at "
            f"{low_steps}-{high_steps} steps and CFG {low_cfg:g}-{high_cfg:g} (guoyww's configs: 25 steps, 7.5).")
    return SamplingSettings(final_steps, float(final_cfg), "leading")


def check_tier_module(tier_id: str, variant_id: str, motion_name: str) -> None:
    """The motion module chosen for a tier must be that tier's kind (a Lightning file on the final tier would be
    sampled at 30 steps it was never trained for)."""
    tier = TIERS[tier_id]
    if variant_id not in tier.variants:
        raise InvalidSettingError(
            f"The {tier.label} tier needs a {' or '.join(tier.variants)} motion module, but {motion_name} is "
            f"{variant_id}. Choose the {tier.id}_motion file accordingly (explore: animatediff_lightning_4step, "
            "develop: animatediff_lightning_8step, final: mm_sd_v15_v2 or v3_sd15_mm).")


def checked_tier_settings(variant: Variant, tier_id: str, settings: SamplingSettings) -> CheckedSettings:
    """The tier's settings in place of the sampler's widgets, checked against the module, and said so."""
    checked = check_settings(variant, settings, "strict")
    return CheckedSettings(checked.settings, (
        f"tier {tier_id}: {settings.steps} steps, CFG {settings.cfg:g}, {settings.scheduler} ({variant.label}); the "
        "sampler's steps/cfg/scheduler widgets are not used", *checked.notes))
