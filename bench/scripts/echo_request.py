"""A script whose answer depends on more than the body, as many users' do: @rawhttp, it reads the method, the query
string and headers. It answers what it saw and, with ECHO_LOG set, appends it to that file (one JSON line a call), so
the tests can check that `scorehost bench --requests DIR` sends it each recorded request as it was recorded, not only
its body."""
import json
import os

from azureml.contrib.services.aml_request import rawhttp


def init():
    pass


@rawhttp
def run(request):
    seen = {"method": request.method, "query": request.query_string.decode("latin-1"),
            "tenant": request.headers.get("X-Tenant"), "user_agent": request.headers.get("User-Agent"),
            "content_type": request.headers.get("Content-Type"), "body": request.get_data(as_text=True)}
    if os.environ.get("ECHO_LOG"):
        with open(os.environ["ECHO_LOG"], "a") as f:
            f.write(json.dumps(seen) + "\n")
    return seen
