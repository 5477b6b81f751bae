"""Readers that follow the ComfyUI frontend's own rules for finding a workflow in a media file.

Used by the tests (and `flipbook inspect`) to prove that what we write is what the frontend
reads: the MP4 reader walks top-level boxes inside the first 64 MiB, then moov/udta/meta with its
`keys` (mdta) and `ilst` boxes, matches `prompt`/`workflow` case-insensitively and parses the
value from the first `{` (Comfy-Org/ComfyUI_frontend src/scripts/metadata/isobmff.ts,
getFromIsobmffFile; the other formats' readers are its siblings there and src/scripts/pnginfo.ts).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

MP4_READ_WINDOW = 64 * 1024 * 1024


def _strict_json(text: str) -> Any:
    """JSON.parse as frontend 1.27 does it: NaN/Infinity are errors (Python's json accepts them)."""
    def refuse(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not JSON", text, 0)

    return json.loads(text, parse_constant=refuse)


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
            result[name] = _strict_json(text[text.index("{"):])
    return result


def _mdta_names(data: bytes, start: int, end: int) -> dict[int, str]:
    count = struct.unpack(">I", data[start + 4:start + 8])[0]
    names, pos = {}, start + 8
    for index in range(1, count + 1):
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        names[index] = data[pos + 8:pos + size].decode("utf-8", "replace")
        pos += size
    return names


WEBM_READ_WINDOW = 2 * 1024 * 1024
_SIMPLE_TAG, _TAG_NAME, _TAG_STRING = b"\x67\xc8", b"\x45\xa3", b"\x44\x87"


def _vint(data: bytes, pos: int) -> tuple[int, int]:
    """EBML variable-length size at `pos` -> (value, length in bytes)."""
    first = data[pos]
    length = 8 - first.bit_length() + 1
    value = first & ((1 << (8 - length)) - 1)
    for byte in data[pos + 1:pos + length]:
        value = (value << 8) | byte
    return value, length


def _json_end_by_brace_count(text: str) -> int:
    """The released frontends' findJsonEnd: counts braces without regard to strings."""
    depth = 0
    for index, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if depth == 0 and char == "}":
            return index + 1
    return -1


def read_webm_metadata(path: str | Path) -> dict[str, Any]:
    """{'workflow', 'prompt'} as getFromWebmFile returns them (2 MiB window, upper-case tag names)."""
    with open(path, "rb") as handle:
        data = handle.read(WEBM_READ_WINDOW)
    if data[:4] != b"\x1a\x45\xdf\xa3":
        return {}
    result: dict[str, Any] = {}
    pos = data.find(_SIMPLE_TAG)
    while pos != -1:
        size, n = _vint(data, pos + 2)
        name, value = _simple_tag(data, pos + 2 + n, pos + 2 + n + size)
        if name in ("PROMPT", "WORKFLOW") and value is not None:
            text = value[value.find("{"):].split("\0", 1)[0]
            end = _json_end_by_brace_count(text)
            if end > 0:
                try:
                    result[name.lower()] = _strict_json(text[:end])
                except json.JSONDecodeError:
                    pass
        pos = data.find(_SIMPLE_TAG, pos + 2)
    return result


def _simple_tag(data: bytes, start: int, end: int) -> tuple[Optional[str], Optional[str]]:
    name = value = None
    pos = start
    while pos + 3 <= min(end, len(data)):
        element = data[pos:pos + 2]
        size, n = _vint(data, pos + 2)
        payload = data[pos + 2 + n:pos + 2 + n + size]
        if element == _TAG_NAME:
            name = payload.split(b"\0", 1)[0].decode("ascii", "replace").strip()
        elif element == _TAG_STRING:
            value = payload.decode("utf-8", "replace")
        pos += 2 + n + size
    return name, value


def read_webp_metadata(path: str | Path, legacy_padding_bug: bool = False) -> dict[str, Any]:
    """getWebpMetadata: first EXIF chunk, IFD0 ASCII values split at the first ':'.

    legacy_padding_bug=True walks chunks the way frontend 1.27 does (ignoring RIFF pad bytes).
    """
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return {}
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if kind == b"EXIF":
            return _parse_json_values(_exif_ascii(data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (0 if legacy_padding_bug else size & 1)
    return {}


def _exif_ascii(exif: bytes) -> dict[str, str]:
    if exif.startswith(b"Exif\0\0"):
        exif = exif[6:]
    order = "<" if exif[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", exif[4:8])
    (count,) = struct.unpack(order + "H", exif[ifd:ifd + 2])
    values = {}
    for i in range(count):
        entry = exif[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
        _tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        if kind != 2:
            continue
        raw = entry[8:8 + n] if n <= 4 else exif[struct.unpack(order + "I", entry[8:12])[0]:][:n]
        key, _, value = raw[: n - 1].decode("utf-8", "replace").partition(":")
        values[key] = value
    return {k.lower() if k in ("Workflow", "Prompt") else k: v for k, v in values.items()}


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """getFromPngBuffer: tEXt / comf chunks anywhere in the file (keys case-sensitive)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return {}
    texts, pos = {}, 8
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind in (b"tEXt", b"comf"):
            key, _, value = data[pos + 8:pos + 8 + size].partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("utf-8", "replace")
        pos += 12 + size
    return _parse_json_values(texts)


def _parse_json_values(texts: dict[str, str]) -> dict[str, Any]:
    """handleFile: only `workflow` and `prompt` count, each JSON-parsed."""
    out = {}
    for key in ("workflow", "prompt"):
        if key in texts:
            try:
                out[key] = _strict_json(texts[key])
            except json.JSONDecodeError:
                pass
    return out


READERS = {".mp4": read_mp4_metadata, ".mov": read_mp4_metadata, ".m4v": read_mp4_metadata,
           ".webm": read_webm_metadata, ".webp": read_webp_metadata, ".png": read_png_metadata}


def read_workflow(path: str | Path) -> dict[str, Any]:
    """What ComfyUI's frontend would restore from this file ({} for GIF and unknown types)."""
    reader = READERS.get(Path(path).suffix)  # the frontend's extension checks are case-sensitive
    return reader(path) if reader else {}
