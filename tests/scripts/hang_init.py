"""init() never returns."""
import time


def init():
    time.sleep(3600)


def run(data):
    return data
