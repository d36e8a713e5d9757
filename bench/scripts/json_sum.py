"""A script that takes JSON, not images, as many users' do: {"data": [numbers]} -> {"sum": ...}. Sent the bench's
default JPEGs, every request is refused (400: the body is not UTF-8), so the tests can check that bench and tune
say so instead of timing the refusals, and that `--requests DIR` sends it what it takes."""
import json


def init():
    pass


def run(raw_data):
    return {"sum": sum(json.loads(raw_data)["data"])}
