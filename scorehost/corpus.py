"""The request corpus, in one place: generated images (the benchmarks' bodies), and labelled requests, each with the
status the reference score.py must answer. The parity replay (deploy/parity.py) sends the labelled requests to two
servers and compares; the soak (bench/soak.py) mixes them into its traffic and counts any other status as a failure.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Optional

SIZES = ((224, 224), (640, 480), (1280, 720))


def images(sizes: tuple[tuple[int, int], ...] = SIZES, quality: int = 90) -> list[bytes]:
    """JPEGs of smooth gradients with noise (deterministic): their sizes are close to photographs', unlike solid
    colours."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for width, height in sizes:
        x = np.linspace(0, 255, width)[None, :, None]
        y = np.linspace(0, 255, height)[:, None, None]
        pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) + rng.normal(0, 20, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def load(directory: Optional[str] = None) -> list[bytes]:
    """The .jpg/.jpeg/.png files of `directory`, or the generated images."""
    if not directory:
        return images()
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise SystemExit(f"no .jpg, .jpeg or .png files in {directory}")
    out = []
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            out.append(f.read())
    return out


@dataclasses.dataclass(frozen=True)
class Probe:
    """One request, and the status the reference score.py answers it with."""
    name: str
    content_type: str
    body: bytes
    status: int
    method: str = "POST"


def labelled() -> list[Probe]:
    """Valid requests of each kind score.py takes, then each bad input it refuses."""
    from PIL import Image

    jpegs = images()
    png, gif = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(images(((96, 64),))[0])).save(png, "PNG")
    Image.new("RGB", (8, 8)).save(gif, "GIF")

    def batch(*items: bytes) -> bytes:
        return json.dumps({"images": [base64.b64encode(b).decode() for b in items]}).encode()

    return [
        *(Probe(f"jpeg {w}x{h}", "image/jpeg", body, 200) for (w, h), body in zip(SIZES, jpegs)),
        Probe("png", "image/png", png.getvalue(), 200),
        Probe("json batch of 4", "application/json", batch(*jpegs, jpegs[0]), 200),
        Probe("empty body", "image/jpeg", b"", 400),
        Probe("not an image", "image/jpeg", b"hello world", 400),
        Probe("truncated jpeg", "image/jpeg", jpegs[1][: len(jpegs[1]) // 2], 400),
        Probe("gif", "image/gif", gif.getvalue(), 415),
        Probe("invalid json", "application/json", b"{nope", 400),
        Probe("bad base64", "application/json", b'{"images": ["%%%"]}', 400),
        Probe("junk in a batch", "application/json", batch(jpegs[0], b"junk"), 400),
        Probe("65 images", "application/json", batch(*[jpegs[0]] * 65), 413),
        Probe("GET", "", b"", 405, "GET"),
    ]
