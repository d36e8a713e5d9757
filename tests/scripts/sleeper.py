"""run(seconds) sleeps that long: served with a short SCORING_TIMEOUT_MS."""
import time


def init():
    pass


def run(data):
    time.sleep(float(data or 0))
    return {"slept": float(data or 0)}
