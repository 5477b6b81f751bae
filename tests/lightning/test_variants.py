"""lightning/variants.py: the variant table, file-name detection, and strict/fill settings checks."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from flipbook_pack.core.errors import InvalidSettingError, SettingsMismatchError
from flipbook_pack.core.schedules import BETA_SCHEDULES, TIMESTEP_SPACINGS
from flipbook_pack.lightning import variants as V

S = V.SamplingSettings


def test_table_invariants():
    assert len({v.id for v in V.VARIANTS.values()}) == len(V.VARIANTS)
    for variant_id, v in V.VARIANTS.items():
        assert v.id == variant_id and v.source.startswith("http")
        assert v.spacing in TIMESTEP_SPACINGS and set(v.allowed_spacings) <= set(TIMESTEP_SPACINGS)
        assert v.beta_schedule in BETA_SCHEDULES
        assert v.allowed_steps is None or v.steps in v.allowed_steps
        assert (v.frames, v.resolution) == (16, 512)
        with pytest.raises(dataclasses.FrozenInstanceError):
            v.steps = 3
    with pytest.raises(TypeError):
        V.VARIANTS["x"] = None
    assert {"lightning_1step", "lightning_2step", "lightning_4step", "lightning_8step",
            "animatediff_v2", "animatediff_v3"} == set(V.VARIANTS)


def test_lightning_presets_follow_the_card():
    for n in (1, 2, 4, 8):
        v = V.VARIANTS[f"lightning_{n}step"]
        assert (v.steps, v.sampler, v.spacing, v.beta_schedule, v.cfg) == (n, "euler", "trailing", "linear", 1.0)
        assert (v.beta_start, v.beta_end) == (0.00085, 0.012)
    assert V.VARIANTS["lightning_2step"].allowed_steps == (2, 3)  # card: 3 steps on the 2-step model


@pytest.mark.parametrize("name,expected", [
    ("animatediff_lightning_4step_comfyui.safetensors", "lightning_4step"),
    ("animatediff_lightning_8step_diffusers.safetensors", "lightning_8step"),
    ("sub/AnimateDiff-Lightning_2step.safetensors", "lightning_2step"),
    ("mm_sd_v15_v2.ckpt", None),
])
def test_variant_from_filename(name, expected):
    found = V.variant_from_filename(name)
    assert (found.id if found else None) == expected


def test_strict_mismatch_names_variant_value_and_requirement():
    v = V.VARIANTS["lightning_4step"]
    with pytest.raises(SettingsMismatchError, match=r"4-step.*steps=4.*got steps=20"):
        V.check_settings(v, S(20, 1.0, "trailing"))
    with pytest.raises(SettingsMismatchError, match=r"'trailing'.*got 'leading'"):
        V.check_settings(v, S(4, 1.0, "leading"))
    with pytest.raises(SettingsMismatchError, match=r"cfg >= 1.0.*got cfg=0.5"):
        V.check_settings(v, S(4, 0.5, "trailing"))


def test_strict_accepts_trained_settings_and_warns_above_cfg_2(caplog):
    v = V.VARIANTS["lightning_4step"]
    assert V.check_settings(v, S(4, 1.0, "trailing")).notes == ()
    with caplog.at_level(logging.WARNING):
        checked = V.check_settings(v, S(4, 2.5, "trailing"))
    assert checked.settings.cfg == 2.5  # never changed silently
    assert "above 2.0" in checked.notes[0] and "above 2.0" in caplog.text


def test_fill_takes_the_variant_values_and_reports_each():
    v = V.VARIANTS["lightning_8step"]
    checked = V.check_settings(v, S(20, 0.0, "leading"), policy="fill")
    assert checked.settings == S(8, 1.0, "trailing")
    assert len(checked.notes) == 3 and "steps 20 -> 8" in checked.notes[0]


def test_standard_variants_allow_any_steps():
    v = V.VARIANTS["animatediff_v3"]
    assert V.check_settings(v, S(30, 7.5, "linspace")).settings.steps == 30


def test_unknown_policy_and_variant():
    with pytest.raises(InvalidSettingError):
        V.check_settings(V.VARIANTS["lightning_4step"], S(4, 1.0, "trailing"), policy="lenient")
    with pytest.raises(InvalidSettingError, match="lightning_4step"):
        V.get_variant("lightning_3step")


def test_steps_message_names_modules_that_exist():
    with pytest.raises(SettingsMismatchError, match="pick the Lightning module for 1, 2, 4 or 8 steps"):
        V.check_settings(V.VARIANTS["lightning_4step"], V.SamplingSettings(6, 1.0, "trailing"))
    with pytest.raises(SettingsMismatchError, match="pick the AnimateDiff-Lightning 8-step motion module"):
        V.check_settings(V.VARIANTS["lightning_4step"], V.SamplingSettings(8, 1.0, "trailing"))
