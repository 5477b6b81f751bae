"""core/media/metadata.py: the frontend-safe JSON encoding and which metadata keys are written."""
from __future__ import annotations

import json

from flipbook_pack.core.media.metadata import build_metadata, encode_value

WAN_NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止"
WORKFLOW = {"nodes": [{"id": 1, "widgets_values": [WAN_NEGATIVE, "open { only", 'say "hi" }}', float("nan"), 1.5,
                                                   "back\\slash\nnew line", "emoji 🎞️"]}], "links": [], "version": 0.4}
PROMPT = {"1": {"class_type": "X", "inputs": {"text": "{a} and {{b}", "inf": float("inf")}}}


def test_encoding_is_ascii_single_json_null_for_nonfinite_and_no_raw_braces_in_strings():
    text = encode_value(WORKFLOW)
    assert text.isascii() and "NaN" not in text
    decoded = json.loads(text)
    assert decoded["nodes"][0]["widgets_values"][:5] == [WAN_NEGATIVE, "open { only", 'say "hi" }}', None, 1.5]
    body = text.replace("\\u007b", "").replace("\\u007d", "")
    assert body.count("{") == body.count("}")


def test_metadata_keys_and_disable_flag():
    meta = build_metadata(PROMPT, {"workflow": WORKFLOW, "extra": [1]})
    assert set(meta) == {"workflow", "extra", "prompt"}
    assert build_metadata(PROMPT, None) == {"prompt": encode_value(PROMPT)}
    assert build_metadata(PROMPT, {"workflow": WORKFLOW}, disabled=True) == {}
