"""The issue-22 proxy of a GPU script, the same in every peer server: `decode` is the request's Pillow decode and
resize (what scorehost's `preprocess()` does in tests/scripts/pipeline.py), `run_batch` costs PIPELINE_COST_S (40 ms)
whatever its size (a sleep, like a GPU call that frees the GIL) and answers each image with its own mean colour and
the size of the call it ran in (and logs that size to $PROXY_STATS). Shared by the peer scripts beside it, which run in their own virtualenvs (not
scorehost's dependencies): each serves POST /score with the peer's own batching. Also the peers' common CLI."""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import time

import numpy as np
from PIL import Image

COST_S = float(os.environ.get("PIPELINE_COST_S", "0.04"))
STATS = os.environ.get("PROXY_STATS")  # a file that gets each call's batch size, for the driver's mean batch


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB").resize((64, 48)))


def from_json(payload: dict) -> bytes:
    """The JPEG of the JSON body {"image": base64} that peers taking JSON only are sent (bench/peers/__init__.py)."""
    return base64.b64decode(payload["image"])


def run_batch(images: list) -> list[dict]:
    time.sleep(COST_S)
    if STATS:
        fd = os.open(STATS, os.O_WRONLY | os.O_APPEND)  # one short write per call: whole, across processes
        os.write(fd, b"%d\n" % len(images))
        os.close(fd)
    return [{"mean": [round(float(c)) for c in image.reshape(-1, 3).mean(axis=0)], "batch": len(images)}
            for image in images]


def free_port() -> int:
    """For the ports a peer opens beside its HTTP one (management, metrics, gRPC)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="the peer's own batching delay bound")
    parser.add_argument("--workers", type=int, default=1, help="model copies")
    return parser.parse_args()
