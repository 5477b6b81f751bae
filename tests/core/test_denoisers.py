"""core/denoisers.py: the initial latent's scaling and classifier-free guidance."""
from __future__ import annotations

import numpy as np
import torch

from flipbook_pack.core import denoisers


def test_initial_latent_uses_vp_scaling():
    noise = torch.ones(2)
    out = denoisers.initial_latent(noise, torch.tensor(3.0), denoisers.epsilon_prediction(torch.ones(2)))
    torch.testing.assert_close(out, torch.full((2,), float(np.sqrt(10.0))))


def test_cfg():
    u, c = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(denoisers.classifier_free_guidance(u, c, 1.5), torch.full((2,), 1.5))
