"""init() killed by the system while loading (as the OOM killer does): SIGKILL to itself."""
import os
import signal


def init():
    os.kill(os.getpid(), signal.SIGKILL)


def run(data):
    return data
