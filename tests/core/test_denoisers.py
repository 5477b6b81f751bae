"""core/denoisers.py: epsilon and flow parameterisations (against exact solutions and diffusers' flow scheduler),
the initial latent's scaling, classifier-free guidance, the CFG-1 skip, evaluation count and progress/cancel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flipbook_pack.core import denoisers, sampling, schedules


def test_initial_latent_uses_vp_scaling():
    noise = torch.ones(2)
    out = denoisers.initial_latent(noise, torch.tensor(3.0), denoisers.epsilon_prediction(torch.ones(2)))
    torch.testing.assert_close(out, torch.full((2,), float(np.sqrt(10.0))))


def test_cfg():
    u, c = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(denoisers.classifier_free_guidance(u, c, 1.5), torch.full((2,), 1.5))


def _flow_denoiser(forward, positive=None, **kw):
    return denoisers.Denoiser(forward=forward, parameterization=denoisers.flow_prediction(), positive=positive, **kw)


def test_flow_denoiser_with_the_true_velocity_recovers_the_data_exactly():
    """x_sigma = (1 - sigma) x0 + sigma n, so the ideal velocity is (x - x0) / sigma; Euler lands on x0."""
    x0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    seen = []

    def velocity(x, t, _cond):
        seen.append(float(t))
        return (x - x0) / (t / 1000)

    sigmas = torch.tensor([1.0, 0.9, 0.6, 0.25, 0.0])
    start = denoisers.initial_latent(noise, sigmas[0], denoisers.flow_prediction())
    out = sampling.sample_euler(_flow_denoiser(velocity), start, sigmas)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert seen == pytest.approx([1000.0, 900.0, 600.0, 250.0])  # t = 1000 * sigma, as Wan was trained


def test_flow_euler_equals_diffusers_flow_match_scheduler_with_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(num_inference_steps=6)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.3

    def velocity(x, t, _cond):
        return torch.einsum("ij,bjfhw->bifhw", weight, x) * (1 + t / 1000)

    start = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    theirs = start.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(velocity(theirs, t, None), t, theirs).prev_sample
    ours = sampling.sample_euler(_flow_denoiser(velocity), start.clone(), scheduler.sigmas.float())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cfg_1_never_builds_the_negative_and_runs_one_forward_per_step():
    batches = []

    def forward(x, t, cond):
        batches.append((x.shape[0], cond))
        return torch.zeros_like(x)

    def negative():
        raise AssertionError("the negative was built at cfg 1")

    denoiser = _flow_denoiser(forward, positive="pos", negative=negative, cfg=1.0)
    sampling.sample_euler(denoiser, torch.ones(1, 2), torch.tensor([1.0, 0.5, 0.0]))
    assert denoiser.calls == 2 and [b for b, _ in batches] == [1, 1]


def test_cfg_batches_negative_then_positive_and_guides():
    conds = []

    def forward(x, t, cond):
        conds.append(cond)
        return torch.stack([torch.full_like(x[0], 1.0), torch.full_like(x[0], 3.0)])  # uncond 1, cond 3

    denoiser = denoisers.Denoiser(forward=forward, parameterization=denoisers.flow_prediction(), positive=torch.ones(1),
                                  negative=lambda: torch.zeros(1), cfg=2.0)
    out = denoiser(torch.zeros(1, 2), torch.tensor(0.5))
    assert conds[0].tolist() == [0.0, 1.0]  # [negative, positive], as ComfyUI batches uncond first
    torch.testing.assert_close(out, torch.full((1, 2), -0.5 * 5.0))  # x0 = x - sigma * (1 + 2 * (3 - 1))


def test_progress_counts_evaluations_and_can_cancel():
    class Cancelled(Exception):
        pass

    reports = []

    def progress(done, total):
        reports.append((done, total))
        if done == 2:
            raise Cancelled

    denoiser = _flow_denoiser(lambda x, t, c: torch.zeros_like(x), progress=progress, expected_calls=4)
    with pytest.raises(Cancelled):
        sampling.sample_euler(denoiser, torch.ones(1, 2), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert reports == [(1, 4), (2, 4)]


def test_epsilon_parameterization_matches_k_diffusion_scalings():
    sigmas = schedules.discrete_sigmas("linear", 0.00085, 0.012)
    p = denoisers.epsilon_prediction(sigmas)
    sigma = sigmas[499].float()
    assert p.input_scale(sigma) == pytest.approx(float((1 + sigma**2) ** -0.5))
    assert float(p.timestep(sigma.reshape(1))) == pytest.approx(499.0, abs=1e-3)
    assert p.timestep(sigma.reshape(1)).dtype == torch.float32


def test_cfg_branches_that_cannot_share_a_batch_run_apart_with_the_same_result():
    weight = torch.randn(2, 2, generator=torch.Generator().manual_seed(5))

    def forward(x, t, cond):  # a batch-independent model: each item sees only its own conditioning
        return torch.einsum("ij,bj->bi", weight, x) * cond.reshape(-1, 1)

    def make(join):
        return denoisers.Denoiser(forward=forward, parameterization=denoisers.flow_prediction(),
                                  positive=torch.tensor([2.0]), negative=lambda: torch.tensor([0.5]), cfg=3.0,
                                  join=join)

    x, sigma = torch.randn(1, 2, generator=torch.Generator().manual_seed(6)), torch.tensor(0.7)
    batched, apart = make(lambda cs: torch.cat(cs)), make(lambda cs: None)
    torch.testing.assert_close(apart(x, sigma), batched(x, sigma))
    assert (batched.calls, batched.forwards) == (1, 1) and (apart.calls, apart.forwards) == (1, 2)
