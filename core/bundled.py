"""The small files shipped in the pack's models/ folder: configs and tokenizer data, never weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelFileNotFoundError

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def bundled_path(*parts: str) -> Path:
    """models/<parts...>, which must exist (a missing one means a broken install, not a user error)."""
    path = BUNDLED_MODELS_DIR.joinpath(*parts)
    if not path.exists():
        raise ModelFileNotFoundError(
            f"The pack's bundled file models/{'/'.join(parts)} is missing ({path}); reinstall Flipbook "
            "(git pull, or the ComfyUI Manager's 'Try fix')."
        )
    return path


def bundled_json(*parts: str) -> dict[str, Any]:
    return json.loads(bundled_path(*parts).read_text())
