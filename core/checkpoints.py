"""Reading model files safely: safetensors (validated, memory-mapped) or weights-only pickles.

No file is ever unpickled with arbitrary globals: `.ckpt`/`.pt`/`.pth`/`.bin` go through
torch.load(weights_only=True) and anything that needs more is refused.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
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
    if not isinstance(header, dict):
        raise CorruptFileError(_corrupt(path, f"its header is a JSON {type(header).__name__}, not an object"))
    data_size = size - 8 - header_len
    for name, info in header.items():
        problem = _metadata_problem(info) if name == "__metadata__" else _entry_problem(info, data_size)
        if problem:
            raise CorruptFileError(_corrupt(path, f"{'its __metadata__' if name == '__metadata__' else repr(name)} "
                                                  f"{problem}"))
    return header


# bytes per element of each safetensors dtype (huggingface/safetensors docs, "Format")
DTYPE_SIZES = MappingProxyType({"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})


def _entry_problem(info: Any, data_size: int) -> Optional[str]:
    """Why a tensor entry is malformed, or None: {dtype, shape, data_offsets [begin, end]} inside the data."""
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_SIZES:
        return f"has no known dtype (got {info.get('dtype') if isinstance(info, dict) else info!r})"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has a malformed shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        return f"has malformed data_offsets {offsets!r}"
    begin, end = offsets
    if not 0 <= begin <= end or end > data_size:
        return (f"ends at byte {end} but only {data_size} data bytes exist (the download was probably cut short)"
                if end > data_size else f"has data_offsets {offsets} out of order")
    if end - begin != math.prod(shape) * DTYPE_SIZES[info["dtype"]]:
        return f"holds {end - begin} bytes but its shape {shape} in {info['dtype']} needs a different size"
    return None


def _metadata_problem(metadata: Any) -> Optional[str]:
    if isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        return None
    return "is not a map of text to text"


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
    except pickle.UnpicklingError:
        # torch's own text (with its advice to turn the safety check off) is deliberately not repeated
        raise UnsafeFileError(
            f"{path.name} is a pickle that would run code when loaded (it holds more than plain tensors), so "
            "Flipbook refuses it. Download the model's .safetensors file instead (the same model is published "
            "as .safetensors on its model page), and delete this file if you do not trust its source."
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
