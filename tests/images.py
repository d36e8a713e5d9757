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


def scan_bomb(repeats: int = 1000) -> bytes:
    """A progressive JPEG whose last scan is repeated: small, and every copy is decoded over the whole image."""
    out = io.BytesIO()
    Image.new("RGB", (600, 400), (90, 120, 150)).save(out, "JPEG", progressive=True)
    data = out.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats + data[end:]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height: its size is read from the header alone."""
    data = bytearray(solid((9, 9, 9), (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def sideways(rgb_left: tuple[int, int, int], rgb_right: tuple[int, int, int], orientation: int = 3) -> bytes:
    """A JPEG stored upside down (left half rgb_right), with the EXIF note that says to turn it 180 degrees."""
    image = Image.new("RGB", (64, 32), rgb_right)
    image.paste(rgb_left, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()
