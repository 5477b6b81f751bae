"""core/sampling_dpmpp.py: DPM-Solver++(2M) for flow models equals diffusers' DPMSolverMultistepScheduler with
flow sigmas (Wan's `dpm++` settings), step by step on the same model, and is exact on an ideal velocity."""
from __future__ import annotations

import torch

from flipbook_pack.core import schedules
from flipbook_pack.core.sampler_table import SAMPLERS
from flipbook_pack.core.sampling_dpmpp import sample_dpmpp_2m


def test_equals_diffusers_dpmsolver_with_flow_sigmas(velocity_model, flow_denoiser):
    from diffusers import DPMSolverMultistepScheduler

    velocity = velocity_model(7, torch.cos)
    start = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for steps, shift in ((8, 5.0), (4, 3.0), (3, 8.0), (20, 5.0)):
        scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=shift, solver_order=2, algorithm_type="dpmsolver++",
                                                solver_type="midpoint", lower_order_final=True,
                                                final_sigmas_type="zero")
        scheduler.set_timesteps(steps)
        theirs = start.clone()
        for i, t in enumerate(scheduler.timesteps):
            theirs = scheduler.step(velocity(theirs, scheduler.sigmas[i].double() * 1000, None), t, theirs).prev_sample
        denoiser = flow_denoiser(velocity)
        ours = sample_dpmpp_2m(denoiser, start.clone(), scheduler.sigmas.double())
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        assert denoiser.calls == steps


def test_second_order_differs_from_first_order(velocity_model, flow_denoiser):
    """The multistep term is really used (a first-order-only solver would also pass an ideal-velocity test)."""
    velocity = velocity_model(7, torch.cos)
    start = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sigmas = schedules.flow_sigmas_dpmpp(6, 5.0).double()
    second = sample_dpmpp_2m(flow_denoiser(velocity), start.clone(), sigmas)
    first = SAMPLERS["euler"](flow_denoiser(velocity), start.clone(), sigmas)  # DDIM = DPM-Solver++ 1 in x0 form
    assert (second - first).abs().max() > 1e-4


def test_ideal_velocity_recovers_the_data(flow_denoiser):
    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigmas = schedules.flow_sigmas_dpmpp(5, 5.0).double()
    out = sample_dpmpp_2m(flow_denoiser(lambda x, t, _c: (x - x0) / (t / 1000)), noise * sigmas[0] + x0 * (1 - sigmas[0]),
                          sigmas)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_distilled_euler_schedule_is_lightx2v():
    """lightx2v WanStepDistillScheduler: 4 steps at shift 5 are sigma 1, 0.9375, 0.8333, 0.625."""
    sigmas = schedules.FLOW_SCHEDULES["euler"](4, 5.0)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]))
