"""The real scoring module behind driver.py."""


def init():
    pass


def run(data):
    return {"from": "driver_module", "data": data}
