"""The load generator for every `scorehost bench` client that is not Locust: asyncio, keep-alive, raw HTTP/1.1,
for loads Locust cannot drive from one core (thousands of requests a second against a GPU server, the soak's mix).

    python -m bench.loadgen URL --clients 64 --seconds 20 [--images DIR] [--key K]     # closed loop
    python -m bench.loadgen URL --qps 500 --seconds 20 [--processes 4]                 # open loop, Poisson

Two ways to load a server:
- closed loop (`run`): each client keeps one connection and sends the next request as soon as the last is answered
  (the offline and single-stream scenarios, and the concurrency matrix);
- open loop (`open_loop`): requests are scheduled by a Poisson process at a fixed rate, whatever the server does,
  and each latency is measured from its scheduled send time, so a server that falls behind shows the queue it
  builds (no coordinated omission).
Either can be spread over several client processes (`processes=N`, each its share of the load) when one core
cannot carry the rate. `client_ceiling` measures the most this client sends on this machine, against a server that
answers at once (`trivial_server`), so that a result limited by the client can be marked as such.

Bodies come from a callable that returns a Request, (label, content type, body) and, for a recorded request, its
method, query string and headers (`Head`), so a caller can mix valid and bad requests, or send a script its own
traffic as it was recorded. The result counts answers by (label, status) and keeps every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import socket
import ssl
import statistics
import time
import urllib.parse
from typing import Callable, NamedTuple, Optional


class Head(NamedTuple):
    """A request's method, query string (sent after the target's scoring path) and headers besides Content-Type:
    a recorded request's (`Bodies.recorded`), or by default a POST with none."""
    method: str = "POST"
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()


class Request(NamedTuple):
    """One request to send; `label` names it in the result, and a content type of "" sends none. A plain (label,
    content type, body) is one, with the default head."""
    label: str
    content_type: str
    body: bytes
    head: Head = Head()


# A recorded request's headers not sent again: the connection's own (hop-by-hop, RFC 9110 7.6.1; also those its
# Connection header names), those the client sets itself (Host, Content-Length; Content-Type, which the Request
# carries apart), Expect (the body goes with the head: no 100 Continue is waited for) and the key (never recorded:
# --key sends one).
NOT_SENT = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                      "proxy-authorization", "proxy-authenticate", "host", "content-length", "content-type", "expect",
                      "authorization"))
NO_BODY = (204, 304)  # answers that never carry one, whatever their Content-Length (RFC 9112 6.3), nor does HEAD's
LATE = math.inf  # the latency of a request never answered (dropped, or still waiting when the run ended)


