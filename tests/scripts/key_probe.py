"""run() reports where the server's key can be read from inside the entry script: its environment, its command
line, and the /proc files of its process and its parent."""
import os
import sys


def init():
    pass


def run(key):
    places = {"os.environ": "\n".join(f"{k}={v}" for k, v in os.environ.items()), "sys.argv": " ".join(sys.argv)}
    for who, pid in (("self", os.getpid()), ("parent", os.getppid())):
        for name in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{name}", "rb") as f:
                places[f"/proc/{who}/{name}"] = f.read().decode("latin-1")
    return sorted(place for place, text in places.items() if key in text)
