"""Tiny random models (and an input clip or image) under the names a bundled Lightning workflow uses, so every
workflow made of Flipbook nodes runs headless on a CPU: the CLI demos and the workflow tests write them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .tiny_models import (TinySizes, tiny_kohya_lora, tiny_motion_lora, tiny_motion_state_dict, tiny_sd15_state_dict,
                          write_safetensors)

INPUT_SIZE = 64  # the demos sample at 64 px


def _widgets(workflow: dict, node_type: str) -> list[list]:
    return [n["widgets_values"] for n in workflow["nodes"] if n["type"] == node_type and n.get("mode", 0) == 0]


def _write(state: dict, path: Path) -> Path:
    """safetensors, or a weights-only torch file where the workflow names a .ckpt (guoyww's published files)."""
    if path.suffix == ".ckpt":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in state.items()}, path)
        return path
    return write_safetensors(state, path)


def write_lightning_workflow_models(models_dir: Path, workflow: dict, input_dir: Optional[Path] = None,
                                    sizes: TinySizes = TinySizes()) -> list[Path]:
    """Checkpoints, motion modules (Lightning names get Lightning files, others a standard v2 module), image and
    motion LoRAs and Load Video inputs named by the workflow's Flipbook nodes."""
    from .sd15_checkpoint import load_sd15_checkpoint

    written: list[Path] = []
    checkpoints = {w[0] for t in ("FlipbookLightningLoader", "FlipbookLightningTierLoader") for w in _widgets(workflow, t)}
    motions = {w[1] for w in _widgets(workflow, "FlipbookLightningLoader")}
    motions |= {name for w in _widgets(workflow, "FlipbookLightningTierLoader") for name in w[2:5]}
    for name in sorted(checkpoints - {"none"}):
        written.append(write_safetensors(tiny_sd15_state_dict(sizes), models_dir / "checkpoints" / name))
    motion_state = tiny_motion_state_dict(sizes)
    for seed, name in enumerate(sorted(motions)):
        written.append(_write(tiny_motion_state_dict(sizes, seed=10 + seed), models_dir / "animatediff_models" / name))
    for lora in {w[0] for w in _widgets(workflow, "FlipbookMotionLoraLoader")}:
        tensors, _ = tiny_motion_lora(motion_state)
        written.append(_write(tensors, models_dir / "animatediff_motion_lora" / lora))
    image_loras = {w[0] for w in _widgets(workflow, "FlipbookLightningLoraLoader")}
    if image_loras and written:
        networks = load_sd15_checkpoint(written[0])
        for lora in image_loras:
            tensors, _ = tiny_kohya_lora(networks.unet, networks.text_encoder)
            written.append(write_safetensors(tensors, models_dir / "loras" / lora))
    for values in _widgets(workflow, "FlipbookLoadVideo"):
        written.append(write_input_clip((input_dir or models_dir.parent / "input") / values[0]))
    return written


def write_input_clip(path: Path, frames: int = 16) -> Path:
    """A moving colour gradient, as a small MP4 (something for video-to-video to restyle)."""
    from ..core.media.writers import VideoSettings, write_mp4

    y, x = torch.meshgrid(torch.linspace(0, 1, INPUT_SIZE), torch.linspace(0, 1, INPUT_SIZE), indexing="ij")
    clip = torch.stack([torch.stack([(x + t / frames) % 1, y, 1 - x], -1) for t in range(frames)])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, (clip.numpy() * 255).astype("uint8"), VideoSettings(fps=8.0), {})
    return path
