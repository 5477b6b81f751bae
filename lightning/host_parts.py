"""SD1.5 networks handed over by the host instead of read from a checkpoint file (ComfyUI's MODEL, VAE, CLIP).

ComfyUI keeps SD1.5 networks under their LDM names (BaseModel.diffusion_model.*, VAE.first_stage_model.*) with
the patches its LoRA nodes added beside them. The host computes the patched tensors; they go through the same
LDM converter as a file's (sd15_checkpoint.py), so a chain CheckpointLoaderSimple -> LoraLoader -> Flipbook loads
exactly the weights ComfyUI's own sampler would use. A CLIP stays the host's: it encodes the prompt itself, with
its embeddings, CLIP skip and prompt weighting. Parts not handed over come from the checkpoint file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from ..core.checkpoints import file_fingerprint, load_state_dict
from ..core.errors import InvalidSettingError, UnsupportedCheckpointError
from ..core.families import detect_base_family
from .sd15_checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, SD15Layout, family_message, inspect_sd15_state

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class HostWeights:
    """One network's tensors, named as in the LDM file without its prefix (`input_blocks.0.0.weight`)."""

    stored: Callable[[], Tensors]  # as the host holds them: read for their shapes only
    patched: Callable[[], Tensors]  # what to load: the host's patches applied, on the CPU


@dataclass(frozen=True)
class HostParts:
    unet: Optional[HostWeights] = None
    vae: Optional[HostWeights] = None
    encode_text: Optional[Callable[[str], torch.Tensor]] = None  # prompt -> [1, tokens, 768]

    @property
    def given(self) -> tuple[str, ...]:
        return tuple(name for name, part in (("MODEL", self.unet), ("CLIP", self.encode_text), ("VAE", self.vae))
                     if part is not None)


def combined_layout(checkpoint: Optional[Path], host: HostParts) -> SD15Layout:
    """The layout of the host's parts with the rest from `checkpoint`; refuses a missing part naming both ways to
    give it. The checkpoint is not read when the host gives every part."""
    hosted = {UNET_PREFIX: host.unet, VAE_PREFIX: host.vae}
    from_file = [prefix for prefix, part in hosted.items() if part is None]
    if host.encode_text is None:
        from_file.append(CLIP_PREFIX)
    if from_file and checkpoint is None:
        missing = [name for prefix, name in ((UNET_PREFIX, "MODEL"), (CLIP_PREFIX, "CLIP"), (VAE_PREFIX, "VAE"))
                   if prefix in from_file]
        raise InvalidSettingError(
            f"No checkpoint chosen and no {', '.join(missing)} connected: choose ckpt_name, or connect "
            f"{' and '.join(missing)} (e.g. from Load Checkpoint).")
    file_state: dict[str, torch.Tensor] = {}
    read_file: Callable[[str], Tensors] = lambda prefix: {}  # noqa: E731
    if from_file:
        fingerprint = file_fingerprint(checkpoint)
        file_state = load_state_dict(checkpoint)  # memory-mapped: shapes only
        family = detect_base_family(file_state)
        if family != "sd15" and not (family == "unknown" and _has_sd15_parts(file_state, from_file)):
            raise UnsupportedCheckpointError(family_message(checkpoint.name, family))

        def read_file(prefix: str) -> Tensors:
            return {k: v for k, v in load_state_dict(checkpoint, expect=fingerprint).items() if k.startswith(prefix)}

    def read(prefix: str) -> Tensors:
        part = hosted.get(prefix)
        return _prefixed(prefix, part.patched()) if part is not None else read_file(prefix)

    state = {k: v for k, v in file_state.items() if k.startswith(tuple(from_file))}
    for prefix, part in hosted.items():
        if part is not None:
            state.update(_prefixed(prefix, part.stored()))
    return inspect_sd15_state(describe(checkpoint, host), state, read=read, with_text_encoder=host.encode_text is None)


def _has_sd15_parts(state: Tensors, prefixes: list[str]) -> bool:
    # a file without a text encoder (UNet-only or VAE-only exports) is fine when CLIP is connected
    return all(any(k.startswith(prefix) for k in state) for prefix in prefixes)


def _prefixed(prefix: str, tensors: Tensors) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def describe(checkpoint: Optional[Path], host: HostParts) -> str:
    """How the model is named in notes and errors: what came from where."""
    inputs = f"the {'/'.join(host.given)} input{'s' if len(host.given) > 1 else ''}"
    if len(host.given) == 3 or checkpoint is None:
        return inputs
    return f"{checkpoint.name} with {inputs}"
