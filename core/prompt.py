"""ComfyUI's prompt syntax, shared by every text encoder: `(word)` x1.1, `(text:1.3)`, `\\(` literal;
for CLIP (SD1.5) also prompts longer than 77 tokens in 75-token chunks, so prompts copied from
ComfyUI workflows mean the same here.

Semantics (ComfyUI comfy/sd1_clip.py, re-implemented): nested parentheses multiply the weight by
1.1; `(text:w)` sets it to w; words are never split across chunks unless longer than half a chunk;
each chunk is BOS + 75 tokens + EOS, padded with EOS; a weighted token's embedding is moved away
from the empty prompt's embedding at the same position: z = (z - z_empty) * w + z_empty.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import InvalidSettingError

WEIGHT_RANGE = (-10.0, 10.0)  # ComfyUI takes any float; NaN/inf gives black frames, |w| > 10 only noise
CHUNK_TOKENS = 75  # 77 minus BOS and EOS
EMBEDDING_PREFIX = "embedding:"  # ComfyUI's textual-inversion syntax, e.g. embedding:EasyNegative
_OPEN, _CLOSE = "\0\1", "\0\2"  # stand-ins for escaped \( and \)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """'a (b:1.5) ((c))' -> [('a ', 1.0), ('b', 1.5), ('c', 1.21)]."""
    return _parse(text.replace("\\(", _OPEN).replace("\\)", _CLOSE), 1.0)


def _parse(text: str, weight: float) -> list[tuple[str, float]]:
    """Split `text` into top-level groups; recurse into each (…) group with its weight."""
    out: list[tuple[str, float]] = []
    depth, group_start, last = 0, 0, 0
    for index, char in enumerate(text):
        if char == "(":
            if depth == 0:
                if index > last:
                    out.append((text[last:index], weight))
                group_start = index
            depth += 1
        elif char == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                out += _group(text[group_start + 1:index], weight)
                last = index + 1
    if last < len(text):
        out.append((text[last:], weight))  # an unclosed "(" stays literal text
    return [(_unescape(part), w) for part, w in out if part]


def _group(inner: str, weight: float) -> list[tuple[str, float]]:
    colon = inner.rfind(":")
    explicit = _number(inner[colon + 1:]) if colon > 0 else None
    if explicit is None:
        return _parse(inner, weight * 1.1)
    low, high = WEIGHT_RANGE
    if not math.isfinite(explicit) or not low <= explicit <= high:
        raise InvalidSettingError(
            f"Prompt weight ({_unescape(inner)}) is {explicit}: weights must be finite numbers from {low} to {high} "
            "(0-2 is usual, 1 = unchanged). Fix the number after the colon."
        )
    return _parse(inner[:colon], explicit)


def _number(text: str) -> Optional[float]:
    """The weight after a colon, or None when it is not a number (then '(a:b)' is plain text x1.1, as ComfyUI)."""
    try:
        return float(text)
    except ValueError:
        return None


def _unescape(text: str) -> str:
    return text.replace(_OPEN, "(").replace(_CLOSE, ")")


def tokenize_weighted(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """Chunks of (token id, weight), each BOS + up to 75 tokens + EOS + EOS padding to 77."""
    words: list[tuple[list[int], float]] = []
    for segment, weight in parse_weights(text):
        for word in segment.replace("\n", " ").split(" "):
            if word and not word.lower().startswith(EMBEDDING_PREFIX):
                ids = tokenizer(word, add_special_tokens=False).input_ids
                words.append((ids, weight))
    chunks: list[list[tuple[int, float]]] = [[]]
    for ids, weight in words:
        room = CHUNK_TOKENS - len(chunks[-1])
        if len(ids) > room and len(ids) <= CHUNK_TOKENS // 2 and chunks[-1]:
            chunks.append([])  # keep a short word whole in the next chunk
        for token in ids:
            if len(chunks[-1]) == CHUNK_TOKENS:
                chunks.append([])
            chunks[-1].append((token, weight))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[(bos, 1.0), *chunk, (eos, 1.0)] + [(eos, 1.0)] * (CHUNK_TOKENS - len(chunk)) for chunk in chunks]


def embedding_names(text: str) -> list[str]:
    """Textual-inversion references in a prompt (not supported yet: they are left out, with a note)."""
    words = (word for segment, _ in parse_weights(text) for word in segment.replace("\n", " ").split(" "))
    return [word[len(EMBEDDING_PREFIX):].strip(",") for word in words if word.lower().startswith(EMBEDDING_PREFIX)]


@torch.no_grad()
def encode_weighted(tokenizer, text_encoder: torch.nn.Module, text: str, device: torch.device) -> torch.Tensor:
    """[1, 77 * chunks, D]: each chunk encoded alone, weights applied against the empty prompt, concatenated."""
    chunks = tokenize_weighted(tokenizer, text)
    ids = torch.tensor([[token for token, _ in chunk] for chunk in chunks], device=device)
    z = text_encoder(ids)[0]
    weights = torch.tensor([[w for _, w in chunk] for chunk in chunks], device=device, dtype=z.dtype)
    if bool((weights != 1.0).any()):
        empty = torch.tensor([[token for token, _ in tokenize_weighted(tokenizer, "")[0]]], device=device)
        z_empty = text_encoder(empty)[0]
        z = (z - z_empty) * weights[..., None] + z_empty
    return z.reshape(1, -1, z.shape[-1])


def match_lengths(contexts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat each [1, 77*k, D] to a common length (the LCM); cross-attention over a sequence
    repeated whole gives exactly the same output, so nothing changes but the batch fits."""
    lengths = [c.shape[1] for c in contexts]
    target = math.lcm(*lengths)
    return [c.repeat(1, target // c.shape[1], 1) for c in contexts]


MAX_CONTEXT_REPEAT = 4  # ComfyUI comfy/conds.py CONDCrossAttn.can_concat: no batch when lcm / shortest > 4


def join_contexts(contexts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One CFG batch of contexts of different lengths, or None when padding them to a common length
    would cost more than running them apart (a 28-chunk prompt against a 27-chunk negative would
    repeat both to 756 chunks)."""
    lengths = [c.shape[1] for c in contexts]
    if math.lcm(*lengths) // min(lengths) > MAX_CONTEXT_REPEAT:
        return None
    return torch.cat(match_lengths(contexts))
