"""CLIP prompt encoding for SD1.5, with the tokenizer data bundled in models/ (or ComfyUI's copy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import logging

import torch

from .sd15_checkpoint import MODELS_DIR

BUNDLED_TOKENIZER = MODELS_DIR / "clip_tokenizer"
CONTEXT_LENGTH = 77
log = logging.getLogger(__name__)


def load_tokenizer(directory: Optional[str | Path] = None):
    """CLIP BPE tokenizer from vocab.json + merges.txt in `directory` (default: the bundled copy)."""
    from transformers import CLIPTokenizer

    directory = Path(directory) if directory else BUNDLED_TOKENIZER
    return CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
        model_max_length=CONTEXT_LENGTH,
    )


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompt: str, device: torch.device) -> torch.Tensor:
    """[1, 77, D] last hidden states, as diffusers' StableDiffusion pipelines use (prompts over 77 tokens are cut)."""
    full = len(tokenizer(prompt).input_ids)
    if full > CONTEXT_LENGTH:
        log.warning("prompt has %d tokens; SD1.5's text encoder reads the first %d, the rest is ignored: %r",
                    full, CONTEXT_LENGTH, prompt[-60:])
    ids = tokenizer(
        prompt, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]
