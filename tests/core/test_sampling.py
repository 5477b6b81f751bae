"""core/sampling.py: the Euler sampler and seeded noise."""
from __future__ import annotations

import torch

from flipbook_pack.core import sampling


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
