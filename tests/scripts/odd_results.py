"""A run_batch() script whose results misbehave on the way back, for the model-process fault tests:
'lock' returns a result that does not pickle (it holds a lock); 'local' returns an instance of a class that only
init() created, so the HTTP worker cannot unpickle it; 'refused' returns werkzeug's BadRequest (its status); preprocess('nap:S') sleeps S seconds (in C: the scoring
deadline cannot interrupt it); anything else is echoed with the model process's pid."""
import os
import sys
import threading
import time
import types

from werkzeug.exceptions import BadRequest


def init():
    module = types.ModuleType("made_in_init")
    exec("class Result:\n    def __init__(self, value):\n        self.value = value\n", module.__dict__)
    sys.modules["made_in_init"] = module
    global Result
    Result = module.Result


def preprocess(data):
    if data.startswith("nap:"):
        time.sleep(float(data[4:]))
    return data


def run(data):
    return run_batch([data])[0]


def run_batch(items):
    out = []
    for item in items:
        if item == "lock":
            out.append({"lock": threading.Lock()})
        elif item == "local":
            out.append(Result(item))
        elif item == "refused":
            out.append(BadRequest("This item is not for this model."))
        else:
            out.append({"echo": item, "pid": os.getpid()})
    return out
