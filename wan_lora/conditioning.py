"""What the Wan transformer is called with, as one object the shared denoiser passes through.

`WanContext` holds the umt5 embeddings ([B, 512, text_dim], zero past each prompt's tokens) and, per
batch row, whether NAG applies to it: the positive prompt's rows get NAG, the CFG negative's rows
(when cfg > 1) do not, so the unconditional prediction is never pushed away from its own prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .nag import NagState


@dataclass(frozen=True)
class WanContext:
    embeddings: torch.Tensor  # [B, 512, text_dim]
    nag_rows: torch.Tensor  # [B] bool

    @staticmethod
    def of(embeddings: torch.Tensor, *, nag: bool) -> "WanContext":
        return WanContext(embeddings=embeddings, nag_rows=torch.full((embeddings.shape[0],), nag, dtype=torch.bool))


def join_contexts(contexts: Sequence[WanContext]) -> Optional[WanContext]:
    """The CFG branches as one batch (every Wan context has the same length, 512)."""
    return WanContext(embeddings=torch.cat([c.embeddings for c in contexts]),
                      nag_rows=torch.cat([c.nag_rows for c in contexts]))


def wan_forward(transformer: torch.nn.Module, nag: Optional[NagState] = None):
    """The model forward for core.denoisers.Denoiser: (x [B,16,F,h,w], t [1] = 1000 sigma, WanContext) -> velocity."""

    def forward(x: torch.Tensor, t: torch.Tensor, context: Any) -> torch.Tensor:
        embeddings = context.embeddings.to(device=x.device, dtype=x.dtype)
        if nag is not None:
            # reading t back waits for the GPU: only when a sigma_end makes NAG depend on it
            sigma = float(t.reshape(-1)[0]) / 1000.0 if nag.settings.sigma_end > 0 else math.inf
            nag.prepare_call(sigma=sigma, rows=context.nag_rows, device=x.device)
        return transformer(hidden_states=x, timestep=t.to(x.device).expand(x.shape[0]),
                           encoder_hidden_states=embeddings, return_dict=False)[0]

    return forward
