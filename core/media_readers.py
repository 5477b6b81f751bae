"""Readers that follow the ComfyUI frontend's own rules for finding a workflow in a media file.

Used by the tests (and `flipbook inspect`) to prove that what we write is what the frontend
reads: the MP4 reader walks top-level boxes inside the first 64 MiB, then moov/udta/meta with its
`keys` (mdta) and `ilst` boxes, matches `prompt`/`workflow` case-insensitively and parses the
value from the first `{` (reference comfyui-metadata-and-node-api.md §1.5).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

MP4_READ_WINDOW = 64 * 1024 * 1024


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in data[start:end]; stops at a box past the window."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> Optional[tuple[int, int]]:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def read_mp4_metadata(path: str | Path) -> dict[str, Any]:
    """{'workflow': obj, 'prompt': obj} as the frontend's getFromIsobmffFile would return them."""
    with open(path, "rb") as handle:
        data = handle.read(MP4_READ_WINDOW)
    udta = _child(data, 0, len(data), b"udta")
    if udta is None:
        moov = _child(data, 0, len(data), b"moov")
        udta = moov and _child(data, moov[0], moov[1], b"udta")
    meta = udta and _child(data, udta[0], udta[1], b"meta")
    if not meta:
        return {}
    keys_box = _child(data, meta[0] + 4, meta[1], b"keys")
    ilst = _child(data, meta[0] + 4, meta[1], b"ilst")
    if not keys_box or not ilst:
        return {}
    names = _mdta_names(data, *keys_box)
    result: dict[str, Any] = {}
    for kind, start, end in _boxes(data, *ilst):
        index = struct.unpack(">I", kind)[0]
        name = names.get(index, "").lower()
        value_box = _child(data, start, end, b"data")
        if name in ("prompt", "workflow") and value_box:
            text = data[value_box[0] + 8:value_box[1]].decode("utf-8", "replace")
            result[name] = json.loads(text[text.index("{"):])
    return result


def _mdta_names(data: bytes, start: int, end: int) -> dict[int, str]:
    count = struct.unpack(">I", data[start + 4:start + 8])[0]
    names, pos = {}, start + 8
    for index in range(1, count + 1):
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        names[index] = data[pos + 8:pos + size].decode("utf-8", "replace")
        pos += size
    return names
