"""GPU-aware workers: by default one worker per visible GPU, each pinned to its own card.

The master gives each new worker the first GPU no live worker holds (`assign`, before the fork); the worker then
sees only that GPU (`pin`, after the fork, before the entry script imports TensorFlow or PyTorch), so no card is
loaded twice by accident, and a replaced worker takes over its predecessor's card. TensorFlow is told to grow GPU
memory as needed rather than take the whole card. On a machine without a GPU nothing changes.
GPUs are read from CUDA_VISIBLE_DEVICES when set, else from NVML (nvidia-ml-py) when a driver is present.
"""

from __future__ import annotations

import os
from typing import Any, Optional


def visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, no driver, no GPU: all mean "CPU"
        return []


class GpuPinning:
    """Holds the master's view of the GPUs; its two methods are gunicorn's pre_fork and post_fork hooks."""

    def __init__(self, gpus: Optional[list[str]] = None):
        self.gpus = visible_gpus() if gpus is None else gpus
        if self.gpus:
            os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

    def assign(self, arbiter: Any, worker: Any) -> None:
        """Master, before the fork: the first GPU that no live worker holds (round robin past one per GPU)."""
        if not self.gpus:
            return
        held = [w.gpu for w in arbiter.WORKERS.values()]
        free = [g for g in self.gpus if g not in held]
        worker.gpu = free[0] if free else self.gpus[len(held) % len(self.gpus)]

    @staticmethod
    def pin(worker: Any) -> None:
        """Worker, after the fork: see only the assigned GPU."""
        gpu = worker.gpu
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
