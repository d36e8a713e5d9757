"""Locust load for any scoring endpoint, local or remote: POST JPEGs to /score, as Azure ML clients do.

    locust -f bench/locustfile.py --host http://127.0.0.1:5001 [--images DIR] [--key K] [--batch N]

Each request is one image (raw bytes) or, with --batch N, JSON {"images": [N base64 JPEGs]}, or with --requests DIR
the requests `scorehost serve --record DIR` kept, in turn, each with its recorded method, query string and headers
(bench/loadgen.py's Bodies, as every other client; made once a process, shared by its users). The server's
x-ms-run-fn-exec-ms (time inside run()) is recorded as a second request type, "run() [server]", so Locust's own
table splits each request's latency into model time and everything else (network, server, client).
"""

from __future__ import annotations

import functools
import json
import os
import sys

from locust import FastHttpUser, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.loadgen import Bodies, Request, error_message, succeeded  # noqa: E402
from bench.run import RUN_TIME_NAME  # noqa: E402


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--images", default="", help="directory of JPEG/PNG files (default: generated JPEGs)")
    parser.add_argument("--key", default="", help="send Authorization: Bearer KEY")
    parser.add_argument("--batch", type=int, default=1, help="images per request (>1 sends the JSON batch form)")
    parser.add_argument("--requests", default="", help="send the requests `scorehost serve --record DIR` kept instead")
    parser.add_argument("--summary", default="", help="write the run's final figures to this JSON file at the end")


@events.quitting.add_listener
def _summary(environment, **_) -> None:
    """The run's figures once its users have stopped, per row name, in the words of Locust's CSV columns, and its
    failures, most frequent first. Locust's --csv files are written by a timer once a second and never at exit:
    they missed up to the last second of a run (80 of 95 requests in a 3 s run; an empty table for 1 s)."""
    path = environment.parsed_options.summary
    if not path:
        return
    rows = {entry.name: {"Request Count": entry.num_requests, "Failure Count": entry.num_failures,
                         "Requests/s": entry.total_rps, "Average Response Time": entry.avg_response_time,
                         **{f"{p}%": entry.get_response_time_percentile(p / 100) for p in (50, 95, 99)}}
            for entry in environment.stats.entries.values() if entry.num_requests or entry.num_failures}
    failures = sorted(((e.error if isinstance(e.error, str) else repr(e.error), e.occurrences)
                       for e in environment.stats.errors.values()), key=lambda f: -f[1])
    with open(path, "w") as f:
        json.dump({"rows": rows, "failures": failures}, f)


@functools.cache
def bodies(images: str, batch: int, requests: str) -> tuple[Bodies, str]:
    """What to send, made (or read: --requests) once for the process, not once for each of its users; and the
    Type of its one row in Locust's table, its methods: "POST", or "GET+POST" for a recording of both (Locust would
    keep a row per method, and bench reads one row, "/score")."""
    chosen = Bodies.chosen(images or None, batch, requests or None)
    return chosen, "+".join(sorted({head.method for head in chosen.heads} or {"POST"}))


class ScoringClient(FastHttpUser):
    """A closed-loop client: it sends the next request as soon as the last one is answered."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.key = {"Authorization": f"Bearer {options.key}"} if options.key else {}
        chosen, self.row_type = bodies(options.images, options.batch, options.requests)
        self.bodies = chosen.requests()

    @task
    def score(self) -> None:
        request: Request = self.bodies()
        method, query, recorded = request.head
        headers = {**dict(recorded), **self.key,
                   **({"Content-Type": request.content_type} if request.content_type else {})}
        with self.client.request(method, "/score" + (f"?{query}" if query else ""), data=request.body,
                                 headers=headers, name="/score", catch_response=True) as response:
            response.request_meta["request_type"] = self.row_type
            if not succeeded(response.status_code):
                response.failure(f"HTTP {response.status_code}: {error_message(response.content or b'')}")
                return
            run_ms = response.headers.get("x-ms-run-fn-exec-ms")
            if run_ms is not None:
                events.request.fire(request_type="RUN", name=RUN_TIME_NAME, response_time=float(run_ms),
                                    response_length=0, exception=None, context={})
