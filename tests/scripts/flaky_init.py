"""init() fails while the file named by $FLAKY_MARKER exists (a transient failure: a busy disk, a model store down)."""
import os


def init():
    if os.path.exists(os.environ["FLAKY_MARKER"]):
        raise RuntimeError("the model store is unavailable just now")


def run(data):
    return {"pid": os.getpid()}
