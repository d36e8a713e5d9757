"""run() fails the way models fail: out of memory (Python's, or a framework's by its class name), or otherwise."""
import time


class ResourceExhaustedError(Exception):
    """Stands for tensorflow.errors.ResourceExhaustedError (OOM when allocating a tensor)."""


def init():
    pass


def run(data):
    if data == "oom":
        raise MemoryError("cannot allocate")
    if data == "tf-oom":
        raise ResourceExhaustedError("OOM when allocating tensor with shape[64,3,224,224]")
    if data == "boom":
        raise RuntimeError("some other failure")
    if data.startswith("big"):  # an answer of N MB, for clients that never read it
        return {"ok": "x" * (int(data[3:]) * 1024 * 1024)}
    if data.startswith("sleep"):
        time.sleep(float(data[5:]))
    return {"ok": data}
