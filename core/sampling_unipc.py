"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), B(h) = e^h - 1 ("bh2"),
data (x0) prediction, for flow-matching models: x_sigma = (1 - sigma) x0 + sigma noise.

Wan 2.1's default sampler (Wan-Video/Wan2.1 wan/utils/fm_solvers_unipc.py: solver_order 2, bh2,
predict_x0, lower_order_final, final sigma 0); the same algorithm as diffusers' UniPCMultistepScheduler
with use_flow_sigmas. A pure function over a denoiser: one evaluation per step, the corrector reuses it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .sampling import DenoiserFn, StepCallback
from .schedules import flow_half_log_snr


def _coefficients(h: float, rks: list[float], order: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """UniPC's linear system R rho = b for `order` terms, plus phi_1(h) and B(h) (data-prediction form: hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1  # at sigma 0, hh = -inf: phi terms tend to -1/k!, which this gives
    b_h = math.expm1(hh)  # bh2
    factorial = 1
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64), h_phi_1, b_h


def _update(x: torch.Tensor, sigma_from: float, sigma_to: float, m0: torch.Tensor, history: list[tuple[float, torch.Tensor]],
            order: int, model_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The predictor (model_to None) or corrector step from sigma_from to sigma_to.

    `m0` is the x0 estimate at sigma_from; `history` holds older (sigma, x0) pairs, newest first."""
    alpha_to, lambda_from, lambda_to = 1 - sigma_to, flow_half_log_snr(sigma_from), flow_half_log_snr(sigma_to)
    h = lambda_to - lambda_from
    older = history[: order - 1]
    rks = [(flow_half_log_snr(s) - lambda_from) / h for s, _ in older] + [1.0]
    diffs = [(m - m0) / rk for (_, m), rk in zip(older, rks)]
    rows, rhs, h_phi_1, b_h = _coefficients(h, rks, order)
    x_next = (sigma_to / sigma_from) * x - alpha_to * h_phi_1 * m0
    if model_to is None:  # predictor: order-1 terms from the history
        if not diffs:
            return x_next
        rhos = [0.5] if order == 2 else torch.linalg.solve(rows[:-1, :-1], rhs[:-1]).tolist()
        return x_next - alpha_to * b_h * sum(r * d for r, d in zip(rhos, diffs))
    rhos = [0.5] if order == 1 else torch.linalg.solve(rows, rhs).tolist()
    correction = sum(r * d for r, d in zip(rhos[:-1], diffs)) + rhos[-1] * (model_to - m0)
    return x_next - alpha_to * b_h * correction


@torch.no_grad()
def sample_unipc(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[StepCallback] = None,
                 order: int = 2) -> torch.Tensor:
    """UniPC-bh2 over flow sigmas (descending, ending in 0); the last steps drop to lower order."""
    values = [float(s) for s in sigmas]
    total = len(values) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (sigma, x0 estimate), newest first
    previous_x, used_order = None, 1
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        if previous_x is not None:  # corrector: refine x at sigma_i with the new estimate
            x = _update(previous_x, values[i - 1], values[i], history[0][1], history[1:], used_order,
                        model_to=denoised)
        history.insert(0, (values[i], denoised))
        used_order = min(order, total - i, len(history))
        previous_x = x
        x = _update(x, values[i], values[i + 1], denoised, history[1:], used_order)
        del history[order:]
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x
