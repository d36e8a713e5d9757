"""A normal-looking script that is not thread-safe: it keeps its input in a module global across a 5 ms model call,
and shows the headers it was given (to check that the key never reaches it)."""
import time

from azureml.contrib.services.aml_request import rawhttp

LAST = None


def init():
    pass


@rawhttp
def run(request):
    global LAST
    LAST = request.get_data(as_text=True)
    time.sleep(0.005)
    return {"echo": LAST, "headers": sorted(k.lower() for k in request.headers.keys())}
