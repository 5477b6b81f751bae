"""RIFF/WebP chunk surgery: make a still WebP into a one-frame animation.

libwebp's animation encoder writes a still image (VP8X + VP8L + EXIF) when all frames are equal or
there is only one. ComfyUI frontends before ~1.50 walk RIFF chunks without the pad byte of an
odd-sized chunk, so a still whose VP8L chunk has an odd length hides its EXIF chunk
(Comfy-Org/ComfyUI_frontend src/scripts/pnginfo.ts, getWebpMetadata, as shipped in
comfyui-frontend-package 1.27.10, the frontend ComfyUI 0.3.64 pins). Inside an ANMF chunk the image
chunk keeps its pad and ANMF itself is always even, so one-frame animations are read correctly by
every frontend.
(WebP container spec: https://developers.google.com/speed/webp/docs/riff_container)
"""
from __future__ import annotations

import struct

ANIMATION_FLAG, EXIF_FLAG = 0x02, 0x08
IMAGE_CHUNKS = (b"ALPH", b"VP8 ", b"VP8L")


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(fourcc, payload) for each top-level chunk of a WebP file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a RIFF/WEBP file")
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunks.append((fourcc, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")


def _u24(value: int) -> bytes:
    return struct.pack("<I", value)[:3]


def as_animation(data: bytes, duration_ms: int, loop: int) -> bytes:
    """Return `data` unchanged if it is already animated, else the same image as a 1-frame animation."""
    chunks = riff_chunks(data)
    kinds = [fourcc for fourcc, _ in chunks]
    if b"ANMF" in kinds or b"VP8X" not in kinds:
        return data
    vp8x = dict(chunks)[b"VP8X"]
    flags = vp8x[0] | ANIMATION_FLAG
    canvas = vp8x[4:10]  # (width-1, height-1) as two 24-bit values
    frame = b"".join(_chunk(k, p) for k, p in chunks if k in IMAGE_CHUNKS)
    anmf = b"\0" * 6 + canvas + _u24(max(1, min(duration_ms, 0xFFFFFF))) + bytes([0x02])  # no blending
    body = [_chunk(b"VP8X", bytes([flags]) + vp8x[1:4] + canvas),
            _chunk(b"ANIM", b"\0\0\0\0" + struct.pack("<H", loop)),
            _chunk(b"ANMF", anmf + frame)]
    body += [_chunk(k, p) for k, p in chunks if k not in IMAGE_CHUNKS and k != b"VP8X"]
    payload = b"WEBP" + b"".join(body)
    return b"RIFF" + struct.pack("<I", len(payload)) + payload
