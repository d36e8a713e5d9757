"""A @rawhttp script with run_batch(): every answer says which request it is for and how big its batch was.

Each run_batch() call costs the same fixed time whatever its size (like a GPU), so batching shows as throughput.
A body of 'fail' makes that item fail on its own; 'explode' makes the whole call raise.
"""
import time

from azureml.contrib.services.aml_request import rawhttp
from azureml.contrib.services.aml_response import AMLResponse

COST_S = 0.05


def init():
    pass


@rawhttp
def run(request):
    return run_batch([request])[0]


def run_batch(requests):
    time.sleep(COST_S)
    bodies = [r.get_data(as_text=True) for r in requests]
    if "explode" in bodies:
        raise RuntimeError("the whole batch failed")
    return [AMLResponse({"message": "bad item"}, 400, json_str=True) if b == "fail" else
            ValueError("item failed") if b == "raise" else
            {"tag": b, "batch": len(requests)} for b in bodies]
