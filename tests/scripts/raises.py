"""run() raises on every call except 'ok'."""


def init():
    pass


def run(data):
    if data == "ok":
        return "fine"
    if data == "set":
        return {1, 2}  # not JSON-serializable: the server's own 500
    raise ValueError("the scoring script failed on purpose: SECRET-TRACEBACK-TEXT")
