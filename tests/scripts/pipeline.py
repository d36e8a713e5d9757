"""A model-process script: preprocess() decodes real JPEGs with Pillow in the HTTP workers, and run_batch() costs a
fixed time per call whatever its size (a sleep: the GIL is free), as a GPU does. Each answer is the mean colour of
its own image, so a test can tell whose answer it got; init() appends its pid to $PIPELINE_INIT_LOG, and preprocess()
its pid, start and end to $PIPELINE_PREPROCESS_LOG.
`?hang=1` makes run_batch() spin in Python forever (a hung model)."""
import io
import os
import time

import numpy as np
from azureml.contrib.services.aml_request import rawhttp
from PIL import Image
from werkzeug.exceptions import BadRequest

COST_S = float(os.environ.get("PIPELINE_COST_S", "0.05"))


def init():
    if os.environ.get("PIPELINE_INIT_LOG"):
        with open(os.environ["PIPELINE_INIT_LOG"], "a") as f:
            f.write(f"{os.getpid()}\n")


def warmup_item():
    return np.zeros((48, 64, 3), np.uint8)


def preprocess(request):
    if request.args.get("hang"):
        return "hang"
    started = time.monotonic()
    try:
        image = Image.open(io.BytesIO(request.get_data())).convert("RGB").resize((64, 48))
    except Exception:
        raise BadRequest("The body is not an image.") from None
    if os.environ.get("PIPELINE_PREPROCESS_LOG"):
        with open(os.environ["PIPELINE_PREPROCESS_LOG"], "a") as f:
            f.write(f"{os.getpid()} {started} {time.monotonic()}\n")
    return np.asarray(image)


@rawhttp
def run(request):
    return run_batch([preprocess(request)])[0]


def run_batch(images):
    if any(isinstance(image, str) for image in images):
        while True:
            pass
    time.sleep(COST_S)
    return [{"mean": [round(float(c)) for c in image.reshape(-1, 3).mean(axis=0)], "batch": len(images),
             "pid": os.getpid()} for image in images]
