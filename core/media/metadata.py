"""The workflow/prompt metadata embedded in saved media, encoded the way every frontend can read it.

Rules (as ComfyUI core's savers build it: Comfy-Org/ComfyUI nodes.py SaveImage and
comfy_extras/nodes_video.py SaveVideo; read back by Comfy-Org/ComfyUI_frontend src/scripts/metadata/):
every `extra_pnginfo` key plus `prompt`; each value JSON-encoded exactly once, ASCII only,
non-finite floats as null (frontends before ~1.50 use plain JSON.parse, not src/utils/jsonUtil.ts
parseJsonWithNonFinite), and `{`/`}` inside JSON strings written as \\u007b/\\u007d because the
WebM reader (src/scripts/metadata/ebml.ts, findJsonEnd) finds the end of the JSON by counting
braces, strings included.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Optional

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _escape_braces_in_strings(text: str) -> str:
    return _JSON_STRING.sub(lambda m: m.group(0).replace("{", "\\u007b").replace("}", "\\u007d"), text)


def encode_value(value: Any) -> str:
    """One metadata value as frontend-safe JSON text (JSON.parse gives back the original data)."""
    text = json.dumps(_finite(value), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return _escape_braces_in_strings(text)


def build_metadata(
    prompt: Optional[Mapping[str, Any]],
    extra_pnginfo: Optional[Mapping[str, Any]],
    disabled: bool = False,
) -> dict[str, str]:
    """{key: json_text} for `prompt` and every extra_pnginfo key (normally `workflow`); {} if disabled."""
    if disabled:
        return {}
    meta: dict[str, str] = {}
    if isinstance(extra_pnginfo, Mapping):
        for key, value in extra_pnginfo.items():
            meta[str(key)] = encode_value(value)
    if prompt is not None:
        meta["prompt"] = encode_value(prompt)
    return meta
