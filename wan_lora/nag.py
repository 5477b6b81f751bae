"""NAG, Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179), on Wan's cross-attention.

Negative prompts at CFG 1 (one forward per step): in every block's cross-attention the image
queries attend to the positive text (Z+) and to the negative text (Z-), both before the output
projection, and are combined as
    Z~ = s Z+ - (s - 1) Z-                          (extrapolation, s = scale)
    Z~ <- Z~ * min(r, tau) / r,  r = |Z~|_1 / |Z+|_1  (per token, L1 over channels)
    Z  = alpha Z~ + (1 - alpha) Z+                   (blend)
L1 as every Wan implementation uses it (ChenDarYen/ComfyUI-NAG utils.nag, kijai WanVideoWrapper
normalized_attention_guidance); the authors' Flux code uses L2. NAG is off at scale <= 1 and, like
ComfyUI-NAG's nag_sigma_end, while sigma < sigma_end. The negative text goes through the text
embedder once per run and each block's negative keys/values are computed once and kept for the run
(they do not depend on the step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

L1_FLOOR = 1e-6  # |Z+|_1 below this counts as this (ComfyUI-NAG clamps the same way)


@dataclass(frozen=True)
class NagSettings:
    """Defaults: kijai WanVideoWrapper WanVideoApplyNAG / KJNodes WanVideoNAG (11, 2.5, 0.25)."""

    scale: float = 11.0
    tau: float = 2.5
    alpha: float = 0.25
    sigma_end: float = 0.0  # NAG only while sigma >= sigma_end (ComfyUI-NAG suggests 0.75 for speed)

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0


CHUNK_TOKENS = 8192  # float32 temporaries per chunk: 8192 x 5120 x 4 B = 168 MB each (14B), whatever the video size


def nag_combine(positive: torch.Tensor, negative: torch.Tensor, *, scale: float, tau: float,
                alpha: float) -> torch.Tensor:
    """NAG's extrapolate-normalize-blend on attention outputs [batch, tokens, channels], in float32, a chunk of
    tokens at a time (720p x 81 frames has 75,600 tokens: whole-tensor temporaries would be GBs each)."""
    out = torch.empty_like(positive)
    for start in range(0, positive.shape[-2], CHUNK_TOKENS):
        part = slice(start, start + CHUNK_TOKENS)
        z_pos, z_neg = positive[..., part, :].float(), negative[..., part, :].float()
        guided = z_pos * scale - z_neg * (scale - 1.0)
        ratio = guided.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True).clamp_min(L1_FLOOR)
        guided = guided * torch.where(ratio > tau, tau / ratio.clamp_min(L1_FLOOR), torch.ones_like(ratio))
        out[..., part, :] = guided * alpha + z_pos * (1.0 - alpha)
    return out


@dataclass
class NagState:
    """Shared by the processors of one run: the settings, the embedded negative text, and, per call,
    which batch rows get NAG and whether sigma is still above sigma_end. Row counts are read on the CPU
    before the rows go to the device, so no block makes the GPU wait for the CPU."""

    settings: NagSettings
    negative: torch.Tensor  # [1, 512, dim]: the negative text after the transformer's text embedder
    rows: Optional[slice | torch.Tensor] = None  # a slice when contiguous (CFG: negative first), else a [B] mask
    row_count: int = 0
    all_rows: bool = False
    active: bool = False
    calls_with_nag: int = field(default=0)

    def prepare_call(self, *, sigma: float, rows: torch.Tensor, device: torch.device) -> None:
        """`rows`: the batch's NAG rows, on the CPU."""
        self.row_count = int(rows.sum())
        self.all_rows = self.row_count == rows.numel()
        self.active = self.settings.enabled and sigma >= self.settings.sigma_end and self.row_count > 0
        first = int(rows.int().argmax()) if self.row_count else 0
        contiguous = bool(rows[first:first + self.row_count].all())
        # a slice indexes without the GPU reporting back how many rows a mask selects (a wait per block)
        self.rows = slice(first, first + self.row_count) if contiguous else rows.to(device, non_blocking=True)
        self.calls_with_nag += int(self.active)


class NagAttnProcessor:
    """A diffusers WanAttention processor for cross-attention (`blocks[i].attn2`) that adds NAG."""

    def __init__(self, state: NagState, fallback) -> None:
        self.state = state
        self.fallback = fallback  # the block's own processor, used whenever NAG is inactive
        self._negative_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _attention(self, query, key, value):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=getattr(self.fallback, "_attention_backend", None))
        return out.flatten(2, 3).type_as(query)

    def _negative_keys_values(self, attn, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._negative_kv is None:
            negative = self.state.negative.to(device=like.device, dtype=like.dtype)
            key = attn.norm_k(attn.to_k(negative)).unflatten(2, (attn.heads, -1))
            self._negative_kv = key, attn.to_v(negative).unflatten(2, (attn.heads, -1))
        return self._negative_kv

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        state = self.state
        if not state.active or encoder_hidden_states is None or attn.add_k_proj is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        positive = self._attention(query, key, value)
        neg_key, neg_value = self._negative_keys_values(attn, query)
        settings, count = state.settings, state.row_count
        guided_query = query if state.all_rows else query[state.rows]
        negative = self._attention(guided_query, neg_key.expand(count, -1, -1, -1),
                                   neg_value.expand(count, -1, -1, -1))
        if state.all_rows:  # CFG 1: every row is the positive prompt
            combined = nag_combine(positive, negative, scale=settings.scale, tau=settings.tau, alpha=settings.alpha)
        else:
            combined = positive.clone()
            combined[state.rows] = nag_combine(positive[state.rows], negative, scale=settings.scale, tau=settings.tau,
                                               alpha=settings.alpha)
        return attn.to_out[1](attn.to_out[0](combined))


class nag_applied:
    """Context manager: NAG processors on every cross-attention of the transformer for one run, the
    original processors back afterwards (also after an error or a cancel)."""

    def __init__(self, transformer: torch.nn.Module, *, negative_embeddings: torch.Tensor,
                 settings: NagSettings) -> None:
        self.transformer = transformer
        self.negative_embeddings = negative_embeddings
        self.settings = settings
        self.originals: list = []
        self.state: Optional[NagState] = None

    def __enter__(self) -> NagState:
        embedder = self.transformer.condition_embedder.text_embedder
        weight = next(embedder.parameters())
        with torch.no_grad():
            negative = embedder(self.negative_embeddings.to(device=weight.device, dtype=weight.dtype))
        self.state = NagState(settings=self.settings, negative=negative)
        for block in self.transformer.blocks:
            self.originals.append(block.attn2.processor)
            block.attn2.processor = NagAttnProcessor(self.state, block.attn2.processor)
        return self.state

    def __exit__(self, *exc) -> None:
        for block, original in zip(self.transformer.blocks, self.originals):
            block.attn2.processor = original
        self.originals.clear()

