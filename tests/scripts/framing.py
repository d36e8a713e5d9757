"""@rawhttp run() for the HTTP framing tests: 'liar' answers 30 bytes under a Content-Length of 5; 'big:S' sleeps
S seconds and answers 8 MiB; 'nap:S' sleeps S seconds and echoes; `?reason=R` and `?header=N` put the query's
text into the status line's reason and a header's name, as a script that reflects its input would; 'fork' forks,
and the child returns from run() too; anything else is echoed with the request id and X-Forwarded-For headers the
script saw."""
import os
import time

from azureml.contrib.services.aml_request import rawhttp
from azureml.contrib.services.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request):
    data = request.get_data(as_text=True)
    if "reason" in request.args:
        return AMLResponse("odd", f"200 {request.args['reason']}")
    if "header" in request.args:
        return AMLResponse("odd", 200, {f"X-{request.args['header']}": "1"})
    if data == "fork":
        return {"child": os.fork() == 0}
    if data == "liar":
        return AMLResponse("x" * 30, 200, {"Content-Length": "5"})
    if data.startswith("nap:"):
        time.sleep(float(data[4:]))
    if data.startswith("big:"):
        time.sleep(float(data[4:]))
        return AMLResponse("y" * (8 << 20), 200)
    return {"echo": data, "x-request-id": request.headers.get("x-request-id"),
            "forwarded": request.headers.get("X-Forwarded-For")}
