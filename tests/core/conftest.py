"""Shared by the flow-sampler tests: a smooth nonlinear velocity field and the flow denoiser over it, in float64."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def velocity_model():
    def make(seed: int = 3, nonlinearity=torch.sin):
        weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.4

        def velocity(x, t, _cond):
            return torch.einsum("ij,bj...->bi...", weight, x) * (1 + t / 1000) + 0.1 * nonlinearity(x)

        return velocity

    return make


@pytest.fixture()
def flow_denoiser():
    from flipbook_pack.core import denoisers

    def make(forward):
        return denoisers.Denoiser(forward=forward, parameterization=denoisers.flow_prediction(), positive=None,
                                  model_dtype=torch.float64)

    return make
