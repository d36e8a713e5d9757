"""Undecorated run(): gets the POST body as a string, or the GET query as a JSON string."""
import json


def init():
    pass


def run(data):
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return {"raw": data, "parsed": parsed, "type": type(data).__name__}
