"""core/schedules.py flow-matching part: Wan's time shift and its UniPC / DPM++ sigma schedules, against
the formulas of Wan's own solvers and diffusers' flow schedulers."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core import schedules
from flipbook_pack.core.errors import InvalidSettingError


def test_shift_follows_wans_formula_and_keeps_the_ends():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    shifted = schedules.shift_sigmas(sigmas, 5.0)
    torch.testing.assert_close(shifted, torch.tensor([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(schedules.shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(InvalidSettingError, match="flow shift must be a positive number"):
        schedules.shift_sigmas(sigmas, 0.0)


def test_unipc_schedule_is_wans_and_matches_diffusers_flow_unipc_closely():
    from diffusers import UniPCMultistepScheduler

    ours = schedules.flow_sigmas_unipc(8, 5.0)
    assert ours.shape == (9,) and float(ours[-1]) == 0.0 and bool((ours[:-1] > ours[1:]).all())
    expected = schedules.shift_sigmas(torch.linspace(0.999, 0, 9, dtype=torch.float64)[:-1], 5.0)
    torch.testing.assert_close(ours[:-1], expected.float())
    theirs = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    theirs.set_timesteps(8)
    # diffusers spaces linspace(1, 1/1000) instead of Wan's linspace(0.999, 0): at most 2.2e-3 apart at 8 steps
    torch.testing.assert_close(ours, theirs.sigmas.float(), atol=3e-3, rtol=0)


def test_dpmpp_schedule_is_wans_and_equals_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = schedules.flow_sigmas_dpmpp(6, 3.0)
    assert float(ours[0]) == 1.0 and float(ours[-1]) == 0.0 and ours.shape == (7,)
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(sigmas=torch.linspace(1.0, 0.0, 7)[:6].tolist())
    torch.testing.assert_close(ours, theirs.sigmas.float(), atol=1e-6, rtol=0)


def test_flow_schedules_refuse_zero_steps():
    for schedule in schedules.FLOW_SCHEDULES.values():
        with pytest.raises(InvalidSettingError, match="steps must be at least 1"):
            schedule(0, 5.0)
