"""The one place that touches ComfyUI (folder_paths, comfy.utils, comfy.model_management, cli args).

Every function works without ComfyUI too, against a `HeadlessHost` (models and output folders in
ComfyUI's layout) that the `flipbook` CLI and the tests configure, so the same node classes run
inside ComfyUI and headless.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import ModelFileNotFoundError

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
ANIMATEDIFF_FOLDER = "animatediff_models"  # the folder name AnimateDiff-Evolved registers; users already have it


@dataclass
class HeadlessHost:
    models_dir: Path
    output_dir: Path
    disable_metadata: bool = False
    input_dir: Optional[Path] = None


_headless: Optional[HeadlessHost] = None


def use_headless(host: Optional[HeadlessHost]) -> None:
    """Point the nodes at plain folders instead of a running ComfyUI (CLI and tests)."""
    global _headless
    _headless = host


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _folder_paths():
    return None if _headless is not None else _module("folder_paths")


def register_model_folders() -> None:
    """Inside ComfyUI: add models/animatediff_models to that model folder (as AnimateDiff-Evolved does),
    also when extra_model_paths.yaml or another pack already registered the name."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return
    folder_paths.add_model_folder_path(ANIMATEDIFF_FOLDER, str(Path(folder_paths.models_dir) / ANIMATEDIFF_FOLDER))
    extensions = folder_paths.folder_names_and_paths[ANIMATEDIFF_FOLDER][1]
    if extensions:  # an empty set means "every file"; otherwise make sure model files are listed
        extensions.update(MODEL_SUFFIXES)


def _inside(root: Path, name: str, what: str) -> Path:
    """root/name, refusing absolute names and '..' (symlinked files inside the folder are fine)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not name:
        raise ModelFileNotFoundError(f"{name!r} points outside the {what} ({root}); use a name inside it.")
    return root / relative


def model_names(folder: str) -> list[str]:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return list(folder_paths.get_filename_list(folder))
    if _headless is None:
        return []
    root = _headless.models_dir / folder
    files = root.rglob("*") if root.is_dir() else []
    return sorted(p.relative_to(root).as_posix() for p in files if p.suffix.lower() in MODEL_SUFFIXES)


def model_path(folder: str, name: str) -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        found = folder_paths.get_full_path(folder, name)
        if found:
            return Path(found)
        where = ", ".join(folder_paths.get_folder_paths(folder))
    else:
        root = _headless.models_dir / folder if _headless else Path(folder)
        candidate = _inside(root, name, f"{folder} folder")
        if candidate.is_file():
            return candidate
        where = str(root)
    raise ModelFileNotFoundError(f"{name!r} is not in the {folder} folder ({where}). Put the file there and refresh.")


def output_dir() -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return _headless.output_dir if _headless else Path("output")


def metadata_disabled() -> bool:
    if _headless is not None:
        return _headless.disable_metadata
    cli_args = _module("comfy.cli_args")
    return bool(cli_args and getattr(cli_args.args, "disable_metadata", False))


def clip_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's own copy of the CLIP tokenizer when running inside it (else the bundled one is used)."""
    sd1_clip = None if _headless is not None else _module("comfy.sd1_clip")
    if sd1_clip is None:
        return None
    folder = Path(sd1_clip.__file__).parent / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


def progress_reporter(total: int) -> Callable[[int, int], None]:
    """A (done, total) callback driving ComfyUI's progress bar; each update is also a cancel point."""
    utils = None if _headless is not None else _module("comfy.utils")
    management = None if _headless is not None else _module("comfy.model_management")
    bar = utils.ProgressBar(total) if utils is not None else None

    def report(done: int, of: int) -> None:
        if management is not None:
            management.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update_absolute(done, of)
        else:
            log.info("progress %d/%d", done, of)

    return report


def v3_api():
    """comfy_api.latest (io, ComfyExtension) when running inside a ComfyUI that has it."""
    if _headless is not None:
        return None
    return _module("comfy_api.latest")


def make_room(bytes_needed: int) -> None:
    """Inside ComfyUI: have its model manager unload other models until this much device memory is free.

    Flipbook's models live outside ComfyUI's model management, so without this a previous workflow's
    checkpoint could stay in VRAM next to ours.
    """
    management = None if _headless is not None else _module("comfy.model_management")
    if management is None:
        return
    device = management.get_torch_device()
    if getattr(device, "type", "cpu") != "cpu":
        management.free_memory(bytes_needed, device)


def torch_device() -> Optional[str]:
    """The device ComfyUI computes on (honours --cpu, --directml, --cuda-device); None when headless."""
    management = None if _headless is not None else _module("comfy.model_management")
    return str(management.get_torch_device()) if management is not None else None


def has_video_api() -> bool:
    api = v3_api()
    return api is not None and hasattr(api, "InputImpl") and hasattr(getattr(api, "InputImpl"), "VideoFromComponents")


def video_from_frames(images, fps: float, audio=None):
    """ComfyUI's native VIDEO object (comfy_api VideoFromComponents) for our frames."""
    from fractions import Fraction

    api = v3_api()
    components = api.Types.VideoComponents(images=images, frame_rate=Fraction(fps).limit_denominator(1001),
                                           audio=audio)
    return api.InputImpl.VideoFromComponents(components)


def _input_dir() -> Path:
    folder_paths = _folder_paths()
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return _headless.input_dir if _headless and _headless.input_dir else Path("input")


def input_files() -> list[str]:
    """Video files in ComfyUI's input folder (top level, as core LoadVideo lists them)."""
    from ..core.media.load_video import VIDEO_SUFFIXES

    folder = _input_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def input_path(name: str) -> Path:
    """A file in ComfyUI's input folder ('name [output]'/'[temp]' annotations as ComfyUI reads them);
    absolute names and '..' are refused: a workflow must not read arbitrary files of the server."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return _inside(_input_dir(), name, "input folder")
    plain, root = name, Path(folder_paths.get_input_directory())
    for tag, getter in ((" [output]", "get_output_directory"), (" [temp]", "get_temp_directory"),
                        (" [input]", "get_input_directory")):
        if name.endswith(tag):
            plain, root = name[: -len(tag)], Path(getattr(folder_paths, getter)())
    return _inside(root, plain, "input folder")


def compute_dtype():
    """ComfyUI's precision choice for this device (honours --force-fp32, cards where fp16 is broken); None headless."""
    management = None if _headless is not None else _module("comfy.model_management")
    if management is None:
        return None
    import torch

    device = management.get_torch_device()
    if management.should_use_fp16(device):
        return torch.float16
    if management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32
