"""Answers N MiB (the body says N): what a client that never reads its answer is given, in bench/slow_clients.py."""


def init():
    pass


def run(data):
    return {"ok": "x" * int(float(data or 0) * 1024 * 1024)}