@dataclasses.dataclass
class LoadResult:
    seconds: float
    latencies_ms: list[float] = dataclasses.field(default_factory=list)  # answered requests, any status
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)  # "label status" -> count
    dropped: int = 0  # connections that closed or failed without an answer
    run_ms: list[float] = dataclasses.field(default_factory=list)  # x-ms-run-fn-exec-ms
    unanswered: int = 0  # open loop: still waiting when the run ended
    scheduled_s: list[float] = dataclasses.field(default_factory=list)  # open loop: each answer's send time, from start
    stopped_early: bool = False  # open loop: ended once its latency bound was already missed (see open_loop)
    error_samples: dict[str, str] = dataclasses.field(default_factory=dict)  # status -> one answer's message
    ok: list[bool] = dataclasses.field(default_factory=list)  # per latency: a 2xx (a result made without: all)

    def __post_init__(self) -> None:
        if not self.ok:
            self.ok = [True] * len(self.latencies_ms)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def successes(self) -> int:
        """Answers with a 2xx: the requests a server carried (an error answer, however fast, carried none)."""
        return self.answered - sum(n for status, n in self.errors().items() if status != "no answer")

    @property
    def sent(self) -> int:
        return self.answered + self.dropped + self.unanswered

    def percentile(self, q: float, with_errors: bool = True) -> float:
        """Over every request sent, or without those answered with an error (`with_errors` False: a fast 500 is no
        fast answer); one without an answer counts as slower than any answered (LATE) either way."""
        missing = self.dropped + self.unanswered
        ordered = sorted(self.latencies_ms if with_errors else
                         [ms for ms, ok in zip(self.latencies_ms, self.ok) if ok])
        n = len(ordered) + missing
        if not n:
            return 0.0
        i = min(n - 1, int(q / 100 * n))
        return ordered[i] if i < len(ordered) else LATE

    def missed(self, bound_ms: float) -> int:
        """Requests that missed a latency bound: answered after it or with an error, or never answered."""
        return sum(not ok or ms > bound_ms for ms, ok in zip(self.latencies_ms, self.ok)) + self.dropped \
            + self.unanswered

    def errors(self) -> dict[str, int]:
        """Failures by status ("no answer": dropped or unanswered). Any answer but a 2xx is one: a script that
        refuses what it is sent (400) carries no requests, however fast it says so."""
        counts: dict[str, int] = {}
        for name, n in self.statuses.items():
            status = name.rsplit(" ", 1)[-1]
            if not succeeded(int(status)):
                counts[status] = counts.get(status, 0) + n
        if self.dropped or self.unanswered:
            counts["no answer"] = self.dropped + self.unanswered
        return counts

    def failures(self) -> int:
        return sum(self.errors().values())

    def top_error(self) -> str:
        """The most common failure, with one answer's message where there was one: `400: Expecting value...`."""
        counts = self.errors()
        if not counts:
            return ""
        status = max(counts, key=counts.__getitem__)
        return f"{status}: {self.error_samples[status]}" if self.error_samples.get(status) else status

    def summary(self) -> dict:
        return {"requests": self.answered, "req_s": self.answered / self.seconds, "dropped": self.dropped,
                "p50_ms": self.percentile(50), "p95_ms": self.percentile(95), "p99_ms": self.percentile(99),
                "run_mean_ms": statistics.fmean(self.run_ms) if self.run_ms else 0.0, "statuses": self.statuses}

    def merge(self, other: "LoadResult") -> "LoadResult":
        """Two client processes' results as one (the same run, run side by side)."""
        statuses = dict(self.statuses)
        for name, n in other.statuses.items():
            statuses[name] = statuses.get(name, 0) + n
        return LoadResult(max(self.seconds, other.seconds), self.latencies_ms + other.latencies_ms, statuses,
                          self.dropped + other.dropped, self.run_ms + other.run_ms,
                          self.unanswered + other.unanswered, self.scheduled_s + other.scheduled_s,
                          self.stopped_early or other.stopped_early, {**other.error_samples, **self.error_samples},
                          self.ok + other.ok)


def succeeded(status: int) -> bool:
    return 200 <= status < 300


def error_message(body: bytes, limit: int = 200) -> str:
    """An error answer's body as one short line: its JSON "message" (scorehost's and AIHS's), else its text."""
    text = body.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("message")
        text = message if isinstance(message, str) else text
    except (ValueError, AttributeError):
        pass
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if method == "HEAD" or status in NO_BODY:
        return status, headers, b""
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


class _Target:
    """Where requests go: a server's base URL (/score appended) or its full scoring URL; https and a key allowed."""

    def __init__(self, url: str, key: str):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self.host, tls = parts.hostname, parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.path = parts.path if parts.path.endswith("/score") else parts.path + "/score"
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.own = f"Host: {parts.netloc}\r\n{auth}"  # the headers this client sets on every request
        self.ssl = ssl.create_default_context() if tls else None

    async def connect(self):
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl)

    async def exchange(self, conn, request: Request, started: float, result: LoadResult) -> tuple[int, bool]:
        """Send one request (a Request, or a plain (label, content type, body)) on `conn`, record its answer with its
        latency from `started`: (status, conn reusable)."""
        label, content_type, body, (method, query, extra) = \
            request if isinstance(request, Request) else Request(*request)
        reader, writer = conn
        fields = "".join([f"{k}: {v}\r\n" for k, v in extra]) if extra else ""
        if content_type:
            fields += f"Content-Type: {content_type}\r\n"
        writer.write(f"{method} {self.path}{'?' if query else ''}{query} HTTP/1.1\r\n{self.own}{fields}Content-Length: "
                     f"{len(body)}\r\n\r\n".encode("latin-1") + body)  # latin-1: recorded values are WSGI's bytes
        status, headers, answer = await _read_response(reader, method)
        result.latencies_ms.append((time.monotonic() - started) * 1000)
        result.ok.append(succeeded(status))
        name = f"{label} {status}"
        result.statuses[name] = result.statuses.get(name, 0) + 1
        if not succeeded(status) and str(status) not in result.error_samples:
            result.error_samples[str(status)] = error_message(answer)
        if "x-ms-run-fn-exec-ms" in headers:
            result.run_ms.append(float(headers["x-ms-run-fn-exec-ms"]))
        return status, headers.get("connection", "").lower() != "close"


