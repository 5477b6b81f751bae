"""Context windows for animations longer than a motion module's positional encoding, and their fusion.

The uniform schedules of AnimateDiff-Evolved (animatediff/context.py, from neggles/animatediff-cli; the same
functions are in ComfyUI's comfy/context_windows.py), with stride 1: at each step the windows are offset by
`ordered_halving(step)` of the clip, so seams move between steps. Standard windows stay inside the clip (a
window that would wrap is shifted to end at the last frame); looped windows wrap around it (a looping video).
Each window is one full model pass; a frame's prediction is the weighted mean over the windows that hold it
(flat weights, or the pyramid 1..L/2, L/2..1). Reference: lightning-breadth.md section 4 (test vectors there).
"""
from __future__ import annotations

import math
from types import MappingProxyType

import torch

from .errors import InvalidSettingError

SCHEDULES = ("standard", "looped")
FUSE_METHODS = ("pyramid", "flat")


def ordered_halving(step: int) -> float:
    """The 64 bits of `step` reversed, as a fraction: 0, 0.5, 0.25, 0.75, 0.125, 0.625, ..."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _raw_windows(frames: int, length: int, overlap: int, step: int, end_overlap: int) -> list[list[int]]:
    shift = ordered_halving(step)
    pad = round(frames * shift)
    return [[(j + t) % frames for t in range(length)]
            for j in range(int(shift) + pad, frames + pad - end_overlap, length - overlap)]


def uniform_looped(frames: int, length: int, overlap: int, step: int, closed_loop: bool = False) -> list[list[int]]:
    """ADE create_windows_uniform_looped, stride 1: windows that may wrap around the clip's end."""
    _check(frames, length, overlap)
    if frames < length:
        return [list(range(frames))]
    return _raw_windows(frames, length, overlap, step, 0 if closed_loop else overlap)


def uniform_standard(frames: int, length: int, overlap: int, step: int) -> list[list[int]]:
    """ADE create_windows_uniform_standard, stride 1: wrapping windows moved to end at the last frame, a plain
    window added where a wrap started, duplicates dropped."""
    _check(frames, length, overlap)
    if frames <= length:
        return [list(range(frames))]
    windows = _raw_windows(frames, length, overlap, step, overlap)
    out: list[list[int]] = []
    for index, window in enumerate(windows):
        wrap = next((i for i in range(1, len(window)) if window[i] < window[i - 1]), None)
        if wrap is None:
            out.append(window)
            continue
        out.append(list(range(frames - length, frames)))  # shift_window_to_end
        start = window[wrap]
        following = windows[index + 1] if index + 1 < len(windows) else []
        if start not in following:
            out.append(list(range(start, start + length)))
    unique: list[list[int]] = []
    for window in out:
        if window not in unique:
            unique.append(window)
    return unique


def _check(frames: int, length: int, overlap: int) -> None:
    if not (0 <= overlap < length):
        raise InvalidSettingError(f"context overlap {overlap}: use 0 to {length - 1} for a context length of {length} "
                                  "(4 is usual).")
    if frames < 1:
        raise InvalidSettingError(f"frames={frames}: at least 1.")


def fuse_weights(method: str, length: int) -> torch.Tensor:
    """Per-frame weights of one window: flat (all 1) or pyramid (1..L/2, L/2..1; odd L: 1..(L+1)/2..1)."""
    if method == "flat":
        return torch.ones(length)
    if method == "pyramid":
        half = list(range(1, math.ceil(length / 2) + 1))
        tail = half[::-1] if length % 2 == 0 else half[-2::-1]
        return torch.tensor(half + tail, dtype=torch.float32)
    raise InvalidSettingError(f"fuse {method!r}: choose one of {', '.join(FUSE_METHODS)}.")


def freenoise(noise: torch.Tensor, *, length: int, overlap: int, seed: int) -> torch.Tensor:
    """FreeNoise (Qiu et al. 2023) as AnimateDiff-Evolved shuffles it (sample_settings._convert_to_freenoise): with
    delta = length - overlap, for window starts s = 0, delta, 2 delta, ... below frames - length, frames
    [s + length, s + length + delta) become a permutation of frames [s, s + delta), in order (later blocks copy
    already shuffled ones), so every window starts from the same noise in another order. [B, C, F, h, w]."""
    out = noise.clone()
    frames, delta = noise.shape[2], length - overlap
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    for start in range(0, max(frames - length, 0), delta):
        target = range(start + length, min(start + length + delta, frames))
        order = torch.randperm(delta, generator=generator)[: len(target)]
        out[:, :, list(target)] = out[:, :, [start + int(i) for i in order]]
    return out


WINDOW_SCHEDULES = MappingProxyType({"standard": uniform_standard, "looped": uniform_looped})


def windowed(forward, *, frames: int, length: int, overlap: int, schedule: str, fuse: str, step_of):
    """A model forward over [B, C, F, h, w] (conditioning [B * F, ...], frames-major per batch row) that runs each
    context window apart and fuses the predictions. `step_of()` gives the sampling step (the window offset)."""
    if schedule not in WINDOW_SCHEDULES:
        raise InvalidSettingError(f"context schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}.")

    def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        windows = WINDOW_SCHEDULES[schedule](frames, length, overlap, step_of())
        total = torch.zeros_like(x, dtype=torch.float32)
        weight_sum = torch.zeros(frames, dtype=torch.float32, device=x.device)
        for window in windows:
            index = torch.tensor(window, device=x.device)
            rows = torch.cat([index + b * frames for b in range(batch)])
            out = forward(x[:, :, index], t, context[rows]).float()
            weights = fuse_weights(fuse, len(window)).to(x.device)
            total[:, :, index] += out * weights.view(1, 1, -1, 1, 1)
            weight_sum.index_add_(0, index, weights)
        return (total / weight_sum.view(1, 1, -1, 1, 1)).to(x.dtype)

    return run
