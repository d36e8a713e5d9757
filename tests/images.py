"""Test images made on the fly: solid colours (the colour model's checkable inputs) and hostile ones."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb as far as any decoder knows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) \
        + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    """A JPEG whose header is fine and whose data stops early: only a real decode finds it."""
    data = solid((200, 30, 30), (256, 256))
    return data[: len(data) * 3 // 4]
