"""Batch variations: seed lists, prompt lists and a contact sheet of the clips they make.

Seed lists are written as users write them in other packs' batch nodes (lightning-breadth.md section 8: Efficiency
Nodes' Seeds++ Batch, Comfyroll's integer range lists): "1, 2, 5-8" is 1, 2, 5, 6, 7, 8. Prompt lists are one prompt
per line (Comfyroll CR Prompt List). The fan-out runs inside one node with one model load; each clip is saved on its
own, and the contact sheet puts one frame of each clip in a grid (rows: prompts, columns: seeds).
"""
from __future__ import annotations

import re

import torch

from .errors import InvalidSettingError

MAX_CLIPS = 256  # one queued run; more is a job for several runs (and a disk of files)
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widgets
_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seed_list(text: str) -> list[int]:
    """'1, 2, 5-8' -> [1, 2, 5, 6, 7, 8]: in the order written, repeats kept (a user may want them)."""
    seeds: list[int] = []
    for item in (part for part in re.split(r"[,\n;]", text or "") if part.strip()):
        match = _ITEM.match(item)
        if match is None:
            raise InvalidSettingError(f"seeds: {item.strip()!r} is not a seed or a range; write seeds like "
                                      "'1, 2, 5-8' (whole numbers, ranges low-high).")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low or high > SEED_MAX:
            raise InvalidSettingError(f"seeds: {item.strip()!r} must run from low to high, each 0-{SEED_MAX}.")
        if len(seeds) + high - low + 1 > MAX_CLIPS:
            raise InvalidSettingError(f"seeds: more than {MAX_CLIPS} seeds; split the batch into several runs.")
        seeds.extend(range(low, high + 1))
    if not seeds:
        raise InvalidSettingError("seeds is empty: give at least one seed, e.g. '1, 2, 3' or '100-107'.")
    return seeds


def parse_prompt_list(text: str) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise InvalidSettingError("The prompt list is empty: write one prompt per line.")
    return prompts


def check_batch_size(prompts: int, seeds: int) -> None:
    if prompts * seeds > MAX_CLIPS:
        raise InvalidSettingError(f"{prompts} prompts x {seeds} seeds = {prompts * seeds} clips, more than "
                                  f"{MAX_CLIPS} in one run; split the batch into several runs.")


def contact_sheet(cells: list[list[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """Rows of [H, W, 3] frames -> one image [1, rows*H + gaps, columns*W + gaps, 3] (ComfyUI IMAGE), gaps white."""
    rows, columns = len(cells), max(len(row) for row in cells)
    height, width = cells[0][0].shape[:2]
    sheet = torch.ones(rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3)
    for r, row in enumerate(cells):
        for c, frame in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            sheet[top:top + height, left:left + width] = frame[..., :3].float().cpu()
    return sheet.unsqueeze(0)
