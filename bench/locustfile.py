"""Locust load for any scoring endpoint, local or remote: POST JPEGs to /score, as Azure ML clients do.

    locust -f bench/locustfile.py --host http://127.0.0.1:5001 [--images DIR] [--key K] [--batch N]

Each request is one image (raw bytes) or, with --batch N, JSON {"images": [N base64 JPEGs]}. The server's
x-ms-run-fn-exec-ms (time inside run()) is recorded as a second request type, "run() [server]", so Locust's own
table splits each request's latency into model time and everything else (network, server, client).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import sys

from locust import FastHttpUser, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scorehost import corpus  # noqa: E402
from bench.run import RUN_TIME_NAME  # noqa: E402


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--images", default="", help="directory of JPEG/PNG files (default: generated JPEGs)")
    parser.add_argument("--key", default="", help="send Authorization: Bearer KEY")
    parser.add_argument("--batch", type=int, default=1, help="images per request (>1 sends the JSON batch form)")


class ScoringClient(FastHttpUser):
    """A closed-loop client: it sends the next request as soon as the last one is answered."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        images = corpus.load(options.images)
        self.headers = {"Authorization": f"Bearer {options.key}"} if options.key else {}
        if options.batch > 1:
            cycle = itertools.cycle(images)
            bodies = [json.dumps({"images": [base64.b64encode(next(cycle)).decode()
                                             for _ in range(options.batch)]}).encode() for _ in images]
            self.headers["Content-Type"] = "application/json"
        else:
            bodies = images
            self.headers["Content-Type"] = "image/jpeg"
        self.bodies = itertools.cycle(bodies)

    @task
    def score(self) -> None:
        with self.client.post("/score", data=next(self.bodies), headers=self.headers, name="/score",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200] if response.text else ''}")
                return
            run_ms = response.headers.get("x-ms-run-fn-exec-ms")
            if run_ms is not None:
                events.request.fire(request_type="RUN", name=RUN_TIME_NAME, response_time=float(run_ms),
                                    response_length=0, exception=None, context={})
