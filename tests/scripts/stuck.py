"""run() that will not stop at the scoring timeout: blocked in native code ('native': a C sleep), or swallowing
the interruption ('swallow': catches everything for a while, then returns an empty item). Answers carry the pid."""
import ctypes
import os
import time


def init():
    pass


def run(data):
    if data == "native":
        ctypes.CDLL(None).sleep(4)
    if data == "swallow":
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            try:
                time.sleep(0.01)
            except BaseException:  # noqa: B036 - the kind of script the server must survive
                pass
        return {"item": None, "pid": os.getpid()}
    return {"ok": data, "pid": os.getpid()}
