"""A @rawhttp script that streams its answer (Flask's `Response(generator)`, as a script streaming tokens does):
`?parts=N&gap_ms=M` yields N lines M ms apart; `?fail_at=K` raises after K parts (the head is out by then);
`?close_fails=1` registers a close callback that raises (it runs once the stream has ended); `?odd_at=K` yields a
dict as part K (a script that meant json.dumps)."""
import time

from azureml.contrib.services.aml_request import rawhttp
from flask import Response


def init():
    pass


@rawhttp
def run(request):
    parts = int(request.args.get("parts", "3"))
    gap_s = int(request.args.get("gap_ms", "0")) / 1000
    fail_at = int(request.args.get("fail_at", "-1"))
    odd_at = int(request.args.get("odd_at", "-1"))

    def lines():
        for i in range(parts):
            if i == fail_at:
                raise RuntimeError("the stream failed")
            if i:
                time.sleep(gap_s)
            yield {"part": i} if i == odd_at else f"part {i} of {parts}\n"

    response = Response(lines(), mimetype="text/plain")
    if request.args.get("close_fails"):
        response.call_on_close(lambda: 1 / 0)
    return response
