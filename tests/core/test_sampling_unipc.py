"""core/sampling_unipc.py: UniPC-bh2 for flow models equals diffusers' UniPCMultistepScheduler with flow
sigmas (Wan's settings), step by step on the same model, and is exact on an ideal velocity."""
from __future__ import annotations

import torch

from flipbook_pack.core import schedules
from flipbook_pack.core.sampling_unipc import sample_unipc


def test_equals_diffusers_unipc_with_flow_sigmas(velocity_model, flow_denoiser):
    from diffusers import UniPCMultistepScheduler

    velocity = velocity_model(3, torch.sin)
    start = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for steps, shift in ((8, 5.0), (4, 3.0), (2, 8.0)):
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True,
                                            lower_order_final=True, final_sigmas_type="zero")
        scheduler.set_timesteps(steps)
        theirs = start.clone()
        for i, t in enumerate(scheduler.timesteps):
            # the model sees t = 1000 sigma as a float (ComfyUI's convention; diffusers rounds it to an integer)
            theirs = scheduler.step(velocity(theirs, scheduler.sigmas[i].double() * 1000, None), t, theirs).prev_sample
        denoiser = flow_denoiser(velocity)
        ours = sample_unipc(denoiser, start.clone(), scheduler.sigmas.double())
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        assert denoiser.calls == steps  # the corrector reuses each evaluation


def test_ideal_velocity_recovers_the_data(flow_denoiser):
    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigmas = schedules.flow_sigmas_unipc(6, 5.0).double()
    out = sample_unipc(flow_denoiser(lambda x, t, _c: (x - x0) / (t / 1000)), noise * sigmas[0] + x0 * (1 - sigmas[0]),
                       sigmas)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)  # the schedule is float32