_FAILED = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError)


async def _client(target: _Target, next_request: Callable[[], Request], deadline: float,
                  result: LoadResult) -> None:
    conn = None
    while time.monotonic() < deadline:
        request = next_request()
        try:
            if conn is None:
                conn = await target.connect()
            if not (await target.exchange(conn, request, time.monotonic(), result))[1]:
                conn[1].close()
                conn = None
        except _FAILED:
            result.dropped += 1
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)
    if conn is not None:
        conn[1].close()


CLOSED_GRACE_S = 60.0  # closed loop: how long past its end the last answers may take before the run gives up


async def _closed_loop(target: _Target, next_request: Callable[[], Request], start_at: float, seconds: float,
                       clients: int) -> LoadResult:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    result, started = LoadResult(seconds), time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(_client(target, next_request, started + seconds, result)
                                                for _ in range(clients))), seconds + CLOSED_GRACE_S)
    except asyncio.TimeoutError:  # a server that stopped answering: what came back counts, and the run ends
        pass
    result.seconds = time.monotonic() - started  # until the last answer: the requests sent before the end count
    return result


ARRIVALS = ("poisson", "uniform")  # open loop: MLPerf's server scenario, or wrk2's constant throughput


async def _open_loop(target: _Target, next_request: Callable[[], Request], start_at: float, seconds: float,
                     rate: float, seed: int, drain_s: float, bound_ms: Optional[float],
                     arrivals: str = "poisson", phase: float = 0.0) -> LoadResult:
    """Arrivals at `rate` for `seconds` (Poisson, or "uniform": one every 1/rate from `phase`, as wrk2's constant
    throughput), then up to `drain_s` more for the answers still due.

    With `bound_ms`, the run ends as soon as more than 1% of the requests it plans have missed the bound (answered
    after it or with anything but a 2xx, dropped, or still unanswered past it): its p99 can no longer meet the
    bound."""
    result = LoadResult(seconds)
    rng = random.Random(seed)
    idle: list = []
    slots = asyncio.Semaphore(max(16, _raise_open_files_limit() - 64))  # past that many, requests wait (clock on)
    waiting: dict[int, float] = {}  # request number -> scheduled time
    allowed_misses = int(0.01 * rate * seconds)
    missed = 0
    done = asyncio.Event()

    async def one(number: int, scheduled: float) -> None:
        nonlocal missed
        waiting[number] = scheduled
        request, conn = next_request(), None
        try:
            async with slots:
                while True:
                    reused = bool(idle)
                    conn = idle.pop() if idle else await target.connect()
                    try:
                        status, reusable = await target.exchange(conn, request, scheduled, result)
                        break
                    except _FAILED:  # a kept-alive connection the server closed meanwhile: once more on a new one
                        conn[1].close()
                        conn = None
                        if not reused:
                            raise
                (idle.append if reusable else lambda c: c[1].close())(conn)
                result.scheduled_s.append(scheduled - start_at)
                missed += bound_ms is not None and (not succeeded(status) or result.latencies_ms[-1] > bound_ms)
        except _FAILED:
            result.dropped += 1
            missed += 1
            if conn is not None:
                conn[1].close()
        finally:
            del waiting[number]

    async def watch() -> None:
        while not done.is_set():
            now = time.monotonic()
            if missed + sum(1 for t in waiting.values() if (now - t) * 1000 > bound_ms) > allowed_misses:
                result.stopped_early = True
                done.set()
            await asyncio.sleep(0.02)

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    watcher = asyncio.create_task(watch()) if bound_ms is not None else None
    tasks: set = set()
    t = phase
    for number in itertools.count():
        t += 1 / rate if arrivals == "uniform" else rng.expovariate(rate)
        if t >= seconds or done.is_set():
            break
        delay = start_at + t - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(done.wait(), delay)
                break
            except asyncio.TimeoutError:
                pass
        task = asyncio.create_task(one(number, start_at + t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:  # even after an early end: what was sent is answered before the next run starts on this server
        await asyncio.wait(list(tasks), timeout=drain_s)
    done.set()
    result.unanswered = len(waiting)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if watcher:
        await watcher
    for _, writer in idle:
        writer.close()
    return result


def _raise_open_files_limit() -> int:
    """The open loop holds one connection per waiting request: allow as many as the system lets this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return min(soft, 65536)


@dataclasses.dataclass(frozen=True)
class Bodies:
    """What to send, built once and handed to each client process: (label, content type, body) in turn, each with
    its Head where `heads` has them (recorded requests). The heads are kept beside the items, not in them, so that
    what re-shapes the items (bench/peers' `bodies`, for a peer's own body format) keeps them."""
    items: tuple[tuple[str, str, bytes], ...]
    heads: tuple[Head, ...] = ()

    @classmethod
    def images(cls, directory: Optional[str] = None, batch: int = 1) -> "Bodies":
        """The image corpus (scorehost/corpus.py, or the JPEGs and PNGs in `directory`), `batch` images a request."""
        import base64

        from scorehost import corpus

        images = corpus.load(directory)
        if batch <= 1:
            return cls(tuple(("image", "image/jpeg", b) for b in images))
        cycle = itertools.cycle(images)
        return cls(tuple(("batch", "application/json",
                          json.dumps({"images": [base64.b64encode(next(cycle)).decode() for _ in range(batch)]}).encode())
                         for _ in images))

    @classmethod
    def recorded(cls, directory: str) -> "Bodies":
        """The requests to /score that `scorehost serve --record DIR` kept (server/record.py), in recording order,
        each as its client sent it: method, query string, headers (less NOT_SENT) and body, since a script may read
        any of them (`request.args`, a header): a script's own traffic, for one that takes no images. Requests to
        other routes (/swagger.json, a 404) were answered by the server, not the script: left out. ValueError, in
        one line, for a directory that holds none."""
        from server import record

        exchanges = [e for e in record.load(directory) if e.path == "/score"]
        if not exchanges:
            raise ValueError(f"{directory} holds no recorded requests to /score")
        return cls(tuple(("recorded", next((v for k, v in e.request_headers if k.lower() == "content-type"), ""),
                          e.request_body) for e in exchanges),
                   tuple(Head(e.method, e.query, sent_again(e.request_headers)) for e in exchanges))

    @classmethod
    def chosen(cls, images: Optional[str] = None, batch: int = 1, requests: Optional[str] = None) -> "Bodies":
        """What bench and tune send: the recorded requests in `requests` (--requests DIR), else images."""
        return cls.recorded(requests) if requests else cls.images(images, batch)

    def requests(self) -> Callable[[], Request]:
        """The requests in turn, from the first (a list of references to the items: no body is copied)."""
        heads = self.heads or itertools.repeat(Head())
        return itertools.cycle([Request(*item, head) for item, head in zip(self.items, heads)]).__next__


def sent_again(headers: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A recorded request's headers as a client sends them again: less NOT_SENT and those its Connection header
    names (hop-by-hop as well)."""
    named = {name.strip().lower() for k, v in headers if k.lower() == "connection" for name in v.split(",")}
    return tuple((k, v) for k, v in headers if k.lower() not in NOT_SENT and k.lower() not in named)


def _in_this_process(job: tuple) -> LoadResult:
    loop, url, key, bodies, start_at, seconds, kwargs = job
    return asyncio.run(loop(_Target(url, key), bodies.requests(), start_at, seconds, **kwargs))


def _spread(loop, url: str, key: str, bodies: Bodies, seconds: float, shares: list[dict]) -> LoadResult:
    """Run `loop` in one process per share (its own keyword arguments), all starting together; one merged result."""
    start_at = time.monotonic() + (0.1 if len(shares) == 1 else 2.0)  # time for client processes to start
    jobs = [(loop, url, key, bodies, start_at, seconds, share) for share in shares]
    if len(jobs) == 1:
        return _in_this_process(jobs[0])
    with concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_in_this_process, jobs))
    merged = results[0]
    for r in results[1:]:
        merged = merged.merge(r)
    return merged


