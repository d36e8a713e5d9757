"""Locust load for any scoring endpoint, local or remote: POST JPEGs to /score, as Azure ML clients do.

    locust -f bench/locustfile.py --host http://127.0.0.1:5001 [--images DIR] [--key K] [--batch N]

Each request is one image (raw bytes) or, with --batch N, JSON {"images": [N base64 JPEGs]}, or with --requests DIR
the requests `scorehost serve --record DIR` kept, in turn (bench/loadgen.py's Bodies, as every other client). The
server's x-ms-run-fn-exec-ms (time inside run()) is recorded as a second request type, "run() [server]", so Locust's own
table splits each request's latency into model time and everything else (network, server, client).
"""

from __future__ import annotations

import os
import sys

from locust import FastHttpUser, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.loadgen import Bodies, error_message, succeeded  # noqa: E402
from bench.run import RUN_TIME_NAME  # noqa: E402


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--images", default="", help="directory of JPEG/PNG files (default: generated JPEGs)")
    parser.add_argument("--key", default="", help="send Authorization: Bearer KEY")
    parser.add_argument("--batch", type=int, default=1, help="images per request (>1 sends the JSON batch form)")
    parser.add_argument("--requests", default="", help="send the requests `scorehost serve --record DIR` kept instead")


class ScoringClient(FastHttpUser):
    """A closed-loop client: it sends the next request as soon as the last one is answered."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.key = {"Authorization": f"Bearer {options.key}"} if options.key else {}
        self.bodies = Bodies.chosen(options.images or None, options.batch, options.requests or None).requests()

    @task
    def score(self) -> None:
        _, content_type, body = self.bodies()
        with self.client.post("/score", data=body, headers={**self.key, "Content-Type": content_type},
                              name="/score", catch_response=True) as response:
            if not succeeded(response.status_code):
                response.failure(f"HTTP {response.status_code}: {error_message(response.content or b'')}")
                return
            run_ms = response.headers.get("x-ms-run-fn-exec-ms")
            if run_ms is not None:
                events.request.fire(request_type="RUN", name=RUN_TIME_NAME, response_time=float(run_ms),
                                    response_length=0, exception=None, context={})
