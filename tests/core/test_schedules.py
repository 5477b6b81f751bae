"""core/schedules.py: trailing/linspace/leading timesteps and discrete sigmas, checked against diffusers."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack.core import schedules
from flipbook_pack.core.errors import InvalidSettingError


@pytest.mark.parametrize("steps,expected", [
    (1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249]), (8, [999, 874, 749, 624, 499, 374, 249, 124]),
])
def test_trailing_timesteps_match_the_lightning_card(steps, expected):
    assert schedules.timesteps_trailing(steps).tolist() == expected


def test_linear_sigmas_match_reference_values():
    model = schedules.discrete_sigmas("linear", 0.00085, 0.012)
    sigmas, _ = schedules.sigmas_for_steps(model, "trailing", 4)
    assert sigmas.tolist() == pytest.approx([25.146, 6.557, 2.276, 0.867, 0.0], abs=2e-3)
    scaled = schedules.discrete_sigmas("scaled_linear", 0.00085, 0.012)
    assert float(scaled[-1]) == pytest.approx(14.615, abs=2e-3)


def test_linspace_is_the_integer_ddim_grid():
    assert schedules.timesteps_linspace(4).tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("spacing,steps", [("trailing", 4), ("leading", 25), ("trailing", 8), ("trailing", 2)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sigmas_equal_diffusers_euler_scheduler(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(steps)
    model = schedules.discrete_sigmas("linear", 0.00085, 0.012)
    sigmas, timesteps = schedules.sigmas_for_steps(model, spacing, steps)
    assert timesteps.tolist() == scheduler.timesteps.long().tolist()
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), rtol=1e-5, atol=1e-5)


def test_sigma_to_timestep_inverts_the_grid():
    model = schedules.discrete_sigmas("linear", 0.00085, 0.012)
    for t in (0, 249, 500, 999):
        assert float(schedules.sigma_to_timestep(model[t].reshape(1).float(), model)) == pytest.approx(t, abs=1e-2)


def test_unknown_names_raise_typed_errors():
    with pytest.raises(InvalidSettingError, match="karras"):
        schedules.sigmas_for_steps(schedules.discrete_sigmas("linear", 0.00085, 0.012), "karras", 4)
    with pytest.raises(InvalidSettingError):
        schedules.discrete_sigmas("cosine", 0.00085, 0.012)


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("denoise", [0.3, 0.4, 0.5, 0.6, 0.75, 1.0])
def test_partial_denoise_keeps_the_trained_timesteps_as_diffusers_video_to_video(steps, denoise):
    """diffusers' AnimateDiffVideoToVideoPipeline runs scheduler.timesteps[steps - int(steps * strength):] of the
    trailing Euler schedule (lightning-breadth.md 5.1, verified there); Flipbook runs the same timesteps."""
    from diffusers import EulerDiscreteScheduler

    from flipbook_pack.core.errors import InvalidSettingError
    from flipbook_pack.core.schedules import discrete_sigmas, schedule_tail, sigmas_for_steps

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    theirs = scheduler.timesteps[steps - min(int(steps * denoise), steps):].round().long().tolist()
    sigmas, timesteps = sigmas_for_steps(discrete_sigmas("linear", 0.00085, 0.012), "trailing", steps)
    if not theirs:  # diffusers would run nothing and return the re-encoded input: Flipbook says so instead
        with pytest.raises(InvalidSettingError, match="runs no step"):
            schedule_tail(sigmas[:-1], timesteps, denoise)
        return
    sigmas_run, ours = schedule_tail(sigmas[:-1], timesteps, denoise)
    assert ours.tolist() == theirs
    torch.testing.assert_close(sigmas_run.double(), scheduler.sigmas[steps - len(theirs):-1].double(), atol=1e-4,
                               rtol=1e-5)
