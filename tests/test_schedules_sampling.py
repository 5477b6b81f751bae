from __future__ import annotations

import numpy as np
import pytest
import torch

from flipbook_pack.core import denoisers, sampling, schedules
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


def test_euler_with_zero_denoiser_scales_x_by_sigma_ratio_and_calls_once_per_step():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    calls = []
    steps = []
    out = sampling.sample_euler(lambda x, s: (calls.append(float(s)), torch.zeros_like(x))[1], torch.ones(3),
                                sigmas, callback=lambda i, n, x, d: steps.append((i, n)))
    assert calls == [10.0, 5.0, 1.0]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(out, torch.zeros(3))


def test_euler_on_gaussian_data_matches_the_exact_ode_solution_in_one_step():
    # data ~ N(0, 1): the optimal denoiser is x / (1 + sigma^2); one step from sigma to 0 ends at
    # x * (1 - 1/(1+sigma^2)) ... Euler: x + (x - D)/sigma * (0 - sigma) = D
    x = torch.randn(5, generator=torch.Generator().manual_seed(1))
    out = sampling.sample_euler(lambda v, s: v / (1 + s**2), x, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out, x / 5)


def test_seeded_noise_is_cpu_and_deterministic():
    a = sampling.seeded_noise((2, 3), 42)
    assert a.device.type == "cpu"
    torch.testing.assert_close(a, sampling.seeded_noise((2, 3), 42))
    assert not torch.equal(a, sampling.seeded_noise((2, 3), 43))
    assert sampling.seeded_noise((1,), 2**64 - 1).shape == (1,)


def test_initial_latent_uses_vp_scaling():
    noise = torch.ones(2)
    out = denoisers.initial_latent(noise, torch.tensor(3.0), denoisers.epsilon_prediction(torch.ones(2)))
    torch.testing.assert_close(out, torch.full((2,), float(np.sqrt(10.0))))


def test_cfg():
    u, c = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(denoisers.classifier_free_guidance(u, c, 1.5), torch.full((2,), 1.5))
