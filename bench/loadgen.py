"""A lean closed-loop HTTP load generator (asyncio, keep-alive, one process) for loads Locust cannot drive from one
core: thousands of requests per second against a GPU server, or the soak's mixed traffic.

    python -m bench.loadgen URL --clients 64 --seconds 20 [--images DIR] [--key K]

Each client keeps one connection and sends the next request as soon as the last is answered. Bodies come from a
callable that returns (label, content type, body), so a caller can mix valid and bad requests. The result counts
answers by (label, status) and keeps every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import time
import urllib.parse
from typing import Callable, Optional

Request = tuple[str, str, bytes]  # label, content type, body


@dataclasses.dataclass
class LoadResult:
    seconds: float
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)  # "label status" -> count
    dropped: int = 0  # connections that closed or failed without an answer
    run_ms: list[float] = dataclasses.field(default_factory=list)  # x-ms-run-fn-exec-ms

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> dict:
        return {"requests": self.answered, "req_s": self.answered / self.seconds, "dropped": self.dropped,
                "p50_ms": self.percentile(50), "p95_ms": self.percentile(95), "p99_ms": self.percentile(99),
                "run_mean_ms": statistics.fmean(self.run_ms) if self.run_ms else 0.0, "statuses": self.statuses}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _client(url: urllib.parse.SplitResult, next_request: Callable[[], Request], deadline: float,
                  key: str, result: LoadResult) -> None:
    reader = writer = None
    while time.perf_counter() < deadline:
        label, content_type, body = next_request()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
            auth = f"Authorization: Bearer {key}\r\n" if key else ""
            writer.write(f"POST {url.path or ''}/score HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {content_type}"
                         f"\r\nContent-Length: {len(body)}\r\n{auth}\r\n".encode() + body)
            started = time.perf_counter()
            status, headers, _ = await _read_response(reader)
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            name = f"{label} {status}"
            result.statuses[name] = result.statuses.get(name, 0) + 1
            if "x-ms-run-fn-exec-ms" in headers:
                result.run_ms.append(float(headers["x-ms-run-fn-exec-ms"]))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.dropped += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _run(base_url: str, clients: int, seconds: float, next_request: Callable[[], Request],
               key: str) -> LoadResult:
    url = urllib.parse.urlsplit(base_url.rstrip("/"))
    result = LoadResult(seconds)
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(_client(url, next_request, deadline, key, result) for _ in range(clients)))
    return result


def run(base_url: str, clients: int, seconds: float, next_request: Callable[[], Request], key: str = "") -> LoadResult:
    """Bounded in time: every client stops at `seconds`; only the loopback or the given endpoint is loaded."""
    return asyncio.run(_run(base_url, clients, seconds, next_request, key))


def image_requests(directory: Optional[str] = None, batch: int = 1) -> Callable[[], Request]:
    import base64

    from scorehost import corpus

    images = corpus.load(directory)
    if batch > 1:
        cycle = itertools.cycle(images)
        bodies = [json.dumps({"images": [base64.b64encode(next(cycle)).decode() for _ in range(batch)]}).encode()
                  for _ in images]
        requests = itertools.cycle([("batch", "application/json", b) for b in bodies])
    else:
        requests = itertools.cycle([("image", "image/jpeg", b) for b in images])
    return lambda: next(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--images")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--key", default="")
    args = parser.parse_args()
    result = run(args.url, args.clients, args.seconds, image_requests(args.images, args.batch), args.key)
    print(json.dumps(result.summary(), indent=1))


if __name__ == "__main__":
    main()
