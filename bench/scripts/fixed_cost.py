"""run() takes a fixed time (FIXED_COST_MS, default 40 ms, a sleep) whatever the request: a script of known
capacity (1000 / FIXED_COST_MS requests a second per worker), to check what the load scenarios report."""
import os
import time

from azureml.contrib.services.aml_request import rawhttp

COST_S = float(os.environ.get("FIXED_COST_MS", "40")) / 1000


def init():
    pass


@rawhttp
def run(request):
    time.sleep(COST_S)
    return {"slept_ms": COST_S * 1000, "bytes": len(request.get_data())}
