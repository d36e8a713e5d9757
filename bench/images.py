"""The benchmark's image corpus: JPEGs of several sizes, generated (deterministic), or read from a directory."""

from __future__ import annotations

import io
import os
from typing import Optional

SIZES = ((224, 224), (640, 480), (1280, 720))


def generated(sizes: tuple[tuple[int, int], ...] = SIZES, quality: int = 90) -> list[bytes]:
    """Smooth gradients with noise: JPEG sizes close to photographs', unlike solid colours."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        x = np.linspace(0, 255, width)[None, :, None]
        y = np.linspace(0, 255, height)[:, None, None]
        pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) + rng.normal(0, 20, (height, width, 3))
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(out, "JPEG", quality=quality)
        images.append(out.getvalue())
    return images


def load(directory: Optional[str] = None) -> list[bytes]:
    if not directory:
        return generated()
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise SystemExit(f"no .jpg, .jpeg or .png files in {directory}")
    images = []
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            images.append(f.read())
    return images
