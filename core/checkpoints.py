"""Reading model files safely: safetensors (validated, memory-mapped) or weights-only pickles.

No file is ever unpickled with arbitrary globals: `.ckpt`/`.pt`/`.pth`/`.bin` go through
torch.load(weights_only=True) and anything that needs more is refused.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .errors import (CorruptFileError, ModelFileChangedError, ModelFileNotFoundError, UnsafeFileError,
                     UnsupportedCheckpointError)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking every tensor lies inside the file."""
    path = Path(path)
    _require_file(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(_corrupt(path, f"it is only {size} bytes long"))
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CorruptFileError(_corrupt(path, f"its header claims {header_len} bytes but the file has {size}"))
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(_corrupt(path, f"its header is not valid JSON ({exc})")) from None
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if end is None or end > data_size:
            raise CorruptFileError(
                _corrupt(path, f"tensor {name!r} ends at byte {end} but only {data_size} data bytes exist "
                         "(the download was probably cut short)")
            )
    return header


_shared: Optional[dict[Path, dict[str, torch.Tensor]]] = None  # set inside `shared_reads()`


@contextmanager
def shared_reads() -> Iterator[None]:
    """Within this block a file is read once however often it is asked for (loading several networks
    from one checkpoint would otherwise unpickle a .ckpt once per network)."""
    global _shared
    outer, _shared = _shared, ({} if _shared is None else _shared)
    try:
        yield
    finally:
        _shared = outer


def file_fingerprint(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size, mtime in ns): enough to notice that a model file was replaced since it was loaded."""
    _require_file(Path(path))
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def load_state_dict(path: str | os.PathLike[str], *, expect: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a model file on the CPU (safetensors memory-mapped), refusing unsafe pickles.

    `expect`: the file's fingerprint when it was first loaded; weights read again later (after ComfyUI
    unloaded them) must come from the same file, not from one replaced in the meantime.
    """
    path = Path(path)
    if expect is not None and file_fingerprint(path) != expect:
        raise ModelFileChangedError(
            f"{path.name} changed on disk since it was loaded (size/time {expect} -> {file_fingerprint(path)}), "
            "so its weights cannot be read again. Run the loader node again (change an input or restart) to "
            "load the new file."
        )
    if _shared is not None:
        key = path.resolve()
        if key not in _shared:
            _shared[key] = _read(path)
        return dict(_shared[key])
    return _read(path)


def _read(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _load_weights_only_pickle(path)
    if suffix not in SAFETENSORS_SUFFIXES:
        raise UnsupportedCheckpointError(
            f"{path.name}: Flipbook reads .safetensors/.sft files and weights-only {', '.join(PICKLE_SUFFIXES)} "
            f"pickles, not {suffix or 'files without an extension'}. Use the model's .safetensors release."
        )
    read_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise CorruptFileError(_corrupt(path, str(exc))) from None


def _load_weights_only_pickle(path: Path) -> dict[str, torch.Tensor]:
    _require_file(path)
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path.name} is a pickle that needs code beyond plain tensors to load ({exc}). Flipbook never "
            "runs code from model files. Use the .safetensors release of this model, or convert the file "
            "in a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CorruptFileError(_corrupt(path, str(exc))) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UnsafeFileError(f"{path.name} does not hold a plain tensor dictionary; use a .safetensors file.")
    return loaded


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ModelFileNotFoundError(
            f"Model file not found: {path}. Put it in the folder ComfyUI lists for this loader, "
            "or fix the file name in the workflow."
        )


def _corrupt(path: Path, why: str) -> str:
    return f"{path.name} is not a valid safetensors file: {why}. Download it again and check its size."