def run(base_url: str, clients: int, seconds: float, next_request: Callable[[], Request], key: str = "") -> LoadResult:
    """Closed loop in this process with any body callable. Bounded in time: every client stops at `seconds`."""
    return asyncio.run(_closed_loop(_Target(base_url, key), next_request, time.monotonic(), seconds, clients))


def closed_loop(url: str, clients: int, seconds: float, bodies: Optional[Bodies] = None, key: str = "",
                processes: int = 1) -> LoadResult:
    """`clients` closed-loop clients in all, spread over `processes` client processes."""
    processes = max(1, min(processes, clients))
    shares = [{"clients": clients // processes + (i < clients % processes)} for i in range(processes)]
    return _spread(_closed_loop, url, key, bodies or Bodies.images(), seconds, shares)


def open_loop(url: str, rate: float, seconds: float, bodies: Optional[Bodies] = None, key: str = "", processes: int = 1,
              drain_s: float = 30.0, bound_ms: Optional[float] = None, seed: int = 0,
              arrivals: str = "poisson") -> LoadResult:
    """Arrivals at `rate` a second in all, Poisson (each of `processes` sends an independent Poisson share: their
    sum is Poisson at `rate`) or uniform (the shares interleave: one request every 1/rate in all); latencies from
    the scheduled send times. See _open_loop for `drain_s` and `bound_ms`."""
    if rate <= 0:
        raise ValueError(f"the open loop needs a rate above 0, got {rate}")
    shares = [{"rate": rate / processes, "seed": seed * 1000 + i, "drain_s": drain_s, "bound_ms": bound_ms,
               "arrivals": arrivals, "phase": i / rate if arrivals == "uniform" else 0.0} for i in range(processes)]
    return _spread(_open_loop, url, key, bodies or Bodies.images(), seconds, shares)


async def _answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            writer.write(answer[:-2] if head.startswith(b"HEAD ") else answer)  # the answer to a HEAD has no body
    except _FAILED:
        writer.close()


def _serve_trivially(sock: socket.socket) -> None:
    async def serve() -> None:
        server = await asyncio.start_server(_answer_at_once, sock=sock, backlog=4096)
        await server.serve_forever()

    asyncio.run(serve())


class trivial_server:
    """A server that reads each request and answers `{}` at once, in `processes` processes sharing one socket: what
    a load is left with when the server costs nothing (the client's own ceiling). A context manager: its URL."""

    def __init__(self, processes: int = 1):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        context = multiprocessing.get_context("fork")  # the listening socket is inherited
        self.procs = [context.Process(target=_serve_trivially, args=(self.sock,), daemon=True) for _ in range(processes)]

    def __enter__(self) -> str:
        for p in self.procs:
            p.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
            p.join()
        self.sock.close()


def connect_error(url: str) -> str:
    """Why no connection to `url` opens ("" when one does): a run against it would measure nothing but errors."""
    target = _Target(url, "")
    try:
        socket.create_connection((target.host, target.port), timeout=10).close()
    except OSError as ex:
        return ex.strerror or str(ex)
    return ""


def client_ceiling(bodies: Optional[Bodies] = None, processes: int = 1, seconds: float = 2.0) -> float:
    """Requests a second this client carries against trivial_server on this machine (closed loop, 64 connections
    per process; the trivial server shares the machine, so this is a floor of what the client alone could do)."""
    with trivial_server(max(1, min(processes, (os.cpu_count() or 1) // 2))) as url:
        result = closed_loop(url, 64 * processes, seconds, bodies, processes=processes)
    return result.answered / seconds


def image_requests(directory: Optional[str] = None, batch: int = 1) -> Callable[[], Request]:
    return Bodies.images(directory, batch).requests()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8, help="closed loop: concurrent clients")
    parser.add_argument("--qps", type=float, help="open loop instead: arrivals at this rate a second")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson", help="open loop: how requests are spaced")
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--images")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--key", default="")
    args = parser.parse_args()
    if args.qps is not None and args.qps <= 0:
        parser.error(f"--qps must be above 0, got {args.qps:g}")
    bodies = Bodies.images(args.images, args.batch)
    if args.qps:
        result = open_loop(args.url, args.qps, args.seconds, bodies, args.key, args.processes,
                           arrivals=args.arrivals)
    else:
        result = closed_loop(args.url, args.clients, args.seconds, bodies, args.key, args.processes)
    print(json.dumps(result.summary(), indent=1))


if __name__ == "__main__":
    main()
