"""init() raises: the server must refuse to start, with the traceback."""


def init():
    raise RuntimeError("model file missing: INIT-FAILED-MARKER")


def run(data):
    return data
