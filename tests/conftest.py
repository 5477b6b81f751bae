"""Loads the pack the way ComfyUI does (spec_from_file_location on the root __init__.py) and
writes tiny random models in the exact key layouts of the real files."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACK = "flipbook_pack"


def load_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


load_pack()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """ComfyUI-style models/ folder with a tiny SD1.5 checkpoint and motion modules in both layouts."""
    from flipbook_pack.lightning import tiny_models as T

    root = tmp_path_factory.mktemp("models")
    ckpt = root / "checkpoints"
    motion = root / "animatediff_models"
    files = {
        "ckpt": T.write_safetensors(T.tiny_sd15_state_dict(), ckpt / "tiny_sd15.safetensors"),
        "original": T.write_safetensors(T.tiny_motion_state_dict(layout="original"),
                                        motion / "animatediff_lightning_4step_comfyui.safetensors"),
        "diffusers": T.write_safetensors(T.tiny_motion_state_dict(layout="diffusers"),
                                         motion / "animatediff_lightning_4step_diffusers.safetensors"),
        "sdxl": T.write_safetensors(T.tiny_motion_state_dict(layout="original", family="sdxl"),
                                    motion / "mm_sdxl_v10_beta.safetensors"),
    }
    return root, files


@pytest.fixture(scope="session")
def lightning_model(tiny_models):
    from flipbook_pack.lightning.pipeline import load_lightning

    _, files = tiny_models
    return load_lightning(files["ckpt"], files["original"], device="cpu")
