"""How many GPUs this process may use, for the default worker count (one worker, one model copy, per GPU).

Read from CUDA_VISIBLE_DEVICES when set, else from NVML (nvidia-ml-py) when a driver is present; 0 on a CPU machine.
"""

from __future__ import annotations

import os


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


def default_workers() -> int:
    return max(1, len(visible_gpus()))
